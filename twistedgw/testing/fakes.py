"""Fakes for fast tests: ``FakeRuntime`` (same interface as ``DockerRuntime``) and ``FakeAgent``.

``FakeRuntime`` labels its containers as ``DockerRuntime`` does and lists only those carrying
its instance's labels, so containers of other gateways (``add_foreign``) and containers without
our labels are there to be ignored, as on a shared engine.

``FakeAgent`` speaks the agent's wire protocol (bearer-secret handshake on ``/agent``, JSON
command in, seed result out) without running anything: ``echo X`` answers ``X\\n``, ``fail``
answers returncode 1 with stderr ``boom``, ``sleep N`` answers after N seconds.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from twistedgw.protocol import binary_output_frame
from twistedgw.runtime.interface import (
    ContainerEvent,
    ContainerFailed,
    ContainerInfo,
    ContainerSpec,
    IContainerRuntime,
    ImageFacts,
    ImageMissing,
    RuntimeUnavailable,
)
from twistedgw.runtime.labels import instance_labels, labels_for


@implementer(IContainerRuntime)
class FakeRuntime:
    """An in-memory ``IContainerRuntime``; every container's agent is ``agent_port``.

    ``containers`` holds every container on the fake engine by id, ``labels`` their labels;
    only those matching ``instance_labels(instance)`` are listed or have their events
    delivered, like ``DockerRuntime``'s label filters.
    """

    def __init__(
        self,
        agent: FakeAgent | None = None,
        agent_port: int = 1,
        agent_host: str = "127.0.0.1",
        instance: str = "fake",
    ) -> None:
        self.agent = agent
        self.agent_port = agent_port
        self.agent_host = agent_host
        self.instance = instance
        self.containers: dict[str, ContainerInfo] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.available = True
        self.removed: list[str] = []
        #: The sandbox id given with each removal (the Docker runtime cleans up its socket).
        self.removed_sandboxes: list[str] = []
        self.fail_removes = 0
        self.watchers: list[Callable[[ContainerEvent], None]] = []
        self.creates = 0
        self.paused: set[str] = set()
        self._next = 0
        #: Images "present in the engine" (``None``: any image is).
        self.images: dict[str, ImageFacts] | None = None
        #: Every spec ``create`` was given, in order.
        self.specs: list[ContainerSpec] = []

    def _unavailable(self) -> Deferred[Any]:
        return fail(RuntimeUnavailable("fake Docker engine is down"))

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        if not self.available:
            return self._unavailable()
        if self.images is not None and spec.image is not None and spec.image not in self.images:
            return fail(ImageMissing(f"the image {spec.image!r} is not present"))
        self.specs.append(spec)
        info = self._started(spec, self._new_info(spec, "container", running=True))
        self.creates += 1
        self.containers[info.container_id] = info
        self.labels[info.container_id] = labels_for(spec, self.instance)
        if self.agent is not None:
            self.agent.secrets.add(spec.agent_secret)
        return succeed(info)

    def _started(self, spec: ContainerSpec, info: ContainerInfo) -> ContainerInfo:
        """What ``create`` reports for a container just made (a subclass may start something
        real for it, as ``HostAgentRuntime`` does)."""
        return info

    def _new_info(self, spec: ContainerSpec, prefix: str, running: bool) -> ContainerInfo:
        """What the engine would report for a container just made from ``spec``."""
        self._next += 1
        return ContainerInfo(
            sandbox_id=spec.sandbox_id,
            container_id=f"{prefix}{self._next:04d}",
            created_at=spec.created_at,
            ip_address=f"172.17.0.{self._next + 1}",
            agent_host=self.agent_host,
            agent_port=self.agent_port,
            agent_secret=spec.agent_secret,
            running=running,
            exit_code=None if running else 1,
            settings=spec.settings,
            for_pool=spec.for_pool,
        )

    def remove(self, container_id: str, sandbox_id: str = "") -> Deferred[None]:
        if not self.available:
            return self._unavailable()
        if self.fail_removes:
            self.fail_removes -= 1
            return fail(RuntimeUnavailable("fake remove failure"))
        self.containers.pop(container_id, None)
        self.labels.pop(container_id, None)
        self.removed.append(container_id)
        self.removed_sandboxes.append(sandbox_id)
        return succeed(None)

    def list_containers(self) -> Deferred[list[ContainerInfo]]:
        if not self.available:
            return self._unavailable()
        return succeed([info for info in self.containers.values() if self.is_ours(info)])

    def is_ours(self, info: ContainerInfo) -> bool:
        """Whether ``info``'s container carries every label of this instance's filter (a
        container added to ``containers`` by hand, without labels, counts as ours)."""
        labels = self.labels.get(info.container_id)
        if labels is None:
            return True
        wanted = (f.partition("=") for f in instance_labels(self.instance))
        return all(labels.get(key) == value for key, _, value in wanted)

    def add_foreign(
        self, spec: ContainerSpec, labels: dict[str, str] | None = None, running: bool = True
    ) -> ContainerInfo:
        """Put a container on the engine that is not this instance's: by default another
        gateway's (``spec`` labelled for instance ``other``); ``labels`` replaces them (``{}``:
        a container without our labels). Its agent answers like ours would."""
        info = self._new_info(spec, "foreign", running=running)
        self.containers[info.container_id] = info
        self.labels[info.container_id] = (
            labels_for(spec, "other") if labels is None else dict(labels)
        )
        return info

    def inspect_image(self, image: str) -> Deferred[ImageFacts | None]:
        if not self.available:
            return self._unavailable()
        if self.images is None:
            return succeed(ImageFacts(image_id=f"sha256:{image}", size=1, created=""))
        return succeed(self.images.get(image))

    def watch(self, callback: Callable[[ContainerEvent], None]) -> None:
        self.watchers.append(callback)

    def pause(self, container_id: str) -> Deferred[None]:
        if not self.available:
            return self._unavailable()
        info = self.containers.get(container_id)
        if info is None or not info.running:
            return fail(ContainerFailed(f"container {container_id} is not running"))
        self.paused.add(container_id)
        return succeed(None)

    def unpause(self, container_id: str) -> Deferred[None]:
        if not self.available:
            return self._unavailable()
        if container_id not in self.containers:
            return fail(ContainerFailed(f"no container {container_id}"))
        self.paused.discard(container_id)
        return succeed(None)

    def kill(self, container_id: str, exit_code: int = 137, emit: bool = False) -> None:
        """Simulate a container that stopped behind the gateway's back."""
        info = attrs.evolve(self.containers[container_id], running=False, exit_code=exit_code)
        self.containers[container_id] = info
        if emit and self.is_ours(info):
            event = ContainerEvent(info.sandbox_id, container_id, "die", exit_code)
            for callback in self.watchers:
                callback(event)


class _FakeAgentProtocol(WebSocketServerProtocol):
    factory: _FakeAgentFactory

    def onConnect(self, request: Any) -> None:
        header = request.headers.get("authorization", "")
        if not any(
            hmac.compare_digest(header.encode(), f"Bearer {secret}".encode())
            for secret in self.factory.secrets
        ):
            raise ConnectionDeny(401, "bad agent secret")

    def onOpen(self) -> None:
        self.factory.connections.add(self)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.connections.discard(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:  # terminal input (a PTY): echoed back as terminal output at offset 0
            self.factory.received_binary.append(payload)
            pid = int.from_bytes(payload[1:5], "big")
            self.sendMessage(binary_output_frame(pid, 0, payload[5:]), isBinary=True)
            return
        message = json.loads(payload)
        self.factory.received.append(message)
        if message.get("type") == "list_sessions":
            sessions = [{"session": name} for name in sorted(self.factory.sessions)]
            reply = {"type": "sessions", "request_id": message["request_id"], "sessions": sessions}
            self._reply(reply)
            return
        if message.get("session"):
            self.factory.sessions.add(message["session"])
        command: str = message["command"]
        result = {
            "request_id": message["request_id"],
            "command": command,
            "success": True,
            "output": "",
            "error": "",
            "returncode": 0,
            "timestamp": datetime.now().isoformat(),
        }
        if command.startswith("echo "):
            result["output"] = command[5:] + "\n"
        elif command == "fail":
            result.update(success=False, error="boom\n", returncode=1)
        if command.startswith("sleep "):
            delay = float(command.split()[1])
            d = deferLater(self.factory.reactor, delay, lambda: None)
            d.addCallback(lambda _: self._reply(result))
        else:
            self._reply(result)

    def _reply(self, result: dict[str, Any]) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(json.dumps(result).encode(), isBinary=False)


class _FakeAgentFactory(WebSocketServerFactory):
    protocol = _FakeAgentProtocol  # type: ignore[assignment]

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.reactor = reactor
        self.secrets: set[str] = set()
        self.received: list[dict[str, Any]] = []
        #: Binary frames received (terminal input), as they came.
        self.received_binary: list[bytes] = []
        self.connections: set[_FakeAgentProtocol] = set()
        #: Names of the sessions commands were sent to (forgotten by a restart).
        self.sessions: set[str] = set()


class FakeAgent:
    """A fake agent listening on 127.0.0.1; accepts any secret in ``secrets``."""

    def __init__(self, reactor: Any) -> None:
        self.factory = _FakeAgentFactory(reactor)
        self.secrets = self.factory.secrets
        root = Resource()
        root.putChild(b"agent", WebSocketResource(self.factory))
        self.site = Site(root)
        self.port: Any = None
        self.port_number = 0

    @property
    def received(self) -> list[dict[str, Any]]:
        return self.factory.received

    def listen(self, reactor: Any) -> int:
        self.factory.doStart()
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port_number = int(self.port.getHost().port)
        return self.port_number

    def drop_all(self) -> None:
        """Drop every agent connection abruptly (as if the container died)."""
        for proto in list(self.factory.connections):
            proto.transport.abortConnection()  # type: ignore[union-attr]

    def restart(self) -> None:
        """Die and come back at once, as the image's supervisor restarts a killed agent: every
        connection drops and the sessions are gone."""
        self.drop_all()
        self.factory.sessions.clear()

    async def vanish(self) -> None:
        """Die for good (as in a container that stopped): connections drop, nobody listens."""
        self.drop_all()
        port, self.port = self.port, None
        if port is not None:
            await port.stopListening()

    def come_back(self, reactor: Any) -> None:
        """Listen again on the same port after ``vanish`` (a slow restart)."""
        self.factory.sessions.clear()
        self.port = reactor.listenTCP(self.port_number, self.site, interface="127.0.0.1")

    async def stop(self) -> None:
        self.drop_all()
        if self.port is not None:
            await self.port.stopListening()
        self.factory.doStop()
