"""Where the replicas are: ``dns:///NAME:PORT``, ``dns://SERVER/NAME:PORT`` or ``HOST:PORT``.

``dns:///`` asks the system resolver (``getaddrinfo``: /etc/hosts, then the cluster's DNS),
as grpc's own ``dns:///`` target does. ``dns://SERVER[:PORT]/`` asks that DNS server and no
other (A and AAAA records), through dnspython, the optional ``fleet`` extra: grpc core can
resolve such a target too, but gives a channel, never the addresses behind it, and the
fleet view needs each one. A plain ``HOST:PORT`` is one replica, followed as written.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Final

__all__ = ["DiscoveryError", "Target", "check_available", "parse_target", "resolve"]

_DEFAULT_PORT: Final = 443  # what grpc assumes for a dns: target without a port
_DNS_PORT: Final = 53
# getaddrinfo's "no such name" and "no address": an empty answer, not a failure.
_NO_SUCH_NAME: Final = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


class DiscoveryError(Exception):
    """A target cannot be read, or its name cannot be resolved (one line, for people)."""


@dataclass(frozen=True, kw_only=True)
class Target:
    """One ``--discover`` argument, parsed."""

    text: str
    host: str
    port: int
    dns: bool
    """Resolve *host* to every address behind it (else: *host* is one replica)."""
    server: tuple[str, int] | None = None
    """The DNS server to ask (``dns://SERVER/``); None: the system resolver."""


def _split_host_port(text: str, *, default_port: int | None, what: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise DiscoveryError(f"{what}: bad address {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise DiscoveryError(f"{what}: put an IPv6 address in brackets: [{text}]:PORT")
    else:
        host, port_text = text, ""
    if not host:
        raise DiscoveryError(f"{what}: no host in {text!r}")
    if not port_text:
        if default_port is None:
            raise DiscoveryError(f"{what}: no port in {text!r} (HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DiscoveryError(f"{what}: bad port {port_text!r}")
    return host, int(port_text)


def parse_target(text: str) -> Target:
    """Parse a ``--discover`` value.

    Raises:
        DiscoveryError: the value is not one of the three forms.
    """
    if text.startswith("dns:"):
        rest = text.removeprefix("dns:")
        server = None
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if not slash:
                raise DiscoveryError(f"{text}: expected dns:///NAME:PORT or dns://SERVER/NAME:PORT")
            if authority:
                server_host, server_port = _split_host_port(
                    authority, default_port=_DNS_PORT, what=text
                )
                try:
                    ipaddress.ip_address(server_host)
                except ValueError:
                    raise DiscoveryError(
                        f"{text}: the DNS server must be an IP address, not {server_host!r}"
                    ) from None
                server = (server_host, server_port)
        host, port = _split_host_port(rest, default_port=_DEFAULT_PORT, what=text)
        return Target(text=text, host=host, port=port, dns=True, server=server)
    if "://" in text:
        raise DiscoveryError(f"{text}: only dns: targets and HOST:PORT are supported")
    host, port = _split_host_port(text, default_port=None, what=text)
    return Target(text=text, host=host, port=port, dns=False)


def check_available(target: Target) -> None:
    """Fail now if resolving *target* needs what is not installed.

    Raises:
        DiscoveryError: ``dns://SERVER/`` without dnspython (the ``fleet`` extra).
    """
    if target.server is None:
        return
    from petsage_grpc._extras import missing_extra  # noqa: PLC0415

    problem = missing_extra("fleet", feature=f"--discover {target.text}", modules=("dns",))
    if problem is not None:
        raise DiscoveryError(f"{problem} (dns:///NAME:PORT uses the system resolver)")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(target: Target, *, limit: float) -> list[str]:
    """Every replica's ``host:port`` behind *target*, sorted, without duplicates.

    A name that does not exist, or has no address, gives an empty list: a headless
    Service with no pod left answers so.

    Raises:
        DiscoveryError: no answer in time, the resolver failed, or the ``fleet`` extra is
            missing for ``dns://SERVER/``.
    """
    if not target.dns:
        return [_join(target.host, target.port)]
    try:
        ipaddress.ip_address(target.host)
    except ValueError:
        pass
    else:
        return [_join(target.host, target.port)]
    if target.server is None:
        hosts = await _system(target, limit)
    else:
        hosts = await _ask_server(target, target.server, limit)
    return sorted({_join(host, target.port) for host in hosts}, key=_address_order)


def _address_order(address: str) -> tuple[int, bytes, int]:
    host, _, port = address.rpartition(":")
    parsed = ipaddress.ip_address(host.strip("[]"))
    return parsed.version, parsed.packed, int(port)


async def _system(target: Target, limit: float) -> set[str]:
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(
            loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), limit
        )
    except TimeoutError:
        raise DiscoveryError(f"{target.text}: no answer from the resolver") from None
    except socket.gaierror as error:
        if error.errno in _NO_SUCH_NAME:
            return set()
        raise DiscoveryError(f"{target.text}: the resolver failed") from None
    return {str(info[4][0]) for info in found}


async def _ask_server(target: Target, server: tuple[str, int], limit: float) -> set[str]:
    try:
        import dns.asyncresolver  # noqa: PLC0415 - optional: the fleet extra
        import dns.exception  # noqa: PLC0415
        import dns.resolver  # noqa: PLC0415
    except ImportError:
        check_available(target)  # says which extra, when it is missing
        raise DiscoveryError(f"{target.text}: dnspython cannot be loaded") from None
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server[0]]
    resolver.port = server[1]
    resolver.lifetime = limit
    hosts: set[str] = set()
    answered = False
    for record_type in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(target.host, record_type, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            answered = True
            continue
        except dns.exception.DNSException:
            continue
        answered = True
        hosts.update(record.to_text() for record in answer)
    if not answered:
        raise DiscoveryError(f"{target.text}: no answer from the DNS server")
    return hosts
