"""One ``lvm`` process per command: what runs when the shell cannot.

Every process runs in a session of its own, so a signal to the driver's
process group never reaches it, and is never killed: past its timeout the
caller is told, and the command finishes on its own while a thread reaps it
(see ``shell``, which follows the same rule).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence

# LVM processes a caller stopped waiting for, still running. The driver waits
# for them before it exits: in a container, everything in its PID namespace
# dies with it, and LVM killed mid-command can leave a thin pool's kernel
# state behind its metadata.
_unfinished: set[subprocess.Popen[str] | subprocess.Popen[bytes]] = set()
_unfinished_lock = threading.Lock()


def finish_in_background(
    process: subprocess.Popen[str] | subprocess.Popen[bytes], reap: bool = False
) -> None:
    """Let ``process`` finish on its own, reaped by a thread, and remember it
    until it has (``reap``: read its output to the end too)."""
    with _unfinished_lock:
        _unfinished.add(process)

    def wait() -> None:
        if reap:
            process.communicate()
        else:
            process.wait()
        with _unfinished_lock:
            _unfinished.discard(process)

    threading.Thread(target=wait, name="lvm-reaper", daemon=True).start()


def wait_for_unfinished(timeout: float) -> int:
    """Wait up to ``timeout`` seconds for every LVM process left to finish on
    its own; the number still running after that."""
    deadline = time.monotonic() + timeout
    while True:
        with _unfinished_lock:
            running = [p for p in _unfinished if p.poll() is None]
        if not running or time.monotonic() >= deadline:
            return len(running)
        time.sleep(0.1)


def run_to_completion(
    command: Sequence[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``command``; past ``timeout`` raise TimeoutExpired, leaving it to finish."""
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
        finish_in_background(process, reap=True)
        raise
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
