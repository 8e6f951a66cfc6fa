"""The client's exceptions: one base class, and one mapping from what the gateway says (an
HTTP status, a WebSocket close code, an error reply) to them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twistedgw.client.results import CommandResult

#: WebSocket close codes after which the sandbox is gone (PROTOCOL.md, "Close codes").
CLOSE_SANDBOX_REMOVED = 4000
#: The agent connection dropped or the container died (1011): gone if the reason says exited.
CLOSE_AGENT_LOST = 1011
#: The agent restarted: reconnect at once.
CLOSE_AGENT_RESTARTED = 4001


class TwistedgwError(Exception):
    """Base class of every error the client raises."""


class AuthError(TwistedgwError):
    """The gateway refused the token (HTTP 401), or the browser origin (403)."""


class SandboxGone(TwistedgwError):
    """The sandbox does not exist (404), was removed (close 4000), or its container exited."""

    def __init__(self, message: str, sandbox_id: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.sandbox_id = sandbox_id
        #: ``deleted``, ``idle``, ``lifetime``, ``exited`` when the gateway said so.
        self.reason = reason


class GatewayError(TwistedgwError):
    """Any other refusal or failure: an HTTP error status, an error reply to a WebSocket
    message (``code`` is its ``error_code``), or a connection that could not be restored."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        #: The HTTP status, when the error came from a REST call or a refused handshake.
        self.status = status
        #: The protocol's ``error_code``, when the error came from an error reply.
        self.code = code


class ConnectionLost(GatewayError):
    """The WebSocket dropped and could not be redialled within the backoff's attempts, or it
    dropped under a command that cannot be resumed (a session command has no process handle)."""


class PathNotFound(GatewayError):
    """A file route's path does not exist in the sandbox (HTTP 404 naming a path)."""


class CommandTimeout(TwistedgwError):
    """The command ran past its ``timeout`` and was killed; ``result`` keeps its output."""

    def __init__(self, message: str, result: CommandResult):
        super().__init__(message)
        self.result = result


def error_from_http(status: int, body: Any, sandbox_id: str | None = None) -> TwistedgwError:
    """The exception for an HTTP error answer (``body`` as parsed JSON, or text)."""
    message = _message(body) or f"HTTP {status}"
    if status in (401, 403):
        return AuthError(f"{message} (HTTP {status})")
    if status == 404 and sandbox_id is not None and _names_sandbox(body):
        reason = body.get("reason") if isinstance(body, Mapping) else None
        text = f"sandbox {sandbox_id} not found"
        if reason:
            text = f"sandbox {sandbox_id} was removed ({reason})"
        return SandboxGone(text, sandbox_id, reason if isinstance(reason, str) else None)
    if status == 404 and sandbox_id is not None:
        return PathNotFound(f"{message} (HTTP 404)", status=404)
    return GatewayError(f"{message} (HTTP {status})", status=status)


def error_from_reply(message: Mapping[str, Any]) -> GatewayError:
    """The exception for a WebSocket error reply (``{"type": "error", "error_code", ...}``)."""
    code = message.get("error_code")
    text = message.get("error") or "error reply without a message"
    return GatewayError(
        f"{text} ({code})" if code else str(text), code=code if isinstance(code, str) else None
    )


def error_from_close(
    code: int | None, reason: str, sandbox_id: str | None
) -> TwistedgwError | None:
    """The exception a WebSocket close means, or ``None`` when it is worth redialling (a
    dropped network, a gateway restart, an agent restart)."""
    if code == CLOSE_SANDBOX_REMOVED:
        removed = reason.removeprefix("sandbox ").strip() or None
        return SandboxGone(f"sandbox {sandbox_id}: {reason or 'removed'}", sandbox_id, removed)
    if code == CLOSE_AGENT_LOST and reason.startswith("sandbox exited"):
        return SandboxGone(f"sandbox {sandbox_id}: {reason}", sandbox_id, "exited")
    return None


def _names_sandbox(body: Any) -> bool:
    """Whether a 404's body is about the sandbox (the gateway's ``Sandbox ID not found``, or
    a removal record) rather than a path inside it (a file route's)."""
    if not isinstance(body, Mapping):
        return bool(body)  # no body (a HEAD): not the gateway's sandbox answer
    error = body.get("error")
    return "sandbox_id" in body or (isinstance(error, str) and error.startswith("Sandbox "))


def _message(body: Any) -> str:
    if isinstance(body, Mapping):
        error = body.get("error")
        return str(error) if error is not None else ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return str(body).strip()[:500] if body else ""
