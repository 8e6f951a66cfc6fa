"""Logging to stderr, at a level, without the ``logging`` package (it and ``traceback`` cost
about 1 MiB of every agent's memory)."""

from __future__ import annotations

import sys
import time
from typing import Any

DEBUG, INFO, WARN, ERROR = 10, 20, 30, 40
NAMES = {DEBUG: "debug", INFO: "info", WARN: "warn", ERROR: "error"}
level = INFO


def set_level(value: int) -> None:
    global level
    level = value


def _emit(at: int, message: str, args: tuple[Any, ...]) -> None:
    if at < level:
        return
    try:
        text = message % args if args else message
    except (TypeError, ValueError):
        text = f"{message} {args!r}"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sys.stderr.write(f"{stamp} [agent#{NAMES[at]}] {text}\n")
    sys.stderr.flush()


def debug(message: str, *args: Any) -> None:
    _emit(DEBUG, message, args)


def info(message: str, *args: Any) -> None:
    _emit(INFO, message, args)


def warn(message: str, *args: Any) -> None:
    _emit(WARN, message, args)


def error(message: str, *args: Any) -> None:
    _emit(ERROR, message, args)


def exception(message: str, *args: Any) -> None:
    """``error`` plus the traceback of the exception being handled."""
    if ERROR < level:
        return
    import traceback  # only when there is one to print

    text = message % args if args else message
    _emit(ERROR, "%s\n%s", (text, traceback.format_exc().rstrip()))
