"""``python -m loadtest.memtrace serve``: the gateway with tracemalloc on, for finding where the
memory of its connections goes. Debugging only: the product itself has no such switch, and
nothing here runs unless this module is the entry point.

tracemalloc starts before the gateway is imported, keeping ``LOADTEST_TRACEMALLOC_FRAMES``
frames per allocation (default 8). Each SIGUSR2 writes a snapshot to
``LOADTEST_TRACEMALLOC_OUT.<n>`` (n = 1, 2, ...), pickled by ``Snapshot.dump``, then a line
``snapshot <path>`` to stderr; ``python -m loadtest.memory --tracemalloc`` takes one before
the clients connect and one after, and prints the difference by line and by file.

tracemalloc itself costs memory for every live block it traces, so the RSS of a process
started this way says nothing about the gateway's: read the snapshots' differences instead.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from types import FrameType


def main() -> int:
    frames = int(os.environ.get("LOADTEST_TRACEMALLOC_FRAMES", "8"))
    out = os.environ.get("LOADTEST_TRACEMALLOC_OUT", f"/tmp/gateway-tracemalloc-{os.getpid()}")
    tracemalloc.start(frames)
    count = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        path = f"{out}.{count}"
        # The snapshot of the snapshot's own machinery is filtered out when it is read.
        tracemalloc.take_snapshot().dump(path)
        print(f"snapshot {path}", file=sys.stderr, flush=True)

    # A Python-level handler: it runs between two bytecodes of the main thread, i.e. at the
    # event loop's next callback (an idle gateway still has its heartbeat timers).
    signal.signal(signal.SIGUSR2, dump)
    from gateway.cli import main as gateway_main

    return gateway_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
