"""``--log-format json`` (``twistedgw.logging``) and the operations options of ``tap``."""

from __future__ import annotations

import io
import json

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from twistedgw.logging import JsonLogObserver, LoggingRoot
from twistedgw.tap import Options


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_each_event_is_one_json_line_with_stable_fields() -> None:
    """An event becomes one JSON object: time, level, namespace, the formatted message,
    and its structured fields (``ms`` as ``duration_ms``); other fields stay out."""
    out = io.StringIO()
    log = Logger(namespace="twistedgw.test", observer=JsonLogObserver(out))
    log.info(
        "sandbox {sandbox_id} ready in {ms:.0f} ms",
        sandbox_id="ab" * 16,
        ms=12.5,
        owner="0f" * 12,
        secret_thing="not copied",
    )
    log.warn("two\nlines")
    first, second = _lines(out)
    assert first["message"] == f"sandbox {'ab' * 16} ready in 12 ms"
    assert (first["level"], first["namespace"]) == ("info", "twistedgw.test")
    assert first["sandbox_id"] == "ab" * 16 and first["owner"] == "0f" * 12
    assert first["duration_ms"] == 12.5
    assert "secret_thing" not in first
    assert str(first["time"]).endswith("Z")
    assert second == {**second, "level": "warn", "message": "two\nlines"}
    assert len(out.getvalue().splitlines()) == 2  # the newline stayed inside the string


def test_debug_events_are_dropped_and_failures_carry_a_traceback() -> None:
    """Debug events (command text may be there) are not written at the default level; a
    logged failure adds its traceback."""
    out = io.StringIO()
    log = Logger(namespace="t", observer=JsonLogObserver(out))
    log.debug("command {command}", command="export TOKEN=secret")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    (line,) = _lines(out)
    assert line["level"] == "critical"
    assert "ZeroDivisionError" in str(line["traceback"])
    verbose = io.StringIO()
    Logger(namespace="t", observer=JsonLogObserver(verbose, LogLevel.debug)).debug("x")
    assert _lines(verbose)[0]["level"] == "debug"


def test_unencodable_values_do_not_lose_the_line() -> None:
    """Fields of any type are written (as text), bytes decoded."""
    out = io.StringIO()
    Logger(namespace="t", observer=JsonLogObserver(out)).info(
        "{path}", path=b"/x\xff", status=object()
    )
    (line,) = _lines(out)
    assert line["path"] == "/x\ufffd"
    assert str(line["status"]).startswith("<object")


def test_logging_root_gives_twistd_its_observer() -> None:
    """The root service sets the application's ILogObserver (what twistd's AppLogger
    uses); without an observer it leaves the application alone."""
    observer = JsonLogObserver(io.StringIO())
    application = Application("sandboxgw")
    LoggingRoot(observer).setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    plain = Application("sandboxgw")
    LoggingRoot().setServiceParent(plain)
    assert plain.getComponent(ILogObserver, None) is None


def test_log_format_and_metrics_port_options() -> None:
    """--log-format takes text or json; --metrics-port is forced onto loopback and refuses
    any other interface."""
    options = Options()
    options.parseOptions(["--log-format", "json", "--metrics-port", "9464"])
    assert options["log-format"] == "json"
    assert options["metrics-port"] == "tcp:9464:interface=127.0.0.1"
    assert Options().parseOptions([]) is None
    with pytest.raises(usage.UsageError, match="log-format"):
        Options().parseOptions(["--log-format", "xml"])
    with pytest.raises(usage.UsageError, match="loopback"):
        Options().parseOptions(["--metrics-port", "tcp:9464:interface=0.0.0.0"])
    options = Options()
    options.parseOptions(["--metrics-port", "tcp6:9464"])
    assert options["metrics-port"] == r"tcp6:9464:interface=\:\:1"


def test_default_output_is_the_stdout_of_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``out`` the observer keeps the stdout it was made with: twistd later redirects
    sys.stdout into the log system, and writing there would feed the observer itself."""
    made_with = io.StringIO()
    monkeypatch.setattr("sys.stdout", made_with)
    observer = JsonLogObserver()
    redirected = io.StringIO()
    monkeypatch.setattr("sys.stdout", redirected)
    Logger(namespace="t", observer=observer).info("hello")
    assert json.loads(made_with.getvalue())["message"] == "hello"
    assert redirected.getvalue() == ""


def test_event_as_json_is_exactly_the_documented_record() -> None:
    """``event_as_json`` gives time (UTC, milliseconds, ``Z``), level, namespace, message and
    every stable field the event has, with nothing else (``log_*`` keys and others left out)."""
    from twistedgw.logging import STABLE_FIELDS, event_as_json

    fields = {name: f"v-{name}" for name in STABLE_FIELDS}
    event = {
        "log_format": "hello {who}",
        "who": "world",
        "log_level": LogLevel.warn,
        "log_namespace": "twistedgw.x",
        "log_time": 1767225600.25,
        "log_source": None,
        **fields,
    }
    assert event_as_json(event) == {
        "time": "2026-01-01T00:00:00.250Z",
        "level": "warn",
        "namespace": "twistedgw.x",
        "message": "hello world",
        **fields,
    }
    assert STABLE_FIELDS == (
        "sandbox_id",
        "request_id",
        "owner",
        "event",
        "duration_ms",
        "status",
        "reason",
        "code",
        "method",
        "path",
        "peer",
        "pid",
        "template",
        "error",
    )


def test_event_as_json_defaults_for_a_bare_event() -> None:
    """An event without level, time, namespace or format is still a full record: info, the
    epoch, ``-`` and an empty message; ``ms`` becomes ``duration_ms``."""
    from twistedgw.logging import event_as_json

    assert event_as_json({"ms": 3}) == {
        "time": "1970-01-01T00:00:00.000Z",
        "level": "info",
        "namespace": "-",
        "message": "",
        "duration_ms": 3,
    }


def test_event_as_json_traceback_is_the_failures() -> None:
    """A failure's ``traceback`` is its full printed traceback; one that cannot print itself
    gives its repr instead of losing the line."""
    from twistedgw.logging import event_as_json

    try:
        raise KeyError("lost")
    except KeyError:
        failure = Failure()
    record = event_as_json({"log_format": "x", "log_failure": failure})
    assert record["traceback"] == failure.getTraceback()
    assert record["traceback"].rstrip().endswith("KeyError: 'lost'")

    class Broken:
        def getTraceback(self) -> str:
            raise RuntimeError("no")

        def __repr__(self) -> str:
            return "<broken failure>"

    assert event_as_json({"log_failure": Broken()})["traceback"] == "<broken failure>"
    assert "traceback" not in event_as_json({"log_format": "x"})


def test_an_unprintable_record_is_an_error_line() -> None:
    """A record json cannot write (a value json refuses) becomes a fixed error line, and each
    line is flushed at once."""
    from twistedgw import logging as gwlogging

    class Flushing(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    out = Flushing()
    observer = JsonLogObserver(out)
    original = gwlogging.event_as_json
    try:
        gwlogging.event_as_json = lambda event: {"x": float("nan"), "y": {1j}}  # type: ignore[assignment,dict-item]
        observer({"log_format": "x"})
    finally:
        gwlogging.event_as_json = original
    assert _lines(out) == [{"level": "error", "message": "unprintable log event"}]
    assert out.flushes == 1
    observer({"log_format": "x", "log_level": LogLevel.info})
    assert out.flushes == 2
    observer({"log_format": "x", "log_level": LogLevel.debug})
    assert out.flushes == 2
