"""The only code that runs LVM.

Every command goes through ``Lvm.run``: an argument list (never a shell),
``LC_ALL=C`` so messages can be classified, and a timeout taken from the
caller's deadline. Reads always ask for JSON reports in bytes and decode them
into typed records; the ``lv_attr`` string is decoded once, here, into named
states. Failures become the domain errors of ``csi_lvm.errors``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from csi_lvm.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DriverError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = structlog.get_logger("csi_lvm.lvm")

LV_FIELDS = (
    "lv_name,vg_name,lv_uuid,lv_size,lv_attr,pool_lv,origin,lv_tags,"
    "data_percent,metadata_percent,lv_path,lv_dm_path,lv_time"
)
VG_COLUMNS = "vg_size,vg_free,vg_extent_size,vg_attr,vg_missing_pv_count"
VG_FIELDS = f"vg_name,{VG_COLUMNS}"
_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
_TAG_RE = re.compile(r"[A-Za-z0-9_+.:/=!&#][A-Za-z0-9_+.:/=!&#-]{0,1023}")


class LvmError(Internal):
    """An LVM command failed for a reason we could not classify."""


class LvmNotFound(NotFound):
    pass


class LvmAlreadyExists(AlreadyExists):
    pass


class LvmNoSpace(ResourceExhausted):
    pass


class LvmInUse(FailedPrecondition):
    """The LV is open (mounted, or read by a copy), so LVM will not remove it."""


# --------------------------------------------------------------------- records


@dataclass(frozen=True)
class LvAttr:
    """The ten characters of ``lv_attr``, named (see lvs(8))."""

    raw: str

    def _char(self, index: int) -> str:
        return self.raw[index] if len(self.raw) > index else "-"

    @property
    def is_thin_pool(self) -> bool:
        return self._char(0) == "t"

    @property
    def is_thin_volume(self) -> bool:
        return self._char(0) == "V"

    @property
    def is_cow_snapshot(self) -> bool:
        """A classic (copy-on-write) snapshot, valid or not."""
        return self._char(0) in "sS"

    @property
    def snapshot_invalid(self) -> bool:
        """A classic snapshot whose COW space overflowed: its view is lost."""
        return self._char(0) == "S" or self._char(4) in "IS"

    @property
    def active(self) -> bool:
        return self._char(4) == "a"

    @property
    def zeroes_new_blocks(self) -> bool:
        """A thin pool, or a thin LV of one, that fills each block it maps
        with zeros before the first write lands in it."""
        return self._char(7) == "z"

    @property
    def device_open(self) -> bool:
        return self._char(5) == "o"

    @property
    def skip_activation(self) -> bool:
        return self._char(9) == "k"

    @property
    def problem(self) -> str | None:
        """A sentence for the first health problem LVM reports, else None."""
        state, health = self._char(4), self._char(8)
        health_text = {
            "p": "a physical volume under it is missing (partial)",
            "r": "a RAID image needs refresh",
            "m": "RAID images have mismatches",
            "F": "the thin pool or volume has failed",
            "D": "the thin pool is out of data space",
            "M": "the thin pool metadata is read-only (out of metadata space or damaged)",
            "X": "LVM cannot tell its health",
        }
        state_text = {
            "s": "the device is suspended",
            "I": "the snapshot is invalid",
            "S": "the snapshot is invalid and suspended",
            "d": "the device is mapped without a table",
            "i": "the device has only an inactive table",
            "c": "the thin pool needs a check",
            "C": "the thin pool is suspended and needs a check",
            "X": "LVM cannot tell its state",
        }
        if health in health_text:
            return health_text[health]
        return state_text.get(state)


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg_name: str
    uuid: str
    size_bytes: int
    attr: LvAttr
    pool: str
    origin: str
    tags: tuple[str, ...]
    data_percent: float | None
    metadata_percent: float | None
    path: str
    dm_path: str
    created: str

    @property
    def full_name(self) -> str:
        return f"{self.vg_name}/{self.name}"

    @property
    def created_at(self) -> datetime | None:
        try:
            return datetime.strptime(self.created, "%Y-%m-%d %H:%M:%S %z")
        except ValueError:
            return None

    @property
    def device(self) -> str:
        """The device node; the dm path exists whether or not udev made links."""
        return self.dm_path or self.path

    @property
    def never_written(self) -> bool:
        """An active thin LV that maps no block of its pool, so it reads zeros
        all through. LVM shows any non-zero share as at least 0.01 % (one
        4 KiB write into 1 TiB reads 0.01), so 0.00 means nothing at all."""
        return self.attr.is_thin_volume and self.attr.active and self.data_percent == 0.0

    @property
    def reads_zeros(self) -> bool:
        """Never written, in a pool that zeroes what it maps: every block reads
        zeros now, and a block that is partly written later still reads zeros
        in the rest, so zeroing any of it again is wasted work."""
        return self.never_written and self.attr.zeroes_new_blocks


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size_bytes: int
    free_bytes: int
    extent_bytes: int
    attr: str
    missing_pvs: int

    @property
    def partial(self) -> bool:
        return self.missing_pvs > 0 or (len(self.attr) > 3 and self.attr[3] == "p")


def _int(value: str) -> int:
    return int(value) if value else 0


def _percent(value: str) -> float | None:
    return float(value) if value else None


def _created(value: str) -> str:
    """``lv_time`` as LVM prints it by default; a profile may ask for seconds
    since the epoch (the lvm shell's does), which is turned into that form."""
    if value.isdigit():
        when = datetime.fromtimestamp(int(value), UTC)
        return when.strftime("%Y-%m-%d %H:%M:%S %z")
    return value


def parse_lv_report(report: dict[str, object]) -> list[LogicalVolume]:
    rows = _report_rows(report, "lv")
    return [
        LogicalVolume(
            name=row["lv_name"],
            vg_name=row["vg_name"],
            uuid=row.get("lv_uuid", ""),
            size_bytes=_int(row.get("lv_size", "")),
            attr=LvAttr(row.get("lv_attr", "")),
            pool=row.get("pool_lv", ""),
            origin=row.get("origin", ""),
            tags=tuple(t for t in row.get("lv_tags", "").split(",") if t),
            data_percent=_percent(row.get("data_percent", "")),
            metadata_percent=_percent(row.get("metadata_percent", "")),
            path=row.get("lv_path", ""),
            dm_path=row.get("lv_dm_path", ""),
            created=_created(row.get("lv_time", "")),
        )
        for row in rows
    ]


def parse_vg_report(report: dict[str, object], section: str = "vg") -> list[VolumeGroup]:
    """VG records from a ``vgs`` report, or from the VG columns of an ``lvs``
    report (``section="lv"``; one record per VG)."""
    rows = list({row["vg_name"]: row for row in _report_rows(report, section)}.values())
    return [
        VolumeGroup(
            name=row["vg_name"],
            size_bytes=_int(row.get("vg_size", "")),
            free_bytes=_int(row.get("vg_free", "")),
            extent_bytes=_int(row.get("vg_extent_size", "")),
            attr=row.get("vg_attr", ""),
            missing_pvs=_int(row.get("vg_missing_pv_count", "")),
        )
        for row in rows
    ]


def _report_rows(report: dict[str, object], kind: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    sections = report.get("report", [])
    if not isinstance(sections, list):
        raise LvmError(f"unexpected LVM report shape: {str(report)[:200]}")
    for section in sections:
        for row in section.get(kind, []):
            rows.append({str(k): str(v) for k, v in row.items()})
    return rows


# --------------------------------------------------------------------- errors


class LvmPoolNeedsRepair(FailedPrecondition):
    """A thin pool's kernel transaction id disagrees with LVM's metadata."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message} -- the thin pool's kernel state and LVM's metadata disagree, which "
            "happens when an LVM command is killed in the middle of a thin-pool change "
            "(the whole container killed during a create or delete). LVM refuses new thin "
            "volumes in this pool until an admin repairs it; see lvmthin(7), "
            "'Thin pool transaction id' and 'Metadata check and repair'."
        )


_CLASSIFIERS: tuple[tuple[re.Pattern[str], type[DriverError]], ...] = (
    (
        re.compile(r"unexpected transaction id|transaction_id is \d+, while expected", re.I),
        LvmPoolNeedsRepair,
    ),
    (re.compile(r"already exists", re.I), LvmAlreadyExists),
    (
        re.compile(
            r"insufficient (free|suitable)|not enough free|free space in thin pool|"
            r"over (the )?threshold|exceeds the size of thin pool|no free extents",
            re.I,
        ),
        LvmNoSpace,
    ),
    (
        re.compile(
            r"failed to find logical volume|volume group \S+ not found|"
            r"logical volume \S+ not found|not found in volume group",
            re.I,
        ),
        LvmNotFound,
    ),
    (re.compile(r"\bin use\b|open logical volume", re.I), LvmInUse),
)


def classify_failure(command: Sequence[str], returncode: int, stderr: str) -> DriverError:
    """The domain error for a failed LVM command, from its message."""
    message = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    message = message or f"exit code {returncode}"
    for pattern, error in _CLASSIFIERS:
        if pattern.search(message):
            return error(message)
    verb = command[1] if len(command) > 1 else "lvm"
    return LvmError(f"lvm {verb} failed: {message}")


# --------------------------------------------------------------------- shell

# What the shell runs; anything else (``version``) runs as a process.
SHELL_VERBS = frozenset({"lvs", "vgs", "lvcreate", "lvremove", "lvchange", "lvextend"})
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


class LvmShell:
    """One long-lived ``lvm`` process fed one command per line on stdin.

    LVM writes each command's report, followed by its command log, as one
    JSON document to ``LVM_REPORT_FD``; the log's "shell" entry says whether
    the command succeeded, and ``lastlog`` gives the messages of a failure.
    Commands run one at a time. A command that outlives its timeout is left
    to finish on its own while a new shell takes the next command; a shell that dies is
    started again for the next command. When the shell cannot be started or
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
        self._lock = threading.Lock()
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
        if not self._lock.acquire(timeout=timeout):
            raise DeadlineExceeded(
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
            self._lock.release()

    def _exit_when_idle(self, process: subprocess.Popen[bytes]) -> None:
        """Beside one shell process: end it once no command came for
        ``idle_exit`` seconds; the next command starts a new one."""
        while True:
            time.sleep(max(0.5, self._last_used + self.idle_exit - time.monotonic()))
            if not self._lock.acquire(blocking=False):
                continue  # a command is running
            try:
                if self._process is not process:
                    return  # already replaced or stopped
                if time.monotonic() - self._last_used >= self.idle_exit:
                    self._stop()
                    log.debug("lvm shell ended after idling", seconds=self.idle_exit)
                    return
            finally:
                self._lock.release()

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
        except DeadlineExceeded:
            self._stop()  # slow, not broken: the next command tries again
            raise
        except (DriverError, OSError) as exc:
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
            done = _run_to_completion(self.command, self.env, 30.0)
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
        data = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stop()
                raise DeadlineExceeded(
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
            data += chunk
            if data.rstrip().endswith(b"}"):
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
            threading.Thread(target=process.wait, name="lvm-reaper", daemon=True).start()

    def close(self) -> None:
        """End the shell: it exits when its input ends."""
        with self._lock:
            process = self._process
            if process is not None and process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
            self._stop()
            self.disabled = True


# --------------------------------------------------------------------- runner


def check_name(name: str, what: str) -> None:
    """Names reach LVM only once they match LVM's own grammar."""
    if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise InvalidArgument(f"{what} {name!r} is not a valid LVM name")


class Lvm:
    """Runs LVM commands and decodes their reports.

    ``prefix`` runs every command through another program (``nsenter`` into
    the host's namespaces, for example); ``binary`` is the ``lvm`` tool. With
    ``shell``, reports and changes go to one long-lived ``lvm`` shell process
    (see ``LvmShell``), which saves a process start and LVM's initialisation
    per command; whatever the shell cannot take falls back to a process per
    command, with the same results and errors.
    """

    def __init__(
        self,
        binary: str = "lvm",
        prefix: Sequence[str] = (),
        timeout: float = 120.0,
        shell: bool = False,
        shell_idle_exit: float = 0.0,
    ):
        self.binary = binary
        self.prefix = list(prefix)
        self.timeout = timeout
        self._env = {
            **os.environ,
            "LC_ALL": "C",
            "LVM_SUPPRESS_FD_WARNINGS": "1",
        }
        self.shell = LvmShell([*self.prefix, binary], self._env, shell_idle_exit) if shell else None

    def close(self) -> None:
        if self.shell is not None:
            self.shell.close()

    def _limit(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else max(0.1, min(timeout, self.timeout))

    def run(self, args: Sequence[str], timeout: float | None = None) -> str:
        """One ``lvm`` process for ``args``; its standard output."""
        command = [*self.prefix, self.binary, *args]
        limit = self._limit(timeout)
        started = time.monotonic()
        try:
            done = _run_to_completion(command, self._env, limit)
        except subprocess.TimeoutExpired as exc:
            raise DeadlineExceeded(
                f"lvm {args[0]} did not finish within {limit:.1f}s; the call may be retried"
            ) from exc
        except FileNotFoundError as exc:
            raise FailedPrecondition(
                f"the LVM tool {self.binary!r} is not installed on this node"
            ) from exc
        elapsed = time.monotonic() - started
        log.debug("lvm", args=list(args), rc=done.returncode, seconds=round(elapsed, 3))
        if done.returncode != 0:
            raise classify_failure(command[len(self.prefix) :], done.returncode, done.stderr)
        return done.stdout

    def _execute(self, args: Sequence[str], timeout: float | None) -> dict[str, object] | None:
        """Run a report or a change through the shell; None when the shell
        cannot take it (the caller then runs a process)."""
        if self.shell is None:
            return None
        limit = self._limit(timeout)
        started = time.monotonic()
        outcome = self.shell.execute(args, limit)
        if outcome is None:
            return None
        report, returncode, messages = outcome
        log.debug(
            "lvm",
            args=list(args),
            rc=returncode,
            seconds=round(time.monotonic() - started, 3),
            via="shell",
        )
        if returncode != 0:
            raise classify_failure([self.binary, *args], returncode, messages)
        return report

    def change(self, args: Sequence[str], timeout: float | None = None) -> None:
        """A command that changes LVM state (its output is not needed)."""
        if self._execute(args, timeout) is None:
            self.run(args, timeout)

    def _report(self, args: Sequence[str], timeout: float | None) -> dict[str, object]:
        full = [*args, "--reportformat", "json", "--units", "b", "--nosuffix"]
        report = self._execute(full, timeout)
        if report is not None:
            return report
        out = self.run(full, timeout)
        try:
            report = json.loads(out)
        except json.JSONDecodeError as exc:
            raise LvmError(
                f"lvm {args[0]} printed a report that is not JSON: {out[:200]!r}"
            ) from exc
        if not isinstance(report, dict):
            raise LvmError(f"lvm {args[0]} printed an unexpected report: {out[:200]!r}")
        return report

    # ---- reads

    def list_lvs(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> list[LogicalVolume]:
        """Every LV of the given volume groups."""
        groups = sorted(set(volume_groups))
        for group in groups:
            check_name(group, "volume group")
        if not groups:
            return []
        return parse_lv_report(self._report(["lvs", "-o", LV_FIELDS, *groups], timeout))

    def scan(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> tuple[list[LogicalVolume], list[VolumeGroup]]:
        """Every LV of the given VGs and the VGs themselves, in one report
        where possible (a VG without LVs needs a ``vgs`` of its own)."""
        groups = sorted(set(volume_groups))
        for group in groups:
            check_name(group, "volume group")
        if not groups:
            return [], []
        report = self._report(["lvs", "-o", f"{LV_FIELDS},{VG_COLUMNS}", *groups], timeout)
        lvs = parse_lv_report(report)
        vgs = parse_vg_report(report, "lv")
        without_lvs = set(groups) - {vg.name for vg in vgs}
        if without_lvs:
            vgs += self.list_vgs(without_lvs, timeout)
        return lvs, vgs

    def find_lv(
        self, volume_group: str, name: str, timeout: float | None = None
    ) -> LogicalVolume | None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        select = f"lv_name={name}"
        lvs = parse_lv_report(
            self._report(["lvs", "-o", LV_FIELDS, "-S", select, volume_group], timeout)
        )
        return lvs[0] if lvs else None

    def list_vgs(
        self, names: Iterable[str] = (), timeout: float | None = None
    ) -> list[VolumeGroup]:
        """The named volume groups that exist (all of them when none are named)."""
        groups = sorted(set(names))
        for group in groups:
            check_name(group, "volume group")
        select = ["-S", "vg_name=" + "||vg_name=".join(groups)] if groups else []
        # A select keeps a missing VG from failing the whole report.
        return parse_vg_report(self._report(["vgs", "-o", VG_FIELDS, *select], timeout))

    # ---- writes

    def create_thin_volume(
        self,
        volume_group: str,
        pool: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_name(volume_group, "volume group")
        check_name(pool, "thin pool")
        check_name(name, "logical volume")
        self.change(
            [
                "lvcreate", "--yes", "--name", name,
                "--virtualsize", f"{size_bytes}b", "--thinpool", pool,
                *_tag_args(tags), volume_group,
            ],
            timeout,
        )  # fmt: skip

    def create_linear_volume(
        self,
        volume_group: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        # Wipe signatures and zero the start: extents freed by an earlier LV
        # must never show up as a filesystem in a new volume.
        self.change(
            [
                "lvcreate", "--yes", "--name", name, "--size", f"{size_bytes}b",
                "--wipesignatures", "y", "--zero", "y",
                *_tag_args(tags), volume_group,
            ],
            timeout,
        )  # fmt: skip

    def create_thin_snapshot(
        self,
        volume_group: str,
        origin: str,
        name: str,
        tags: Sequence[str],
        *,
        active: bool,
        timeout: float | None = None,
    ) -> None:
        """A thin snapshot of ``origin``: inactive with activation skipped (a
        snapshot), or active and writable (a restore or clone)."""
        check_name(volume_group, "volume group")
        check_name(origin, "logical volume")
        check_name(name, "logical volume")
        activation = (
            ["--setactivationskip", "n", "--activate", "y", "--ignoreactivationskip"]
            if active
            else ["--setactivationskip", "y", "--activate", "n"]
        )
        self.change(
            [
                "lvcreate", "--yes", "--snapshot", "--name", name, *activation,
                *_tag_args(tags), f"{volume_group}/{origin}",
            ],
            timeout,
        )  # fmt: skip

    def create_cow_snapshot(
        self,
        volume_group: str,
        origin: str,
        name: str,
        size_bytes: int,
        chunk_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        """A classic copy-on-write snapshot of ``origin`` with ``size_bytes``
        of COW space: a frozen, active view of it while the origin stays in use."""
        check_name(volume_group, "volume group")
        check_name(origin, "logical volume")
        check_name(name, "logical volume")
        self.change(
            [
                "lvcreate", "--yes", "--snapshot", "--name", name,
                "--size", f"{size_bytes}b", "--chunksize", f"{chunk_bytes // 1024}k",
                "--setactivationskip", "n", "--activate", "y",
                *_tag_args(tags), f"{volume_group}/{origin}",
            ],
            timeout,
        )  # fmt: skip

    def remove(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.change(["lvremove", "--yes", f"{volume_group}/{name}"], timeout)

    def activate(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.change(
            ["lvchange", "--activate", "y", "--ignoreactivationskip", f"{volume_group}/{name}"],
            timeout,
        )

    def extend(
        self, volume_group: str, name: str, size_bytes: int, timeout: float | None = None
    ) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.change(
            ["lvextend", "--yes", "--size", f"{size_bytes}b", f"{volume_group}/{name}"], timeout
        )

    def delete_tag(
        self, volume_group: str, name: str, tag: str, timeout: float | None = None
    ) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.change(["lvchange", *_tag_args([tag], "--deltag"), f"{volume_group}/{name}"], timeout)

    def version(self, timeout: float | None = None) -> str:
        return self.run(["version"], timeout).strip()


def _tag_args(tags: Sequence[str], flag: str = "--addtag") -> list[str]:
    args: list[str] = []
    for tag in tags:
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"LVM tag {tag!r} has characters LVM does not accept")
        args += [flag, tag]
    return args


def _run_to_completion(
    command: Sequence[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run an LVM command in a session of its own. Past ``timeout`` the caller
    gets TimeoutExpired but the command is not killed (see LvmShell._stop): it
    finishes on its own and a thread reaps it."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        threading.Thread(target=process.communicate, name="lvm-reaper", daemon=True).start()
        raise
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
