"""The worker supervisor of ``gateway serve --workers N``: N processes on one port
(SO_REUSEPORT), each a whole gateway; a crashed worker is restarted, signals are passed on."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

# Its lines keep the name they had when this was part of the CLI: log filters know it.
log = logging.getLogger("gateway.cli")

# A worker exits with this when it cannot start (bad setting, database unreachable or without
# the gateway schema, port taken): the CLI maps every such error to it. Starting it again would
# fail the same way, once a second, forever; a single-process gateway exits with it too.
CANNOT_START = 2


def supervise(workers: int) -> int:
    """Run ``workers`` processes on one port (SO_REUSEPORT); restart any that crash.

    SIGTERM/SIGINT are passed on to every worker, which drain and exit on their own. A worker
    whose first start fails with CANNOT_START stops them all, and the supervisor exits with
    it: whatever runs the gateway (systemd, Kubernetes, compose) sees the failure and applies
    its own restart policy, as it does for ``--workers 1``.
    """
    argv = [sys.executable, "-m", "gateway", *sys.argv[1:]]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def spawn(i: int) -> None:
        if stopping:  # a signal came while we slept: start nothing nobody would stop
            return
        env = dict(os.environ, GATEWAY_WORKERS="1", GATEWAY_WORKER_ID=str(i))
        cmd = [a for a in argv if not a.startswith("--workers")]
        if "--workers" in argv:
            j = argv.index("--workers")
            cmd = argv[:j] + argv[j + 2 :]
        procs[i] = subprocess.Popen(cmd, env=env)
        if stopping:  # the signal came while it was starting, before forward() could see it
            procs[i].send_signal(signal.SIGTERM)
        log.info("worker %d started (pid %d)", i, procs[i].pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i in range(workers):
        spawn(i)
    restarts: dict[int, float] = {}
    status = 0
    while procs:
        time.sleep(0.2)
        for i, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if stopping:
                del procs[i]
                continue
            # Only a first start: a worker restarted after a crash may meet a database that
            # is down for a moment, and the others are still serving, so it is retried.
            if code == CANNOT_START and i not in restarts:
                log.error(
                    "worker %d (pid %d) could not start (its error is above); stopping every worker",
                    i,
                    proc.pid,
                )
                del procs[i]
                status = CANNOT_START
                forward(signal.SIGTERM, None)
                continue
            log.error("worker %d (pid %d) exited with %s; restarting", i, proc.pid, code)
            # Back off a crash loop: at most one restart per second per worker.
            wait = max(0.0, 1.0 - (time.monotonic() - restarts.get(i, 0.0)))
            time.sleep(wait)
            restarts[i] = time.monotonic()
            spawn(i)
    return status
