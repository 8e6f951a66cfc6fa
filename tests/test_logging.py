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
