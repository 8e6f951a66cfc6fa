"""An in-memory gateway for proxy tests: the real proxy, site and manager on loopback, in front
of a fake agent that speaks the agent protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from attrs import define
from twisted.internet import reactor

from tests.wsclient import TestClient, connect
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.proxy.agent import WebSocketAgents
from twistedgw.proxy.client import ProxyFactory, make_ws_resource
from twistedgw.registry import SandboxRegistry
from twistedgw.testing.fakes import FakeAgent, FakeRuntime
from twistedgw.web.api import GatewayAPI
from twistedgw.web.site import make_site


@define
class Gateway:
    manager: SandboxManager
    runtime: FakeRuntime
    agent: FakeAgent
    factory: ProxyFactory
    port: int
    clients: list[TestClient]

    async def client(self, sandbox_id: str) -> TestClient:
        client = await connect(reactor, self.port, f"/ws/{sandbox_id}")
        self.clients.append(client)
        return client


@asynccontextmanager
async def proxy_gateway(
    max_message_size: int, agent_recovery_timeout: float = 3
) -> AsyncIterator[Gateway]:
    """A listening gateway whose clients may send messages up to ``max_message_size``; its
    clients, listener, fake agent and factory are all stopped on exit. A lost agent is waited
    for ``agent_recovery_timeout`` seconds (real time)."""
    agent = FakeAgent(reactor)
    agent_port = agent.listen(reactor)
    runtime = FakeRuntime(agent=agent, agent_port=agent_port)
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        reactor,
        agent_ready_timeout=5,
        agent_recovery_timeout=agent_recovery_timeout,
        agents=WebSocketAgents(reactor),
    )
    factory = ProxyFactory(manager, reactor, maxMessagePayloadSize=max_message_size)
    factory.doStart()
    site = make_site(GatewayAPI(manager, make_ws_resource(factory)))
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    gw = Gateway(manager, runtime, agent, factory, listening.getHost().port, [])
    try:
        yield gw
    finally:
        for client in gw.clients:
            if client.transport is not None:
                client.transport.abortConnection()
        await listening.stopListening()
        await agent.stop()
        factory.doStop()
