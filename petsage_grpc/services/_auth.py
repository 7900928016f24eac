"""The optional bearer token for what is not public: List, SmokeTest's per-check detail, reflection.

Check and Watch never ask for it: the kubelet and load balancers cannot send credentials.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["BearerToken"]

UNAUTHENTICATED_DETAILS: Final = "missing or invalid bearer token"


def _digest(value: bytes) -> bytes:
    # hashlib and hmac load OpenSSL's libcrypto (about 0.7 MiB): only servers with a token.
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(value).digest()


def _equal(left: bytes, right: bytes) -> bool:
    import hmac  # noqa: PLC0415

    return hmac.compare_digest(left, right)


class BearerToken:
    """A shared secret that callers send as ``authorization: Bearer <token>``.

    Compared in constant time (of equal-length digests, so not even the length leaks);
    never logged or shown by ``repr``.

    Raises:
        ValueError: the token is empty or contains whitespace.
    """

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            raise ValueError("a bearer token must be non-empty and contain no whitespace")
        self._expected = _digest(token.encode())

    @staticmethod
    def read_file(path: str) -> str:
        """Read a token from *path* (surrounding whitespace and newlines are ignored).

        Raises:
            ValueError: the file cannot be read or holds no usable token.
        """
        try:
            with open(path, encoding="utf-8") as file:
                token = file.read().strip()
        except OSError as error:
            raise ValueError(
                f"cannot read the token file {path}: {error.strerror or error}"
            ) from None
        except UnicodeDecodeError:
            raise ValueError(f"the token file {path} is not UTF-8 text") from None
        try:
            BearerToken(token)  # the same rules as for a token given in code
        except ValueError as error:
            raise ValueError(f"the token file {path} holds no usable token: {error}") from None
        return token

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"

    def allows(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether *metadata* (a call's invocation metadata) carries this token."""
        for key, value in metadata or ():
            if key == "authorization":
                raw = value if isinstance(value, bytes) else value.encode()
                scheme, _, token = raw.strip().partition(b" ")
                # The scheme is case-insensitive (RFC 9110); the token is compared whole.
                matches = _equal(_digest(token.strip()), self._expected)
                return scheme.lower() == b"bearer" and matches
        return False
