"""Backpressure pairing between the two legs of the proxy."""

from __future__ import annotations

from typing import Any

from twistedgw.proxy.flow import WRITE_BUFFER, PauseReading, pair_flow, unpair_flow, unsent_bytes


class Transport:
    """The parts of a TCP transport that pairing touches."""

    def __init__(self) -> None:
        self.producer: Any = None
        self.streaming: bool | None = None
        self.paused = 0
        self.resumed = 0
        self.bufferSize = 65536

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1


def test_full_writer_pauses_reader_until_it_drains() -> None:
    """When the writer's buffer fills, reading from the other side stops; it resumes when the
    writer drains. An earlier producer (twisted.web's channel) is replaced."""
    client, agent = Transport(), Transport()
    client.producer = object()  # what HTTPChannel leaves behind
    pair_flow(client, agent)
    assert isinstance(client.producer, PauseReading) and client.streaming is True
    assert client.bufferSize == WRITE_BUFFER
    client.producer.pauseProducing()
    assert agent.paused == 1
    client.producer.resumeProducing()
    assert agent.resumed == 1


def test_unpair_resumes_a_paused_reader() -> None:
    """Closing one side never leaves the other side's reading paused."""
    client, agent = Transport(), Transport()
    pair_flow(client, agent)
    client.producer.pauseProducing()
    unpair_flow(client)
    assert client.producer is None
    assert agent.resumed == 1
    unpair_flow(client)  # twice is harmless
    assert agent.resumed == 1


def test_unpair_leaves_a_running_reader_alone_and_says_whether_it_is_paused() -> None:
    """``paused`` follows pause and resume; stopping an unpaused pairing does not resume the
    reader (it never stopped), and stopping a resumed one does not resume it twice."""
    client, agent = Transport(), Transport()
    pair_flow(client, agent)
    producer = client.producer
    assert producer.paused is False
    producer.pauseProducing()
    assert producer.paused is True
    producer.resumeProducing()
    assert producer.paused is False
    unpair_flow(client)
    assert (agent.paused, agent.resumed) == (1, 1)


class BareTransport:
    """A writer with no ``bufferSize`` and no producer yet (not a Twisted TCP transport)."""

    def __init__(self) -> None:
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        raise AssertionError("nothing was registered to unregister")


def test_write_buffer_lets_half_a_mebibyte_wait_before_pausing() -> None:
    """A writer holds up to 512 KiB unsent before its reader pauses (the documented bound)."""
    assert WRITE_BUFFER == 512 * 1024


def test_pairing_a_writer_without_a_buffer_size_or_producer_only_registers() -> None:
    """A writer that has no send-buffer setting gets none, and with no earlier producer nothing
    is unregistered first."""
    writer, reader = BareTransport(), Transport()
    pair_flow(writer, reader)
    assert isinstance(writer.producer, PauseReading)
    assert writer.producer.reader is reader
    assert not hasattr(writer, "bufferSize")


def test_unpair_leaves_a_producer_it_did_not_register() -> None:
    """``unpair_flow`` undoes only its own pairing: another producer stays registered."""
    writer = Transport()
    other = object()
    writer.producer = other
    unpair_flow(writer)
    assert writer.producer is other


class Buffered:
    """What ``unsent_bytes`` reads of a TCP transport."""

    def __init__(self, data: bytes, offset: int, temp: int) -> None:
        self.dataBuffer = data
        self.offset = offset
        self._tempDataLen = temp


def test_unsent_bytes_counts_the_buffer_past_its_offset_and_the_pending_writes() -> None:
    """Unsent = the write buffer past what was already sent, plus writes not yet joined."""
    assert unsent_bytes(Buffered(b"x" * 100, 30, 7)) == 77
    assert unsent_bytes(Buffered(b"x" * 100, 0, 0)) == 100
    assert unsent_bytes(Buffered(b"", 0, 5)) == 5


def test_unsent_bytes_is_never_negative_and_zero_for_unknown_transports() -> None:
    """An offset past the buffer does not make the backlog negative; a transport without
    these attributes has none."""
    assert unsent_bytes(Buffered(b"x" * 10, 20, 3)) == 3
    assert unsent_bytes(object()) == 0
    only_buffer = type("OnlyBuffer", (), {"dataBuffer": b"x" * 9})()
    assert unsent_bytes(only_buffer) == 9
