"""The one runner of LVM's programs: ``lvm`` itself, ``dmsetup`` and the
thin-provisioning tools.

Every command runs through ``prefix`` (``nsenter`` into the host, say) as an
argument list (never a shell), with ``LC_ALL=C`` so that messages can be
classified, within a timeout taken from the caller's deadline and capped by
the driver's own, and is never killed once it may change anything (see
``process``). ``lvm`` commands go to the long-lived shell where it can take
them (``shell``) and run as processes otherwise, with the same results and
errors either way; their failures are classified once (``errors``). A tool
that only reads and prints without end (the thin tools' listings) is
streamed instead, and may be stopped. The verbs (``commands``,
``thin_metadata``) build command lines and read what comes back; they never
start a program themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

import structlog

from csi_lvm.lvm.errors import (
    LvmError,
    LvmTimeout,
    LvmToolMissing,
    classify_failure,
    classify_tool_failure,
)
from csi_lvm.lvm.process import run_to_completion, wait_for_unfinished
from csi_lvm.lvm.shell import LvmShell

log = structlog.get_logger("csi_lvm.lvm")


def config_overrides_from(text: str) -> str:
    """LVM configuration text (a file's, comments and all) as the one
    argument ``--config`` takes."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return " ".join(line for line in lines if line)


class Runner:
    """Runs LVM's programs. With ``shell``, ``lvm`` reports and changes go to
    one long-lived ``lvm`` shell process (see ``LvmShell``), which saves a
    process start and LVM's initialisation per command."""

    def __init__(
        self,
        binary: str = "lvm",
        prefix: Sequence[str] = (),
        timeout: float = 120.0,
        shell: bool = False,
        shell_idle_exit: float = 0.0,
        config_overrides: str = "",
    ):
        self.binary = binary
        self.prefix = list(prefix)
        self.timeout = timeout
        # LVM settings every command gets on top of the node's own config
        # (``--config``): what a container must change, and nothing else.
        self.config_overrides = config_overrides
        self.env = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}
        self.shell = LvmShell([*self.prefix, binary], self.env, shell_idle_exit) if shell else None

    def close(self, wait_seconds: float | None = None) -> None:
        """End the shell, and wait (up to ``wait_seconds``, by default the
        command timeout) for every command still running: one a caller gave
        up on finishes first, so an exit never cuts LVM short."""
        if self.shell is not None:
            self.shell.close()
        left = wait_for_unfinished(self.timeout if wait_seconds is None else wait_seconds)
        if left:
            log.warning("lvm commands still running at exit", count=left)

    def limit(self, timeout: float | None) -> float:
        """The time a command may take: the caller's, within the driver's own."""
        return self.timeout if timeout is None else max(0.1, min(timeout, self.timeout))

    def command(self, args: Sequence[str]) -> list[str]:
        """A tool's command line as it runs: through the prefix."""
        return [*self.prefix, *args]

    # ---- lvm

    def _with_overrides(self, args: Sequence[str]) -> list[str]:
        if not self.config_overrides or not args:
            return list(args)
        return [args[0], "--config", self.config_overrides, *args[1:]]

    def lvm(self, args: Sequence[str], timeout: float | None = None) -> str:
        """One ``lvm`` process for ``args``; its standard output."""
        args = self._with_overrides(args)
        command = self.command([self.binary, *args])
        started = time.monotonic()
        done = self.tool(command, f"lvm {args[0]}", f"the LVM tool {self.binary!r}", timeout)
        elapsed = time.monotonic() - started
        log.debug("lvm", args=list(args), rc=done.returncode, seconds=round(elapsed, 3))
        if done.returncode != 0:
            raise classify_failure(command[len(self.prefix) :], done.returncode, done.stderr)
        return done.stdout

    def _through_shell(
        self, args: Sequence[str], timeout: float | None
    ) -> dict[str, object] | None:
        """Run a report or a change through the shell; None when the shell
        cannot take it (the caller then runs a process)."""
        if self.shell is None:
            return None
        args = self._with_overrides(args)
        started = time.monotonic()
        outcome = self.shell.execute(args, self.limit(timeout))
        if outcome is None:
            return None
        report, returncode, messages = outcome
        elapsed = round(time.monotonic() - started, 3)
        log.debug("lvm", args=list(args), rc=returncode, seconds=elapsed, via="shell")
        if returncode != 0:
            raise classify_failure([self.binary, *args], returncode, messages)
        return report

    def change(self, args: Sequence[str], timeout: float | None = None) -> None:
        """An ``lvm`` command that changes LVM state (its output is not needed)."""
        if self._through_shell(args, timeout) is None:
            self.lvm(args, timeout)

    def report(self, args: Sequence[str], timeout: float | None = None) -> dict[str, object]:
        """An ``lvm`` report, as JSON with sizes in bytes."""
        full = [*args, "--reportformat", "json", "--units", "b", "--nosuffix"]
        report = self._through_shell(full, timeout)
        if report is not None:
            return report
        out = self.lvm(full, timeout)
        try:
            report = json.loads(out)
        except json.JSONDecodeError as exc:
            raise LvmError(
                f"lvm {args[0]} printed a report that is not JSON: {out[:200]!r}"
            ) from exc
        if not isinstance(report, dict):
            raise LvmError(f"lvm {args[0]} printed an unexpected report: {out[:200]!r}")
        return report

    # ---- other tools

    def tool(
        self, command: list[str], what: str, tool: str, timeout: float | None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` (already through the prefix) as a process of its own
        (never killed: see ``process``), its failures to run as LVM-domain
        errors; the caller reads its exit code."""
        limit = self.limit(timeout)
        try:
            return run_to_completion(command, self.env, limit)
        except subprocess.TimeoutExpired as exc:
            raise LvmTimeout(
                f"{what} did not finish within {limit:.1f}s; the call may be retried"
            ) from exc
        except FileNotFoundError as exc:
            raise LvmToolMissing(f"{tool} is not installed on this node") from exc

    def dmsetup(
        self, args: Sequence[str], timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.tool(self.command(["dmsetup", *args]), f"dmsetup {args[0]}", "dmsetup", timeout)

    @contextmanager
    def stream(self, args: Sequence[str], timeout: float | None = None) -> Iterator[IO[bytes]]:
        """The output of a thin-provisioning tool, which only reads, read as
        the caller goes. Such a tool may be stopped, unlike LVM: when the
        caller leaves before its end, and past the time limit (then the
        read ends early and LvmTimeout is raised). A tool that failed raises
        its classified error, also when the caller stopped reading at an
        LvmError of its own (output cut short says less than the tool)."""
        limit = self.limit(timeout)
        with tempfile.TemporaryFile() as errors:
            try:
                process = subprocess.Popen(
                    self.command(args),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    env=self.env,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise LvmToolMissing(
                    f"{args[0]} (thin-provisioning-tools) is not installed on this node"
                ) from exc
            assert process.stdout is not None
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                process.kill()

            watchdog = threading.Timer(limit, expire)
            watchdog.daemon = True
            watchdog.start()

            def failed() -> LvmError:
                if expired.is_set():
                    return LvmTimeout(
                        f"{args[0]} did not finish within {limit:.1f}s; it was stopped"
                    )
                errors.seek(0)
                message = " ".join(errors.read().decode(errors="replace").split())
                return classify_tool_failure(args, process.returncode, message)

            left_early = True
            try:
                try:
                    yield process.stdout
                except LvmError as exc:
                    if process.wait() != 0:
                        raise failed() from exc
                    raise
                left_early = bool(process.stdout.read(1))
            finally:
                watchdog.cancel()
                if left_early and process.poll() is None:
                    process.kill()
                process.wait()
                process.stdout.close()
            if not left_early and process.returncode != 0:
                raise failed()
