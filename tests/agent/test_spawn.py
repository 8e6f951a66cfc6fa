"""start_process, the one place user processes start: as which user, with which oom_score_adj.

These run on the host (as root here, as in CI), which can change uid the way the agent in the
image does with its SETUID/SETGID capabilities.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from agent import spawn

RUNAS_C = Path(__file__).resolve().parents[2] / "sandbox-image" / "runas.c"


def run(argv: list[str], user: spawn.UserIdentity) -> str:
    """Start ``argv`` through start_process and return its stdout once it exits."""
    started = spawn.start_process(argv, {"PATH": "/usr/bin:/bin"}, "/", user=user)
    os.close(started.stdin)
    os.set_blocking(started.stdout, True)
    chunks = []
    while data := os.read(started.stdout, 65536):
        chunks.append(data)
    os.close(started.stdout)
    os.close(started.stderr)
    os.waitpid(started.pid, 0)
    return b"".join(chunks).decode()


def own_oom_score_adj() -> int:
    with open("/proc/self/oom_score_adj") as f:
        return int(f.read())


def test_user_processes_get_a_higher_oom_score_adj_and_the_caller_keeps_its_own() -> None:
    """The child inherits the raised oom_score_adj; the agent's own is back right after."""
    before = own_oom_score_adj()
    user = spawn.UserIdentity(oom_score_adj=before + 300, agent_oom_score_adj=before)
    assert run(["/bin/cat", "/proc/self/oom_score_adj"], user).strip() == str(before + 300)
    assert own_oom_score_adj() == before


def runas_binary(tmp_path: Path) -> str:
    """sandbox-image/runas.c compiled here (as the image build does)."""
    binary = tmp_path / "runas"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(RUNAS_C)], check=True
    )
    return str(binary)


@pytest.mark.parametrize("wrapper", ["runas", "setpriv"])
def test_wrapper_starts_the_process_as_another_user_without_capabilities(
    wrapper: str, tmp_path: Path
) -> None:
    """With either prefix wrapper_prefix() builds (the image's runas, or setpriv), the process
    runs under the target uid and gid, without supplementary groups and with empty capability
    sets."""
    assert os.getuid() == 0, "these tests change uid, which needs root (or SETUID/SETGID)"
    runas = runas_binary(tmp_path) if wrapper == "runas" else str(tmp_path / "absent")
    prefix = spawn.wrapper_prefix(65534, 65534, runas=runas)
    assert prefix[0] == runas if wrapper == "runas" else prefix[0].endswith("setpriv")
    user = spawn.UserIdentity(prefix=prefix, uid=65534, gid=65534)
    status = run(
        ["/bin/grep", "-E", "^(Uid|Gid|Groups|CapEff|CapAmb|CapPrm):", "/proc/self/status"], user
    )
    fields = {k: v.split() for k, v in (line.split(":", 1) for line in status.splitlines())}
    assert fields["Uid"] == ["65534"] * 4
    assert fields["Gid"] == ["65534"] * 4
    assert fields["Groups"] in ([], ["65534"])
    for cap in ("CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap][0], 16) == 0


def filesystem_uid() -> str:
    with open("/proc/self/status") as f:
        return next(line.split()[4] for line in f if line.startswith("Uid:"))


def test_readlink_as_the_user_reads_its_processes_cwd_and_restores_the_fsuid() -> None:
    """UserIdentity.readlink reads /proc/PID/cwd with the user's filesystem uid, and the
    caller's filesystem uid is its own again afterwards."""
    started = spawn.start_process(["/bin/sleep", "5"], {}, "/tmp")
    before = filesystem_uid()
    try:
        identity = spawn.UserIdentity(uid=65534, gid=65534)
        assert identity.readlink(f"/proc/{started.pid}/cwd") == "/tmp"
        assert filesystem_uid() == before
    finally:
        os.kill(started.pid, 9)
        os.waitpid(started.pid, 0)
        for fd in (started.stdin, started.stdout, started.stderr):
            os.close(fd)


def test_user_identity_runs_as_itself_without_a_sandbox_user_of_another_uid() -> None:
    """Where no `sandbox` user of another uid exists (this host), processes are started as the
    agent's own user, only with the raised oom_score_adj."""
    identity, passwd = spawn.user_identity()
    try:
        import pwd

        other = pwd.getpwnam(spawn.SANDBOX_USER).pw_uid != os.getuid()
    except KeyError:
        other = False
    if not other:
        assert identity.prefix == ()
        assert passwd is not None and passwd.pw_uid == os.getuid()
    else:
        assert identity.prefix[0] in (spawn.RUNAS, *spawn.SETPRIV_CANDIDATES)
    assert identity.oom_score_adj is not None
    assert identity.oom_score_adj >= spawn.USER_OOM_SCORE_ADJ


def test_runas_refuses_root_and_relative_programs(tmp_path: Path) -> None:
    """runas never runs anything as uid or gid 0, nor a program found by PATH search."""
    runas = runas_binary(tmp_path)
    for argv in (
        [runas, "0", "65534", "/bin/true"],
        [runas, "65534", "0", "/bin/true"],
        [runas, "65534", "65534", "true"],
        [runas, "x", "65534", "/bin/true"],
    ):
        assert subprocess.run(argv, capture_output=True).returncode == 126, argv
    missing = subprocess.run([runas, "65534", "65534", "/nonexistent"], capture_output=True)
    assert missing.returncode == 127
