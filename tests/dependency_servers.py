"""Real dependency servers for the tests: PostgreSQL, Redis and a TCP black hole.

pytest loads fixtures only from conftest.py, plugins and the test module itself, so a test
module imports the fixtures it uses, and those they depend on. Each fixture function is
named ``<fixture>_fixture`` and registered under the fixture's name, so that a test's
parameter does not shadow the import (ruff F811)::

    from dependency_servers import (  # noqa: F401 - fixtures, used by name
        postgres_cluster_fixture,
        postgres_server_fixture,
    )

A module that imports ``postgres_cluster_fixture`` gets its own session-scoped cluster.

PostgreSQL and Redis come from Debian (``scripts/test`` installs them); a fixture whose
binaries are missing fails with a message that says what to install. ``initdb`` runs once
per session; each test gets its own server process on its own free loopback port, which
it may stop, freeze and restart (on the same port). Every wait is bounded, and every
process is ended at teardown, also when the test fails. Each server is additionally
started with a parent-death signal, so that even a pytest killed with SIGKILL leaves no
server behind.

PostgreSQL refuses to run as root: as root, its commands run as the ``postgres`` system
user, with the data directory and the unix socket directory in a private temporary
directory owned by that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Final

import pytest
from tcp_listener import free_port

__all__ = [
    "AUTH_ROLE",
    "DATABASE",
    "ROLE",
    "BlackHole",
    "PostgresCluster",
    "PostgresServer",
    "RedisServer",
    "black_hole_fixture",
    "free_port",
    "postgres_cluster_fixture",
    "postgres_server_fixture",
    "redis_server_fixture",
    "start_redis_fixture",
]

START_TIMEOUT: Final = 30.0
"""How long a server gets to accept connections (initdb and first starts can be slow)."""
STOP_TIMEOUT: Final = 15.0
"""How long a server gets to exit after each signal of the stop sequence."""
COMMAND_TIMEOUT: Final = 60.0
"""Bound for one-shot commands (initdb, psql)."""

ROLE: Final = "petsage"
"""A PostgreSQL role that logs in from 127.0.0.1 without a password (trust)."""
AUTH_ROLE: Final = "petsage_secret"
"""A PostgreSQL role that must give its password from 127.0.0.1 (scram-sha-256)."""
DATABASE: Final = "petsage"
_SUPERUSER: Final = "postgres"
_OS_USER: Final = "postgres"
"""The system user PostgreSQL runs as when the tests run as root."""


def _wait_until(
    ready: Callable[[], bool],
    what: str,
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    log: Callable[[], str] = lambda: "",
) -> None:
    """Poll *ready* until it holds; fail (with the log) on timeout or when not *alive*."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            pytest.fail(f"{what}: the process exited\n{log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s\n{log()}")
        time.sleep(0.02)


def _setpriv() -> str | None:
    return shutil.which("setpriv")


def _with_parent_death_signal(command: list[str], signame: str) -> list[str]:
    """Make the kernel send *signame* to the command when its parent dies.

    Strictly, when the thread that started it ends: start servers from pytest's main
    thread (fixtures and tests run there). The setting must be made after any change
    of user (which clears it), hence its own ``setpriv`` inside the one that switches
    users.
    """
    setpriv = _setpriv()
    if setpriv is None:
        return command  # best effort: teardown still ends the process
    return [setpriv, f"--pdeathsig={signame}", "--", *command]


class _Daemon:
    """A server process in its own process group, output appended to a log file.

    The process is the server itself (``setpriv`` execs in place), so signals reach it.
    """

    def __init__(self, what: str, log_path: Path, *, as_user: str | None = None) -> None:
        self.what = what
        self.log_path = log_path
        self._as_user = as_user
        self.process: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        """The last lines of the server's output, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-40:])

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.what} is not running"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self, command: list[str], *, death_signal: str) -> None:
        assert not self.alive(), f"{self.what} is already running"
        command = _with_parent_death_signal(command, death_signal)
        user: str | None = None
        if self._as_user is not None:
            setpriv = _setpriv()
            if setpriv is not None:
                command = [
                    setpriv,
                    f"--reuid={self._as_user}",
                    f"--regid={self._as_user}",
                    "--init-groups",
                    "--",
                    *command,
                ]
            else:
                user = self._as_user
        log: IO[bytes]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                group=user,
                extra_groups=[] if user is not None else None,
            )

    def end(self, signals: tuple[signal.Signals, ...]) -> None:
        """Send each signal in turn until the process exits; SIGKILL the group last.

        A frozen (SIGSTOPped) process is continued first, or it could not act on them.
        """
        process = self.process
        if process is None:
            return
        try:
            for signum in (*signals, signal.SIGKILL):
                if process.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    if signum is signal.SIGKILL:
                        os.killpg(process.pid, signal.SIGKILL)
                    else:
                        os.kill(process.pid, signum)
                        os.kill(process.pid, signal.SIGCONT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_TIMEOUT)
            if process.poll() is None:
                pytest.fail(f"{self.what} (pid {process.pid}) did not exit\n{self.log()}")
        finally:
            self.process = None

    def freeze(self) -> None:
        """SIGSTOP the process: its port still accepts connections, nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


# -- PostgreSQL ------------------------------------------------------------------------


def _postgres_bindir() -> Path:
    override = os.environ.get("PETSAGE_TEST_PG_BINDIR")
    candidates = [override] if override else sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    for candidate in reversed(candidates):
        if (Path(candidate) / "postgres").is_file() and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    pytest.fail(
        "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin "
        "(or $PETSAGE_TEST_PG_BINDIR): install the Debian package 'postgresql' "
        "(scripts/test does this when run as root)",
        pytrace=False,
    )


class PostgresCluster:
    """A data directory made by ``initdb``, with the ``petsage`` roles and database.

    One server at a time may run on it (:meth:`server`).
    """

    def __init__(self, bindir: Path, base: Path, *, as_user: str | None) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "sock"
        self.as_user = as_user
        self.password = secrets.token_hex(16)
        """The password of :data:`AUTH_ROLE`."""

    def run(self, *args: str) -> str:
        """Run a program from the PostgreSQL bin directory (as its user); return its output."""
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user is not None:
            setpriv = _setpriv()
            if setpriv is not None:
                command = [
                    setpriv,
                    f"--reuid={self.as_user}",
                    f"--regid={self.as_user}",
                    "--init-groups",
                    "--",
                    *command,
                ]
            else:
                command = ["runuser", "-u", self.as_user, "--", *command]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            cwd=self.base,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result.stdout

    def initdb(self) -> None:
        self.run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            _SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        # First match wins: the password role must authenticate over TCP, everyone
        # else is trusted. Only loopback connections are accepted at all.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {AUTH_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        server = self.server()
        server.start()
        try:
            server.psql(
                f"CREATE ROLE {ROLE} LOGIN",
                f"CREATE DATABASE {DATABASE} OWNER {ROLE}",
                f"CREATE ROLE {AUTH_ROLE} LOGIN PASSWORD '{self.password}'",
            )
        finally:
            server.stop()

    def server(self, port: int | None = None) -> PostgresServer:
        return PostgresServer(self, free_port() if port is None else port)


class PostgresServer:
    """One ``postgres`` process on 127.0.0.1:*port*; stop and start it as often as needed."""

    def __init__(self, cluster: PostgresCluster, port: int) -> None:
        self.cluster = cluster
        self.host = "127.0.0.1"
        self.port = port
        self._daemon = _Daemon(
            f"PostgreSQL on port {port}", cluster.base / "postgres.log", as_user=cluster.as_user
        )

    def url(self, role: str = ROLE) -> str:
        """A ``postgresql://`` URL for *role* (never with a password)."""
        return f"postgresql://{role}@{self.host}:{self.port}/{DATABASE}"

    def log(self) -> str:
        return self._daemon.log()

    @property
    def running(self) -> bool:
        return self._daemon.alive()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        command = [
            str(self.cluster.bindir / "postgres"),
            "-D",
            str(self.cluster.data),
            "-p",
            str(self.port),
            "-k",
            str(self.cluster.socket_dir),
            "-c",
            f"listen_addresses={self.host}",
            # A throwaway cluster: durability only costs time.
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "synchronous_commit=off",
        ]
        # SIGQUIT is PostgreSQL's immediate shutdown: the postmaster ends its backends too.
        self._daemon.spawn(command, death_signal="QUIT")
        _wait_until(
            self._accepts_connections,
            f"PostgreSQL on port {self.port}",
            timeout=START_TIMEOUT,
            alive=self._daemon.alive,
            log=self._daemon.log,
        )

    def _accepts_connections(self) -> bool:
        result = subprocess.run(
            [
                str(self.cluster.bindir / "pg_isready"),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--username",
                _SUPERUSER,
                "--dbname",
                "postgres",
                "--timeout",
                "2",
                "--quiet",
            ],
            check=False,
            timeout=COMMAND_TIMEOUT,
        )
        return result.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then immediate, then SIGKILL."""
        self._daemon.end((signal.SIGINT, signal.SIGQUIT))

    def restart(self) -> None:
        """Stop if running, then start again on the same port."""
        self.stop()
        self.start()

    def psql(self, *statements: str) -> str:
        """Run SQL statements as the superuser over TCP."""
        args = ["psql", "--no-psqlrc", "--set", "ON_ERROR_STOP=1", "--tuples-only"]
        args += ["--host", self.host, "--port", str(self.port), "--username", _SUPERUSER]
        args += ["--dbname", "postgres"]
        for statement in statements:
            args += ["--command", statement]
        return self.cluster.run(*args)


@pytest.fixture(name="postgres_cluster", scope="session")
def postgres_cluster_fixture() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster, initialised once per session in a private temporary directory."""
    bindir = _postgres_bindir()
    as_user: str | None = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(_OS_USER)
        except KeyError:
            pytest.fail(
                f"running as root, but there is no {_OS_USER!r} system user to run PostgreSQL"
            )
        as_user = _OS_USER
    # Not pytest's tmp_path: its parent directories are private to the user running pytest.
    base = Path(tempfile.mkdtemp(prefix="petsage-pg-"))
    try:
        (base / "sock").mkdir()
        if as_user is not None:
            for path in (base, base / "sock"):
                os.chown(path, account.pw_uid, account.pw_gid)
        cluster = PostgresCluster(bindir, base, as_user=as_user)
        cluster.initdb()
        yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="postgres_server")
def postgres_server_fixture(postgres_cluster: PostgresCluster) -> Iterator[PostgresServer]:
    """A running PostgreSQL server on a free port, stopped at teardown whatever happened."""
    server = postgres_cluster.server()
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- Redis -----------------------------------------------------------------------------


class RedisServer:
    """One ``redis-server`` on 127.0.0.1:*port*, without persistence."""

    def __init__(self, binary: str, directory: Path, port: int, password: str | None) -> None:
        self.binary = binary
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = port
        self.password = password
        self._daemon = _Daemon(f"Redis on port {port}", directory / "redis.log")

    def url(self, db: int = 0) -> str:
        """A ``redis://`` URL (never with a password)."""
        return f"redis://{self.host}:{self.port}/{db}"

    def log(self) -> str:
        return self._daemon.log()

    @property
    def running(self) -> bool:
        return self._daemon.alive()

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        command = [self.binary, "--port", str(self.port), "--bind", self.host]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        command += ["--daemonize", "no", "--logfile", ""]
        if self.password is not None:
            command += ["--requirepass", self.password]
        # No persistence, so nothing is lost by SIGKILL; SIGTERM could not reach a frozen one.
        self._daemon.spawn(command, death_signal="KILL")
        _wait_until(
            self._answers,
            f"Redis on port {self.port}",
            timeout=START_TIMEOUT,
            alive=self._daemon.alive,
            log=self._daemon.log,
        )

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as connection:
                connection.sendall(b"PING\r\n")
                reply = connection.recv(64)
        except OSError:
            return False
        # With requirepass, an unauthenticated PING is refused: the server is up all the same.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        """SIGTERM (Redis closes its clients and exits), then SIGKILL."""
        self._daemon.end((signal.SIGTERM,))

    def restart(self) -> None:
        """Stop if running, then start again on the same port."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): connections are accepted by the kernel, never answered."""
        self._daemon.freeze()

    def thaw(self) -> None:
        self._daemon.thaw()


def _redis_binary() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )
    if binary is None:
        pytest.fail(
            "redis-server not found on PATH: install the Debian package 'redis-server' "
            "(scripts/test does this when run as root)",
            pytrace=False,
        )
    return binary


@pytest.fixture(name="start_redis")
def start_redis_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisServer]]:
    """Start Redis servers (``password=`` sets requirepass); all are stopped at teardown."""
    binary = _redis_binary()
    started: list[RedisServer] = []

    def start(*, password: str | None = None) -> RedisServer:
        directory = tmp_path_factory.mktemp("redis")
        server = RedisServer(binary, directory, free_port(), password)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(name="redis_server")
def redis_server_fixture(start_redis: Callable[..., RedisServer]) -> RedisServer:
    """A running Redis server on a free port, without a password."""
    return start_redis()


# -- black hole ------------------------------------------------------------------------


class BlackHole:
    """A TCP server that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.05)
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._accepted = 0
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def accepted(self) -> int:
        """How many connections have been accepted so far."""
        with self._lock:
            return self._accepted

    def open_connections(self) -> int:
        """How many accepted connections the clients have not closed yet.

        What clients sent is read and thrown away; a connection whose client has closed
        it is closed here too.
        """
        with self._lock:
            self._held = [c for c in self._held if not _closed_by_peer(c)]
            return len(self._held)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.setblocking(False)
            with self._lock:
                self._accepted += 1
                self._held.append(connection)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(STOP_TIMEOUT)
        self._listener.close()
        with self._lock:
            for connection in self._held:
                connection.close()
            self._held = []


def _closed_by_peer(connection: socket.socket) -> bool:
    """Read everything pending; True (and close it) if the peer has closed the connection."""
    try:
        while connection.recv(65536):
            pass
    except BlockingIOError:
        return False  # open, nothing more to read
    except OSError:
        pass  # reset by the peer
    connection.close()
    return True


@pytest.fixture(name="black_hole")
def black_hole_fixture() -> Iterator[BlackHole]:
    """A black hole on a free loopback port, closed at teardown."""
    hole = BlackHole()
    try:
        yield hole
    finally:
        hole.close()
