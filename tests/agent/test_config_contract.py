"""The agent's environment contract: every variable the gateway (or the image) may set, its
default when unset, its bounds, and what a bad value says. These are what the gateway's
``runtime/docker.py`` and the image rely on; the black-box suite only sees a few of them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from agent.config import (
    DEFAULT_KEPT_LOG_BYTES,
    DEFAULT_KILL_OUTPUT,
    DEFAULT_LOG_SIZE,
    DEFAULT_MAX_BACKGROUND,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_RUNNING,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_PORT,
    DEFAULT_RESULT_RETENTION,
    SAFE_PATH,
    AgentConfig,
    ConfigError,
    parse_command_env,
)
from agent.egress import DEFAULT_EGRESS_PORT

from twistedgw import protocol

SECRET = {"SANDBOX_AGENT_SECRET": "s"}

#: (field, variable, its default, the smallest and the largest value taken, or None).
NUMBERS: list[tuple[str, str, Any, Any, Any]] = [
    ("port", "AGENT_PORT", DEFAULT_PORT, 0, 65535),
    ("egress_port", "AGENT_EGRESS_PORT", DEFAULT_EGRESS_PORT, 1, 65535),
    ("max_output", "AGENT_MAX_OUTPUT", DEFAULT_MAX_OUTPUT, 0, 1 << 34),
    ("kill_output", "AGENT_KILL_OUTPUT", DEFAULT_KILL_OUTPUT, 0, 1 << 40),
    ("max_running", "AGENT_MAX_RUNNING", DEFAULT_MAX_RUNNING, 1, 1 << 20),
    ("max_sessions", "AGENT_MAX_SESSIONS", DEFAULT_MAX_SESSIONS, 0, 1 << 16),
    ("log_size", "AGENT_LOG_SIZE", DEFAULT_LOG_SIZE, 0, 1 << 32),
    ("result_retention", "AGENT_RESULT_RETENTION", DEFAULT_RESULT_RETENTION, 0.0, 1e9),
    ("max_background", "AGENT_MAX_BACKGROUND", DEFAULT_MAX_BACKGROUND, 0, 1 << 16),
    ("kept_log_bytes", "AGENT_KEPT_LOG_BYTES", DEFAULT_KEPT_LOG_BYTES, 0, 1 << 40),
    ("max_timeout", "AGENT_MAX_TIMEOUT", protocol.DEFAULT_MAX_TIMEOUT, 1e-3, 1e9),
]


def read(**variables: str) -> AgentConfig:
    return AgentConfig.from_environ({**SECRET, **variables})


def test_the_defaults_of_an_environment_with_only_the_secret() -> None:
    """Unset, every number has its documented default; no socket, no egress, info logging,
    posix_spawn; commands get a fixed, safe environment."""
    config = read()
    for name, _, default, _, _ in NUMBERS:
        assert getattr(config, name) == default, name
    assert config.default_timeout == protocol.DEFAULT_TIMEOUT
    assert (config.unix_socket, config.egress_socket) == (None, None)
    assert config.log_level == 20 and config.spawn_method == "posix_spawn"
    env = config.child_env
    assert env["PATH"] == SAFE_PATH and env["LANG"] == "C.UTF-8"
    assert env["USER"] == env["LOGNAME"] and env["SHELL"] == config.shell
    assert env["HOME"] and "HTTP_PROXY" not in env and "http_proxy" not in env
    assert config.cwd in (env["HOME"], "/")


@pytest.mark.parametrize(("name", "variable", "default", "low", "high"), NUMBERS)
def test_each_number_is_read_within_its_bounds_and_refused_outside(
    name: str, variable: str, default: Any, low: Any, high: Any
) -> None:
    """Each variable sets its field; both bounds are accepted (blank means unset); one step
    outside either bound, or a word, is a ConfigError naming the variable and the range."""
    assert getattr(read(**{variable: str(low)}), name) == low
    assert getattr(read(**{variable: str(high)}), name) == high
    assert getattr(read(**{variable: "  "}), name) == default
    step = 1 if isinstance(low, int) else low / 2 or 0.5
    for bad in (low - step if low else -1, high * 2):
        with pytest.raises(ConfigError) as refused:
            read(**{variable: str(bad)})
        assert str(refused.value) == f"{variable}={type(low)(bad)} is out of range [{low}, {high}]"
    what = "an integer" if isinstance(low, int) else "a number"
    with pytest.raises(ConfigError) as word:
        read(**{variable: "lots"})
    assert str(word.value) == f"{variable}='lots' is not {what}"


def test_the_default_timeout_has_its_own_variable_and_never_exceeds_the_maximum() -> None:
    """AGENT_DEFAULT_TIMEOUT sets the default (within [0.001, 1e9]); above the maximum it is
    the maximum."""
    assert read(AGENT_DEFAULT_TIMEOUT="12.5").default_timeout == 12.5
    assert read(AGENT_DEFAULT_TIMEOUT="0.001").default_timeout == 0.001
    assert read(AGENT_DEFAULT_TIMEOUT="50", AGENT_MAX_TIMEOUT="40").default_timeout == 40.0
    with pytest.raises(ConfigError, match=r"AGENT_DEFAULT_TIMEOUT=inf is out of range"):
        read(AGENT_DEFAULT_TIMEOUT="inf")


def test_sockets_egress_spawn_and_log_level() -> None:
    """The agent socket and the egress socket are taken as given (blank: none); an egress
    socket gives commands the proxy variables for the egress port; only ``fork`` selects
    fork; the log level is case- and space-insensitive, blank meaning info."""
    config = read(AGENT_UNIX_SOCKET="/run/a.sock", AGENT_EGRESS_SOCKET="/run/p.sock")
    assert (config.unix_socket, config.egress_socket) == ("/run/a.sock", "/run/p.sock")
    assert read(AGENT_UNIX_SOCKET="").unix_socket is None
    proxied = read(AGENT_EGRESS_SOCKET="/run/p.sock", AGENT_EGRESS_PORT="3129").child_env
    assert "3129" in proxied["http_proxy"] and "3129" in proxied["HTTPS_PROXY"]
    assert read(AGENT_SPAWN="fork").spawn_method == "fork"
    assert read(AGENT_SPAWN="vfork").spawn_method == "posix_spawn"
    levels = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}
    for word, level in levels.items():
        assert read(AGENT_LOG_LEVEL=f" {word.upper()} ").log_level == level
    assert read(AGENT_LOG_LEVEL="").log_level == 20
    with pytest.raises(ConfigError) as loud:
        read(AGENT_LOG_LEVEL="Loud")
    assert str(loud.value) == "AGENT_LOG_LEVEL='loud' is not a log level"


def test_the_secret_is_required_and_both_secrets_are_taken_out_of_the_environment() -> None:
    """Without a secret (or with an empty one) the agent refuses to start, saying so; the
    secret and the command env are removed from the environment it was read from."""
    for environ in ({}, {"SANDBOX_AGENT_SECRET": ""}):
        with pytest.raises(ConfigError) as refused:
            AgentConfig.from_environ(environ)
        assert str(refused.value) == (
            "SANDBOX_AGENT_SECRET is not set (or empty); refusing to start"
        )
    environ = {**SECRET, "SANDBOX_COMMAND_ENV": json.dumps({"A": "1"}), "AGENT_PORT": "9"}
    config = AgentConfig.from_environ(environ)
    assert environ == {"AGENT_PORT": "9"}
    assert config.secret == b"s" and config.child_env["A"] == "1"


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [("", {}), ("{}", {}), ('{"A": "1", "B_2": ""}', {"A": "1", "B_2": ""})],
)
def test_the_command_env_is_a_json_object_of_strings(raw: str, parsed: dict[str, str]) -> None:
    """``SANDBOX_COMMAND_ENV`` that is empty, ``{}`` or an object of strings (empty values
    allowed) parses to that dict."""
    assert parse_command_env(raw) == parsed


@pytest.mark.parametrize(
    "raw",
    ["not json", "[1]", '{"": "x"}', '{"A=B": "x"}', '{"A\\u0000": "x"}', '{"A": 1}',
     '{"A": "x\\u0000"}'],
)  # fmt: skip
def test_a_bad_command_env_is_a_config_error(raw: str) -> None:
    """A command env that is not JSON, not an object, has an empty name, a name with ``=`` or
    NUL, a non-string value or a value with NUL is a ConfigError naming ``SANDBOX_COMMAND_ENV``."""
    with pytest.raises(ConfigError, match="SANDBOX_COMMAND_ENV"):
        parse_command_env(raw)


def test_a_session_shell_reads_no_startup_files_when_it_is_bash() -> None:
    """Commands run as ``SHELL -c COMMAND``; a session shell is bash without profile or rc
    (a user's dotfiles must not change the protocol's framing), another shell as it is."""
    import dataclasses

    bash = dataclasses.replace(read(), shell="/bin/bash")
    assert bash.argv_for("echo hi") == ["/bin/bash", "-c", "echo hi"]
    assert bash.session_argv() == ["/bin/bash", "--noprofile", "--norc"]
    assert dataclasses.replace(bash, shell="/bin/sh").session_argv() == ["/bin/sh"]
    assert bash.home == bash.cwd


def test_without_a_passwd_entry_the_user_is_the_uid_and_home_comes_from_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """An agent whose user has no passwd entry names the user by uid and takes ``HOME`` from
    its environment ("/" without one); the working directory is that home if it exists, "/"
    otherwise; user processes run with the identity ``user_identity`` gave."""
    import os

    from agent import config as module
    from agent.spawn import UserIdentity

    identity = UserIdentity(prefix=("setpriv", "--"), oom_score_adj=500)
    monkeypatch.setattr(module, "user_identity", lambda: (identity, None))
    config = read(HOME=str(tmp_path))
    uid = str(os.getuid())
    assert (config.child_env["USER"], config.child_env["LOGNAME"]) == (uid, uid)
    assert config.child_env["HOME"] == str(tmp_path) and config.cwd == str(tmp_path)
    assert config.user == identity
    missing = read(HOME=str(tmp_path / "gone"))
    assert missing.child_env["HOME"] == str(tmp_path / "gone") and missing.cwd == "/"
    assert read().child_env["HOME"] == "/" and read().cwd == "/"


def test_a_user_the_agent_cannot_become_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """When ``user_identity`` raises IdentityError, reading the config is a ConfigError with the
    IdentityError's message."""
    from agent import config as module
    from agent.spawn import IdentityError

    def refuse() -> Any:
        raise IdentityError("cannot change to uid 1000: no SETUID capability")

    monkeypatch.setattr(module, "user_identity", refuse)
    with pytest.raises(ConfigError) as refused:
        read()
    assert str(refused.value) == "cannot change to uid 1000: no SETUID capability"


@pytest.mark.parametrize(("bash", "shell"), [(True, "/bin/bash"), (False, "/bin/sh")])
def test_the_shell_is_bash_where_it_can_run_else_sh(
    monkeypatch: pytest.MonkeyPatch, bash: bool, shell: str
) -> None:
    """Commands run through /bin/bash when it is executable, /bin/sh otherwise; ``SHELL``
    says which."""
    import os

    real = os.access
    asked: list[str] = []

    def access(path: Any, mode: int) -> bool:
        if path == "/bin/bash":
            asked.append(path)
            return bash
        return real(path, mode)

    monkeypatch.setattr(os, "access", access)
    config = read()
    assert asked == ["/bin/bash"]
    assert config.shell == shell and config.child_env["SHELL"] == shell


def test_bad_command_env_messages_say_what_is_wrong() -> None:
    """A command env that is not JSON says ``SANDBOX_COMMAND_ENV is not JSON``; one with a
    non-string value says it ``must be an object of strings``."""
    with pytest.raises(ConfigError) as not_json:
        parse_command_env("{")
    assert str(not_json.value) == "SANDBOX_COMMAND_ENV is not JSON"
    with pytest.raises(ConfigError) as not_strings:
        parse_command_env('{"A": 1}')
    assert str(not_strings.value) == "SANDBOX_COMMAND_ENV must be an object of strings"


def test_the_log_level_default_and_the_default_timeout_ceiling() -> None:
    """Unset, the log level is info; the default timeout may be set up to 1e9 s (with the
    maximum as high), not above."""
    assert AgentConfig.from_environ(dict(SECRET)).log_level == 20
    high = read(AGENT_MAX_TIMEOUT="1e9", AGENT_DEFAULT_TIMEOUT="1e9")
    assert high.default_timeout == 1e9
    with pytest.raises(ConfigError, match="AGENT_DEFAULT_TIMEOUT"):
        read(AGENT_DEFAULT_TIMEOUT="1000000001")
