"""How the gateway reaches an agent: the ``IAgents`` interface the lifecycle uses (wait for a
new sandbox's agent, open a connection for a client, list an agent's sessions), and its one
failure, ``AgentUnavailable``. The WebSocket implementation is
``twistedgw.proxy.agent.WebSocketAgents``; nothing here imports Autobahn."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail
from zope.interface import Interface, implementer


class AgentUnavailable(Exception):
    """The sandbox's agent could not be reached or refused the gateway."""


class AgentLink(Protocol):
    """An open connection to one agent, as far as the lifecycle sees it."""

    def close(self) -> None: ...


class IAgents(Interface):  # pragma: no mutate block (zope declarations, no code)
    """Connections to agents (TCP on 127.0.0.1, or a Unix socket), on the reactor thread."""

    def wait_ready(
        host: str, port: int, secret: str, timeout: float, unix_socket: str | None = None
    ) -> Deferred[None]:
        """Fire once the agent completes an authenticated handshake; ``AgentUnavailable``
        after ``timeout`` seconds."""

    def connect(
        host: str,
        port: int,
        secret: str,
        timeout: float,
        max_message_size: int = 0,
        unix_socket: str | None = None,
    ) -> Deferred[Any]:
        """A new ``AgentLink`` to the agent; ``AgentUnavailable`` if it cannot be had."""

    def list_sessions(link: Any, timeout: float) -> Deferred[set[str]]:
        """The names of the sessions the agent behind ``link`` has now."""

    def list_processes(link: Any, timeout: float) -> Deferred[list[dict[str, Any]]]:
        """The process table of the agent behind ``link`` (``processes``' entries)."""


@implementer(IAgents)
class NoAgents:
    """``IAgents`` for a manager that never talks to an agent (tests of the lifecycle alone):
    every call fails with ``AgentUnavailable``."""

    def wait_ready(self, *args: Any, **kwargs: Any) -> Deferred[None]:
        return _unavailable()

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return _unavailable()

    def list_sessions(self, *args: Any, **kwargs: Any) -> Deferred[set[str]]:
        return _unavailable()

    def list_processes(self, *args: Any, **kwargs: Any) -> Deferred[list[dict[str, Any]]]:
        return _unavailable()


def _unavailable() -> Deferred[Any]:
    return fail(AgentUnavailable("this gateway has no way to reach agents"))
