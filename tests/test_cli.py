"""Fast tests of the ``twistedgw`` CLI (click's runner, no gateway): argument handling, the
mapping of errors to one line and exit status 1, exit statuses, ``ID:PATH`` parsing."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from twistedgw.cli import _exit_status, _split_remote, cli


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_gateway_is_one_line_and_exit_status_1() -> None:
    """``ls`` against a closed port exits with status 1 and prints exactly one line, ``Error:
    cannot reach the gateway at <url>``, with no exception escaping but ``SystemExit``."""
    result = CliRunner().invoke(cli, ["--url", closed_url(), "ls"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("Error: cannot reach the gateway at http://127.0.0.1:")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_url_comes_from_the_environment() -> None:
    """Without ``--url``, ``ls`` dials ``$TWISTEDGW_URL``: the one-line error names that URL and
    the exit status is 1."""
    url = closed_url()
    result = CliRunner().invoke(cli, ["ls"], env={"TWISTEDGW_URL": url})
    assert url in result.output and result.exit_code == 1


def test_cp_needs_exactly_one_remote_side() -> None:
    """``cp`` with two local paths is a usage error (status 2) saying ``exactly one of SOURCE
    and DESTINATION``; with two ``ID:PATH`` sides it is a usage error (status 2) too."""
    both_local = CliRunner().invoke(cli, ["cp", "a", "b"])
    assert (
        both_local.exit_code == 2 and "exactly one of SOURCE and DESTINATION" in both_local.output
    )
    both_remote = CliRunner().invoke(cli, ["cp", "x:a", "y:b"])
    assert both_remote.exit_code == 2


def test_bad_name_value_pairs_are_usage_errors() -> None:
    """``create --env NOEQUALS`` (no ``=``) is a usage error (status 2) whose message asks for
    ``NAME=VALUE``."""
    result = CliRunner().invoke(cli, ["--url", closed_url(), "create", "--env", "NOEQUALS"])
    assert result.exit_code == 2 and "NAME=VALUE" in result.output


def test_shell_refuses_without_a_terminal() -> None:
    """``shell`` whose stdin/stdout are not a terminal (the runner's) is a usage error (status 2)
    saying it ``needs a terminal``."""
    result = CliRunner().invoke(cli, ["shell", "0" * 32])
    assert result.exit_code == 2 and "needs a terminal" in result.output


def test_exit_statuses_follow_the_shell_convention_for_signals() -> None:
    """Exit codes 0 and 3 pass through; a command killed by signal 9 or 15 (exit code -9, -15)
    gives status 137 and 143 (128 + the signal)."""
    assert [_exit_status(c) for c in (0, 3, -9, -15)] == [0, 3, 137, 143]


def test_remote_specs_are_id_colon_path_and_local_paths_stay_local() -> None:
    """``ID:PATH`` splits into ``(ID, PATH)`` (an empty path is ``.``); a colon after a slash
    (``./a:b``), an absolute path and a plain name are local (``None``)."""
    assert _split_remote("abc:data/x") == ("abc", "data/x")
    assert _split_remote("abc:") == ("abc", ".")
    assert _split_remote("./a:b") is None
    assert _split_remote("/tmp/x") is None
    assert _split_remote("plain") is None
