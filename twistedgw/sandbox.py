"""The ``Sandbox`` record, its status words, and the in-memory registry of sandboxes.

The registry is a cache of what Docker knows (Docker is the source of truth); it is only ever
touched on the reactor thread.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any, Protocol

from attrs import define, field

#: Status words of the seed contract.
CREATED = "created"
IDLE = "idle"
CONNECTED = "connected"

#: 128 random bits, hex encoded: sandbox ids are capabilities, they must not be guessable.
SANDBOX_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


def new_sandbox_id() -> str:
    """Return a fresh sandbox id carrying 128 random bits."""
    return secrets.token_hex(16)


def new_agent_secret() -> str:
    """Return a fresh per-sandbox secret the gateway presents to the agent."""
    return secrets.token_urlsafe(32)


def is_valid_sandbox_id(text: str) -> bool:
    """True when ``text`` has the shape of a sandbox id (and so may be looked up at all)."""
    return SANDBOX_ID_RE.match(text) is not None


class Attachment(Protocol):
    """A client attached to a sandbox, which the gateway can disconnect."""

    def disconnect(self, code: int, reason: str) -> None:
        """Close this client's connection with a WebSocket close code and a reason."""


@define
class Sandbox:
    """One sandbox: a container of ours and what the gateway needs to reach its agent."""

    sandbox_id: str
    container_id: str
    created_at: float
    ip_address: str
    agent_host: str
    agent_port: int
    agent_secret: str = field(repr=False)
    last_activity: float
    attachments: set[Attachment] = field(factory=set, repr=False, eq=False)
    ever_connected: bool = False

    @property
    def clients(self) -> int:
        """How many clients are attached now."""
        return len(self.attachments)

    @property
    def status(self) -> str:
        """``connected`` while a client is attached, ``idle`` after, ``created`` before any."""
        if self.clients > 0:
            return CONNECTED
        if self.ever_connected:
            return IDLE
        return CREATED

    def idle_for(self, now: float) -> float:
        """Seconds without clients or command activity; 0 while a client is attached."""
        if self.clients > 0:
            return 0.0
        return max(0.0, now - self.last_activity)

    def to_json(self) -> dict[str, Any]:
        """The seed's JSON description of a sandbox."""
        return {
            "sandbox_id": self.sandbox_id,
            "status": self.status,
            "created_at": self.created_at,
            "ip_address": self.ip_address,
        }


@define
class SandboxRegistry:
    """The sandboxes this gateway knows, by id. Reactor thread only."""

    _sandboxes: dict[str, Sandbox] = field(factory=dict)

    def add(self, sandbox: Sandbox) -> None:
        """Remember ``sandbox`` (replacing any record with the same id)."""
        self._sandboxes[sandbox.sandbox_id] = sandbox

    def get(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with this id, or None."""
        return self._sandboxes.get(sandbox_id)

    def remove(self, sandbox_id: str) -> Sandbox | None:
        """Forget a sandbox; returns the record that was removed, if any."""
        return self._sandboxes.pop(sandbox_id, None)

    def __iter__(self) -> Iterator[Sandbox]:
        # A snapshot, so callers may remove entries while iterating.
        return iter(list(self._sandboxes.values()))

    def __len__(self) -> int:
        return len(self._sandboxes)

    def __contains__(self, sandbox_id: object) -> bool:
        return sandbox_id in self._sandboxes

    def attach(self, sandbox: Sandbox, client: Attachment, now: float) -> None:
        """``client`` attached to ``sandbox``."""
        sandbox.attachments.add(client)
        sandbox.ever_connected = True
        sandbox.last_activity = now

    def detach(self, sandbox: Sandbox, client: Attachment, now: float) -> None:
        """``client`` left ``sandbox``; the idle clock starts from now."""
        sandbox.attachments.discard(client)
        sandbox.last_activity = now

    def touch(self, sandbox: Sandbox, now: float) -> None:
        """Command activity on ``sandbox``."""
        sandbox.last_activity = now
