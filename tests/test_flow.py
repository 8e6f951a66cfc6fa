"""Backpressure pairing between the two legs of the proxy."""

from __future__ import annotations

from typing import Any

from twistedgw.proxy.flow import WRITE_BUFFER, PauseReading, pair_flow, unpair_flow


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
