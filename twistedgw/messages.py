"""Client messages: parse and validate what clients send, build error replies.

A command message is a JSON object ``{"command": str, "request_id"?: str, ...options}``; the
gateway fills a missing ``request_id`` and the server's default ``timeout``. Control messages
carry a ``type``: ``cancel``, ``stdin``, ``list_sessions``, ``close_session``.

Whatever cannot be run gets an error reply. For a command-like message it carries the seed's
result fields (``request_id``, ``command``, ``success``, ``output``, ``error``, ``returncode``,
``timestamp``) plus ``type: "error"`` and ``error_code``, so a seed client can treat it like any
failed command. For a control message it is ``{"type": "error", "request_id", "error",
"error_code"}``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from attrs import frozen

#: Longest ``request_id`` accepted (it is echoed back, so it is bounded).
MAX_REQUEST_ID_LENGTH = 256
#: Longest ``cwd`` accepted.
MAX_CWD_LENGTH = 4096
#: Most variables in one ``env`` object.
MAX_ENV_ENTRIES = 256
#: Session names: short and plain.
SESSION_NAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
ENV_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,255}\Z")

COMMAND = "command"
CONTROL_TYPES = frozenset({"cancel", "stdin", "list_sessions", "close_session"})


@frozen
class MessagePolicy:
    """Server-side rules applied to command messages."""

    default_timeout: float = 900.0
    max_timeout: float = 3600.0


#: The policy when the operator sets nothing.
DEFAULT_POLICY = MessagePolicy()


class MessageError(Exception):
    """A client message that cannot be run; carries what is known of it for the reply."""

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        command: str | None = None,
        control: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.command = command
        self.control = control


def new_request_id() -> str:
    """A fresh request id for a message that did not carry one."""
    return uuid.uuid4().hex


def _decode(payload: bytes, is_binary: bool) -> dict[str, Any]:
    if is_binary:
        raise MessageError("binary_message", "binary messages are not supported; send JSON text")
    try:
        message = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise MessageError("invalid_json", "message is not valid UTF-8") from None
    except RecursionError:
        raise MessageError("invalid_json", "message is nested too deeply") from None
    except ValueError as e:
        raise MessageError("invalid_json", f"message is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise MessageError("invalid_message", "message must be a JSON object")
    return message


def _request_id(message: dict[str, Any], required: bool, control: bool) -> str | None:
    request_id = message.get("request_id")
    if request_id is None:
        if required:
            raise MessageError(
                "invalid_request_id", "this message needs a 'request_id'", control=control
            )
        return None
    if not isinstance(request_id, str):
        raise MessageError("invalid_request_id", "request_id must be a string", control=control)
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise MessageError(
            "invalid_request_id",
            f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters",
            control=control,
        )
    return request_id


def _check_session(value: Any, request_id: str | None, command: str | None, control: bool) -> str:
    if not isinstance(value, str) or not SESSION_NAME_RE.match(value):
        raise MessageError(
            "invalid_session",
            "'session' must be 1-64 characters of letters, digits, '_', '.' and '-'",
            request_id,
            command,
            control,
        )
    return value


def parse_message(
    payload: bytes,
    is_binary: bool,
    policy: MessagePolicy = DEFAULT_POLICY,
    make_request_id: Callable[[], str] = new_request_id,
) -> dict[str, Any]:
    """Parse one client WebSocket message into what the agent is sent.

    Command messages get a ``request_id`` (if missing) and a ``timeout`` (the policy's
    default if missing). Raises ``MessageError`` for anything that cannot be forwarded.
    """
    message = _decode(payload, is_binary)
    kind = message.get("type", COMMAND)
    if kind == COMMAND:
        return _parse_command(message, policy, make_request_id)
    if not isinstance(kind, str) or kind not in CONTROL_TYPES:
        raise MessageError(
            "unknown_type",
            f"unknown message type; expected one of: command, {', '.join(sorted(CONTROL_TYPES))}",
            control=True,
        )
    return _parse_control(kind, message)


def _parse_command(
    message: dict[str, Any], policy: MessagePolicy, make_request_id: Callable[[], str]
) -> dict[str, Any]:
    request_id = _request_id(message, required=False, control=False) or make_request_id()
    message["request_id"] = request_id

    command = message.get("command")
    if command is None:
        raise MessageError("missing_command", "message has no 'command' field", request_id)
    if not isinstance(command, str):
        raise MessageError("invalid_command", "'command' must be a string", request_id)
    if "\x00" in command:
        raise MessageError(
            "invalid_command", "'command' must not contain NUL characters", request_id, command
        )

    def fail(code: str, text: str) -> MessageError:
        return MessageError(code, text, request_id, command)

    timeout = message.get("timeout")
    if timeout is None:
        message["timeout"] = policy.default_timeout
    elif (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise fail("invalid_timeout", "'timeout' must be a number of seconds greater than 0")
    elif timeout > policy.max_timeout:
        raise fail(
            "invalid_timeout", f"'timeout' exceeds the server maximum of {policy.max_timeout:g} s"
        )

    cwd = message.get("cwd")
    if cwd is not None and (
        not isinstance(cwd, str) or not cwd or "\x00" in cwd or len(cwd) > MAX_CWD_LENGTH
    ):
        raise fail("invalid_cwd", f"'cwd' must be a non-empty path (at most {MAX_CWD_LENGTH})")

    env = message.get("env")
    if env is not None:
        if not isinstance(env, dict) or len(env) > MAX_ENV_ENTRIES:
            raise fail("invalid_env", f"'env' must be an object of at most {MAX_ENV_ENTRIES}")
        for key, value in env.items():
            if not ENV_NAME_RE.match(key):
                raise fail("invalid_env", f"'env' name {key[:64]!r} is not a variable name")
            if not isinstance(value, str) or "\x00" in value:
                raise fail("invalid_env", f"'env' value of {key} must be a string without NUL")

    stdin = message.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        raise fail("invalid_stdin", "'stdin' must be a string")

    for flag in ("stream", "interactive"):
        if flag in message and not isinstance(message[flag], bool):
            raise fail(f"invalid_{flag}", f"'{flag}' must be true or false")

    if message.get("session") is not None:
        _check_session(message["session"], request_id, command, control=False)
        if message.get("interactive"):
            raise fail("unsupported", "'interactive' cannot be combined with 'session'")
    return message


def _parse_control(kind: str, message: dict[str, Any]) -> dict[str, Any]:
    request_id = _request_id(message, required=kind in ("cancel", "stdin"), control=True)
    forwarded: dict[str, Any] = {"type": kind, "request_id": request_id}
    if kind == "stdin":
        data = message.get("data", "")
        if not isinstance(data, str):
            raise MessageError("invalid_stdin", "'data' must be a string", request_id, control=True)
        eof = message.get("eof", False)
        if not isinstance(eof, bool):
            raise MessageError(
                "invalid_stdin", "'eof' must be true or false", request_id, None, True
            )
        forwarded.update(data=data, eof=eof)
    elif kind == "close_session":
        forwarded["session"] = _check_session(message.get("session"), request_id, None, True)
    return forwarded


def error_reply(error: MessageError, now: datetime) -> dict[str, Any]:
    """The reply to a message that could not be forwarded."""
    if error.control:
        return {
            "type": "error",
            "request_id": error.request_id,
            "error": error.message,
            "error_code": error.code,
        }
    return {
        "type": "error",
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
