"""``EgressProxies``: one egress proxy listener per egress sandbox, following the registry.

An egress sandbox has no network (like ``network: none``) and a socket directory on the host,
bind-mounted at ``/run/twistedgw``; the gateway listens on ``proxy.sock`` in it (a name no
longer than ``agent.sock``: Unix socket paths are limited to 107 bytes), and the agent
forwards the sandbox's proxy port there. The directory belongs to the agent's uid,
mode 0700, so user code reaches the proxy only through the agent's forwarder; the socket is
given to the agent's uid too (mode 0600).

Listeners follow the registry: a sandbox that is added (created, or recovered after a gateway
restart) gets one, a sandbox that is forgotten loses it and its connections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from twistedgw.egress.policy import EgressPolicy
from twistedgw.egress.proxy import Connector, EgressProxyFactory
from twistedgw.egress.resolver import IEgressResolver
from twistedgw.runtime.hardening import AGENT_UID, EGRESS_SOCKET_NAME
from twistedgw.sandbox import Sandbox

#: Listen backlog of each proxy socket: a burst of connections from one sandbox (the agent
#: connects once per user connection) must not be refused while the reactor is busy.
BACKLOG = 1024


class EgressProxies(Service):
    """The egress proxies of this gateway's sandboxes, by sandbox id."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        policy: EgressPolicy,
        resolver: IEgressResolver,
        connect: Connector | None = None,
    ) -> None:
        self.reactor = reactor
        self.policy = policy
        self.resolver = resolver
        self._connect = connect
        self.listeners: dict[str, tuple[Any, EgressProxyFactory]] = {}

    def socket_path(self, sandbox: Sandbox) -> Path | None:
        """Host path of ``sandbox``'s egress socket (``None``: it has no socket directory)."""
        if sandbox.agent_socket is None:
            return None
        return Path(sandbox.agent_socket).parent / EGRESS_SOCKET_NAME

    def sandbox_added(self, sandbox: Sandbox) -> None:
        egress = sandbox.settings.egress
        if egress is None or sandbox.sandbox_id in self.listeners:
            return
        path = self.socket_path(sandbox)
        if path is None:
            self._log.error(
                "egress sandbox {sandbox_id} has no socket directory; it has no egress",
                sandbox_id=sandbox.sandbox_id,
            )
            return
        factory = EgressProxyFactory(
            sandbox.sandbox_id, egress, self.policy, self.resolver, self.reactor, self._connect
        )
        try:
            if path.is_socket():
                path.unlink()  # left by an earlier gateway process
            port = self.reactor.listenUNIX(str(path), factory, backlog=BACKLOG, mode=0o600)
        except Exception:
            self._log.failure(
                "cannot listen for sandbox {sandbox_id}'s egress on {path}",
                sandbox_id=sandbox.sandbox_id,
                path=str(path),
            )
            return
        try:
            os.chown(path, AGENT_UID, AGENT_UID)
        except PermissionError:
            # A gateway not running as root: its socket directory is open to all anyway.
            path.chmod(0o666)
        self.listeners[sandbox.sandbox_id] = (port, factory)
        self._log.info(
            "egress proxy for sandbox {sandbox_id}: {patterns}",
            sandbox_id=sandbox.sandbox_id,
            patterns=", ".join(egress) or "(nothing allowed)",
        )

    def sandbox_removed(self, sandbox: Sandbox) -> None:
        entry = self.listeners.pop(sandbox.sandbox_id, None)
        if entry is not None:
            self._stop(*entry)

    def _stop(self, port: Any, factory: EgressProxyFactory) -> None:
        factory.close_all()
        d = port.stopListening()
        if d is not None:
            # The socket file may be gone with its directory already.
            d.addErrback(lambda f: f.trap(FileNotFoundError))

    def stopService(self) -> None:
        super().stopService()
        for port, factory in self.listeners.values():
            self._stop(port, factory)
        self.listeners.clear()
