"""``GET /sandboxes/{id}/events`` (issue 14): auth and ownership as the other sandbox routes,
and the SSE stream's framing of agent and gateway events, over a fake agent link."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.testing.rest import call
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator
from twistedgw.web.events import EventStream, SandboxEvents, sse_frame

A = "token-alpha-0123456789"
B = "token-bravo-0123456789"


@pytest_twisted.ensureDeferred
async def test_the_event_route_needs_the_owner_s_token(manager: SandboxManager) -> None:
    treq = StubTreq(GatewayAPI(manager, authenticator=Authenticator.from_tokens([A, B])).resource())
    _, created = await call(treq, "POST", "/sandboxes", A)
    path = f"/sandboxes/{created['sandbox_id']}/events"
    assert (await call(treq, "GET", path, None))[0] == 401
    assert (await call(treq, "GET", path, B))[0] == 404
    assert (await call(treq, "GET", "/sandboxes/" + "0" * 32 + "/events", A))[0] == 404


def test_an_sse_frame_has_id_event_and_one_json_data_line() -> None:
    frame = sse_frame("exited", {"pid": 7, "text": "a\nb"}, "ab12-3")
    assert frame == b'id: ab12-3\nevent: exited\ndata: {"pid":7,"text":"a\\nb"}\n\n'
    assert sse_frame("idle_warning", {}).startswith(b"event: idle_warning\n")


class _Link:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.listener: Any = None
        self.closed = False

    def send_json(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))

    def close(self) -> None:
        self.closed = True


class _Sandbox:
    sandbox_id = "s" * 32
    closing: tuple[int, str] | None = None


class _Manager:
    def __init__(self, sandbox: _Sandbox) -> None:
        self.registry = {sandbox.sandbox_id: sandbox}


def _stream() -> tuple[EventStream, DummyRequest, _Link, _Sandbox, SandboxEvents, Clock]:
    request = DummyRequest([b""])
    sandbox = _Sandbox()
    hub = SandboxEvents()
    clock = Clock()
    stream = EventStream(request, sandbox, _Manager(sandbox), hub, clock, heartbeat=15)
    link = _Link()
    stream.start(link, "boot-4")
    return stream, request, link, sandbox, hub, clock


def test_the_stream_subscribes_with_the_last_event_id_and_frames_agent_events() -> None:
    _, request, link, *_ = _stream()
    assert link.sent == [
        {"type": "subscribe_events", "request_id": "gateway-events", "last_event_id": "boot-4"}
    ]
    event = {"type": "event", "id": "boot-5", "event": "exited", "pid": 9, "returncode": 0}
    link.listener.agent_message(json.dumps(event).encode(), False)
    link.listener.agent_message(b'{"type": "output"}', False)  # not an event: ignored
    body = b"".join(request.written)
    assert body.startswith(b": connected\n\n")
    assert b"id: boot-5\nevent: exited\ndata: " in body
    assert body.count(b"event: ") == 1


def test_gateway_events_have_no_id_and_removed_ends_the_stream() -> None:
    stream, request, link, sandbox, hub, clock = _stream()
    hub.publish(sandbox.sandbox_id, "idle_warning", {"remove_in": 12.0})
    clock.advance(15)
    body = b"".join(request.written)
    assert b"event: idle_warning\ndata: " in body and b"id: " not in body
    assert b": heartbeat\n\n" in body
    sandbox.closing = (4000, "sandbox idle")
    link.listener.agent_closed(1006, None)
    body = b"".join(request.written)
    assert body.endswith(
        b'event: removed\ndata: {"reason":"idle","sandbox_id":"' + b"s" * 32 + b'"}\n\n'
    )
    assert stream.done.called and not hub.watched(sandbox.sandbox_id)
    clock.advance(60)
    assert b"".join(request.written) == body  # no heartbeat after the end


def test_a_client_leaving_closes_the_agent_link() -> None:
    stream, request, link, sandbox, hub, _ = _stream()
    request.finish()  # a finished request notifies as a client that left would
    assert link.closed and stream.done.called and not hub.watched(sandbox.sandbox_id)


def test_a_client_that_does_not_read_is_ended_not_buffered_for() -> None:
    from types import SimpleNamespace

    stream, request, link, sandbox, hub, _ = _stream()
    request.channel = SimpleNamespace(transport=SimpleNamespace(dataBuffer=b"x" * (2 << 20)))
    written = len(request.written)
    hub.publish(sandbox.sandbox_id, "idle_warning", {})
    assert len(request.written) == written  # not written: the stream ended instead
    assert stream.done.called and link.closed
