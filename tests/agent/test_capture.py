"""Output capture: the head+tail cap and the coalescing of streamed chunks."""

from __future__ import annotations

import pytest
from agent.capture import (
    STREAM_FLUSH_BYTES,
    STREAM_FLUSH_DELAY,
    ChunkStream,
    OutputBuffer,
    StreamCapture,
)

from tests.agent.fakeclock import FakeClock


def test_output_buffer_keeps_head_and_tail_within_the_cap() -> None:
    """26 bytes written in four chunks to a 10-byte buffer keep the first 5 and the last 5 bytes;
    ``kept`` is 10, ``total`` 26 and ``truncated`` is set."""
    buf = OutputBuffer(10)
    for chunk in (b"abc", b"defgh", b"ijklmnop", b"qrstuvwxyz"):
        buf.write(chunk)
    assert buf.getvalue() == b"abcde" + b"vwxyz"
    assert buf.kept == 10
    assert buf.total == 26
    assert buf.truncated


def test_output_buffer_under_the_cap_is_not_truncated() -> None:
    """Writes that fit under the cap are kept whole, joined in order, and ``truncated`` stays
    unset."""
    buf = OutputBuffer(100)
    buf.write(b"hello ")
    buf.write(b"world")
    assert buf.getvalue() == b"hello world"
    assert not buf.truncated


def test_output_buffer_text_replaces_undecodable_bytes() -> None:
    """``text()`` decodes the kept bytes as UTF-8 with U+FFFD in place of an undecodable byte."""
    buf = OutputBuffer(100)
    buf.write(b"ok \xff")
    assert buf.text() == "ok \ufffd"


def test_chunks_are_coalesced_until_the_delay() -> None:
    """Two small writes send nothing at once; after ``STREAM_FLUSH_DELAY`` they go out as one
    chunk for the stream and no timer is left pending."""
    clock = FakeClock()
    sent: list[tuple[str, str]] = []
    stream = ChunkStream("stdout", lambda name, text: sent.append((name, text)), clock)
    stream.write(b"a")
    stream.write(b"b")
    assert sent == []
    clock.advance(STREAM_FLUSH_DELAY)
    assert sent == [("stdout", "ab")]
    assert clock.pending == 0


def test_chunks_flush_at_the_size_threshold_without_waiting() -> None:
    """A write of ``STREAM_FLUSH_BYTES`` is sent at once, as one chunk, with no timer left
    pending."""
    clock = FakeClock()
    sent: list[str] = []
    stream = ChunkStream("stdout", lambda name, text: sent.append(text), clock)
    stream.write(b"x" * STREAM_FLUSH_BYTES)
    assert sent == ["x" * STREAM_FLUSH_BYTES]
    assert clock.pending == 0


def test_a_character_split_across_reads_stays_whole() -> None:
    """A UTF-8 character whose bytes arrive in two writes, with a flush delay between them, is
    sent whole, not as replacement characters."""
    clock = FakeClock()
    sent: list[str] = []
    stream = ChunkStream("stdout", lambda name, text: sent.append(text), clock)
    euro = "\u20ac".encode()
    stream.write(euro[:1])
    clock.advance(STREAM_FLUSH_DELAY)
    stream.write(euro[1:])
    stream.flush(final=True)
    assert "".join(sent) == "\u20ac"


def test_a_truncated_character_at_the_end_becomes_a_replacement() -> None:
    """An incomplete UTF-8 character left at the final flush is sent as one U+FFFD."""
    clock = FakeClock()
    sent: list[str] = []
    stream = ChunkStream("stdout", lambda name, text: sent.append(text), clock)
    stream.write("\u20ac".encode()[:2])
    stream.flush(final=True)
    assert sent == ["\ufffd"]


def test_buffered_capture_calls_the_limit_once_past_the_kill_size() -> None:
    """A buffered capture (cap 8, kill size 20) fed 100 bytes calls its limit callback exactly
    once, is truncated and keeps 8 characters of text."""
    hits: list[int] = []
    capture = StreamCapture("stdout", 8, 20, lambda: hits.append(1))
    for _ in range(10):
        capture.write(b"0123456789")
    assert hits == [1]
    assert capture.truncated
    assert len(capture.text()) == 8


def test_streamed_capture_has_no_limit_and_no_text() -> None:
    """A streamed capture fed 100 bytes (past its kill size) never calls the limit callback,
    sends all of them as chunks, keeps no text and is not truncated."""
    clock = FakeClock()
    sent: list[str] = []
    hits: list[int] = []
    capture = StreamCapture(
        "stderr", 8, 20, lambda: hits.append(1), lambda n, t: sent.append(t), clock
    )
    capture.write(b"y" * 100)
    capture.finish()
    assert hits == []
    assert "".join(sent) == "y" * 100
    assert capture.text() == ""
    assert not capture.truncated


def _expected(stream: bytes, cap: int) -> bytes:
    """What a capped buffer keeps of ``stream``: its first ``cap // 2`` bytes, then the last
    ``cap - cap // 2`` bytes of the rest."""
    head_cap = cap // 2
    tail_cap = cap - head_cap
    head, rest = stream[:head_cap], stream[head_cap:]
    return head + rest[max(0, len(rest) - tail_cap) :]


@pytest.mark.parametrize("cap", range(8))
def test_head_and_tail_are_kept_exactly_however_the_output_is_split(cap: int) -> None:
    """For every length of output up to 20 bytes (all bytes different, so a wrong byte or
    order shows) and several ways of cutting it into reads, the buffer keeps exactly the
    head and the tail, never more than ``cap`` bytes, and says whether it dropped any."""
    for length in range(21):
        stream = bytes(range(65, 65 + length))
        for size in (1, 2, 3, 5, max(1, length)):
            buffer = OutputBuffer(cap)
            for start in range(0, length, size):
                buffer.write(stream[start : start + size])
            expected = _expected(stream, cap)
            assert buffer.getvalue() == expected, (cap, length, size)
            assert buffer.kept == len(expected) <= cap
            assert buffer.total == length
            assert buffer.truncated is (length > len(expected))
