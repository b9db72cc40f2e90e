"""A real ``nats-server`` on a free loopback port, started and stopped by the test.

The tests of the broker mode (test_broker.py) skip, saying why, only when the binary cannot
be found (Debian's package ``nats-server`` installs it in /usr/sbin; .ci/run installs it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .gwtest import free_port


def binary() -> str | None:
    return shutil.which("nats-server") or shutil.which(
        "nats-server", path="/usr/sbin:/usr/bin:/usr/local/bin"
    )


class NatsServer:
    """One nats-server; ``kill()`` is kill -9, ``start()`` again comes back on the same port."""

    def __init__(
        self, log_path: Path, *, user: str = "", password: str = "", args: tuple[str, ...] = ()
    ) -> None:
        path = binary()
        assert path is not None
        self.path = path
        self.port = free_port()
        self.log_path = log_path
        self.user, self.password = user, password
        self.args = args  # more command-line options (TLS)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{auth}127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        args = [self.path, "-a", "127.0.0.1", "-p", str(self.port), "-l", str(self.log_path)]
        if self.user:
            args += ["--user", self.user, "--pass", self.password]
        args += self.args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"nats-server did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
