"""An in-process gateway on 127.0.0.1 whose sandboxes are real agent processes on the host
(``twistedgw.testing.hostagents.HostAgentRuntime``): the real site and edge, WebSocket proxy,
REST API, file routes and port previews, with token auth on. The fast counterpart of the
integration suite's gateway process: no Docker, one agent process per sandbox.

The tests run under pytest-twisted (the reactor in the main thread): clients that block (the
sync client, ``requests``) or run their own event loop (the asyncio client) run in a thread,
``in_thread``, while the reactor serves the gateway.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import requests
from attrs import define
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.protocol import Limits
from twistedgw.proxy.agent import WebSocketAgents
from twistedgw.proxy.client import ProxyFactory, make_ws_resource
from twistedgw.proxy.files import AgentFiles
from twistedgw.proxy.ports import URLSigner, parse_ports
from twistedgw.registry import SandboxRegistry
from twistedgw.testing.hostagents import HostAgentRuntime
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator
from twistedgw.web.files import FileRoutes
from twistedgw.web.previews import PreviewRoutes
from twistedgw.web.site import EdgePolicy, make_site

T = TypeVar("T")

TOKEN = "hostgw-test-token"
#: Upload limit of the test gateway (small, so a test can pass it cheaply).
MAX_UPLOAD = 1024 * 1024


@define
class HostGateway:
    """A listening gateway: ``url`` (``http://127.0.0.1:PORT``), its ``token``, and the
    runtime whose agents are the sandboxes."""

    manager: SandboxManager
    runtime: HostAgentRuntime
    factory: ProxyFactory
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A blocking HTTP request with the token (call it in a thread: ``in_thread``)."""
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 20)
        return requests.request(method, self.url + path, headers=headers, **kwargs)


@asynccontextmanager
async def host_gateway(
    max_upload: int = MAX_UPLOAD, **agent_env: str
) -> AsyncIterator[HostGateway]:
    """A gateway on 127.0.0.1 in front of host agents (``max_upload``: its ``--max-upload``;
    ``agent_env``: extra ``AGENT_*`` settings); on exit every sandbox's agent is stopped and
    the listener closed."""
    runtime = HostAgentRuntime(agent_env=agent_env)
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        reactor,
        policy=LifecyclePolicy(idle_timeout=600, max_sandboxes=20, max_lifetime=3600),
        agent_ready_timeout=20,
        agent_recovery_timeout=3,
        agents=WebSocketAgents(reactor),
    )
    authenticator = Authenticator.from_tokens([TOKEN])
    factory = ProxyFactory(
        manager,
        reactor,
        authenticator=authenticator,
        policy=Limits(30.0, 120.0),
        maxMessagePayloadSize=16 * 1024 * 1024,
        maxFramePayloadSize=16 * 1024 * 1024,
    )
    factory.doStart()
    files = FileRoutes(manager, authenticator, AgentFiles(reactor), max_upload=max_upload)
    previews = PreviewRoutes(
        manager,
        authenticator,
        URLSigner(os.urandom(32), reactor.seconds),
        reactor,
        ports=parse_ports("1024-65535"),
    )
    api = GatewayAPI(
        manager,
        make_ws_resource(factory),
        authenticator,
        clock=reactor,
        files=files,
        previews=previews,
    )
    site = make_site(api, policy=EdgePolicy(authenticator=authenticator))
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    gw = HostGateway(manager, runtime, factory, listening.getHost().port, TOKEN)
    try:
        yield gw
    finally:
        await listening.stopListening()
        factory.doStop()
        for connection in list(site.http_channels):  # type: ignore[attr-defined]
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abortConnection()
        runtime.stop_all()


def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a thread of the reactor's pool: a Deferred of its
    result (await it), while the reactor keeps serving."""
    return deferToThread(function, *args, **kwargs)


def in_asyncio(make: Callable[[], Coroutine[Any, Any, T]]) -> Any:
    """Run the coroutine ``make()`` on a fresh asyncio loop in a thread (``asyncio.run``):
    a Deferred of its result."""
    return deferToThread(lambda: asyncio.run(make()))
