"""TLS and mTLS server credentials that follow certificate files as they are rotated.

cert-manager (and Kubernetes secret volumes in general) replace the files in place. grpc
core asks for the current certificate configuration on every new handshake; the fetcher
here answers from a cheap ``stat`` and re-reads the files only when they changed, so a
renewed certificate is served without a restart and without dropping connections.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass

import grpc

__all__ = ["TlsError", "TlsFiles", "server_credentials"]

_log = logging.getLogger("petsage_grpc.tls")


class TlsError(ValueError):
    """The certificate, key or client CA cannot be used; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """PEM files for a TLS listener."""

    cert: str
    """The server certificate chain."""
    key: str
    """The server's private key."""
    client_ca: str | None = None
    """CA certificates that client certificates must chain to; setting it requires mTLS."""


def _stamp(files: TlsFiles) -> tuple[tuple[int, int], ...]:
    paths = [files.cert, files.key] + ([files.client_ca] if files.client_ca else [])
    return tuple((s.st_mtime_ns, s.st_size) for s in (os.stat(p) for p in paths))


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise TlsError(f"cannot read the {what} {path}: {error.strerror or error}") from None


def _load(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the files: the key must match the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(
            f"the certificate {files.cert} and key {files.key} are not a usable pair: {error}"
        ) from None
    root = None
    if files.client_ca:
        root = _read(files.client_ca, "client CA file")
        try:
            context.load_verify_locations(cadata=root.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise TlsError(
                f"the client CA file {files.client_ca} holds no usable CA: {error}"
            ) from None
    pair = (_read(files.key, "private key"), _read(files.cert, "certificate"))
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)


class _Rotation:
    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamp = _stamp(files)
        self.initial = _load(files)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc core per handshake: None keeps the current configuration."""
        try:
            stamp = _stamp(self._files)
        except OSError:
            return None  # mid-rotation; the old certificate keeps serving
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                config = _load(self._files)
            except TlsError as error:
                _log.warning("certificate files changed but cannot be used yet: %s", error)
                return None
            self._stamp = stamp
        _log.info("certificate files reloaded", extra={"event": "tls_reloaded"})
        return config


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port`` that pick up rotated files.

    Raises:
        TlsError: a file cannot be read, or the key does not match the certificate.
    """
    try:
        rotation = _Rotation(files)
    except OSError as error:
        raise TlsError(f"cannot read {error.filename}: {error.strerror or error}") from None
    return grpc.dynamic_ssl_server_credentials(
        rotation.initial,
        # grpc documents None as "no change"; the stub's return type leaves it out.
        rotation.fetch,  # type: ignore[arg-type]
        require_client_authentication=files.client_ca is not None,
    )
