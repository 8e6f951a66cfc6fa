"""Backpressure between the two legs of the proxy (Twisted push producers)."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class PauseReading:
    """Registered as the producer of one transport (the writer): while the writer's send
    buffer is full, stop reading from another transport (the reader). This is how a slow
    client pauses the agent (and a slow agent pauses the client) instead of the gateway
    buffering what the fast side sends."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.reader.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.reader.resumeProducing()

    def stopProducing(self) -> None:
        if self.paused:
            self.resumeProducing()


#: Bytes a transport may hold unsent before it pauses its paired reader. Twisted's default
#: (64 KiB) pauses and resumes the stream constantly; this bounds memory per connection just
#: the same, at a size that lets a stream flow.
WRITE_BUFFER = 512 * 1024


def pair_flow(writer: Any, reader: Any) -> None:
    """Make ``writer``'s backpressure pause reading from ``reader``."""
    if hasattr(writer, "bufferSize"):
        writer.bufferSize = WRITE_BUFFER
    if getattr(writer, "producer", None) is not None:
        # twisted.web's HTTPChannel registered itself before the WebSocket took the
        # transport over; it has no say any more.
        writer.unregisterProducer()
    writer.registerProducer(PauseReading(reader), True)


def unpair_flow(writer: Any) -> None:
    """Undo ``pair_flow``: resume the reader and forget the pairing."""
    producer = getattr(writer, "producer", None)
    if isinstance(producer, PauseReading):
        producer.stopProducing()
        writer.unregisterProducer()


def unsent_bytes(transport: Any) -> int:
    """Bytes written to a Twisted TCP transport and not yet sent (0 if it cannot tell)."""
    buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return max(0, buffered) + int(getattr(transport, "_tempDataLen", 0))
