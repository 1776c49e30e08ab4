"""Start ``csi-lvm serve`` in well under a second, many times over.

A fresh interpreter needs 15-20 s in the test VM just to import gRPC and the
driver, which would make a test that kills and restarts the driver a hundred
times take an hour. This process imports the driver once, then forks one
child per line it reads on stdin (a JSON list of ``csi-lvm`` arguments and a
log path) and answers with the child's pid. Each child leads its own process
group, so killing the group also kills any LVM command it was running, as
the end of a container would.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> None:
    from csi_lvm import cli  # the expensive import, paid once

    # Children are reaped by the kernel, so a killed driver never lingers.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.setsid()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocess needs its children
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log, 1)
                os.dup2(log, 2)
                code = cli.main(request["argv"])
            finally:
                os._exit(code)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
