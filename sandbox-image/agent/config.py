"""The agent's configuration, read once from the environment at start-up."""

from __future__ import annotations

import json
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from agent.egress import DEFAULT_EGRESS_PORT, proxy_env
from agent.spawn import IdentityError, UserIdentity, user_identity
from twistedgw import protocol

DEFAULT_PORT = 8765
DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_KILL_OUTPUT = 64 * 1024 * 1024
DEFAULT_TIMEOUT = protocol.DEFAULT_TIMEOUT
DEFAULT_MAX_TIMEOUT = protocol.DEFAULT_MAX_TIMEOUT
DEFAULT_MAX_RUNNING = 64
DEFAULT_MAX_SESSIONS = 16
#: Process handles (issue 14): bytes kept per output stream of each process, seconds a
#: finished process's result and log are kept, background processes at once, and the bytes
#: of finished processes' logs kept in all (the oldest are forgotten first past it).
DEFAULT_LOG_SIZE = 2 * 1024 * 1024
DEFAULT_RESULT_RETENTION = 900.0
DEFAULT_MAX_BACKGROUND = 32
DEFAULT_KEPT_LOG_BYTES = 64 * 1024 * 1024
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}


class ConfigError(Exception):
    """The agent's environment is unusable; the message says why."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs; ``from_environ`` reads it (and scrubs the secrets)."""

    secret: bytes = field(repr=False)
    child_env: dict[str, str] = field(repr=False)
    shell: str = "/bin/sh"
    cwd: str = "/"
    port: int = DEFAULT_PORT
    unix_socket: str | None = None
    #: The gateway's egress proxy socket, for sandboxes with an ``egress`` allow-list
    #: (agent.egress forwards 127.0.0.1:``egress_port`` to it).
    egress_socket: str | None = None
    egress_port: int = DEFAULT_EGRESS_PORT
    max_output: int = DEFAULT_MAX_OUTPUT
    kill_output: int = DEFAULT_KILL_OUTPUT
    default_timeout: float = DEFAULT_TIMEOUT
    max_timeout: float = DEFAULT_MAX_TIMEOUT
    max_running: int = DEFAULT_MAX_RUNNING
    max_sessions: int = DEFAULT_MAX_SESSIONS
    log_level: int = LOG_LEVELS["info"]
    spawn_method: str = "posix_spawn"
    log_size: int = DEFAULT_LOG_SIZE
    result_retention: float = DEFAULT_RESULT_RETENTION
    max_background: int = DEFAULT_MAX_BACKGROUND
    kept_log_bytes: int = DEFAULT_KEPT_LOG_BYTES
    #: Who user processes run as, and their oom_score_adj (see agent.spawn).
    user: UserIdentity = field(default_factory=UserIdentity)

    @property
    def home(self) -> str:
        """The directory relative ``cwd`` values are resolved against."""
        return self.cwd

    def argv_for(self, command: str) -> list[str]:
        """The argv that runs ``command`` through the shell."""
        return [self.shell, "-c", command]

    def session_argv(self) -> list[str]:
        """The argv of a persistent session shell (reads its commands from stdin)."""
        if os.path.basename(self.shell) == "bash":
            return [self.shell, "--noprofile", "--norc"]
        return [self.shell]

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> AgentConfig:
        """Read (and scrub) the configuration; raise ConfigError on bad values."""
        secret = environ.pop("SANDBOX_AGENT_SECRET", "")
        if not secret:
            raise ConfigError("SANDBOX_AGENT_SECRET is not set (or empty); refusing to start")
        raw_env = environ.pop("SANDBOX_COMMAND_ENV", "")
        max_timeout = _float_env(environ, "AGENT_MAX_TIMEOUT", DEFAULT_MAX_TIMEOUT, 1e-3, 1e9)
        default_timeout = min(
            _float_env(environ, "AGENT_DEFAULT_TIMEOUT", DEFAULT_TIMEOUT, 1e-3, 1e9), max_timeout
        )
        level_name = environ.get("AGENT_LOG_LEVEL", "info").strip().lower() or "info"
        if level_name not in LOG_LEVELS:
            raise ConfigError(f"AGENT_LOG_LEVEL={level_name!r} is not a log level")
        try:
            identity, pw = user_identity()
        except IdentityError as e:
            raise ConfigError(str(e)) from None
        if pw is not None:
            user, home = pw.pw_name, pw.pw_dir
        else:
            user, home = str(os.getuid()), environ.get("HOME", "/")
        cwd = home if os.path.isdir(home) else "/"
        shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
        child_env = {
            "HOME": home,
            "USER": user,
            "LOGNAME": user,
            "PATH": SAFE_PATH,
            "LANG": "C.UTF-8",
            "SHELL": shell,
        }
        egress_socket = environ.get("AGENT_EGRESS_SOCKET") or None
        egress_port = _int_env(environ, "AGENT_EGRESS_PORT", DEFAULT_EGRESS_PORT, 1, 65535)
        if egress_socket:
            child_env.update(proxy_env(egress_port))
        child_env.update(parse_command_env(raw_env))
        return cls(
            secret=secret.encode("utf-8"),
            child_env=child_env,
            shell=shell,
            cwd=cwd,
            port=_int_env(environ, "AGENT_PORT", DEFAULT_PORT, 0, 65535),
            unix_socket=environ.get("AGENT_UNIX_SOCKET") or None,
            egress_socket=egress_socket,
            egress_port=egress_port,
            max_output=_int_env(environ, "AGENT_MAX_OUTPUT", DEFAULT_MAX_OUTPUT, 0, 1 << 34),
            kill_output=_int_env(environ, "AGENT_KILL_OUTPUT", DEFAULT_KILL_OUTPUT, 0, 1 << 40),
            default_timeout=default_timeout,
            max_timeout=max_timeout,
            max_running=_int_env(environ, "AGENT_MAX_RUNNING", DEFAULT_MAX_RUNNING, 1, 1 << 20),
            max_sessions=_int_env(environ, "AGENT_MAX_SESSIONS", DEFAULT_MAX_SESSIONS, 0, 1 << 16),
            log_level=LOG_LEVELS[level_name],
            spawn_method="fork" if environ.get("AGENT_SPAWN") == "fork" else "posix_spawn",
            log_size=_int_env(environ, "AGENT_LOG_SIZE", DEFAULT_LOG_SIZE, 0, 1 << 32),
            result_retention=_float_env(
                environ, "AGENT_RESULT_RETENTION", DEFAULT_RESULT_RETENTION, 0.0, 1e9
            ),
            max_background=_int_env(
                environ, "AGENT_MAX_BACKGROUND", DEFAULT_MAX_BACKGROUND, 0, 1 << 16
            ),
            kept_log_bytes=_int_env(
                environ, "AGENT_KEPT_LOG_BYTES", DEFAULT_KEPT_LOG_BYTES, 0, 1 << 40
            ),
            user=identity,
        )


def parse_command_env(raw: str) -> dict[str, str]:
    """``SANDBOX_COMMAND_ENV``: a JSON object of strings every command gets ('' = none)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise ConfigError("SANDBOX_COMMAND_ENV is not JSON") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str)
        and k
        and "=" not in k
        and "\x00" not in k
        and isinstance(v, str)
        and "\x00" not in v
        for k, v in value.items()
    ):
        raise ConfigError("SANDBOX_COMMAND_ENV must be an object of strings")
    return value


def _number(environ: MutableMapping[str, str], name: str, kind: type) -> float | int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name}={raw!r} is not {what}") from None
    assert isinstance(value, int | float)
    return value


def _int_env(
    environ: MutableMapping[str, str], name: str, default: int, low: int, high: int
) -> int:
    """An integer from the environment, within [low, high]."""
    value = _number(environ, name, int)
    if value is None:
        return default
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of range [{low}, {high}]")
    return int(value)


def _float_env(
    environ: MutableMapping[str, str], name: str, default: float, low: float, high: float
) -> float:
    """A finite number from the environment, within [low, high]."""
    value = _number(environ, name, float)
    if value is None:
        return default
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{name}={value} is out of range [{low}, {high}]")
    return float(value)
