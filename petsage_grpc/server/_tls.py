"""TLS and mTLS server credentials that follow certificate files as they are rotated.

cert-manager (and Kubernetes secret volumes in general) replace the files in place. grpc
core asks for the current certificate configuration on every new handshake; the fetcher
here answers from a cheap ``stat`` and re-reads the files only when they changed (or a
second has passed), so a renewed certificate is served without a restart and without
dropping connections, however it was copied into place.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Final

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


_RECHECK_SECONDS: Final = 1.0
"""Re-read the files at most this often even when ``stat`` shows no change (see _Rotation)."""

_Contents = tuple[bytes, ...]
"""The certificate, key and client CA files' bytes, in that order."""


class _ChangingError(Exception):
    """The files changed while they were being read: look again at the next handshake."""


def _paths(files: TlsFiles) -> list[str]:
    return [files.cert, files.key] + ([files.client_ca] if files.client_ca else [])


def _stamp(files: TlsFiles) -> tuple[tuple[int, ...], ...]:
    """What ``stat`` says of each file.

    The change time is here because nothing can set it: ``cp -p``, ``rsync -a`` and
    ``touch -r`` keep a replacement's mtime (and often its size), never its ctime or inode.
    """
    stats = [os.stat(path) for path in _paths(files)]
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in stats)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise TlsError(f"cannot read the {what} {path}: {error.strerror or error}") from None


def _contents(files: TlsFiles) -> _Contents:
    return (
        _read(files.cert, "certificate"),
        _read(files.key, "private key"),
        *([_read(files.client_ca, "client CA file")] if files.client_ca else []),
    )


def _check(files: TlsFiles) -> None:
    """Check the files as they are now: the key must match the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(
            f"the certificate {files.cert} and key {files.key} are not a usable pair: {error}"
        ) from None
    if files.client_ca:
        root = _read(files.client_ca, "client CA file")
        try:
            context.load_verify_locations(cadata=root.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise TlsError(
                f"the client CA file {files.client_ca} holds no usable CA: {error}"
            ) from None


def _read_again(files: TlsFiles) -> _Contents | None:
    try:
        return _contents(files)
    except TlsError:
        return None  # gone for a moment: changing too


def _load(files: TlsFiles, contents: _Contents) -> grpc.ServerCertificateConfiguration:
    """Check the files and return *contents* (read from them just before) as grpc's configuration.

    The ssl module checks files by path only, so the bytes are read again afterwards:
    a verdict counts only for the bytes it was made on.

    Raises:
        TlsError: the files, unchanged throughout, are not usable.
        _ChangingError: the files changed meanwhile.
    """
    try:
        _check(files)
    except TlsError:
        if _read_again(files) != contents:
            raise _ChangingError from None
        raise
    if _read_again(files) != contents:
        raise _ChangingError
    cert, key, *client_ca = contents
    return grpc.ssl_server_certificate_configuration(
        [(key, cert)], root_certificates=client_ca[0] if client_ca else None
    )


class _Rotation:
    """Answers grpc core's per-handshake question: did the files change?

    A cheap ``stat`` of each file on every handshake notices any replacement (inode,
    size, mtime, ctime); the bytes are read again when it does, and at most once a
    second anyway (a change within one tick of the file system's clock escapes
    ``stat``). New bytes are loaded only if they are not the ones in use; a pair that
    cannot be used is remembered, warned about once, and not tried again until the
    bytes change once more.
    """

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, ...], ...] | None = _stamp(files)
        self._next_read = time.monotonic() + _RECHECK_SECONDS
        contents = _contents(files)
        try:
            self.initial = _load(files, contents)
        except _ChangingError:
            raise TlsError("the certificate files changed while being read; try again") from None
        self._in_use = contents
        self._rejected: _Contents | None = None

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc core per handshake: None keeps the current configuration."""
        try:
            stamp = _stamp(self._files)
        except OSError:
            return None  # mid-rotation; the old certificate keeps serving
        now = time.monotonic()
        with self._lock:
            if stamp == self._stamp and now < self._next_read:
                return None
            self._stamp, self._next_read = stamp, now + _RECHECK_SECONDS
            try:
                config = self._load_new()
            except _ChangingError:
                self._stamp = None  # mid-rotation: look again at the next handshake
                return None
        if config is not None:
            _log.info("certificate files reloaded", extra={"event": "tls_reloaded"})
        return config

    def _load_new(self) -> grpc.ServerCertificateConfiguration | None:
        """Load the files if their bytes are new and usable. Lock held.

        Raises:
            _ChangingError: a file is missing or changed while being read.
        """
        contents = _read_again(self._files)
        if contents is None:
            raise _ChangingError
        if contents in (self._in_use, self._rejected):
            return None
        try:
            config = _load(self._files, contents)
        except TlsError as error:
            self._rejected = contents
            _log.warning("certificate files changed but cannot be used yet: %s", error)
            return None
        self._in_use, self._rejected = contents, None
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
