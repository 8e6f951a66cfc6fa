"""Command messages: parse and validate what clients send, build error results.

A command message is a JSON object ``{"command": str, "request_id"?: str}``; the gateway fills a
missing ``request_id``. Anything else gets an error result that carries the seed's result fields
(``request_id``, ``command``, ``success``, ``output``, ``error``, ``returncode``, ``timestamp``)
plus ``error_code``, so a seed client can treat it like any failed command.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

#: Longest ``request_id`` accepted (it is echoed back, so it is bounded).
MAX_REQUEST_ID_LENGTH = 256


class MessageError(Exception):
    """A client message that cannot be run; carries what is known of it for the reply."""

    def __init__(
        self, code: str, message: str, request_id: str | None = None, command: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.command = command


def new_request_id() -> str:
    """A fresh request id for a message that did not carry one."""
    return uuid.uuid4().hex


def parse_command(
    payload: bytes, is_binary: bool, make_request_id: Callable[[], str] = new_request_id
) -> dict[str, Any]:
    """Parse one client WebSocket message into a command object with a ``request_id``.

    Raises ``MessageError`` for anything that is not a valid command message.
    """
    if is_binary:
        raise MessageError("binary_message", "binary messages are not supported; send JSON text")
    try:
        message = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise MessageError("invalid_json", "message is not valid UTF-8") from None
    except ValueError as e:
        raise MessageError("invalid_json", f"message is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise MessageError("invalid_message", "message must be a JSON object")

    request_id = message.get("request_id")
    if request_id is None:
        request_id = make_request_id()
    elif not isinstance(request_id, str):
        raise MessageError("invalid_request_id", "request_id must be a string")
    elif len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise MessageError(
            "invalid_request_id", f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters"
        )

    command = message.get("command")
    if command is None:
        raise MessageError("missing_command", "message has no 'command' field", request_id)
    if not isinstance(command, str):
        raise MessageError("invalid_command", "'command' must be a string", request_id)
    if "\x00" in command:
        raise MessageError(
            "invalid_command", "'command' must not contain NUL characters", request_id, command
        )

    message["request_id"] = request_id
    return message


def error_result(error: MessageError, now: datetime) -> dict[str, Any]:
    """The reply to a message that could not be run, in the seed's result shape."""
    return {
        "request_id": error.request_id,
        "command": error.command,
        "success": False,
        "output": "",
        "error": error.message,
        "returncode": -1,
        "timestamp": now.isoformat(),
        "error_code": error.code,
    }


def encode(message: dict[str, Any]) -> bytes:
    """JSON-encode a message for a WebSocket text frame."""
    return json.dumps(message, ensure_ascii=False).encode("utf-8")
