"""``GET /sandboxes/{id}/events`` (issue 14): auth and ownership as the other sandbox routes,
and the SSE stream's framing of agent and gateway events, over a fake agent link."""

from __future__ import annotations

import json
from typing import Any

import pytest
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
    """``GET /sandboxes/{id}/events`` without a token is 401; with another valid token it is
    404, as for an unknown sandbox id with the owner's token."""
    treq = StubTreq(GatewayAPI(manager, authenticator=Authenticator.from_tokens([A, B])).resource())
    _, created = await call(treq, "POST", "/sandboxes", A)
    path = f"/sandboxes/{created['sandbox_id']}/events"
    assert (await call(treq, "GET", path, None))[0] == 401
    assert (await call(treq, "GET", path, B))[0] == 404
    assert (await call(treq, "GET", "/sandboxes/" + "0" * 32 + "/events", A))[0] == 404


def test_an_sse_frame_has_id_event_and_one_json_data_line() -> None:
    """``sse_frame`` writes ``id``, ``event`` and one ``data`` line of compact JSON (a newline in
    a value escaped), then a blank line; without an id the frame starts at ``event``."""
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
    """Started with ``boot-4``, the stream sends the agent ``subscribe_events`` with that
    ``last_event_id`` and writes ``: connected``; an agent event becomes one frame with its id
    and event name, and a non-event message (``output``) writes no frame."""
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
    """A gateway event (``idle_warning``) is framed without an ``id`` and a heartbeat comes after
    15 s; the agent link closing while the sandbox closes as idle writes a final ``removed``
    frame (reason ``idle``), ends the stream, unsubscribes it and stops the heartbeats."""
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
    """The request finishing (the client left) closes the agent link, ends the stream and
    unsubscribes it from the hub."""
    stream, request, link, sandbox, hub, _ = _stream()
    request.finish()  # a finished request notifies as a client that left would
    assert link.closed and stream.done.called and not hub.watched(sandbox.sandbox_id)


def test_a_client_that_does_not_read_is_ended_not_buffered_for() -> None:
    """With 2 MiB unsent in the transport, the next event is not written: the stream ends and
    the agent link is closed."""
    from types import SimpleNamespace

    stream, request, link, sandbox, hub, _ = _stream()
    request.channel = SimpleNamespace(transport=SimpleNamespace(dataBuffer=b"x" * (2 << 20)))
    written = len(request.written)
    hub.publish(sandbox.sandbox_id, "idle_warning", {})
    assert len(request.written) == written  # not written: the stream ended instead
    assert stream.done.called and link.closed


def test_agent_events_are_framed_exactly_with_the_sandbox_id() -> None:
    """An agent event becomes one SSE frame: its ``id``, its ``event``, and its other fields
    (``type``/``event``/``id`` left out) plus ``sandbox_id`` as compact JSON."""
    _, request, link, *_ = _stream()
    event = {"type": "event", "id": "boot-5", "event": "started", "pid": 9}
    link.listener.agent_message(json.dumps(event).encode(), False)
    assert request.written == [
        b": connected\n\n",
        b'id: boot-5\nevent: started\ndata: {"pid":9,"sandbox_id":"' + b"s" * 32 + b'"}\n\n',
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1]",
        b'{"type": "event", "event": "exited"}',
        b'{"type": "event", "event": 5, "id": "x"}',
        b'{"type": "event", "event": "exited", "id": 7}',
    ],
)
def test_agent_messages_that_are_not_events_are_ignored(payload: bytes) -> None:
    """Anything but an event with a string ``event`` and ``id`` writes nothing."""
    _, request, link, *_ = _stream()
    link.listener.agent_message(payload, False)
    assert request.written == [b": connected\n\n"]


def test_heartbeat_comes_every_interval_not_before() -> None:
    """The first heartbeat comment is written when the interval has passed, then each
    interval."""
    _, request, _, _, _, clock = _stream()
    clock.advance(14.9)
    assert request.written == [b": connected\n\n"]
    clock.advance(0.1)
    clock.advance(15)
    assert request.written == [b": connected\n\n", b": heartbeat\n\n", b": heartbeat\n\n"]


def test_an_unread_backlog_at_the_limit_is_still_written() -> None:
    """Exactly ``MAX_UNREAD`` unsent bytes is still written to; one byte more ends it."""
    from types import SimpleNamespace

    from twistedgw.web.events import MAX_UNREAD

    assert MAX_UNREAD == 1024 * 1024
    stream, request, link, sandbox, hub, _ = _stream()
    transport = SimpleNamespace(dataBuffer=b"x" * MAX_UNREAD)
    request.channel = SimpleNamespace(transport=transport)
    hub.publish(sandbox.sandbox_id, "idle_warning", {})
    assert request.written[-1].startswith(b"event: idle_warning\n")
    assert not stream.done.called
    transport.dataBuffer = b"x" * (MAX_UNREAD + 1)
    hub.publish(sandbox.sandbox_id, "idle_warning", {})
    assert stream.done.called and link.closed


def test_agent_closing_for_a_sandbox_gone_from_the_registry_says_removed() -> None:
    """The agent link closing after the sandbox left the registry ends the stream with a
    ``removed`` event whose reason is ``removed``; while it is still registered and not
    closing, the stream just ends (the client reconnects)."""
    stream, request, link, *_ = _stream()
    stream.manager.registry.clear()
    link.listener.agent_closed(1006, None)
    assert request.written[-1] == (
        b'event: removed\ndata: {"reason":"removed","sandbox_id":"' + b"s" * 32 + b'"}\n\n'
    )
    assert stream.done.called and stream.link is None
    quiet, quiet_request, quiet_link, *_ = _stream()
    quiet_link.listener.agent_closed(1006, None)
    assert quiet_request.written == [b": connected\n\n"]
    assert quiet.done.called


def test_nothing_is_written_after_the_end() -> None:
    """Once finished, neither gateway nor agent events are written, and finishing again does
    nothing."""
    stream, request, link, sandbox, hub, _ = _stream()
    stream.finish()
    assert link.closed and link.listener is None
    stream.gateway_event("idle_warning", {})
    stream.agent_message(b'{"type": "event", "event": "exited", "id": "1"}', False)
    stream.finish()
    assert request.written == [b": connected\n\n"]
    assert not hub.watched(sandbox.sandbox_id)


def test_hub_subscriptions_are_per_sandbox() -> None:
    """A hub calls the listeners of one sandbox only; unsubscribing twice is harmless."""
    hub = SandboxEvents()
    seen: list[tuple[str, str, dict[str, Any]]] = []
    stop_a = hub.subscribe("a", lambda e, d: seen.append(("a", e, d)))
    hub.subscribe("b", lambda e, d: seen.append(("b", e, d)))
    hub.publish("a", "idle_warning", {"x": 1})
    assert seen == [("a", "idle_warning", {"x": 1})]
    stop_a()
    stop_a()
    assert not hub.watched("a") and hub.watched("b")
    hub.publish("a", "removed", {})
    assert len(seen) == 1
