"""Throwaway PostgreSQL servers for the demo, the tests and the load test.

Three kinds share one small interface (:class:`Postgres`):

``LocalCluster``
    ``initdb`` + ``pg_ctl`` from local PostgreSQL binaries, in a fresh temporary directory,
    listening on 127.0.0.1 only. It can be restarted (same port, same data), which the tests
    use to prove the gateway survives a PostgreSQL restart. Removed on ``stop()`` and at exit.
``ContainerPostgres``
    ``postgres:16-alpine`` through testcontainers, when there are no local binaries but Docker
    answers. Cannot be restarted (the published port would change).
``ExistingPostgres``
    A server named by a URL (``DATABASE_URL``, ``TEST_DATABASE_URL``). Never restarted or stopped:
    it is not ours.

``throwaway_postgres(fast)`` picks local binaries, then Docker, and otherwise raises
:class:`PostgresUnavailable` saying exactly what to install.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

INSTALL_HINT = (
    "Install PostgreSQL server binaries (Debian/Ubuntu: `sudo apt-get install postgresql`; "
    "macOS: `brew install postgresql`) or start Docker, or set DATABASE_URL to an existing database."
)
CONTAINER_IMAGE = "postgres:16-alpine"
DEFAULT_MAX_CONNECTIONS = 300

# The three programs a cluster needs; a directory is only used if it holds all of them.
_TOOLS = ("initdb", "pg_ctl", "postgres")
# Settings that trade durability for speed; a test database is thrown away anyway.
_FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
_PG_CTL_TIMEOUT = 60  # seconds pg_ctl waits for the server to start or stop


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL can be started here; the message says what to install."""


class ClusterError(RuntimeError):
    """A PostgreSQL command failed; the message holds its output and the end of the server log."""


class RestartUnsupported(RuntimeError):
    """This kind of server cannot be restarted by us (a container, or a server named by a URL)."""


class Postgres(Protocol):
    """What the demo, the tests and the load test need from a PostgreSQL server."""

    kind: str
    can_restart: bool

    def dsn(self, dbname: str = "postgres") -> str: ...

    def restart(self) -> None: ...

    def is_running(self) -> bool: ...

    def stop(self) -> None: ...


# --- finding the binaries ---------------------------------------------------------


def _has_tools(directory: Path) -> bool:
    return all((directory / t).is_file() and os.access(directory / t, os.X_OK) for t in _TOOLS)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,), /usr/lib/postgresql/9.6/bin -> (9, 6)
    return tuple(int(n) for n in re.findall(r"\d+", bin_dir.parent.name)) or (0,)


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None.

    Tried in order: ``pg_config --bindir``, ``initdb`` on PATH (symlinks followed, because Debian
    and Homebrew link the programs into a directory that may not hold the others), then the
    highest version under /usr/lib/postgresql (Debian installs the server there, off PATH).
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_tools(candidate):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option PostgreSQL sets, so a port in TIME_WAIT does not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _server_user() -> str | None:
    """The OS user to run PostgreSQL as: None for ourselves, ``postgres`` when we are root.

    PostgreSQL refuses to run as root (initdb and postgres both exit), so as root the cluster
    belongs to the ``postgres`` user that Debian's package creates.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "Running as root, and PostgreSQL refuses to run as root: there is no `postgres` OS user "
            "to run it as. Create one (`useradd --system --home /var/lib/postgresql postgres`) "
            "or run as a normal user."
        ) from None
    if shutil.which("runuser") is None:
        raise PostgresUnavailable(
            "Running as root needs `runuser` (util-linux) to start PostgreSQL as the `postgres` user."
        )
    return "postgres"


def _conf_value(value: object) -> str:
    # Every postgresql.conf value may be single-quoted; quotes inside are doubled.
    return "'" + str(value).replace("'", "''") + "'"


# --- a cluster from local binaries --------------------------------------------------


class LocalCluster:
    """A PostgreSQL cluster in a temporary directory, run with the local binaries.

    ``fast=True`` turns off fsync, synchronous_commit and full_page_writes (tests): a crash of
    the machine may then corrupt the cluster, and ``kill()`` may lose the last commits.
    """

    kind = "local"
    can_restart = True

    def __init__(
        self,
        *,
        port: int | None = None,
        fast: bool = False,
        bin_dir: Path | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be between 1 and 65535, not {port}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.fast = fast
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self._requested_port = port
        self._bin_dir = bin_dir
        self._user: str | None = None
        self.port: int | None = None
        self.base_dir: Path | None = None

    # paths inside the temporary directory
    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base() / "socket"

    @property
    def log_path(self) -> Path:
        return self._base() / "postgres.log"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            raise ClusterError("the cluster has not been started")
        return self._bin_dir

    def _base(self) -> Path:
        if self.base_dir is None:
            raise ClusterError("the cluster has not been started (or was stopped)")
        return self.base_dir

    def __repr__(self) -> str:
        return f"<LocalCluster port={self.port} dir={self.base_dir}>"

    def dsn(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise ClusterError("the cluster has not been started (or was stopped)")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    # lifecycle
    def start(self) -> LocalCluster:
        """initdb and start the server; returns self. Raises ClusterError or PostgresUnavailable."""
        if self.base_dir is not None:
            raise ClusterError(f"the cluster is already started ({self.base_dir})")
        if self._bin_dir is None:
            self._bin_dir = find_pg_bin()
            if self._bin_dir is None:
                raise PostgresUnavailable(INSTALL_HINT)
        elif not _has_tools(self._bin_dir):
            raise PostgresUnavailable(f"{self._bin_dir} does not hold all of {', '.join(_TOOLS)}")
        self._user = _server_user()
        requested = self._requested_port
        if requested is not None and _port_in_use(requested):
            raise ClusterError(f"port {requested} on 127.0.0.1 is already in use; pick another or pass none")

        self.base_dir = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        # Registered before anything can start, so an interrupted start still cleans up.
        atexit.register(self.stop)
        try:
            self.socket_dir.mkdir()
            self._chown(self.base_dir, self.socket_dir)
            self._initdb()
            # A free port can be taken by someone else before the server binds it: try again.
            attempts = 1 if requested is not None else 5
            for attempt in range(1, attempts + 1):
                port = requested if requested is not None else free_port()
                self._write_conf(port)
                try:
                    self._pg_ctl("start", "-l", str(self.log_path))
                except ClusterError:
                    if attempt < attempts and "could not bind" in self._log_tail():
                        continue
                    raise
                self.port = port
                break
        except BaseException:
            self.stop()
            raise
        return self

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def postmaster_pid(self) -> int | None:
        """The server's process id while it runs, from its postmaster.pid file."""
        if self.base_dir is None:
            return None
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by another user
        return pid

    def restart(self) -> None:
        """Restart the server (fast shutdown, same port and data); starts it if it is down."""
        self._base()
        if self.is_running():
            self._pg_ctl("restart", "-m", "fast", "-l", str(self.log_path))
        else:
            self._pg_ctl("start", "-l", str(self.log_path))

    def kill(self) -> None:
        """Stop the server the way a crash would (immediate shutdown), keeping the data.

        ``restart()`` brings it back after crash recovery. With ``fast=True`` the last commits
        may be lost, as after a real crash with synchronous_commit off.
        """
        if self.is_running():
            self._pg_ctl("stop", "-m", "immediate")

    def stop(self) -> None:
        """Stop the server and remove its directory. Safe to call twice, and after a failed start."""
        base = self.base_dir
        if base is None:
            return
        try:
            if self.is_running():
                try:
                    self._pg_ctl("stop", "-m", "fast")
                except ClusterError:
                    self._kill_hard()
        finally:
            shutil.rmtree(base, ignore_errors=True)
            self.base_dir = None
            self.port = None
            atexit.unregister(self.stop)

    def _kill_hard(self) -> None:
        # Last resort when pg_ctl cannot stop it: SIGQUIT makes the postmaster end its children.
        pid = self.postmaster_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while self.postmaster_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.postmaster_pid() is not None:
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> LocalCluster:
        return self if self.base_dir is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # helpers
    def _chown(self, *paths: Path) -> None:
        if self._user is not None:
            for p in paths:
                shutil.chown(p, self._user, self._user)

    def _initdb(self) -> None:
        # --no-sync: the cluster is thrown away, and syncing every file costs seconds.
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            "initdb",
            timeout=120,
        )
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# Settings of this throwaway cluster (gateway.pgcluster)\ninclude 'gateway.conf'\n")

    def _write_conf(self, port: int) -> None:
        settings: dict[str, object] = {
            "listen_addresses": "127.0.0.1",
            "port": port,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
        }
        if self.fast:
            settings.update(_FAST_SETTINGS)
        settings.update(self.settings)
        conf = self.data_dir / "gateway.conf"
        conf.write_text("".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items()))
        self._chown(conf)

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                action,
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(_PG_CTL_TIMEOUT),
                *args,
            ],
            f"pg_ctl {action}",
            timeout=_PG_CTL_TIMEOUT + 30,
        )

    def _run(self, args: list[str], what: str, *, timeout: float) -> None:
        cmd = args if self._user is None else ["runuser", "-u", self._user, "--", *args]
        # PG* variables (PGDATA, PGPORT, ...) would override what we pass; C locale keeps messages
        # in English, which start() relies on to recognize a port taken by someone else.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base_dir, env=env, check=False
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{what} did not finish within {timeout:.0f}s{self._log_section()}") from None
        except OSError as e:
            raise ClusterError(f"{what}: cannot run {cmd[0]}: {e}") from None
        if proc.returncode != 0:
            output = (proc.stderr.strip() + "\n" + proc.stdout.strip()).strip()
            raise ClusterError(
                f"{what} failed (exit status {proc.returncode}):\n{output}{self._log_section()}"
            )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, ClusterError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_section(self) -> str:
        tail = self._log_tail()
        return f"\nEnd of the server log {self.log_path}:\n{tail}" if tail else ""


# --- Docker ----------------------------------------------------------------------


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker daemon answers a ping within ``timeout`` seconds; False on any error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import docker

            client = docker.from_env(timeout=timeout)
            try:
                return bool(client.ping())
            finally:
                client.close()
    except Exception:
        return False


def _container_class() -> Any:
    try:
        from testcontainers.community.postgres import PostgresContainer  # testcontainers >= 4.14
    except ImportError:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from testcontainers.postgres import PostgresContainer
        except ImportError:
            raise PostgresUnavailable(
                "Docker answers but the testcontainers package is missing "
                "(`pip install 'testcontainers[postgres]'`). " + INSTALL_HINT
            ) from None
    return PostgresContainer


class ContainerPostgres:
    """PostgreSQL in a Docker container (testcontainers), removed on ``stop()`` and at exit."""

    kind = "docker"
    can_restart = False

    def __init__(
        self,
        *,
        fast: bool = False,
        image: str = CONTAINER_IMAGE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.fast = fast
        self.image = image
        self.max_connections = max_connections
        self._container: Any = None
        self._host = ""
        self._port = 0

    def start(self) -> ContainerPostgres:
        cls = _container_class()
        container = cls(self.image, username="postgres", password="postgres", dbname="postgres", driver=None)
        command = ["postgres", "-c", f"max_connections={self.max_connections}"]
        if self.fast:
            for k, v in _FAST_SETTINGS.items():
                command += ["-c", f"{k}={v}"]
        container.with_command(command)
        container.start()
        self._container = container
        atexit.register(self.stop)
        self._host = container.get_container_host_ip()
        self._port = int(container.get_exposed_port(5432))
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        if self._container is None:
            raise ClusterError("the container has not been started (or was stopped)")
        return f"postgresql://postgres:postgres@{self._host}:{self._port}/{quote(dbname, safe='')}"

    def is_running(self) -> bool:
        return self._container is not None

    def restart(self) -> None:
        raise RestartUnsupported(
            "PostgreSQL runs in a Docker container here and cannot be restarted in place "
            "(its published port would change); install local PostgreSQL server binaries for restart tests"
        )

    def stop(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            atexit.unregister(self.stop)
            container.stop()

    def __enter__(self) -> ContainerPostgres:
        return self if self._container is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- an existing server --------------------------------------------------------------


class ExistingPostgres:
    """A server named by a URL; ``dsn(name)`` is the same URL with another database."""

    kind = "url"
    can_restart = False

    def __init__(self, url: str) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or "host=" in parts.query):
            raise ValueError(
                "expected a PostgreSQL URL such as postgresql://user:password@host:5432/dbname, "
                f"not {url.split('@')[-1]!r}"
            )
        self._parts = parts

    def dsn(self, dbname: str = "postgres") -> str:
        return urlunsplit(self._parts._replace(path="/" + quote(dbname, safe="")))

    def is_running(self) -> bool:
        return True  # not ours to know; connecting tells

    def restart(self) -> None:
        raise RestartUnsupported(
            "PostgreSQL was given by URL (DATABASE_URL / TEST_DATABASE_URL): a server this process did "
            "not start cannot be restarted; unset the URL to use a throwaway cluster from local binaries"
        )

    def stop(self) -> None:
        pass  # not ours to stop


# --- choosing ------------------------------------------------------------------------


def start_throwaway(*, fast: bool = False, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> Postgres:
    """Start a throwaway server: local binaries, else Docker, else PostgresUnavailable."""
    bin_dir = find_pg_bin()
    if bin_dir is not None:
        return LocalCluster(fast=fast, bin_dir=bin_dir, max_connections=max_connections).start()
    if docker_available():
        return ContainerPostgres(fast=fast, max_connections=max_connections).start()
    raise PostgresUnavailable(INSTALL_HINT)


@contextlib.contextmanager
def throwaway_postgres(fast: bool = False) -> Iterator[Postgres]:
    """A throwaway server for the ``with`` block (see :func:`start_throwaway`), stopped after it."""
    server = start_throwaway(fast=fast)
    try:
        yield server
    finally:
        server.stop()
