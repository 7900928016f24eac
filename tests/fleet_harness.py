"""A fleet on loopback for the fleet view's tests and benchmark: real DNS, real replicas.

``Dnsmasq`` is Debian's dnsmasq on a loopback port, answering only from a hosts file the
test rewrites (:meth:`Dnsmasq.set_hosts` reloads it with SIGHUP). Replicas are
``petsage-grpc serve`` processes on 127.0.0.2, 127.0.0.3, ... all on the same port, as
pods behind a headless Service are; each can have a ``tcp`` check against a listener of
its own, to fail its dependency by closing the listener.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import dns.exception
import dns.resolver

ROOT: Final = Path(__file__).resolve().parent.parent
NAME: Final = "pets.fleet.test"
DNSMASQ: Final = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
_LISTENING: Final = re.compile(r"serving on (\S+):(\d+)")


def port_free_on(hosts: Sequence[str]) -> int:
    """A TCP port free on every one of *hosts* a moment ago (replicas share one port)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


def dns_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 a moment ago (dnsmasq takes both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            try:
                with socket.socket() as tcp:
                    tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for UDP and TCP")


def dns_answer(port: int, name: str = NAME) -> list[str]:
    """What the DNS server on 127.0.0.1:*port* answers for *name* (A records), sorted."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = 2
    try:
        return sorted(r.to_text() for r in resolver.resolve(name, "A", search=False))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []


class Dnsmasq:
    """dnsmasq answering for :data:`NAME` from a hosts file; nothing forwarded anywhere."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        if not Path(DNSMASQ).exists():
            raise RuntimeError("dnsmasq is missing: scripts/test installs dnsmasq-base")
        self.port = port = dns_port() if port is None else port
        self.hosts = directory / "hosts"
        self.hosts.write_text("", encoding="utf-8")
        command = [
            DNSMASQ,
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--addn-hosts={self.hosts}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--port={port}",
            "--cache-size=0",
            "--local-ttl=0",
            f"--pid-file={directory / 'dnsmasq.pid'}",
            f"--log-facility={directory / 'dnsmasq.log'}",
            # Authoritative for the test domain: a name not in the hosts file is NXDOMAIN,
            # as a headless Service with no pod is, not REFUSED for want of an upstream.
            "--local=/fleet.test/",
        ]
        if os.geteuid() == 0:
            command.append("--user=root")  # no unprivileged user to switch to is needed
        self.log = directory / "dnsmasq.log"
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                dns_answer(port)
                break
            except dns.exception.DNSException:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text() if self.log.exists() else ""
                    raise RuntimeError(f"dnsmasq did not start: {log}") from None
                time.sleep(0.05)

    def set_hosts(self, addresses: Sequence[str], name: str = NAME) -> None:
        """Answer *name* with exactly *addresses*; return once dnsmasq does."""
        self.hosts.write_text("".join(f"{a} {name}\n" for a in addresses), encoding="utf-8")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while dns_answer(self.port, name) != sorted(addresses):
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq still answers {dns_answer(self.port, name)}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> Dnsmasq:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class Replica:
    """One ``petsage-grpc serve`` on *host*:*port*."""

    host: str
    port: int
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stderr is not None:
            self.process.stderr.close()


def _pump(stream: IO[str], lines: list[str]) -> None:
    try:
        for line in stream:
            lines.append(line)
    except (ValueError, OSError):
        return  # closed at teardown


def start_replica(host: str, port: int, *args: str, wait: bool = True) -> Replica:
    """Start ``serve --host HOST --port PORT ARGS``; with *wait*, return once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "petsage_grpc", "serve", "--host", host, "--port", str(port), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    replica = Replica(host, port, process)
    assert process.stderr is not None
    if wait:
        for line in process.stderr:
            replica.lines.append(line)
            if _LISTENING.search(line):
                break
        else:
            process.wait(10)
            raise RuntimeError(f"replica {host} did not start: {''.join(replica.lines)}")
    threading.Thread(target=_pump, args=(process.stderr, replica.lines), daemon=True).start()
    return replica


def wait_listening(replicas: Sequence[Replica], timeout: float = 120) -> None:
    """Wait until every replica started with ``wait=False`` says it listens."""
    deadline = time.monotonic() + timeout
    for replica in replicas:
        while not any(_LISTENING.search(line) for line in list(replica.lines)):
            if replica.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.host} did not start")
            time.sleep(0.05)
