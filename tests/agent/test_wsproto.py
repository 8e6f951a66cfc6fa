"""The agent's RFC 6455 pieces: handshake, framing, unmasking, fragmentation, close codes."""

from __future__ import annotations

import os
import struct

import pytest
from agent import wsproto
from agent.wsproto import FrameParser, WebSocketError


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame (masked), as a browser would send it."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def test_accept_key_matches_the_rfc_example() -> None:
    """``accept_key`` of RFC 6455's sample key gives the RFC's ``Sec-WebSocket-Accept`` value."""
    assert wsproto.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_parse_request_reads_method_path_and_headers_case_insensitively() -> None:
    """``parse_request`` reads the method and the path with its query; headers are looked up
    regardless of case, and repeated ones are joined with a comma."""
    req = wsproto.parse_request(
        b"GET /agent?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nX-A: 1\r\nx-a: 2"
    )
    assert (req.method, req.path) == ("GET", "/agent?x=1")
    assert req.header("upgrade") == "WebSocket"
    assert req.header("X-A") == "1, 2"


@pytest.mark.parametrize("head", [b"GET /", b"GET / HTTP/1.1\r\nno colon", b"GET / SPDY/3"])
def test_parse_request_refuses_garbage(head: bytes) -> None:
    """A request line without a version, a header line without a colon or a protocol other than
    HTTP is a ValueError."""
    with pytest.raises(ValueError):
        wsproto.parse_request(head)


def handshake(**override: str) -> wsproto.Request:
    headers = {
        "upgrade": "websocket",
        "connection": "keep-alive, Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    headers.update(override)
    return wsproto.Request("GET", "/agent", "HTTP/1.1", headers)


def test_a_valid_handshake_has_no_problem() -> None:
    """A GET with ``Upgrade: websocket``, ``Upgrade`` in ``Connection``, version 13 and a valid
    key has no handshake problem."""
    assert wsproto.handshake_problem(handshake()) is None


@pytest.mark.parametrize(
    "override",
    [
        {"upgrade": "h2c"},
        {"connection": "close"},
        {"sec-websocket-version": "8"},
        {"sec-websocket-key": "short"},
    ],
)
def test_invalid_handshakes_are_named(override: dict[str, str]) -> None:
    """A handshake with another ``Upgrade``, no ``Upgrade`` in ``Connection``, version 8 or a
    short key has a problem (not None)."""
    assert wsproto.handshake_problem(handshake(**override)) is not None


def test_a_masked_text_frame_is_unmasked() -> None:
    """A masked client text frame parses to one text event with the unmasked payload."""
    parser = FrameParser(1024)
    [event] = parser.feed(masked(wsproto.OP_TEXT, b"hello"))
    assert (event.opcode, event.payload) == (wsproto.OP_TEXT, b"hello")


def test_frames_split_at_every_byte_are_reassembled() -> None:
    """A text frame (300 bytes, 16-bit length) and a binary frame fed one byte at a time parse to
    the same two events."""
    data = masked(wsproto.OP_TEXT, b"x" * 300) + masked(wsproto.OP_BINARY, b"yz")
    parser = FrameParser(1024)
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    assert [(e.opcode, e.payload) for e in events] == [
        (wsproto.OP_TEXT, b"x" * 300),
        (wsproto.OP_BINARY, b"yz"),
    ]


def test_fragments_with_a_ping_in_between_make_one_message() -> None:
    """A text message in three fragments with a ping among them gives the ping first, then one
    text event with the whole payload."""
    parser = FrameParser(1024)
    events = parser.feed(
        masked(wsproto.OP_TEXT, b"he", fin=False)
        + masked(wsproto.OP_PING, b"p")
        + masked(wsproto.OP_CONT, b"ll", fin=False)
        + masked(wsproto.OP_CONT, b"o")
    )
    assert [(e.opcode, e.payload) for e in events] == [
        (wsproto.OP_PING, b"p"),
        (wsproto.OP_TEXT, b"hello"),
    ]


def test_an_unmasked_client_frame_is_a_protocol_error() -> None:
    """An unmasked client frame raises WebSocketError with code 1002."""
    with pytest.raises(WebSocketError) as err:
        FrameParser(1024).feed(wsproto.frame(wsproto.OP_TEXT, b"hi"))
    assert err.value.code == wsproto.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize(
    "data",
    [
        masked(wsproto.OP_TEXT, b"x", rsv=0x40),
        masked(0x3, b"x"),
        masked(wsproto.OP_CONT, b"x"),
        masked(wsproto.OP_PING, b"x", fin=False),
        masked(wsproto.OP_PING, b"x" * 126),
        masked(wsproto.OP_TEXT, b"a", fin=False) + masked(wsproto.OP_TEXT, b"b"),
    ],
    ids=["rsv", "opcode", "orphan-cont", "fragmented-ping", "long-ping", "nested-message"],
)
def test_protocol_violations_close_with_1002(data: bytes) -> None:
    """An RSV bit, an unknown opcode, an orphan continuation, a fragmented or over-125-byte ping,
    or a new message inside a fragmented one raises WebSocketError with code 1002."""
    with pytest.raises(WebSocketError) as err:
        FrameParser(1024).feed(data)
    assert err.value.code == wsproto.CLOSE_PROTOCOL_ERROR


def test_an_oversize_frame_is_refused_from_its_header_alone() -> None:
    """A frame header announcing more than the maximum message size raises 1009 before any
    payload arrives."""
    header = struct.pack("!BBQ", 0x81, 0x80 | 127, 10**6) + b"mask"
    with pytest.raises(WebSocketError) as err:
        FrameParser(1000).feed(header)
    assert err.value.code == wsproto.CLOSE_TOO_BIG


def test_an_oversize_fragmented_message_is_refused() -> None:
    """Fragments that are each under the maximum but together over it raise 1009."""
    parser = FrameParser(10)
    parser.feed(masked(wsproto.OP_TEXT, b"x" * 6, fin=False))
    with pytest.raises(WebSocketError) as err:
        parser.feed(masked(wsproto.OP_CONT, b"x" * 6))
    assert err.value.code == wsproto.CLOSE_TOO_BIG


@pytest.mark.parametrize("code", [1000, 1001, 1011, 3000, 4999])
def test_valid_close_codes_are_accepted(code: int) -> None:
    """A close payload with a valid code (1000, 1001, 1011, 3000, 4999) parses to the code and
    its reason."""
    assert wsproto.parse_close(struct.pack("!H", code) + b"bye") == (code, "bye")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2999, 5000])
def test_invalid_close_codes_are_protocol_errors(code: int) -> None:
    """A close payload with a code that must not be sent (0, 999, 1004, 1005, 1006, 1015, 2999,
    5000) raises 1002."""
    with pytest.raises(WebSocketError) as err:
        wsproto.parse_close(struct.pack("!H", code))
    assert err.value.code == wsproto.CLOSE_PROTOCOL_ERROR


def test_close_without_code_and_bad_close_payloads() -> None:
    """An empty close payload means 1005 with no reason; a 1-byte payload raises WebSocketError;
    a reason that is not UTF-8 raises 1007."""
    assert wsproto.parse_close(b"") == (1005, "")
    with pytest.raises(WebSocketError):
        wsproto.parse_close(b"\x03")
    with pytest.raises(WebSocketError) as err:
        wsproto.parse_close(struct.pack("!H", 1000) + b"\xff")
    assert err.value.code == wsproto.CLOSE_INVALID_DATA


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_frames_encode_every_length_form(size: int) -> None:
    """A server text frame is unmasked and final (first byte 0x81), ends with the payload, and
    has a 2-, 4- or 10-byte header by payload size."""
    data = wsproto.frame(wsproto.OP_TEXT, b"z" * size)
    assert data[0] == 0x81
    assert data.endswith(b"z" * size)
    assert len(data) - size == (2 if size < 126 else 4 if size < 65536 else 10)


def test_unmask_is_its_own_inverse() -> None:
    """Unmasking twice with the same key gives back the payload."""
    payload = os.urandom(1001)
    assert wsproto.unmask(wsproto.unmask(payload, b"abcd"), b"abcd") == payload


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (wsproto.Request("POST", "/", "HTTP/1.1", handshake().headers),
         "the WebSocket handshake must be a GET"),
        (handshake(upgrade="h2c"), "missing 'Upgrade: websocket'"),
        (handshake(connection="keep-alive"), "missing 'Connection: Upgrade'"),
        (handshake(**{"sec-websocket-version": "8"}), "only WebSocket version 13 is supported"),
        (handshake(**{"sec-websocket-key": "c2hvcnQ="}), "bad Sec-WebSocket-Key"),
        (handshake(**{"sec-websocket-key": "not base64!"}), "bad Sec-WebSocket-Key"),
    ],
)  # fmt: skip
def test_each_handshake_problem_has_its_own_words(request_: wsproto.Request, problem: str) -> None:
    """The 400 the agent answers names what is wrong with the handshake."""
    assert wsproto.handshake_problem(request_) == problem


def test_upgrade_and_connection_tokens_are_read_without_case_or_spaces() -> None:
    """``Upgrade: WebSocket`` and ``Connection: keep-alive ,UPGRADE`` are a valid handshake."""
    request = handshake(upgrade="WebSocket", connection="keep-alive ,UPGRADE")
    assert wsproto.handshake_problem(request) is None


def test_answers_are_exact_http() -> None:
    """The agent's HTTP answers: a closing plain-text response with its length and any extra
    header lines; the 101 with the accept key."""
    assert wsproto.http_response(400, "Bad Request", b"no", "X-A: 1\r\n") == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Cache-Control: no-store\r\nContent-Length: 2\r\nX-A: 1\r\nConnection: close\r\n\r\nno"
    )
    assert wsproto.switching_protocols("dGhlIHNhbXBsZSBub25jZQ==") == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )


def test_close_frames_carry_the_code_and_at_most_120_bytes_of_reason() -> None:
    """A close frame is final, opcode 8, the code big-endian, then the reason's UTF-8 cut at
    120 bytes (a control frame's payload is at most 125); parse_close reads it back."""
    assert wsproto.close_frame(1000) == b"\x88\x02\x03\xe8"
    long = wsproto.close_frame(4001, "é" * 100)
    assert long[:4] == b"\x88\x7a\x0f\xa1" and len(long) == 2 + 2 + 120
    assert wsproto.parse_close(struct.pack("!H", 4001) + "bye é".encode()) == (4001, "bye é")


@pytest.mark.parametrize(
    ("size", "head"),
    [
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65536, b"\x82\x7f" + (65536).to_bytes(8, "big")),
    ],
)
def test_frame_headers_use_the_shortest_length_form(size: int, head: bytes) -> None:
    """A frame of 125 bytes uses the 7-bit length, 126 bytes the 16-bit form, 65536 bytes the
    64-bit form."""
    assert wsproto.frame(wsproto.OP_BINARY, b"\x00" * size)[: len(head)] == head


@pytest.mark.parametrize(
    "head",
    [b" GET / HTTP/1.1", b"GET / HTTP/1.1\r\n: empty", b"GET / HTTP/1.1\r\nX-A : 1",
     b"GET / HTTP/1.1\r\n X-A: 1", b"GET  / HTTP/1.1"],
)  # fmt: skip
def test_request_heads_with_misplaced_spaces_or_empty_names_are_refused(head: bytes) -> None:
    """A request line with a leading or doubled space, or a header with an empty name, a space
    before its colon or a leading space, is a ValueError."""
    with pytest.raises(ValueError):
        wsproto.parse_request(head)


def test_the_parser_starts_afresh_after_each_message() -> None:
    """After a fragmented message, the next message's size counts from zero (two messages of
    the maximum size each pass) and its opcode is its own."""
    parser = FrameParser(max_message=10)
    events = parser.feed(
        masked(wsproto.OP_TEXT, b"12345", fin=False)
        + masked(wsproto.OP_CONT, b"67890")
        + masked(wsproto.OP_BINARY, b"abcdefghij")
    )
    assert [(e.opcode, e.payload) for e in events] == [
        (wsproto.OP_TEXT, b"1234567890"),
        (wsproto.OP_BINARY, b"abcdefghij"),
    ]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (masked(wsproto.OP_TEXT, b"x", rsv=0x40), "RSV bits set without an extension"),
        (masked(0x3, b"x"), "unknown opcode 3"),
        (masked(wsproto.OP_PING, b"x", fin=False), "bad control frame"),
        (masked(wsproto.OP_CONT, b"x"), "continuation without a message"),
        (masked(wsproto.OP_TEXT, b"a", fin=False) + masked(wsproto.OP_TEXT, b"b"),
         "new message inside a fragmented one"),
        (b"\x81\xff" + (1 << 63).to_bytes(8, "big"), "bad frame length"),
    ],
    ids=["rsv", "opcode", "fragmented-ping", "orphan-cont", "nested-message", "length"],
)  # fmt: skip
def test_each_violation_says_what_it_is(data: bytes, reason: str) -> None:
    """Each framing violation raises 1002 with its own reason, which is also the exception's
    text."""
    with pytest.raises(WebSocketError) as err:
        FrameParser(max_message=1 << 20).feed(data)
    assert (err.value.code, err.value.reason) == (wsproto.CLOSE_PROTOCOL_ERROR, reason)
    assert str(err.value) == reason


def test_a_message_too_big_is_1009_naming_the_limit() -> None:
    """A 5-byte message against a 4-byte limit raises 1009 with the reason ``message larger than
    4 bytes``."""
    with pytest.raises(WebSocketError) as err:
        FrameParser(max_message=4).feed(masked(wsproto.OP_TEXT, b"12345"))
    assert (err.value.code, err.value.reason) == (1009, "message larger than 4 bytes")


def test_close_payload_problems_name_themselves() -> None:
    """A 1-byte close payload and close code 1005 raise WebSocketError with messages naming the
    payload size and the code."""
    with pytest.raises(WebSocketError, match="close frame with a 1-byte payload"):
        wsproto.parse_close(b"\x03")
    with pytest.raises(WebSocketError, match="invalid close code 1005"):
        wsproto.parse_close(struct.pack("!H", 1005))


def test_edges_of_the_framing() -> None:
    """Lengths are unsigned (a 40000-byte frame in the 16-bit form, a 65536-byte one in the
    64-bit form both arrive whole), a control frame of exactly 125 bytes is allowed, a
    fragmented message's size is the sum of its fragments, code 1014 is a valid close code, and
    unmasking nothing gives nothing."""
    parser = FrameParser(max_message=1 << 20)
    for size in (40000, 65536):
        payload = bytes(range(256)) * (size // 256)
        assert [(e.opcode, e.payload) for e in parser.feed(masked(wsproto.OP_BINARY, payload))] == [
            (wsproto.OP_BINARY, payload)
        ]
    assert parser.feed(masked(wsproto.OP_PING, b"p" * 125))[0].payload == b"p" * 125
    small = FrameParser(max_message=10)
    assert small.feed(masked(wsproto.OP_TEXT, b"1234", fin=False)) == []
    assert small.feed(masked(wsproto.OP_CONT, b"5678", fin=False)) == []
    with pytest.raises(WebSocketError) as err:
        small.feed(masked(wsproto.OP_CONT, b"9ab"))
    assert err.value.code == wsproto.CLOSE_TOO_BIG
    assert wsproto.valid_close_code(1014) and not wsproto.valid_close_code(1015)
    assert wsproto.unmask(b"", b"abcd") == b""
    assert wsproto.close_frame(40000)[2:4] == (40000).to_bytes(2, "big")


def test_exact_reasons_and_codes_of_refusals() -> None:
    """The words and codes the agent closes or answers with, exactly."""
    with pytest.raises(WebSocketError) as unmasked:
        FrameParser(max_message=10).feed(b"\x81\x01x")
    assert (unmasked.value.code, unmasked.value.reason) == (1002, "client frames must be masked")
    with pytest.raises(WebSocketError) as short:
        wsproto.parse_close(b"\x03")
    assert (short.value.code, short.value.reason) == (1002, "close frame with a 1-byte payload")
    with pytest.raises(WebSocketError) as not_utf8:
        wsproto.parse_close(struct.pack("!H", 1000) + b"\xff")
    assert (not_utf8.value.code, not_utf8.value.reason) == (1007, "close reason is not UTF-8")
    for head, message in [
        (b"GET /", "bad request line"),
        (b"GET / HTTP/1.1\r\nx", "bad header line"),
    ]:
        with pytest.raises(ValueError) as bad:
            wsproto.parse_request(head)
        assert str(bad.value) == message
    request = wsproto.parse_request(b"GET /a HTTP/1.0\r\nHost: h:1")
    assert (request.version, request.header("host"), request.header("absent")) == (
        "HTTP/1.0",
        "h:1",
        "",
    )
