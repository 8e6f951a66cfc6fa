"""What ``SwarmRuntime`` asks of the docker SDK's low-level API (services, tasks, volumes,
containers), and what it makes of the answers, against a recording stand-in shaped like
``docker.APIClient`` (the ``_thd_*`` methods called directly, as the thread pool would).
The real engine's side is ``tests/integration/test_swarm_runtime_contract.py``; this file
pins the exact arguments, the waiting for a task, the cleanup, the label compare-and-swap
and the event mapping in memory. Time (``monotonic``/``sleep``) is a fake clock."""

from __future__ import annotations

import json
from typing import Any

import docker.errors
import docker.types
import pytest

from tests.dockerfakes import CallFromThread, api_error
from twistedgw.runtime import swarm as swarm_module
from twistedgw.runtime.hardening import SOCKET_MOUNT, SOCKET_NAME, ContainerLimits
from twistedgw.runtime.interface import (
    ContainerEvent,
    ContainerFailed,
    ContainerSpec,
    ImageMissing,
)
from twistedgw.runtime.labels import (
    COMMAND_ENV,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_SANDBOX_ID,
    SECRET_ENV,
    instance_labels,
    labels_for,
)
from twistedgw.runtime.swarm import (
    SERVICE_ID_LABEL,
    START_GRACE,
    SwarmRuntime,
    _latest_task,
    service_name,
    volume_names,
)
from twistedgw.sandbox import SandboxSettings

SANDBOX = "a" * 32
SERVICE = "svc" + "0" * 22
MOUNTPOINT = "/var/lib/docker/volumes/x/_data"


def spec(sandbox_id: str = SANDBOX, image: str | None = None, **settings: Any) -> ContainerSpec:
    return ContainerSpec(
        sandbox_id,
        1_700_000_000.5,
        "s3cret",
        SandboxSettings(idle_timeout=60, **settings),
        image=image,
    )


def task(state: str, index: int = 1, service: str = SERVICE, **status: Any) -> dict[str, Any]:
    return {"ServiceID": service, "Version": {"Index": index}, "Status": {"State": state, **status}}


class FakeTime:
    """``time`` for the swarm module: ``sleep`` advances ``monotonic`` at once."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return 1_700_000_000.5


class Response:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error


class FakeAPI:
    """The parts of ``docker.APIClient`` ``SwarmRuntime`` calls, with the SDK's parameter
    names, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.images = {"img", "tmpl-image"}
        self.service_docs: dict[str, dict[str, Any]] = {}
        #: Answers of ``tasks`` during a create, one per call (the last one repeats).
        self.task_script: list[list[dict[str, Any]]] = [[task("running")]]
        self.all_tasks: list[dict[str, Any]] = []
        self.volume_docs: list[dict[str, Any]] = [
            {"Name": volume_names(SANDBOX)[SOCKET_MOUNT], "Mountpoint": MOUNTPOINT}
        ]
        self.container_summaries: list[dict[str, Any]] = []
        self.create_error: Exception | None = None
        self.remove_service_error: Exception | None = None
        self.remove_volume_errors: dict[str, list[Exception]] = {}
        self.update_error: Exception | None = None
        self.container_state: dict[str, Any] = {"Running": True, "Paused": False}

    def inspect_image(self, image: str) -> dict[str, Any]:
        self.calls.append(("inspect_image", image))
        if image not in self.images:
            raise docker.errors.ImageNotFound(f"no such image: {image}")
        return {"Id": "sha256:1"}

    def create_service(
        self,
        task_template: Any,
        name: Any = None,
        labels: Any = None,
        mode: Any = None,
        update_config: Any = None,
        networks: Any = None,
        endpoint_config: Any = None,
        endpoint_spec: Any = None,
        rollback_config: Any = None,
    ) -> dict[str, Any]:
        self.calls.append(("create_service", name))
        if self.create_error is not None:
            raise self.create_error
        self.service_docs.setdefault(
            SERVICE,
            {
                "ID": SERVICE,
                "Version": {"Index": 11},
                "Spec": {
                    "Name": name,
                    "Labels": labels,
                    "TaskTemplate": {"ContainerSpec": dict(task_template["ContainerSpec"])},
                },
            },
        )
        # The SDK's ContainerSpec keeps env as a list of KEY=VALUE, as the engine returns it.
        return {"ID": SERVICE}

    def inspect_service(self, service: str, insert_defaults: Any = None) -> dict[str, Any]:
        self.calls.append(("inspect_service", service))
        if service not in self.service_docs:
            raise docker.errors.NotFound(f"service {service} not found")
        return self.service_docs[service]

    def tasks(self, filters: Any = None) -> list[dict[str, Any]]:
        self.calls.append(("tasks", filters))
        if isinstance(filters["service"], list):
            return self.all_tasks
        if len(self.task_script) > 1:
            return self.task_script.pop(0)
        return self.task_script[0]

    def services(self, filters: Any = None, status: Any = None) -> list[dict[str, Any]]:
        self.calls.append(("services", filters))
        return list(self.service_docs.values())

    def volumes(self, filters: Any = None) -> dict[str, Any]:
        self.calls.append(("volumes", filters))
        return {"Volumes": self.volume_docs, "Warnings": None}

    def containers(
        self,
        quiet: bool = False,
        all: bool = False,
        trunc: bool = False,
        latest: bool = False,
        since: Any = None,
        before: Any = None,
        limit: int = -1,
        size: bool = False,
        filters: Any = None,
    ) -> list[dict[str, Any]]:
        self.calls.append(("containers", filters))
        return self.container_summaries

    def remove_service(self, service: str) -> bool:
        self.calls.append(("remove_service", service))
        if self.remove_service_error is not None:
            raise self.remove_service_error
        self.service_docs.pop(service, None)
        return True

    def remove_volume(self, name: str, force: bool = False) -> None:
        self.calls.append(("remove_volume", name, force))
        errors = self.remove_volume_errors.get(name)
        if errors:
            raise errors.pop(0)

    def _url(self, pathfmt: str, *args: str, **kwargs: Any) -> str:
        return "http+docker://localhost/v1.41" + pathfmt.format(*args)

    def _post_json(self, url: str, data: Any, **kwargs: Any) -> Response:
        self.calls.append(("post_json", url, data, kwargs))
        return Response(self.update_error)

    def _raise_for_status(self, response: Response) -> None:
        if response.error is not None:
            raise response.error

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        self.calls.append(("inspect_container", container_id))
        return {"State": self.container_state}

    def pause(self, container_id: str) -> None:
        self.calls.append(("pause", container_id))

    def unpause(self, container_id: str) -> None:
        self.calls.append(("unpause", container_id))

    def names(self) -> list[Any]:
        return [call[0] for call in self.calls]


class FakeClient:
    def __init__(self) -> None:
        self.api = FakeAPI()


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(swarm_module, "time", fake)
    return fake


def runtime(client: FakeClient | None = None, **kwargs: Any) -> SwarmRuntime:
    rt = SwarmRuntime(
        CallFromThread(), "img", instance="inst-s", agent_env={"AGENT_MAX_OUTPUT": "9"}, **kwargs
    )
    rt._client = client or FakeClient()
    return rt


# -- names -------------------------------------------------------------------------------------


def test_service_and_volume_names_are_short_and_per_sandbox() -> None:
    """``twistedgw-ID`` for the service; four ``tgw-ID-*`` volumes by mount point."""
    assert service_name(SANDBOX) == f"twistedgw-{SANDBOX}"
    assert volume_names(SANDBOX) == {
        "/run/twistedgw": f"tgw-{SANDBOX}-a",
        "/home/sandbox": f"tgw-{SANDBOX}-home",
        "/tmp": f"tgw-{SANDBOX}-tmp",
        "/var/tmp": f"tgw-{SANDBOX}-vtmp",
    }


def test_latest_task_is_the_one_with_the_highest_version() -> None:
    """Of a service's tasks the newest (highest ``Version.Index``) counts, a missing version
    counts as 0; no task gives ``None``."""
    old, new, unversioned = task("failed", 3), task("running", 9), {"Status": {"State": "x"}}
    assert _latest_task([old, new, unversioned]) is new
    assert _latest_task([unversioned, old]) is old
    assert _latest_task([]) is None


# -- the service spec --------------------------------------------------------------------------


def test_service_spec_names_labels_image_and_agent_environment() -> None:
    """Name ``twistedgw-ID``, the label codec's labels on service and container, the runtime's
    image, hostname ``sandbox``, the agent's environment plus its secret and socket path,
    ``SANDBOX_COMMAND_ENV`` as JSON, a 2 s stop grace, json-file logs of the limit's size."""
    rt = runtime()
    wanted = spec(env={"A": "1"})
    options = rt._service_spec(wanted)
    labels = labels_for(wanted, "inst-s")
    assert options["name"] == f"twistedgw-{SANDBOX}"
    assert options["labels"] == labels
    assert isinstance(options["task_template"], docker.types.TaskTemplate)
    assert isinstance(options["mode"], docker.types.ServiceMode)
    container = options["task_template"]["ContainerSpec"]
    assert container["Image"] == "img"
    assert container["Hostname"] == "sandbox"
    assert container["Labels"] == labels
    env = dict(entry.split("=", 1) for entry in container["Env"])
    assert env == {
        "AGENT_MAX_OUTPUT": "9",
        SECRET_ENV: "s3cret",
        "AGENT_UNIX_SOCKET": f"{SOCKET_MOUNT}/{SOCKET_NAME}",
        COMMAND_ENV: json.dumps({"A": "1"}),
    }
    assert container["StopGracePeriod"] == 2_000_000_000
    assert options["task_template"]["LogDriver"] == {
        "Name": "json-file",
        "Options": {"max-size": "10m", "max-file": "2"},
    }
    assert "Networks" not in options["task_template"]
    assert set(options) == {"task_template", "name", "labels", "mode"}


def test_service_spec_uses_a_template_image_and_no_command_env_without_env() -> None:
    """A spec's image wins over the runtime's; no ``env`` means no ``SANDBOX_COMMAND_ENV``."""
    container = runtime()._service_spec(spec(image="tmpl-image"))["task_template"]["ContainerSpec"]
    assert container["Image"] == "tmpl-image"
    assert not any(entry.startswith(f"{COMMAND_ENV}=") for entry in container["Env"])


def test_service_spec_volumes_carry_only_the_finding_labels_and_exact_tmpfs_options() -> None:
    """Each volume is a ``local`` tmpfs with exactly its options (sizes in bytes) and only the
    managed/instance/sandbox labels (enough to find and remove it)."""
    wanted = spec()
    rt = runtime(limits=ContainerLimits(home_size="2m", tmp_size="1m"))
    container = rt._service_spec(wanted)["task_template"]["ContainerSpec"]
    mounts = {m["Target"]: m for m in container["Mounts"]}
    options = {
        target: m["VolumeOptions"]["DriverConfig"]["Options"] for target, m in mounts.items()
    }
    assert options["/run/twistedgw"] == {
        "type": "tmpfs",
        "device": "tmpfs",
        "o": "uid=999,gid=999,mode=0700,size=1m,nosuid,nodev,noexec",
    }
    assert options["/home/sandbox"]["o"] == (
        f"uid=1000,gid=1000,mode=0755,size={2 << 20},nosuid,nodev,noexec"
    )
    assert options["/tmp"]["o"] == f"mode=1777,size={1 << 20},nosuid,nodev,noexec"
    assert options["/var/tmp"]["o"] == f"mode=1777,size={1 << 20},nosuid,nodev,noexec"
    for target, mount in mounts.items():
        assert mount["Type"] == "volume", target
        assert mount["ReadOnly"] is False, target
        assert mount["VolumeOptions"]["DriverConfig"]["Name"] == "local"
        assert mount["VolumeOptions"]["Labels"] == {
            LABEL_MANAGED: "true",
            LABEL_INSTANCE: "inst-s",
            LABEL_SANDBOX_ID: SANDBOX,
        }


def test_service_spec_sizes_from_the_sandbox_resources() -> None:
    """A sandbox's ``resources`` (cpus, memory, disk) size the limits, reservations and the
    home volume; the template's own limits, when given, win over the runtime's."""
    from twistedgw.sandbox import Resources

    rt = runtime()
    wanted = spec(resources=Resources(cpus=0.25, memory=64 << 20, disk=8 << 20))
    template = rt._service_spec(wanted)["task_template"]
    assert template["Resources"]["Limits"]["NanoCPUs"] == 250_000_000
    assert template["Resources"]["Limits"]["MemoryBytes"] == 64 << 20
    assert template["Resources"]["Reservations"] == {
        "NanoCPUs": 250_000_000,
        "MemoryBytes": 64 << 20,
    }
    mounts = {m["Target"]: m for m in template["ContainerSpec"]["Mounts"]}
    home = mounts["/home/sandbox"]["VolumeOptions"]["DriverConfig"]["Options"]["o"]
    assert f"size={8 << 20}," in home
    own = ContainerSpec(
        SANDBOX, 1.0, "s", SandboxSettings(idle_timeout=60), limits=ContainerLimits(pids=5)
    )
    assert rt._service_spec(own)["task_template"]["Resources"]["Limits"]["Pids"] == 5


# -- create ------------------------------------------------------------------------------------


def test_create_makes_the_service_waits_for_its_task_and_reads_it_back(fake_time: FakeTime) -> None:
    """The image is checked, the service created with ``_service_spec``'s arguments, the task
    polled (every 50 ms) until running; the answer is the service read back with the socket
    under the socket volume's mountpoint and the task container's address."""
    client = FakeClient()
    api = client.api
    api.task_script = [[], [task("pending", 1)], [task("running", 2)]]
    api.container_summaries = [
        {
            "Labels": {SERVICE_ID_LABEL: SERVICE},
            "NetworkSettings": {"Networks": {"ingress": None, "br": {"IPAddress": "10.0.9.4"}}},
        }
    ]
    rt = runtime(client)
    info = rt._thd_create(spec())
    assert api.calls[0] == ("inspect_image", "img")
    assert api.calls[1] == ("create_service", f"twistedgw-{SANDBOX}")
    assert [c for c in api.calls if c[0] == "tasks"] == [("tasks", {"service": SERVICE})] * 3
    assert fake_time.sleeps == [0.05, 0.05]
    assert info.container_id == SERVICE and info.sandbox_id == SANDBOX
    assert info.running and info.exit_code is None
    assert info.agent_socket == f"{MOUNTPOINT}/{SOCKET_NAME}"
    assert (info.agent_host, info.agent_port) == ("127.0.0.1", 0)
    assert info.agent_secret == "s3cret"
    assert info.ip_address == "10.0.9.4"
    assert info.created_at == 1_700_000_000.5
    assert ("volumes", {"label": instance_labels("inst-s")}) in api.calls
    assert ("containers", {"label": instance_labels("inst-s")}) in api.calls
    assert "remove_service" not in api.names()


def test_create_of_a_missing_image_is_image_missing_and_makes_nothing(fake_time: FakeTime) -> None:
    """An image the engine lacks: ``ImageMissing`` before any service exists."""
    client = FakeClient()
    rt = runtime(client)
    with pytest.raises(ImageMissing, match="'nope'"):
        rt._thd_create(spec(image="nope"))
    assert client.api.names() == ["inspect_image"]


def test_a_task_that_fails_is_reported_with_its_error_and_cleaned_up(fake_time: FakeTime) -> None:
    """A task past the starting states but not running: ``ContainerFailed`` with the task's
    ``Err``; the service and the sandbox's four volumes are removed."""
    client = FakeClient()
    client.api.task_script = [[task("rejected", Err="no suitable node")]]
    rt = runtime(client)
    with pytest.raises(ContainerFailed, match="did not start: no suitable node"):
        rt._thd_create(spec())
    assert ("remove_service", SERVICE) in client.api.calls
    removed = [c[1] for c in client.api.calls if c[0] == "remove_volume"]
    assert removed == list(volume_names(SANDBOX).values())
    assert all(c[2] is False for c in client.api.calls if c[0] == "remove_volume")


def test_a_failed_task_without_error_text_reports_its_state(fake_time: FakeTime) -> None:
    """No ``Err``: the message names the state."""
    client = FakeClient()
    client.api.task_script = [[task("complete")]]
    with pytest.raises(ContainerFailed, match="did not start: complete"):
        runtime(client)._thd_create(spec())


def test_a_task_that_never_runs_times_out_after_start_timeout(fake_time: FakeTime) -> None:
    """A task still starting after ``start_timeout`` seconds: ``ContainerFailed`` naming the
    timeout; it was polled (not given up at once) and the service is removed."""
    client = FakeClient()
    client.api.task_script = [[task("preparing")]]
    rt = runtime(client, start_timeout=2.0)
    with pytest.raises(ContainerFailed, match="did not start within 2 s"):
        rt._thd_create(spec())
    assert 2.0 < sum(fake_time.sleeps) <= 2.1
    assert ("remove_service", SERVICE) in client.api.calls


def test_a_running_task_without_socket_volume_is_refused_and_removed(fake_time: FakeTime) -> None:
    """Running, but no mountpoint for the socket volume on this engine: ``ContainerFailed``,
    service removed."""
    client = FakeClient()
    client.api.volume_docs = [{"Name": "someone-else", "Mountpoint": "/x"}]
    with pytest.raises(ContainerFailed, match="no socket volume"):
        runtime(client)._thd_create(spec())
    assert ("remove_service", SERVICE) in client.api.calls


def test_a_refused_service_create_cleans_up_by_service_name(fake_time: FakeTime) -> None:
    """``create_service`` itself failing: the error is raised and the removal is by name."""
    client = FakeClient()
    client.api.create_error = api_error("name conflicts", 409)
    with pytest.raises(docker.errors.APIError, match="name conflicts"):
        runtime(client)._thd_create(spec())
    assert ("remove_service", f"twistedgw-{SANDBOX}") in client.api.calls


def test_a_failing_cleanup_keeps_the_original_error(fake_time: FakeTime) -> None:
    """The cleanup failing too: the create's own error is what the caller sees."""
    client = FakeClient()
    client.api.task_script = [[task("failed", Err="boom")]]
    client.api.remove_service_error = api_error("engine down")
    with pytest.raises(ContainerFailed, match="boom"):
        runtime(client)._thd_create(spec())


# -- listing -----------------------------------------------------------------------------------


def service_doc(
    service_id: str = SERVICE, sandbox_id: str = SANDBOX, **extra_labels: str
) -> dict[str, Any]:
    labels = {**labels_for(spec(sandbox_id), "inst-s"), **extra_labels}
    return {
        "ID": service_id,
        "Version": {"Index": 4},
        "Spec": {
            "Labels": labels,
            "TaskTemplate": {
                "ContainerSpec": {"Env": [f"{SECRET_ENV}=s3cret", "NOEQUALS", "X=a=b"]}
            },
        },
    }


def test_listing_asks_by_instance_and_groups_tasks_by_service(fake_time: FakeTime) -> None:
    """Services by this instance's labels, then one ``tasks`` call for all their ids; each
    service's newest task decides (a dead old one does not hide a running new one)."""
    client = FakeClient()
    api = client.api
    other = "b" * 32
    api.service_docs = {SERVICE: service_doc(), "svc2": service_doc("svc2", other)}
    api.all_tasks = [
        task("failed", 1, SERVICE, ContainerStatus={"ExitCode": 3}),
        task("running", 5, SERVICE),
        task("failed", 2, "svc2", ContainerStatus={"ExitCode": 137}),
    ]
    rt = runtime(client)
    rt.wall_clock = lambda: 1_700_000_000.5 + START_GRACE + 1
    infos = {info.container_id: info for info in rt._thd_list()}
    assert ("services", {"label": instance_labels("inst-s")}) in api.calls
    assert ("tasks", {"service": [SERVICE, "svc2"]}) in api.calls
    assert infos[SERVICE].running and infos[SERVICE].exit_code is None
    assert infos[SERVICE].agent_socket == f"{MOUNTPOINT}/{SOCKET_NAME}"
    assert not infos["svc2"].running and infos["svc2"].exit_code == 137
    assert infos["svc2"].sandbox_id == other and infos["svc2"].agent_socket is None


def test_listing_without_services_asks_nothing_more() -> None:
    """No services: an empty list, no task/volume/container queries."""
    client = FakeClient()
    assert runtime(client)._thd_list() == []
    assert client.api.names() == ["services"]


def test_a_young_service_without_task_is_skipped_an_old_one_listed() -> None:
    """No task yet and younger than ``START_GRACE``: not listed; older: listed, not running."""
    client = FakeClient()
    client.api.service_docs = {SERVICE: service_doc()}
    rt = runtime(client)
    rt.wall_clock = lambda: 1_700_000_000.5 + START_GRACE - 1
    assert rt._thd_list() == []
    rt.wall_clock = lambda: 1_700_000_000.5 + START_GRACE + 1
    [info] = rt._thd_list()
    assert not info.running and info.exit_code is None


def test_info_reads_environment_pool_label_and_missing_parts() -> None:
    """Env entries split at the first ``=`` (entries without one ignored); the pool label;
    a service without task, labels or address reads as not running with empty fields."""
    rt = runtime()
    info = rt._info(service_doc(**{LABEL_POOL: "true"}), task("running"), {}, None)
    assert info.agent_secret == "s3cret" and info.for_pool
    assert info.ip_address == "" and info.agent_socket is None
    bare = rt._info({"ID": "x"}, None, {}, {})
    assert (bare.sandbox_id, bare.container_id, bare.created_at) == ("", "x", 0.0)
    assert not bare.running and not bare.for_pool and bare.oom_killed is False
    assert bare.agent_secret == ""


def test_info_keeps_every_equals_sign_after_the_first_in_an_env_value() -> None:
    """An env entry splits at its first ``=`` only: a secret or a command environment whose
    value holds ``=`` is read back whole."""
    doc = service_doc()
    doc["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] = [
        f"{SECRET_ENV}=a=b==",
        f"{COMMAND_ENV}=" + json.dumps({"Q": "k=v"}),
    ]
    info = runtime()._info(doc, task("running"), {}, None)
    assert info.agent_secret == "a=b=="
    assert dict(info.settings.env) == {"Q": "k=v"}


def test_mountpoints_and_addresses_skip_incomplete_entries() -> None:
    """Volumes without a name are skipped (an empty answer is no volumes); a container counts
    only with a service label and an address on one of its networks."""
    client = FakeClient()
    api = client.api
    api.volume_docs = [{"Name": "v1", "Mountpoint": "/m1"}, {"Name": "", "Mountpoint": "/m2"}]
    api.container_summaries = [
        {"Labels": {}, "NetworkSettings": {"Networks": {"n": {"IPAddress": "10.0.0.1"}}}},
        {"Labels": {SERVICE_ID_LABEL: "s2"}, "NetworkSettings": {"Networks": {"n": {}}}},
        {"Labels": {SERVICE_ID_LABEL: "s3"}},
        {
            "Labels": {SERVICE_ID_LABEL: "s4"},
            "NetworkSettings": {
                "Networks": {"a": {"IPAddress": ""}, "b": {"IPAddress": "10.0.0.4"}}
            },
        },
    ]
    rt = runtime(client)
    assert rt._thd_mountpoints() == {"v1": "/m1"}
    assert rt._thd_addresses() == {"s4": "10.0.0.4"}
    api.volume_docs = []
    api.container_summaries = []
    assert rt._thd_mountpoints() == {} and rt._thd_addresses() == {}


# -- labels ------------------------------------------------------------------------------------


def test_read_labels_gives_the_service_version_and_labels() -> None:
    """``(Version.Index, Spec.Labels)``; a gone service is ``ContainerFailed``."""
    client = FakeClient()
    client.api.service_docs = {SERVICE: service_doc()}
    version, labels = runtime(client)._thd_read_labels(SERVICE)
    assert version == 4 and labels[LABEL_SANDBOX_ID] == SANDBOX
    with pytest.raises(ContainerFailed, match=r"\Asandbox service gone00000000 is gone\Z"):
        runtime(client)._thd_read_labels("gone" + "0" * 60)


def test_write_labels_posts_the_spec_back_with_changed_labels_at_the_version() -> None:
    """The raw update endpoint gets the service's spec, unchanged but for its labels (set,
    replaced, removed), and ``version`` as the compare-and-swap parameter."""
    client = FakeClient()
    doc = service_doc(**{"org.x.a": "1", "org.x.b": "2"})
    client.api.service_docs = {SERVICE: doc}
    ok = runtime(client)._thd_write_labels(SERVICE, 4, {"org.x.a": "9", "org.x.b": None, "c": "3"})
    assert ok is True
    [(_, url, data, kwargs)] = [c for c in client.api.calls if c[0] == "post_json"]
    assert url.endswith(f"/services/{SERVICE}/update")
    assert kwargs == {"params": {"version": 4}}
    assert data["TaskTemplate"] == doc["Spec"]["TaskTemplate"]
    assert data["Labels"]["org.x.a"] == "9" and data["Labels"]["c"] == "3"
    assert "org.x.b" not in data["Labels"]
    assert doc["Spec"]["Labels"]["org.x.b"] == "2", "the inspected document is not mutated"


def test_write_labels_at_a_stale_version_changes_nothing() -> None:
    """A version other than the service's: ``False`` and no update is sent."""
    client = FakeClient()
    client.api.service_docs = {SERVICE: service_doc()}
    assert runtime(client)._thd_write_labels(SERVICE, 3, {"a": "b"}) is False
    assert "post_json" not in client.api.names()


def test_write_labels_lost_race_is_false_other_errors_raise() -> None:
    """Swarm's "update out of sequence" (another writer won): ``False``; any other API error
    is raised; a gone service is ``ContainerFailed``."""
    client = FakeClient()
    client.api.service_docs = {SERVICE: service_doc()}
    rt = runtime(client)
    client.api.update_error = api_error("rpc error: update out of sequence")
    assert rt._thd_write_labels(SERVICE, 4, {"a": "b"}) is False
    client.api.update_error = api_error("something else")
    with pytest.raises(docker.errors.APIError, match="something else"):
        rt._thd_write_labels(SERVICE, 4, {"a": "b"})
    with pytest.raises(ContainerFailed, match="is gone"):
        rt._thd_write_labels("nope", 4, {"a": "b"})


# -- remove, pause -----------------------------------------------------------------------------


def test_remove_removes_the_service_then_its_volumes(fake_time: FakeTime) -> None:
    """The service, then each of the sandbox's volumes (not forced); gone ones are fine."""
    client = FakeClient()
    names = list(volume_names(SANDBOX).values())
    client.api.remove_service_error = docker.errors.NotFound("no service")
    client.api.remove_volume_errors = {names[1]: [docker.errors.NotFound("no volume")]}
    runtime(client)._thd_remove(SERVICE, SANDBOX)
    assert client.api.calls == [
        ("remove_service", SERVICE),
        *[("remove_volume", name, False) for name in names],
    ]


def test_remove_without_a_valid_sandbox_id_removes_only_the_service(fake_time: FakeTime) -> None:
    """No (or a malformed) sandbox id: no volume names are made up from it."""
    client = FakeClient()
    runtime(client)._thd_remove(SERVICE)
    runtime(client)._thd_remove(SERVICE, "../etc")
    assert client.api.names() == ["remove_service", "remove_service"]


def test_remove_retries_a_volume_in_use_until_its_container_is_gone(fake_time: FakeTime) -> None:
    """409 (the task's container still holds it): retried every 100 ms; other errors raise."""
    client = FakeClient()
    socket_volume = volume_names(SANDBOX)[SOCKET_MOUNT]
    client.api.remove_volume_errors = {socket_volume: [api_error("in use", 409)] * 3}
    runtime(client)._thd_remove(SERVICE, SANDBOX)
    assert [c for c in client.api.calls if c[1] == socket_volume] == [
        ("remove_volume", socket_volume, False)
    ] * 4
    assert fake_time.sleeps == [0.1, 0.1, 0.1]
    client.api.remove_volume_errors = {socket_volume: [api_error("disk on fire", 500)]}
    with pytest.raises(docker.errors.APIError, match="disk on fire"):
        runtime(client)._thd_remove(SERVICE, SANDBOX)


def test_remove_gives_up_on_a_volume_in_use_after_15_seconds(fake_time: FakeTime) -> None:
    """A volume busy for good: the 409 is raised once 15 s have passed."""
    client = FakeClient()
    socket_volume = volume_names(SANDBOX)[SOCKET_MOUNT]
    client.api.remove_volume_errors = {socket_volume: [api_error("in use", 409)] * 1000}
    with pytest.raises(docker.errors.APIError, match="in use"):
        runtime(client)._thd_remove(SERVICE, SANDBOX)
    assert 15.0 < sum(fake_time.sleeps) <= 15.2


def test_pause_acts_on_the_service_task_container() -> None:
    """Pause/unpause find the task's container by the service label and act on it; a service
    without a container on this engine is ``ContainerFailed``."""
    client = FakeClient()
    client.api.container_summaries = [{"Id": "task-container-1"}, {"Id": "other"}]
    rt = runtime(client)
    rt._thd_pause(SERVICE, True)
    assert client.api.calls[0] == ("containers", {"label": f"{SERVICE_ID_LABEL}={SERVICE}"})
    assert ("pause", "task-container-1") in client.api.calls
    client.api.container_state = {"Running": True, "Paused": True}
    rt._thd_pause(SERVICE, False)
    assert ("unpause", "task-container-1") in client.api.calls
    client.api.container_summaries = []
    with pytest.raises(ContainerFailed, match="has no container here"):
        rt._thd_task_container(SERVICE)


# -- events ------------------------------------------------------------------------------------


def test_task_container_deaths_are_reported_against_their_service() -> None:
    """``die`` and ``oom`` of a task's container reach watchers with the service id as
    ``container_id``, the sandbox id and the exit code (``None`` if absent or not a number);
    other actions and containers of no service are ignored."""
    rt = runtime()
    seen: list[ContainerEvent] = []
    rt._watchers.append(seen.append)

    def event(action: str, **attributes: str) -> dict[str, Any]:
        return {"Action": action, "Actor": {"ID": "cid", "Attributes": attributes}}

    ours = {SERVICE_ID_LABEL: SERVICE, LABEL_SANDBOX_ID: SANDBOX}
    rt._thd_dispatch(event("die", exitCode="137", **ours))
    rt._thd_dispatch(event("oom", **ours))
    rt._thd_dispatch({"status": "die", "Actor": {"Attributes": {**ours, "exitCode": "x"}}})
    rt._thd_dispatch(event("destroy", **ours))
    rt._thd_dispatch(event("start", **ours))
    rt._thd_dispatch(event("die", exitCode="1", **{LABEL_SANDBOX_ID: SANDBOX}))
    rt._thd_dispatch({})
    assert seen == [
        ContainerEvent(SANDBOX, SERVICE, "die", 137),
        ContainerEvent(SANDBOX, SERVICE, "oom", None),
        ContainerEvent(SANDBOX, SERVICE, "die", None),
    ]
    assert len(rt._reactor.calls) == 3  # delivered through callFromThread
