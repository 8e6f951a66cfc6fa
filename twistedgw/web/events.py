"""``GET /sandboxes/{id}/events``: a sandbox's events as Server-Sent Events (issue 14).

Process events (``started``, ``exited``) come from the sandbox's agent, which owns the
processes: each stream opens its own agent connection and sends ``subscribe_events`` (with the
client's ``Last-Event-ID``, so a reconnecting client resumes after the last event it saw).
The gateway adds its own events, which carry no ``id`` (so ``Last-Event-ID`` keeps naming the
last process event): ``idle_warning`` from the reaper before it removes an idle sandbox, and
``removed`` when the sandbox goes, which ends the stream. A comment line every
``HEARTBEAT`` seconds keeps proxies from closing a quiet stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from twistedgw import protocol
from twistedgw.proxy.flow import unsent_bytes

#: Seconds between heartbeat comments.
HEARTBEAT = 15.0
#: Bytes of events a client may leave unread before its stream is ended (it reconnects with
#: ``Last-Event-ID`` and loses nothing the agent still keeps): no unbounded buffering.
MAX_UNREAD = 1024 * 1024

Listener = Callable[[str, dict[str, Any]], None]


class SandboxEvents:
    """The gateway's own events per sandbox, for its open event streams."""

    def __init__(self) -> None:
        self._listeners: dict[str, set[Listener]] = {}

    def subscribe(self, sandbox_id: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, data)`` for each event of ``sandbox_id``; returns the
        function that unsubscribes it."""
        self._listeners.setdefault(sandbox_id, set()).add(listener)

        def unsubscribe() -> None:
            listeners = self._listeners.get(sandbox_id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[sandbox_id]

        return unsubscribe

    def publish(self, sandbox_id: str, event: str, data: dict[str, Any]) -> None:
        for listener in list(self._listeners.get(sandbox_id, ())):
            listener(event, data)

    def watched(self, sandbox_id: str) -> bool:
        return bool(self._listeners.get(sandbox_id))


def sse_frame(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    """One SSE event: ``id`` (when given), ``event`` and one ``data`` line of JSON."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class EventStream:
    """One open ``/events`` response: agent events and the gateway's, until either end goes."""

    _log = Logger()

    def __init__(
        self,
        request: IRequest,
        sandbox: Any,
        manager: Any,
        hub: SandboxEvents,
        clock: Any,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.request = request
        self.sandbox = sandbox
        self.manager = manager
        self.done: Deferred[None] = Deferred()
        self.link: Any = None
        self._finished = False
        self._unsubscribe = hub.subscribe(sandbox.sandbox_id, self.gateway_event)
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._heartbeat.start(heartbeat, now=False)
        request.notifyFinish().addBoth(self._client_gone)  # type: ignore[attr-defined]

    def start(self, link: Any, last_event_id: str | None) -> None:
        self.link = link
        link.listener = self
        subscribe = protocol.SubscribeEvents(last_event_id, "gateway-events")
        link.send_json(protocol.encode(subscribe.to_wire()))
        self._write(b": connected\n\n")

    # AgentListener ---------------------------------------------------------------------------

    def agent_message(self, payload: bytes, is_binary: bool) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("type") != "event":
            return
        event = message.get("event")
        event_id = message.get("id")
        if not isinstance(event, str) or not isinstance(event_id, str):
            return
        data = {k: v for k, v in message.items() if k not in ("type", "event", "id")}
        data["sandbox_id"] = self.sandbox.sandbox_id
        self._write(sse_frame(event, data, event_id))

    def agent_closed(self, code: int | None, reason: str | None) -> None:
        self.link = None
        registry = self.manager.registry
        closing = self.sandbox.closing
        if closing is not None or registry.get(self.sandbox.sandbox_id) is not self.sandbox:
            reason_text = closing[1] if closing is not None else "sandbox removed"
            self.gateway_event(
                "removed",
                {"reason": reason_text.removeprefix("sandbox ")},
            )
        self.finish()

    # the gateway's events ----------------------------------------------------------------------

    def gateway_event(self, event: str, data: dict[str, Any]) -> None:
        self._write(sse_frame(event, dict(data, sandbox_id=self.sandbox.sandbox_id)))
        if event == "removed":
            self.finish()

    # plumbing ---------------------------------------------------------------------------------

    def _beat(self) -> None:
        self._write(b": heartbeat\n\n")

    def _write(self, data: bytes) -> None:
        if self._finished:
            return
        transport = getattr(getattr(self.request, "channel", None), "transport", None)
        if transport is not None and unsent_bytes(transport) > MAX_UNREAD:
            self._log.info(
                "event stream of {sandbox_id}: client not reading; ending it",
                sandbox_id=self.sandbox.sandbox_id,
            )
            self.finish()
            return
        self.request.write(data)

    def _client_gone(self, _: object) -> None:
        self._finished = True
        self._cleanup()

    def _cleanup(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._unsubscribe()
        link, self.link = self.link, None
        if link is not None:
            link.listener = None
            link.close()
        if not self.done.called:
            self.done.callback(None)

    def finish(self) -> None:
        """End the stream: ``done`` fires, and the route's answer finishes the response (the
        client may reconnect with ``Last-Event-ID``)."""
        if self._finished:
            return
        self._finished = True
        self._cleanup()
