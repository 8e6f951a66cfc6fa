"""The one table from failures to HTTP answers (``twistedgw.web.errors``): status, JSON body,
extra headers, and how loudly each is logged. A pure function of the failure."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

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
from twistedgw.sandbox import Tombstone
from twistedgw.web.auth import Unauthorized
from twistedgw.web.errors import APIError, ErrorAnswer, error_answer

SANDBOX = "a" * 32


class Recorded:
    """A Logger whose events are kept (level, format, fields)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)

    @property
    def levels(self) -> list[tuple[LogLevel, str]]:
        return [(e["log_level"], e["log_format"]) for e in self.events]


def answer(error: BaseException) -> tuple[ErrorAnswer, Recorded]:
    recorded = Recorded()
    try:
        raise error
    except BaseException:
        failure = Failure()
    return error_answer(DummyRequest([b"x"]), failure, recorded.log), recorded


@pytest.mark.parametrize(
    ("error", "status", "body", "headers"),
    [
        (APIError(426, "upgrade"), 426, {"error": "upgrade"}, ()),
        (SandboxNotFound(SANDBOX), 404, {"error": f"Sandbox {SANDBOX} not found"}, ()),
        (
            Unauthorized("missing API token"),
            401,
            {"error": "missing API token"},
            ((b"WWW-Authenticate", b'Bearer realm="twistedgw"'),),
        ),
        (IdempotencyConflict("other options"), 422, {"error": "other options"}, ()),
        (InvalidSettings("bad"), 400, {"error": "bad"}, ()),
        (CapacityExceeded("full"), 429, {"error": "full"}, ((b"Retry-After", b"5"),)),
        (Recovering("wait"), 503, {"error": "wait"}, ((b"Retry-After", b"1"),)),
        (RuntimeUnavailable("down"), 503, {"error": "Docker unavailable: down"}, ()),
        (ImageMissing("no image"), 503, {"error": "no image"}, ()),
        (AgentUnavailable("gone"), 503, {"error": "sandbox agent: gone"}, ()),
        (ContainerFailed("refused"), 502, {"error": "refused"}, ()),
        (SocketPathTooLong("paths too long"), 503, {"error": "paths too long"}, ()),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_each_failure_has_its_answer(
    error: BaseException, status: int, body: dict[str, Any], headers: tuple[Any, ...]
) -> None:
    """Each domain failure is answered with its status, JSON message and headers."""
    got, _ = answer(error)
    assert got == ErrorAnswer(status, body, headers)


@pytest.mark.parametrize(
    ("error", "level", "text"),
    [
        (RuntimeUnavailable("down"), LogLevel.warn, "Docker unavailable: {error}"),
        (ContainerFailed("refused"), LogLevel.error, "Docker refused: {error}"),
        (ImageMissing("no image"), LogLevel.error, "{error}"),
        (SocketPathTooLong("paths too long"), LogLevel.error, "{error}"),
    ],
)
def test_engine_failures_are_logged(error: BaseException, level: LogLevel, text: str) -> None:
    """Failures of the engine are logged at their level with the message; client errors
    (404, 400, 401, 429 ...) are not logged at all."""
    _, recorded = answer(error)
    assert recorded.levels == [(level, text)]
    assert recorded.events[0]["error"] == str(error)
    for quiet in (SandboxNotFound(SANDBOX), InvalidSettings("x"), Unauthorized("x")):
        assert answer(quiet)[1].events == []


def test_a_removed_sandbox_says_when_and_why() -> None:
    """A 404 for a sandbox removed recently carries its tombstone: reason, time, detail."""
    tombstone = Tombstone(SANDBOX, "idle", 1_700_000_000.0, "idle for 60 s")
    got, _ = answer(SandboxNotFound(SANDBOX, tombstone))
    assert got.status == 404
    assert got.body == {
        "error": f"Sandbox {SANDBOX} was removed (idle)",
        "sandbox_id": SANDBOX,
        "status": "removed",
        "reason": "idle",
        "removed_at": 1_700_000_000.0,
        "detail": "idle for 60 s",
    }


def test_a_subclass_takes_its_parents_row() -> None:
    """An exception without a row of its own is answered by its nearest base's row."""

    class Busy(CapacityExceeded):
        pass

    got, _ = answer(Busy("later"))
    assert got == ErrorAnswer(429, {"error": "later"}, ((b"Retry-After", b"5"),))


def test_routing_errors_are_json() -> None:
    """No such route is 404, a wrong method 405 with ``Allow``."""
    got, _ = answer(NotFound())
    assert got.status == 404 and got.body is not None and "error" in got.body
    got, _ = answer(MethodNotAllowed(valid_methods=["GET", "POST"]))
    assert got.status == 405 and got.headers == ((b"Allow", b"GET, POST"),)


def test_a_client_that_went_away_gets_nothing() -> None:
    """A cancelled request is nobody's to answer: no body, nothing logged."""
    got, recorded = answer(CancelledError())
    assert got.body is None and recorded.events == []


def test_anything_else_is_a_logged_500_without_details() -> None:
    """An unexpected exception is a JSON 500 that says nothing of its cause, and is logged
    as a failure with the request line."""
    got, recorded = answer(ZeroDivisionError("secret detail"))
    assert got == ErrorAnswer(500, {"error": "internal server error"})
    assert [e["log_level"] for e in recorded.events] == [LogLevel.critical]
    assert "unhandled error" in recorded.events[0]["log_format"]


def test_an_api_error_reads_as_its_message() -> None:
    """An ``APIError`` in a log line or traceback reads as what the client was told."""
    error = APIError(409, "sandbox is paused")
    assert str(error) == "sandbox is paused"
    assert error.args == ("sandbox is paused",)


def test_routing_errors_say_what_werkzeug_says_and_default_to_400() -> None:
    """A routing error's JSON says its description; an HTTP error without a code is a 400;
    a 405 that names no methods has an empty ``Allow`` instead of failing."""
    from werkzeug.exceptions import HTTPException

    got, _ = answer(NotFound())
    assert got.body == {"error": NotFound.description}
    got, _ = answer(HTTPException(description="bad route"))
    assert (got.status, got.body) == (400, {"error": "bad route"})

    class Bare405(HTTPException):
        code = 405
        description = "no such method"

    got, _ = answer(Bare405())
    assert (got.status, got.headers) == (405, ((b"Allow", b""),))


def test_an_unhandled_error_is_logged_with_the_request_line() -> None:
    """The 500's log line names the method and the URI the client asked for."""
    recorded = Recorded()
    request = DummyRequest([b"sandboxes"])
    request.method = b"POST"
    request.uri = b"/sandboxes?x=1"
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        failure = Failure()
    error_answer(request, failure, recorded.log)
    (event,) = recorded.events
    assert (event["method"], event["uri"]) == (b"POST", b"/sandboxes?x=1")
    assert event["log_format"] == "unhandled error on {method} {uri}"
