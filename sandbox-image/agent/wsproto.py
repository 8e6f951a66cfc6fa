"""A small server-side RFC 6455 WebSocket: the opening handshake and the framing.

Pure functions and a frame parser, no I/O: ``server.py`` feeds it bytes.  What it does:
HTTP/1.1 request parsing (bounded), the ``Sec-WebSocket-Accept`` answer, unmasking (client
frames must be masked), fragmentation (continuation frames, control frames in between), ping,
pong, close (code validation), and size limits (frame and message).  No extensions and no
subprotocols are negotiated, so any RSV bit is a protocol error.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from hashlib import sha1  # the builtin one in the agent (__main__ blocks _hashlib)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_REQUEST_HEAD = 16 * 1024

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (OP_CONT, OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


class WebSocketError(Exception):
    """The peer broke the protocol; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Request:
    """An HTTP request head."""

    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


def parse_request(head: bytes) -> Request:
    """Parse a request head (up to and without the blank line); raises ValueError."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("bad header line")
        key = name.lower()
        value = value.strip()
        # Repeated headers are joined, as HTTP allows for list-valued ones.
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Request(parts[0], parts[1], parts[2], headers)


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def handshake_problem(request: Request) -> str | None:
    """Why ``request`` is not a valid WebSocket opening handshake (None: it is)."""
    if request.method != "GET":
        return "the WebSocket handshake must be a GET"
    if request.header("upgrade").lower() != "websocket":
        return "missing 'Upgrade: websocket'"
    tokens = [t.strip().lower() for t in request.header("connection").split(",")]
    if "upgrade" not in tokens:
        return "missing 'Connection: Upgrade'"
    if request.header("sec-websocket-version") != "13":
        return "only WebSocket version 13 is supported"
    key = request.header("sec-websocket-key")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return "bad Sec-WebSocket-Key"
    except ValueError:
        return "bad Sec-WebSocket-Key"
    return None


def http_response(status: int, reason: str, body: bytes = b"", extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Cache-Control: no-store\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def switching_protocols(key: str) -> bytes:
    """The 101 response that opens the WebSocket."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode("ascii")


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120])


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` (fast: one big-integer XOR)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 7.4)."""
    if 1000 <= code <= 1014:
        return code not in (1004, 1005, 1006)
    return 3000 <= code <= 4999


@dataclass
class Event:
    """What the parser found: a complete message, a ping, a pong, or a close."""

    opcode: int
    payload: bytes


class FrameParser:
    """Client frames in, events out; raises WebSocketError on a protocol violation."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._message_opcode: int | None = None
        self._parts: list[bytes] = []
        self._message_size = 0

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            event = self._next()
            if event is None:
                return events
            if isinstance(event, Event):
                events.append(event)

    def _next(self) -> Event | bool | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
        masked, length = b1 & 0x80, b1 & 0x7F
        if rsv:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "RSV bits set without an extension")
        if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not masked:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = struct.unpack_from("!H", buf, 2)[0]
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = struct.unpack_from("!Q", buf, 2)[0]
            pos = 10
            if length >> 63:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "bad frame length")
        if opcode in CONTROL_OPCODES:
            if not fin or length > 125:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "bad control frame")
        elif opcode == OP_CONT:
            if self._message_opcode is None:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
        elif self._message_opcode is not None:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
        if opcode in DATA_OPCODES and self._message_size + length > self.max_message:
            raise WebSocketError(CLOSE_TOO_BIG, f"message larger than {self.max_message} bytes")
        if len(buf) < pos + 4 + length:
            return None
        mask = bytes(buf[pos : pos + 4])
        payload = unmask(bytes(buf[pos + 4 : pos + 4 + length]), mask)
        del buf[: pos + 4 + length]
        if opcode in CONTROL_OPCODES:
            return Event(opcode, payload)
        if opcode != OP_CONT:
            self._message_opcode = opcode
        self._parts.append(payload)
        self._message_size += length
        if not fin:
            return True
        message_opcode = self._message_opcode
        assert message_opcode is not None
        whole = b"".join(self._parts)
        self._message_opcode = None
        self._parts = []
        self._message_size = 0
        return Event(message_opcode, whole)


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a received close frame; raises WebSocketError when malformed."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if not valid_close_code(code):
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason
