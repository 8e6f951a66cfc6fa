"""A test client's view of a PTY (issue 16): its screen bytes in offset order, from JSON
``output`` chunks or binary frames, and the other messages it got."""

from __future__ import annotations

import json
import time
from typing import Any

from twistedgw import protocol


def send(ws: Any, message: Any) -> None:
    ws.send(json.dumps(message))


def recv(ws: Any, timeout: float = 15.0) -> Any:
    """The next message: bytes for a binary frame, else the decoded JSON."""
    data = ws.recv(timeout=timeout)
    return data if isinstance(data, bytes) else json.loads(data)


def input_frame(pid: int, data: bytes) -> bytes:
    """A binary terminal input frame."""
    return protocol.BINARY_STDIN_HEAD.pack(protocol.BINARY_STDIN, pid) + data


class Screen:
    """What one connection saw of one PTY: its bytes by offset, and the other messages."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.data = bytearray()
        #: The offset of data[0] (an attach may start past 0).
        self.base = 0
        #: How many output chunks came as binary frames, and as JSON.
        self.binary_frames = 0
        self.json_chunks = 0
        self.messages: list[dict[str, Any]] = []

    def _take(self, message: Any) -> None:
        if isinstance(message, bytes):
            kind, _pid, offset = protocol.BINARY_OUTPUT_HEAD.unpack_from(message)
            assert kind == protocol.BINARY_OUTPUT
            self.binary_frames += 1
            assert offset == self.base + len(self.data), "binary output continues in order"
            self.data += message[protocol.BINARY_OUTPUT_HEAD.size :]
        elif message["type"] == "output":
            assert message["stream"] == "pty"
            self.json_chunks += 1
            assert message["offset"] == self.base + len(self.data), "text output is in order"
            self.data += message["data"].encode("utf-8")
        else:
            if message["type"] == "attached" and not self.data:
                self.base = message["since"]["pty"]
            self.messages.append(message)

    def until(self, predicate: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; screen {bytes(self.data)[-400:]!r} {self.messages}"
            self._take(recv(self.ws, left))

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        self.until(lambda s: text in s.text(), timeout)

    def message(self, kind: str, timeout: float = 15.0) -> dict[str, Any]:
        self.until(lambda s: any(m["type"] == kind for m in s.messages), timeout)
        found = next(m for m in self.messages if m["type"] == kind)
        self.messages.remove(found)
        return found


def start_pty(ws: Any, rid: str, **fields: Any) -> tuple[Screen, int]:
    send(ws, {"type": "pty", "request_id": rid, "cols": 80, "rows": 24, **fields})
    screen = Screen(ws)
    started = screen.message("started")
    assert started["request_id"] == rid and started["pty"] is True
    return screen, started["pid"]
