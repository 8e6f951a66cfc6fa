"""``SwarmRuntime``'s service spec and listing, without an engine: what a sandbox's service
asks Swarm for, what it refuses, and how tasks read back."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from tests.runtime_contract import spec
from twistedgw.runtime.hardening import ContainerLimits
from twistedgw.runtime.interface import ContainerFailed
from twistedgw.runtime.labels import LABEL_SANDBOX_ID, LABEL_STATE, labels_for
from twistedgw.runtime.swarm import SwarmRuntime, volume_names


def runtime(**limits: Any) -> SwarmRuntime:
    return SwarmRuntime(Clock(), "img", instance="t", limits=ContainerLimits(**limits))


def test_service_spec_limits_reservations_and_hardening() -> None:
    """One replica, never restarted, CPU and memory as limits and equal reservations, pids
    and nofile limits, capabilities, a read-only root, and tmpfs volumes for the agent's
    socket (agent-owned) and the writable places (nosuid, nodev, noexec, sized)."""
    wanted = spec()
    options = runtime(memory="512m", cpus=0.5, pids=99, nofile=77)._service_spec(wanted)
    template = options["task_template"]
    assert options["mode"]["replicated"]["Replicas"] == 1
    assert template["RestartPolicy"]["Condition"] == "none"
    resources = template["Resources"]
    assert resources["Limits"] == {"NanoCPUs": 500_000_000, "MemoryBytes": 512 << 20, "Pids": 99}
    assert resources["Reservations"] == {"NanoCPUs": 500_000_000, "MemoryBytes": 512 << 20}
    container = template["ContainerSpec"]
    assert container["ReadOnly"] is True
    assert container["CapabilityDrop"] == ["ALL"]
    assert sorted(container["CapabilityAdd"]) == ["CAP_KILL", "CAP_SETGID", "CAP_SETUID"]
    assert container["Ulimits"] == [{"Name": "nofile", "Soft": 77, "Hard": 77}]
    assert container["Labels"][LABEL_SANDBOX_ID] == wanted.sandbox_id
    mounts = {m["Target"]: m for m in container["Mounts"]}
    names = volume_names(wanted.sandbox_id)
    assert {t: m["Source"] for t, m in mounts.items()} == names
    socket_options = mounts["/run/twistedgw"]["VolumeOptions"]["DriverConfig"]["Options"]["o"]
    assert "uid=999" in socket_options and "mode=0700" in socket_options
    home = mounts["/home/sandbox"]["VolumeOptions"]["DriverConfig"]["Options"]["o"]
    assert "uid=1000" in home and "noexec" in home and "nosuid" in home and "nodev" in home


def test_exec_tmpfs_and_writable_root() -> None:
    """exec_tmpfs drops noexec; a writable root keeps only the socket volume."""
    exec_ok = runtime(exec_tmpfs=True)._service_spec(spec())
    for mount in exec_ok["task_template"]["ContainerSpec"]["Mounts"]:
        if mount["Target"] != "/run/twistedgw":
            assert "noexec" not in mount["VolumeOptions"]["DriverConfig"]["Options"]["o"]
    writable = runtime(read_only_root=False)._service_spec(spec())
    targets = [m["Target"] for m in writable["task_template"]["ContainerSpec"]["Mounts"]]
    assert targets == ["/run/twistedgw"]


@pytest.mark.parametrize(
    "settings, limits",
    [({"network": "none"}, {}), ({"egress": ("example.com:443",)}, {}), ({}, {"runtime": "runsc"})],
)
def test_unsupported_options_are_refused(settings: dict[str, Any], limits: dict[str, Any]) -> None:
    """network none, an egress list and an OCI runtime are refused with a clear error."""
    with pytest.raises(ContainerFailed, match="swarm backend"):
        runtime(**limits)._service_spec(spec(**settings))


def test_listing_reads_state_and_skips_starting_tasks() -> None:
    """A running task is listed with its socket under the volume's mountpoint and the state
    label decoded; a young service whose task is still starting is not listed (another
    gateway may be creating it); an old one that never ran is listed as not running."""
    rt = runtime()
    wanted = spec()
    labels = {**labels_for(wanted, "t"), LABEL_STATE: '{"last_activity": 5.0}'}
    service = {"ID": "svc1", "Spec": {"Labels": labels, "TaskTemplate": {"ContainerSpec": {}}}}
    running = {"ServiceID": "svc1", "Version": {"Index": 3}, "Status": {"State": "running"}}
    mount = {volume_names(wanted.sandbox_id)["/run/twistedgw"]: "/data/v/_data"}
    info = rt._info(service, running, mount, {"svc1": "10.213.0.7"})
    assert info.running and info.container_id == "svc1" and info.ip_address == "10.213.0.7"
    assert info.agent_socket == "/data/v/_data/agent.sock"
    assert info.saved is not None and info.saved.last_activity == 5.0

    class Api:
        def __init__(self, task: dict[str, Any]) -> None:
            self.task = task

        def services(self, filters: Any) -> list[Any]:
            return [service]

        def tasks(self, filters: Any) -> list[Any]:
            return [self.task]

        def volumes(self, filters: Any) -> dict[str, Any]:
            return {"Volumes": []}

        def containers(self, filters: Any) -> list[Any]:
            return []

    starting = {**running, "Status": {"State": "preparing"}}
    client = type("Client", (), {})()
    rt._thd_client = lambda: client  # type: ignore[method-assign]
    client.api = Api(starting)
    rt.wall_clock = lambda: wanted.created_at + 10
    assert rt._thd_list() == []
    rt.wall_clock = lambda: wanted.created_at + 600
    (old,) = rt._thd_list()
    assert not old.running
