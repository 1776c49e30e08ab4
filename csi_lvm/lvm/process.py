"""One ``lvm`` process per command: what runs when the shell cannot.

Every process runs in a session of its own, so a signal to the driver's
process group never reaches it, and is never killed: past its timeout the
caller is told, and the command finishes on its own while a thread reaps it
(see ``shell``, which follows the same rule).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence


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
        threading.Thread(target=process.communicate, name="lvm-reaper", daemon=True).start()
        raise
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
