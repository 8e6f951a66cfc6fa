"""How failures become HTTP answers: ``APIError`` for the edge's own refusals, and ONE table
(``ERRORS``) from every domain exception to its status, JSON message, extra headers and log
line. Anything not in the table is logged and answered with a JSON 500.

The routes never catch these; ``GatewayAPI`` has one Klein error handler that calls
``error_answer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from attrs import frozen
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.errors import (
    CapacityExceeded,
    IdempotencyConflict,
    InvalidSettings,
    Recovering,
    SandboxNotFound,
)
from twistedgw.runtime.interface import (
    ContainerFailed,
    ImageMissing,
    RuntimeUnavailable,
    SocketPathTooLong,
)
from twistedgw.sandbox import SandboxPaused
from twistedgw.web.auth import Unauthorized


class APIError(Exception):
    """An error with an HTTP status, answered as ``{"error": message}`` (plus ``extra``
    fields, such as the refused tar entry of a file upload)."""

    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


@frozen
class ErrorAnswer:
    """What to answer for a failure: a status, a JSON body (``None``: nothing, the client has
    gone) and extra headers."""

    status: int
    body: dict[str, Any] | None
    headers: tuple[tuple[bytes, bytes], ...] = ()


@frozen
class ErrorRule:
    """One row of the table: the status, the message (from the exception's text), extra
    headers and how loudly to log it (``None``: not at all)."""

    status: int
    message: Callable[[str], str] = str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    log: str | None = None


def _not_found_body(error: Exception) -> dict[str, Any]:
    assert isinstance(error, SandboxNotFound)
    body: dict[str, Any] = {"error": f"Sandbox {error.sandbox_id} not found"}
    if error.tombstone is not None:
        # Removed recently: say when and why, so "it vanished" is explainable.
        body.update(error.tombstone.to_json())
        body["error"] = f"Sandbox {error.sandbox_id} was removed ({error.tombstone.reason})"
    return body


#: Domain exceptions and their answers. A subclass may have a row of its own; the most
#: specific row (along the exception's MRO) wins.
ERRORS: dict[type[BaseException], ErrorRule] = {
    SandboxNotFound: ErrorRule(404),  # body: _not_found_body
    Unauthorized: ErrorRule(401, headers=((b"WWW-Authenticate", b'Bearer realm="twistedgw"'),)),
    IdempotencyConflict: ErrorRule(422),
    InvalidSettings: ErrorRule(400),
    CapacityExceeded: ErrorRule(429, headers=((b"Retry-After", b"5"),)),
    Recovering: ErrorRule(
        503, headers=((b"Retry-After", str(Recovering.retry_after).encode("ascii")),)
    ),
    RuntimeUnavailable: ErrorRule(503, lambda m: f"Docker unavailable: {m}", log="warn"),
    ImageMissing: ErrorRule(503, log="error"),
    AgentUnavailable: ErrorRule(503, lambda m: f"sandbox agent: {m}"),
    ContainerFailed: ErrorRule(502, log="error"),
    # The gateway's own configuration, not Docker: say so, as a 503 naming the options.
    SocketPathTooLong: ErrorRule(503, log="error"),
    SandboxPaused: ErrorRule(409),
}

#: How a logged row is logged.
_LOG_FORMATS: dict[type[BaseException], str] = {
    RuntimeUnavailable: "Docker unavailable: {error}",
    ContainerFailed: "Docker refused: {error}",
}


def _rule_for(error: BaseException) -> tuple[type[BaseException], ErrorRule] | None:
    for kind in type(error).__mro__:
        rule = ERRORS.get(kind)
        if rule is not None:
            return kind, rule
    return None


def error_answer(request: IRequest, failure: Failure, log: Logger) -> ErrorAnswer:
    """The answer to ``failure`` raised while serving ``request``."""
    error = failure.value
    if isinstance(error, APIError):
        return ErrorAnswer(error.status, {**error.extra, "error": error.message})
    if isinstance(error, RequestRedirect):
        # Routing merged a double slash (``/sandboxes//x``): 308 to the merged path, with
        # the Location a client needs to follow it (relative: no host taken from the request).
        target = urlsplit(error.new_url)
        query = target.query or urlsplit(request.uri.decode("latin-1")).query
        location = urlunsplit(("", "", target.path, query, ""))
        return ErrorAnswer(
            error.code,
            {"error": f"moved to {location}", "location": location},
            ((b"Location", location.encode("latin-1")),),
        )
    if isinstance(error, HTTPException):
        # Routing: no such route (404) or method (405, with Allow).
        status = error.code or 400
        headers: tuple[tuple[bytes, bytes], ...] = ()
        if status == 405:
            allowed = getattr(error, "valid_methods", None) or []
            headers = ((b"Allow", ", ".join(allowed).encode("ascii")),)
        return ErrorAnswer(status, {"error": error.description or error.name}, headers)
    if isinstance(error, CancelledError):
        # The client went away; nobody reads this.
        return ErrorAnswer(200, None)
    assert error is not None
    found = _rule_for(error)
    if found is None:
        log.failure(
            "unhandled error on {method} {uri}", failure, method=request.method, uri=request.uri
        )
        return ErrorAnswer(500, {"error": "internal server error"})
    kind, rule = found
    message = failure.getErrorMessage()
    if rule.log is not None:
        getattr(log, rule.log)(_LOG_FORMATS.get(kind, "{error}"), error=message)
    assert isinstance(error, Exception)
    body = _not_found_body(error) if kind is SandboxNotFound else {"error": rule.message(message)}
    return ErrorAnswer(rule.status, body, rule.headers)
