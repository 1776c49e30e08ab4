"""The long-lived ``lvm`` shell: one process fed one command per line.

This is the protocol lvm2's own D-Bus daemon speaks (lvmdbusd): with the
``lvmdbusd`` command profile, each command's report and its command log come
as one JSON document on ``LVM_REPORT_FD``; the log's "shell" entry holds the
command's status, and ``lastlog`` the messages of a failure. It saves a
process start and LVM's initialisation per command. This module carries the
protocol only; which commands are sent is ``commands``' business.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence

import structlog

from csi_lvm.lvm.errors import LvmError, LvmTimeout
from csi_lvm.lvm.process import finish_in_background, run_to_completion

log = structlog.get_logger("csi_lvm.lvm")

# What the shell runs; anything else (``version``) runs as a process.
SHELL_VERBS = frozenset({"lvs", "vgs", "lvcreate", "lvremove", "lvchange", "lvextend"})
_REPORT_VERBS = frozenset({"lvs", "vgs"})
# lvm splits a shell line into at most 64 words (MAX_ARGS in lvm2's tools).
_SHELL_MAX_WORDS = 60
# The command profile lvm2 ships for lvmdbusd: JSON reports, bytes, and a
# command log whose "shell" entry carries each command's return code.
SHELL_PROFILE = "lvmdbusd"
_SUCCESS = 1  # ECMD_PROCESSED, lvm's return code for success


class ShellUnavailable(Exception):
    """The shell cannot be used (it failed to start or speaks another protocol)."""


class ShellDied(LvmError):
    """The shell ended; ``sent`` tells whether it may have run the command."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


def shell_line(args: Sequence[str]) -> str | None:
    """``args`` as one line for the lvm shell, or None when its simple
    quoting (a word may start with a quote and ends at the same quote) cannot
    carry them."""
    if not args or len(args) > _SHELL_MAX_WORDS:
        return None
    words = []
    for arg in args:
        if not arg or any(c in arg for c in "\n\r\0"):
            return None
        if '"' not in arg:
            words.append(f'"{arg}"')
        elif "'" not in arg:
            words.append(f"'{arg}'")
        else:
            return None
    return " ".join(words) + "\n"


def shell_status(report: dict[str, object]) -> int | None:
    """The return code of the shell's entry in a command log, if any."""
    entries = report.get("log")
    if not isinstance(entries, list):
        return None
    code = None
    for entry in entries:
        if (
            isinstance(entry, dict)
            and entry.get("log_context") == "shell"
            and entry.get("log_object_type") == "cmd"
        ):
            try:
                code = int(entry.get("log_ret_code", ""))
            except ValueError:
                return None
    return code


def log_errors(report: dict[str, object]) -> str:
    """The messages of a command log (``lastlog``), one per line, as a
    command run on its own would print them on stderr: errors and warnings,
    not its status entries or ordinary output."""
    entries = report.get("log")
    if not isinstance(entries, list):
        return ""
    return "\n".join(
        str(e.get("log_message", ""))
        for e in entries
        if isinstance(e, dict) and e.get("log_type") not in ("status", "print", None)
    )


class _Turns:
    """Whose command the shell runs next: waiting reports first, then
    waiting changes, each in the order they came (a command that just ran
    never takes the shell again before those already waiting). A report
    takes as long as one change, and a queue of creates (sixteen at once
    from a provisioner) would otherwise keep the kept view's refresh waiting
    behind all of them, until every call that needs a view waits for a
    report of its own. Changes wait only while reports do; those are the
    refreshes and single-LV reads, never steady."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._reports: collections.deque[object] = collections.deque()
        self._changes: collections.deque[object] = collections.deque()

    def take(self, report: bool, timeout: float | None) -> bool:
        """Wait for the shell (``timeout`` seconds, None: without end);
        False when the time ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me, queue = object(), self._reports if report else self._changes
        with self._cond:
            queue.append(me)
            try:
                while self._busy or (self._reports or self._changes)[0] is not me:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                self._busy = True
                return True
            finally:
                queue.remove(me)
                self._cond.notify_all()  # the next in line may go

    def take_if_free(self) -> bool:
        with self._cond:
            if self._busy or self._reports or self._changes:
                return False
            self._busy = True
            return True

    def give_back(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class LvmShell:
    """One long-lived ``lvm`` process fed one command per line on stdin.

    LVM writes each command's report, followed by its command log, as one
    JSON document to ``LVM_REPORT_FD``; the log's "shell" entry says whether
    the command succeeded, and ``lastlog`` gives the messages of a failure.
    Commands run one at a time, reports before changes (``_Turns``). A
    command that outlives its timeout is left to finish on its own while a
    new shell takes the next command; a shell that dies is started again for
    the next command. When the shell cannot be started or
    does not speak this protocol (an LVM without the lvmdbusd profile, for
    example), it is given up for good and every command runs as a process.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str], idle_exit: float = 0.0) -> None:
        self.command = list(command)
        # Seconds without a command after which the shell is ended (0: never).
        # A busy lvm keeps tens of MiB resident (its locked memory and
        # caches); an idle node should not pay for that.
        self.idle_exit = idle_exit
        self._last_used = time.monotonic()
        self.env = {
            **env,
            "LVM_COMMAND_PROFILE": SHELL_PROFILE,
            # The shell logs to the command log without end; never abort on it.
            "LVM_LOG_FILE_MAX_LINES": "0",
        }
        self.disabled = False
        self._turns = _Turns()
        self._process: subprocess.Popen[bytes] | None = None
        self._report_fd = -1

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def execute(
        self, args: Sequence[str], timeout: float
    ) -> tuple[dict[str, object], int, str] | None:
        """Run ``args``: (report without its log, return code, error
        messages), or None when the command must run as a process instead."""
        line = shell_line(args)
        if self.disabled or line is None or args[0] not in SHELL_VERBS:
            return None
        deadline = time.monotonic() + timeout
        if not self._turns.take(args[0] in _REPORT_VERBS, timeout):
            raise LvmTimeout(
                f"lvm {args[0]} did not start within {timeout:.1f}s (LVM is busy); "
                "the call may be retried"
            )
        try:
            for attempt in (1, 2):
                if self._process is None:
                    try:
                        self._start(deadline)
                    except ShellUnavailable as exc:
                        self.disabled = True
                        self._stop()
                        log.warning(
                            "lvm shell unavailable; one process per command", reason=str(exc)
                        )
                        return None
                try:
                    report = self._command(line, args[0], deadline)
                    break
                except ShellDied as exc:
                    # A report is safe to ask again, and so is a change the
                    # shell never received; a new shell takes it.
                    log.warning("lvm shell died", verb=args[0], error=str(exc))
                    if attempt == 2 or (exc.sent and args[0] not in ("lvs", "vgs")):
                        raise
            code = shell_status(report)
            if code is None:
                self._stop()
                raise LvmError(f"lvm {args[0]}: the lvm shell reported no status; retry")
            messages = ""
            if code != _SUCCESS:
                messages = log_errors(self._command("lastlog\n", args[0], deadline))
            report.pop("log", None)
            return report, 0 if code == _SUCCESS else code, messages
        finally:
            self._last_used = time.monotonic()
            self._turns.give_back()

    def _exit_when_idle(self, process: subprocess.Popen[bytes]) -> None:
        """Beside one shell process: end it once no command came for
        ``idle_exit`` seconds; the next command starts a new one."""
        while True:
            time.sleep(max(0.5, self._last_used + self.idle_exit - time.monotonic()))
            if not self._turns.take_if_free():
                continue  # a command is running or waiting
            try:
                if self._process is not process:
                    return  # already replaced or stopped
                if time.monotonic() - self._last_used >= self.idle_exit:
                    self._stop()
                    log.debug("lvm shell ended after idling", seconds=self.idle_exit)
                    return
            finally:
                self._turns.give_back()

    def _start(self, deadline: float) -> None:
        read_end, write_end = os.pipe()
        try:
            self._process = subprocess.Popen(
                self.command,
                start_new_session=True,  # a signal to the driver's group never reaches it
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**self.env, "LVM_REPORT_FD": str(write_end)},
                pass_fds=(write_end,),
                cwd="/",
            )
        except OSError as exc:
            os.close(read_end)
            raise ShellUnavailable(f"cannot start {self.command[0]}: {exc}") from exc
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self._report_fd = read_end
        try:
            report = self._command(
                '"vgs" "-o" "vg_name" "--reportformat" "json"\n', "vgs", deadline
            )
        except LvmTimeout:
            self._stop()  # slow, not broken: the next command tries again
            raise
        except (LvmError, OSError) as exc:
            raise ShellUnavailable(
                f"the lvm shell did not answer: {exc}; {self._why_not()}"
            ) from exc
        if shell_status(report) != _SUCCESS:
            raise ShellUnavailable(f"the lvm shell answered without a command log: {report}")
        log.info("lvm shell started", pid=self._process.pid)
        if self.idle_exit > 0:
            threading.Thread(
                target=self._exit_when_idle, args=(self._process,), name="lvm-idle", daemon=True
            ).start()

    def _why_not(self) -> str:
        """What lvm says when started as the shell with no input: the reason
        it cannot serve (a missing command profile, most often)."""
        try:
            done = run_to_completion(self.command, self.env, 30.0)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"lvm could not be asked why: {exc}"
        said = " ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        return f"lvm exited {done.returncode}: {said or 'without a message'}"

    def _command(self, line: str, verb: str, deadline: float) -> dict[str, object]:
        """Send one line and read one JSON document from the report pipe."""
        process = self._process
        if process is None or process.stdin is None:
            raise ShellDied(f"lvm {verb}: the lvm shell is not running; retry", sent=False)
        try:
            process.stdin.write(line.encode())
            process.stdin.flush()
        except OSError as exc:
            self._stop()
            raise ShellDied(
                f"lvm {verb}: the lvm shell is gone ({exc}); retry", sent=False
            ) from exc
        # A report of a thousand LVs is megabytes in pipe-sized chunks: they
        # are joined only when one ends as a document can.
        chunks: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stop()
                raise LvmTimeout(
                    f"lvm {verb} did not finish in time (it is left to finish on its own); "
                    "the call may be retried"
                )
            ready, _, _ = select.select([self._report_fd], [], [], min(remaining, 1.0))
            if not ready:
                if process.poll() is not None:
                    self._stop()
                    raise ShellDied(
                        f"lvm {verb}: the lvm shell died; the call may be retried", True
                    )
                continue
            chunk = os.read(self._report_fd, 1 << 20)
            if not chunk:
                self._stop()
                raise ShellDied(f"lvm {verb}: the lvm shell died; the call may be retried", True)
            chunks.append(chunk)
            if chunk.rstrip().endswith(b"}"):
                data = b"".join(chunks)
                chunks = [data]
                try:
                    report = json.loads(data)
                except json.JSONDecodeError:
                    continue  # a "}" inside an unfinished document
                if not isinstance(report, dict):
                    self._stop()
                    raise LvmError(f"lvm {verb}: unexpected report {data[:200]!r}")
                return report

    def _stop(self) -> None:
        process, self._process = self._process, None
        if self._report_fd >= 0:
            os.close(self._report_fd)
            self._report_fd = -1
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if process.poll() is None:
            # Never kill LVM in the middle of a command: a thin-pool change cut
            # short can leave the kernel's transaction id behind LVM's
            # metadata, and LVM then refuses the pool. With its input closed
            # the shell exits once its command is done; a thread reaps it.
            finish_in_background(process)

    def close(self) -> None:
        """End the shell: it exits when its input ends."""
        self._turns.take(report=False, timeout=None)
        try:
            process = self._process
            if process is not None and process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
            self._stop()
            self.disabled = True
        finally:
            self._turns.give_back()
