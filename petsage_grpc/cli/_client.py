"""How the command-line clients (probe, status) reach a server: address, TLS, user agent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

__all__ = ["Connection"]


@dataclass(frozen=True, kw_only=True)
class Connection:
    """Where and how to connect, as grpc_health_probe's flags describe it."""

    addr: str
    user_agent: str
    connect_timeout: float
    tls: bool = False
    tls_no_verify: bool = False
    tls_ca_cert: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    tls_server_name: str = ""

    @property
    def target(self) -> str:
        # Go dials ":50051" on the local machine; grpc core needs a host.
        return f"localhost{self.addr}" if self.addr.startswith(":") else self.addr

    def channel_arguments(
        self,
    ) -> tuple[str, grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
        """The target, credentials (None: plaintext) and options for a grpc channel.

        With ``tls_no_verify`` the target is a loopback relay that makes the TLS
        connection without verifying the server (grpcio cannot skip verification).

        Raises:
            OSError: a TLS file cannot be read, holds nothing usable, or the client key
                does not fit the certificate (ssl.SSLError is an OSError).
        """
        import grpc  # noqa: PLC0415 - only once the arguments are known to be good

        options: list[tuple[str, Any]] = [("grpc.primary_user_agent", self.user_agent)]
        if not self.tls:
            return self.target, None, options
        if self.tls_no_verify:
            from petsage_grpc.cli._tls_relay import start_unverified_tls_relay  # noqa: PLC0415

            host, _, port = self.target.rpartition(":")
            relay = start_unverified_tls_relay(
                host.strip("[]"),
                int(port),
                cert=self.tls_client_cert or None,
                key=self.tls_client_key or None,
                timeout=self.connect_timeout,
            )
            return relay, None, options
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        _check_tls_files(self.tls_ca_cert, self.tls_client_cert, self.tls_client_key)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca_cert),
            private_key=_read(self.tls_client_key),
            certificate_chain=_read(self.tls_client_cert),
        )
        return self.target, credentials, options

    def aio_channel(self, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel, with extra channel *options*.

        See :meth:`channel_arguments` for errors.
        """
        import grpc  # noqa: PLC0415

        target, credentials, defaults = self.channel_arguments()
        options = [*defaults, *options]
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)


def _check_tls_files(ca: str, cert: str, key: str) -> None:
    """Fail now, as Go's TLS config does, on files grpc would only reject at handshake.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: the CA file holds no certificate, or the key does not fit the cert.
    """
    import ssl  # noqa: PLC0415

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        context.load_verify_locations(cafile=ca)
        if not context.get_ca_certs():
            raise ssl.SSLError(f"no root CA certs parsed from file {ca}")
    if cert and key:
        context.load_cert_chain(cert, key)


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as file:
        return file.read()
