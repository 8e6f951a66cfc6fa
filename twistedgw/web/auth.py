"""API tokens: who may use the gateway, and which sandboxes are theirs.

With no tokens configured the gateway is open (local development) and every sandbox is
everyone's. With tokens, every REST route and WebSocket handshake must present one, as
``Authorization: Bearer TOKEN`` or, for browsers that cannot set headers on a WebSocket, as the
``access_token`` query parameter. A sandbox belongs to the token that created it (an owner id
derived from the token, never the token itself, is stored in a container label); other tokens
cannot see it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from attrs import frozen

TOKENS_ENV = "TWISTEDGW_TOKENS"
QUERY_PARAMETER = "access_token"


class Unauthorized(Exception):
    """No valid token was presented."""


def owner_id(token: str) -> str:
    """A stable, non-reversible id for a token (what labels and logs may carry)."""
    return hashlib.sha256(b"twistedgw-owner:" + token.encode("utf-8")).hexdigest()[:24]


def read_tokens(path: Path | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Tokens from a file (one per line, ``#`` comments) and from ``$TWISTEDGW_TOKENS``
    (comma separated). Raises ``ValueError`` for unusable tokens."""
    tokens: list[str] = []
    if path is not None:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    tokens += [t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    for token in tokens:
        if len(token) < 16 or any(c.isspace() for c in token):
            raise ValueError("API tokens must be at least 16 characters, without spaces")
    return tokens


@frozen
class Authenticator:
    """Checks presented tokens in constant time; ``None`` owner means open mode."""

    _tokens: tuple[bytes, ...]

    @classmethod
    def from_tokens(cls, tokens: Iterable[str]) -> Authenticator:
        return cls(tuple(t.encode("utf-8") for t in tokens))

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def owner_for(self, authorization: str | None, query_token: str | None) -> str | None:
        """The owner id of the presented token; raises ``Unauthorized``.

        In open mode (no tokens configured) everyone is the anonymous owner ``None``.
        """
        if not self._tokens:
            return None
        presented = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                presented = value.strip()
        if presented is None and query_token:
            presented = query_token
        if presented is None:
            raise Unauthorized("missing API token (Authorization: Bearer ...)")
        candidate = presented.encode("utf-8")
        # Compare against every token, without stopping at a match: the time taken does not
        # say which token (or how much of one) matched.
        matched: bytes | None = None
        for token in self._tokens:
            if hmac.compare_digest(candidate, token):
                matched = token
        if matched is None:
            raise Unauthorized("invalid API token")
        return owner_id(matched.decode("utf-8"))
