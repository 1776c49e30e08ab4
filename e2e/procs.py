"""Long-running processes of the tier: started with a log file each, stopped
in reverse order, and their process groups killed if they do not go.

Nothing here knows Kubernetes; cluster.py and plugin.py say what to run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class Failed(Exception):
    """A step of the tier failed; the message says which and why."""


class Died(Failed):
    """A process the tier started has exited."""


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> str:
    done = subprocess.run(
        list(args), capture_output=True, text=True, check=False, timeout=timeout, env=env
    )
    if check and done.returncode != 0:
        raise Failed(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wait_for(what: str, probe: Callable[[], bool], timeout: float, interval: float = 1.0) -> float:
    """Poll ``probe`` until it is true; the seconds it took, or Failed."""
    start = time.monotonic()
    while True:
        try:
            if probe():
                return time.monotonic() - start
        except Died:
            raise
        except Exception:  # noqa: S110 - a probe that raises is a probe that says "not yet"
            pass
        if time.monotonic() - start > timeout:
            raise Failed(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Process:
    name: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    # Restarted when it exits, as the kubelet restarts a pod's containers
    # (restartPolicy Always), with the kubelet's doubling back-off.
    restart: bool = False
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stopping: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_start: float = 0.0

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = self.popen.returncode if self.popen else None
            raise Died(f"{self.name} exited ({code}); its log:\n{tail(self.log)}")

    def supervise(self) -> None:
        """Start it again if it exited and may restart; called every second."""
        with self.lock:
            if not self.restart or self.stopping or self.alive():
                return
            now = time.monotonic()
            if self.next_start == 0.0:
                self.next_start = now + min(2**self.restarts, 20)
            if now < self.next_start:
                return
            self.restarts += 1
            self.next_start = 0.0
            with self.log.open("ab") as out:
                out.write(f"=== e2e: restart {self.restarts}\n".encode())
            self.start()

    def stop(self, sig: signal.Signals = signal.SIGTERM, grace: float = 15) -> None:
        with self.lock:
            self.stopping = True
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
                self.popen.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


@dataclass
class Processes:
    """What the tier started, stopped last-first."""

    logs: Path
    started: list[Process] = field(default_factory=list)
    supervisor: threading.Thread | None = None

    def start(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        restart: bool = False,
    ) -> Process:
        process = Process(name, list(args), self.logs / f"{name}.log", dict(env or {}), restart)
        self.started.append(process.start())
        if restart and self.supervisor is None:
            self.supervisor = threading.Thread(target=self._supervise, daemon=True)
            self.supervisor.start()
        return process

    def _supervise(self) -> None:
        while True:
            time.sleep(1)
            for process in list(self.started):
                process.supervise()

    def get(self, name: str) -> Process:
        return next(p for p in reversed(self.started) if p.name == name)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()
