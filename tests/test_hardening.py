"""The confinement of a sandbox container as ``containers.run`` options: a pure function of
the operator's limits (the engine applying them is checked by the integration tests)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from twistedgw.runtime.hardening import (
    AGENT_CAPABILITIES,
    DEFAULT_LIMITS,
    MAX_SOCKET_PATH,
    ContainerLimits,
    socket_path_length,
)


def test_default_confinement() -> None:
    """By default: 1 GiB without extra swap, one CPU, 256 processes, every capability
    dropped but the agent's three, no privilege gain, bounded logs and /dev/shm, and a
    read-only root with sized, nosuid, nodev tmpfs mounts for the writable places."""
    assert DEFAULT_LIMITS.run_options() == {
        "mem_limit": "1g",
        "memswap_limit": "1g",
        "nano_cpus": 1_000_000_000,
        "pids_limit": 256,
        "shm_size": "64m",
        "cap_drop": ["ALL"],
        "cap_add": ["SETUID", "SETGID", "KILL"],
        "security_opt": ["no-new-privileges"],
        "log_config": {"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}},
        "read_only": True,
        "tmpfs": {
            "/home/sandbox": "rw,nosuid,nodev,size=256m,uid=1000,gid=1000,mode=0755",
            "/tmp": "rw,nosuid,nodev,size=128m,mode=1777",
            "/var/tmp": "rw,nosuid,nodev,size=128m,mode=1777",
        },
    }
    assert AGENT_CAPABILITIES == ("SETUID", "SETGID", "KILL")


def test_operator_limits_are_applied() -> None:
    """Each limit option changes its own run option, and only that."""
    options = ContainerLimits(
        memory="512m",
        cpus=0.25,
        pids=32,
        home_size="1g",
        tmp_size="16m",
        log_size="1m",
        shm_size="8m",
        runtime="runsc",
    ).run_options()
    assert options["mem_limit"] == options["memswap_limit"] == "512m"
    assert options["nano_cpus"] == 250_000_000
    assert options["pids_limit"] == 32
    assert options["shm_size"] == "8m"
    assert options["log_config"]["config"] == {"max-size": "1m", "max-file": "2"}
    assert options["runtime"] == "runsc"
    assert options["tmpfs"]["/home/sandbox"].split(",")[3] == "size=1g"
    assert options["tmpfs"]["/tmp"] == "rw,nosuid,nodev,size=16m,mode=1777"
    assert options["tmpfs"]["/var/tmp"] == "rw,nosuid,nodev,size=16m,mode=1777"
    assert options["cap_drop"] == ["ALL"] and options["security_opt"] == ["no-new-privileges"]


def test_writable_root_has_no_tmpfs_and_no_runtime_by_default() -> None:
    """``--writable-root`` drops the read-only root and its tmpfs mounts; no ``runtime``
    option unless one is named. The rest of the confinement stays."""
    options = ContainerLimits(read_only_root=False).run_options()
    assert "read_only" not in options and "tmpfs" not in options
    assert "runtime" not in options
    assert options["cap_drop"] == ["ALL"] and options["pids_limit"] == 256


def test_socket_path_length_counts_the_longest_socket_of_a_sandbox() -> None:
    """The longest path under a socket directory is <dir>/<32 hex id>/proxy.sock, counted in
    bytes of the absolute path (the gateway dials the mount's absolute source)."""
    assert socket_path_length(Path("/s")) == len("/s/") + 32 + len("/proxy.sock")
    assert socket_path_length(Path("/s/\u00e9")) == socket_path_length(Path("/s/ab"))
    relative = socket_path_length(Path("rel"))
    assert relative == len(str(Path.cwd() / "rel")) + 1 + 32 + len("/proxy.sock")
    assert MAX_SOCKET_PATH == 107


def test_a_socket_dir_too_long_refuses_network_none_before_touching_the_disk() -> None:
    """A runtime whose socket directory would give paths over 107 bytes refuses a network-none
    sandbox's directory with SocketPathTooLong (naming the length and the options to change)
    and creates nothing; one byte less works and makes the directory."""
    from twisted.internet import reactor

    from twistedgw.runtime.docker import DockerRuntime
    from twistedgw.runtime.interface import SocketPathTooLong

    base = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    try:
        fixed = socket_path_length(base / "x") - 1
        fits = base / ("x" * (MAX_SOCKET_PATH - fixed))
        too_long = base / ("x" * (MAX_SOCKET_PATH - fixed + 1))
        assert socket_path_length(fits) == MAX_SOCKET_PATH
        refused = DockerRuntime(reactor, image="none", socket_dir=too_long)
        assert refused.socket_path_problem() is not None
        with pytest.raises(SocketPathTooLong, match=r"108 bytes.*--state-dir or --instance"):
            refused._thd_socket_dir("0" * 32)
        assert not too_long.exists()
        accepted = DockerRuntime(reactor, image="none", socket_dir=fits)
        assert accepted.socket_path_problem() is None
        assert accepted._thd_socket_dir("0" * 32).is_dir()
    finally:
        shutil.rmtree(base)
