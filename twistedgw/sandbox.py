"""The ``Sandbox`` record, its status words, and the in-memory registry of sandboxes.

The registry is a cache of what Docker knows (Docker is the source of truth); it is only ever
touched on the reactor thread.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any, Protocol

from attrs import define, field, frozen

#: Status words of the seed contract (GET answers ``idle`` or ``connected``).
IDLE = "idle"
CONNECTED = "connected"
#: The finer ``state`` under ``?details=true``: ``created`` until a client first attaches,
#: then ``connected`` while one is, ``idle`` after.
CREATED = "created"

#: Why a sandbox was removed (reported by GET for a while afterwards).
REASON_DELETED = "deleted"
REASON_IDLE = "idle"
REASON_LIFETIME = "lifetime"
REASON_EXITED = "exited"

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


@frozen
class Resources:
    """What one sandbox may use: CPUs, memory (bytes) and disk (bytes of its home tmpfs)."""

    cpus: float
    memory: int
    disk: int

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory": self.memory, "disk": self.disk}


@frozen
class ResourceRequest:
    """A creator's ``cpus``, ``memory`` and ``disk`` (each ``None``: the template's), already
    checked against the server's maxima."""

    cpus: float | None = None
    memory: int | None = None
    disk: int | None = None


@frozen
class SandboxSettings:
    """What a creator chose for a sandbox (within the server's maxima).

    Stored in the container's labels and environment, so it survives gateway restarts.
    """

    idle_timeout: float
    max_lifetime: float | None = None
    metadata: Mapping[str, str] = field(factory=dict)
    env: Mapping[str, str] = field(factory=dict)
    idempotency_key: str | None = None
    #: Owner id of the API token that created it (``None``: created with auth off).
    owner: str | None = None
    #: ``bridge`` (Docker's default network, as in the seed) or ``none`` (no network at all).
    network: str = "bridge"
    #: Egress by allow-list: ``host:port`` patterns (network ``none`` plus the gateway's
    #: egress proxy); ``None``: no egress proxy.
    egress: tuple[str, ...] | None = None
    #: The template (image and its resource defaults) the sandbox was made from.
    template: str = "default"
    #: What the creator asked for in ``cpus``/``memory``/``disk`` (``None``: nothing; such a
    #: create may come from the warm pool). Only seen while creating.
    requested: ResourceRequest | None = None
    #: What the sandbox got, fixed when its container is made (server defaults < template
    #: labels < ``requested``) and kept in its labels; ``None``: not yet resolved, or a
    #: container of an older gateway.
    resources: Resources | None = None


class SandboxPaused(Exception):
    """The sandbox is paused (``docker pause``): nothing runs in it until it is resumed."""


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
    settings: SandboxSettings
    #: Host path of the agent's Unix socket, for sandboxes without a network.
    agent_socket: str | None = None
    expires_at: float | None = None
    attachments: set[Attachment] = field(factory=set, repr=False, eq=False)
    ever_connected: bool = False
    #: Came from the warm pool: its settings live in the state file, not in its labels.
    from_pool: bool = False
    #: Set while the gateway removes the sandbox: the close code and reason its clients
    #: get, even when the agent link drops first.
    closing: tuple[int, str] | None = field(default=None, repr=False, eq=False)
    #: Session names clients used and did not close, as far as this gateway saw them.
    sessions: set[str] = field(factory=set, repr=False, eq=False)
    #: Sessions lost when the agent was lost and came back, until a command for one of them
    #: has been told so (``session_lost``).
    lost_sessions: set[str] = field(factory=set, repr=False, eq=False)
    #: How often this gateway saw the agent lost and back (killed and restarted in place).
    agent_restarts: int = 0
    #: When the sandbox was paused (``POST .../pause``), ``None`` while it runs.
    paused_at: float | None = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    @property
    def clients(self) -> int:
        """How many clients are attached now."""
        return len(self.attachments)

    @property
    def status(self) -> str:
        """The seed's word: ``connected`` while a client is attached, ``idle`` otherwise
        (a new sandbox included, as in the seed's example)."""
        return CONNECTED if self.clients > 0 else IDLE

    @property
    def state(self) -> str:
        """The finer state: ``created`` before any client attached, else as ``status``."""
        if self.clients == 0 and not self.ever_connected:
            return CREATED
        return self.status

    def idle_for(self, now: float) -> float:
        """Seconds without clients or command activity; 0 while a client is attached."""
        if self.clients > 0:
            return 0.0
        return max(0.0, now - self.last_activity)

    def is_idle_expired(self, now: float) -> bool:
        """True when idle longer than its idle timeout."""
        return self.clients == 0 and self.idle_for(now) > self.settings.idle_timeout

    def is_lifetime_over(self, now: float) -> bool:
        """True when past its maximum lifetime (connected or not)."""
        return self.expires_at is not None and now >= self.expires_at

    def attach(self, client: Attachment, now: float) -> None:
        """``client`` attached."""
        self.attachments.add(client)
        self.ever_connected = True
        self.last_activity = now

    def detach(self, client: Attachment, now: float) -> None:
        """``client`` left; the idle clock starts from now."""
        self.attachments.discard(client)
        self.last_activity = now

    def touch(self, now: float) -> None:
        """Command activity."""
        self.last_activity = now

    def to_json(self, details: bool = False) -> dict[str, Any]:
        """The seed's JSON description of a sandbox.

        Additions are opt-in: ``metadata`` appears when the creator set some, the rest only
        when ``details`` is asked for.
        """
        body: dict[str, Any] = {
            "sandbox_id": self.sandbox_id,
            "status": self.status,
            "created_at": self.created_at,
            "ip_address": self.ip_address,
        }
        if self.settings.metadata or details:
            body["metadata"] = dict(self.settings.metadata)
        if details:
            body.update(
                state=self.state,
                clients=self.clients,
                last_activity=self.last_activity,
                idle_timeout=self.settings.idle_timeout,
                expires_at=self.expires_at,
                agent_restarts=self.agent_restarts,
                lost_sessions=sorted(self.lost_sessions),
                paused=self.paused,
                template=self.settings.template,
                network=self.settings.network,
                egress=None if self.settings.egress is None else list(self.settings.egress),
                resources=None
                if self.settings.resources is None
                else self.settings.resources.to_json(),
            )
        return body


@frozen
class Tombstone:
    """What is left of a removed sandbox: when and why it went."""

    sandbox_id: str
    reason: str
    removed_at: float
    detail: str = ""
    owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "status": "removed",
            "reason": self.reason,
            "removed_at": self.removed_at,
            "detail": self.detail,
        }


@define
class Graveyard:
    """Recently removed sandboxes, so "it vanished" is always explainable. Bounded in size
    and age."""

    max_entries: int = 10_000
    max_age: float = 24 * 3600.0
    _entries: dict[str, Tombstone] = field(factory=dict)

    def bury(self, tombstone: Tombstone) -> None:
        self._entries.pop(tombstone.sandbox_id, None)
        self._entries[tombstone.sandbox_id] = tombstone
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def get(self, sandbox_id: str, now: float) -> Tombstone | None:
        tombstone = self._entries.get(sandbox_id)
        if tombstone is not None and now - tombstone.removed_at > self.max_age:
            del self._entries[sandbox_id]
            return None
        return tombstone

    def __len__(self) -> int:
        return len(self._entries)
