"""What the lifecycle refuses with: the domain errors the edges answer (``twistedgw.web.errors``
maps each to an HTTP status; the proxy to a close code)."""

from __future__ import annotations

from twistedgw.sandbox import Tombstone


class SandboxNotFound(Exception):
    """No sandbox with that id (or not one this gateway may show)."""

    def __init__(self, sandbox_id: str, tombstone: Tombstone | None = None) -> None:
        super().__init__(sandbox_id)
        self.sandbox_id = sandbox_id
        self.tombstone = tombstone


class InvalidSettings(ValueError):
    """Creation options that are malformed or beyond the server's maxima."""


class IdempotencyConflict(InvalidSettings):
    """An Idempotency-Key was used again with other creation options."""


class CapacityExceeded(Exception):
    """The gateway already runs its maximum number of sandboxes."""


class Recovering(Exception):
    """The gateway has started but not yet recovered its sandboxes from the runtime, so it
    cannot tell whether a sandbox exists (answered as 503 with ``Retry-After``)."""

    #: Seconds a client should wait before asking again.
    retry_after = 1
