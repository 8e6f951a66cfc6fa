"""What ``DockerRuntime`` asks of the docker SDK, and what it makes of the answers, against a
recording stand-in for ``docker.DockerClient`` (the ``_thd_*`` methods called directly, as its
thread pool would). The real engine's side of the same contract is
``tests/integration/test_runtime_contract.py``; this file pins the exact arguments (names,
labels, environment, ports, mounts, limits), the error mapping and the inspect parsing, so a
wrong argument fails in memory instead of only on a real engine."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import docker.types
import pytest
import requests.exceptions

from tests.dockerfakes import CallFromThread, api_error
from twistedgw.runtime import docker as docker_module
from twistedgw.runtime.docker import (
    PAUSE_ATTEMPTS,
    WATCHED_ACTIONS,
    DockerRuntime,
    _operation,
    container_info_from_attrs,
    missing_image_message,
)
from twistedgw.runtime.hardening import (
    AGENT_PORT,
    DEFAULT_LIMITS,
    EGRESS_PORT,
    EGRESS_SOCKET_NAME,
    SOCKET_MOUNT,
    SOCKET_NAME,
)
from twistedgw.runtime.interface import (
    ContainerEvent,
    ContainerFailed,
    ContainerSpec,
    ImageMissing,
    RuntimeUnavailable,
    SocketPathTooLong,
)
from twistedgw.runtime.labels import (
    COMMAND_ENV,
    LABEL_CREATED_AT,
    LABEL_POOL,
    LABEL_SANDBOX_ID,
    SECRET_ENV,
    instance_labels,
    labels_for,
)
from twistedgw.sandbox import SandboxSettings

SANDBOX = "c" * 32


def inspect_doc(
    container_id: str = "f00d" * 16,
    sandbox_id: str = SANDBOX,
    running: bool = True,
    host_ip: str = "127.0.0.1",
    host_port: str = "49153",
    env: list[str] | None = None,
    labels: dict[str, str] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    ip: str = "172.17.0.9",
    networks: dict[str, Any] | None = None,
    exit_code: int = 0,
    oom: bool = False,
) -> dict[str, Any]:
    """A ``docker inspect`` document shaped as the engine returns it (only what is read)."""
    return {
        "Id": container_id,
        "Config": {
            "Labels": {
                LABEL_SANDBOX_ID: sandbox_id,
                LABEL_CREATED_AT: "1700000000.5",
                **(labels or {}),
            },
            "Env": env if env is not None else [f"{SECRET_ENV}=s3cret", "PATH=/usr/bin"],
        },
        "State": {"Running": running, "ExitCode": exit_code, "OOMKilled": oom},
        "NetworkSettings": {
            "IPAddress": ip,
            "Networks": networks or {},
            "Ports": {f"{AGENT_PORT}/tcp": [{"HostIp": host_ip, "HostPort": host_port}]}
            if host_port
            else {},
        },
        "Mounts": mounts or [],
    }


class FakeContainer:
    def __init__(self, client: FakeClient, name: str, attrs: dict[str, Any]) -> None:
        self.client = client
        self.name = name
        self.attrs = attrs
        self.started = False
        self.reloaded = False
        self.removed_with: dict[str, Any] | None = None

    def start(self) -> None:
        if self.client.fail_start:
            raise self.client.fail_start
        self.started = True

    def reload(self) -> None:
        self.reloaded = True

    def remove(self, **kwargs: Any) -> None:
        self.removed_with = kwargs


class FakeContainers:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.created: list[tuple[str, dict[str, Any]]] = []
        self.by_name: dict[str, FakeContainer] = {}

    def create(self, image: str, **options: Any) -> FakeContainer:
        if self.client.fail_create:
            raise self.client.fail_create
        self.created.append((image, options))
        container = FakeContainer(self.client, options["name"], self.client.attrs)
        self.by_name[options["name"]] = container
        return container

    def get(self, name: str) -> FakeContainer:
        if name not in self.by_name:
            raise docker.errors.NotFound(f"no container {name}")
        return self.by_name[name]


class FakeAPI:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.summaries: list[dict[str, Any]] = []
        self.inspected: dict[str, dict[str, Any]] = {}
        self.state: dict[str, Any] = {"Running": True, "Paused": False}
        self.pause_failures: list[Exception] = []
        self.remove_error: Exception | None = None
        self.images: dict[str, dict[str, Any]] = {}

    def containers(self, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append(("containers", kwargs))
        return self.summaries

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        self.calls.append(("inspect_container", container_id))
        if container_id in self.inspected:
            return self.inspected[container_id]
        if self.summaries:
            raise docker.errors.NotFound(f"no container {container_id}")
        return {"State": self.state}

    def inspect_image(self, image: str) -> dict[str, Any]:
        if image not in self.images:
            raise docker.errors.ImageNotFound(f"no image {image}")
        return self.images[image]

    def remove_container(self, container_id: str, **kwargs: Any) -> None:
        self.calls.append(("remove_container", container_id, kwargs))
        if self.remove_error:
            raise self.remove_error

    def pause(self, container_id: str) -> None:
        self.calls.append(("pause", container_id))
        if self.pause_failures:
            raise self.pause_failures.pop(0)

    def unpause(self, container_id: str) -> None:
        self.calls.append(("unpause", container_id))


class FakeClient:
    """The parts of ``docker.DockerClient`` the runtime uses, recording every call."""

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        self.attrs = attrs if attrs is not None else inspect_doc()
        self.fail_create: Exception | None = None
        self.fail_start: Exception | None = None
        self.containers = FakeContainers(self)
        self.api = FakeAPI()


def runtime(
    client: FakeClient | None = None, tmp_path: Path | None = None, **kwargs: Any
) -> DockerRuntime:
    rt = DockerRuntime(
        CallFromThread(),
        "default-image",
        instance="inst-a",
        agent_env={"AGENT_MAX_OUTPUT": "1234"},
        socket_dir=tmp_path / "sockets" if tmp_path is not None else None,
        **kwargs,
    )
    rt._client = client or FakeClient()
    return rt


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temporary directory short enough for agent socket paths (pytest's are too long)."""
    path = Path(tempfile.mkdtemp(prefix="gw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def spec(**settings: Any) -> ContainerSpec:
    return ContainerSpec(
        SANDBOX, 1_700_000_000.5, "s3cret", SandboxSettings(idle_timeout=60, **settings)
    )


# -- creating ----------------------------------------------------------------------------------


def test_create_asks_for_a_named_labelled_container_with_the_agent_on_loopback() -> None:
    """A bridge sandbox: the runtime's image, name ``twistedgw-ID``, hostname ``sandbox``, the
    label codec's labels for this instance, the agent's environment plus the sandbox's secret,
    the agent port published on 127.0.0.1 only (ephemeral), the nofile ulimit and the limits'
    run options; created, then started, then re-inspected for the published port."""
    client = FakeClient()
    rt = runtime(client)
    info = rt._thd_create(spec())
    [(image, options)] = client.containers.created
    assert image == "default-image"
    assert options["name"] == f"twistedgw-{SANDBOX}"
    assert options["hostname"] == "sandbox"
    assert options["labels"] == labels_for(spec(), "inst-a")
    assert options["environment"] == {"AGENT_MAX_OUTPUT": "1234", SECRET_ENV: "s3cret"}
    assert options["ports"] == {f"{AGENT_PORT}/tcp": ("127.0.0.1", None)}
    [ulimit] = options["ulimits"]
    assert isinstance(ulimit, docker.types.Ulimit)
    assert (ulimit.name, ulimit.soft, ulimit.hard) == (
        "nofile",
        DEFAULT_LIMITS.nofile,
        DEFAULT_LIMITS.nofile,
    )
    for key, value in DEFAULT_LIMITS.run_options().items():
        assert options[key] == value, key
    assert "network_mode" not in options and "volumes" not in options
    container = client.containers.by_name[f"twistedgw-{SANDBOX}"]
    assert container.started and container.reloaded
    assert info == container_info_from_attrs(client.attrs)


def test_create_passes_the_command_environment_as_json_and_a_template_image() -> None:
    """The sandbox's ``env`` reaches the agent as JSON in ``SANDBOX_COMMAND_ENV``; a spec's
    image (its template's) is used instead of the runtime's."""
    client = FakeClient()
    rt = runtime(client)
    the_spec = ContainerSpec(
        SANDBOX,
        1.0,
        "s3cret",
        SandboxSettings(idle_timeout=60, env={"A": "1", "B": "two words"}),
        image="tmpl-image",
    )
    rt._thd_create(the_spec)
    [(image, options)] = client.containers.created
    assert image == "tmpl-image"
    assert json.loads(options["environment"][COMMAND_ENV]) == {"A": "1", "B": "two words"}


def test_operator_container_options_override_the_defaults() -> None:
    """``--container-option`` style overrides (``container_options``) win over the runtime's."""
    client = FakeClient()
    rt = runtime(client, container_options={"hostname": "box", "pids_limit": 7})
    rt._thd_create(spec())
    [(_, options)] = client.containers.created
    assert options["hostname"] == "box" and options["pids_limit"] == 7


def test_a_networkless_sandbox_gets_a_private_socket_directory_and_no_ports(
    short_dir: Path,
) -> None:
    """``network: none``: no published port, ``network_mode`` none, the sandbox's own socket
    directory bind-mounted read-write at the socket mount, the agent told its socket path;
    the directory is not listable by others."""
    client = FakeClient(inspect_doc(host_port="", mounts=[]))
    client.attrs["Mounts"] = [
        {"Destination": SOCKET_MOUNT, "Source": str(short_dir / "sockets" / SANDBOX)}
    ]
    rt = runtime(client, short_dir)
    info = rt._thd_create(spec(network="none"))
    [(_, options)] = client.containers.created
    assert "ports" not in options
    assert options["network_mode"] == "none"
    directory = short_dir / "sockets" / SANDBOX
    assert options["volumes"] == {str(directory): {"bind": SOCKET_MOUNT, "mode": "rw"}}
    assert options["environment"]["AGENT_UNIX_SOCKET"] == f"{SOCKET_MOUNT}/{SOCKET_NAME}"
    assert "AGENT_EGRESS_SOCKET" not in options["environment"]
    assert directory.is_dir()
    assert (short_dir / "sockets").stat().st_mode & 0o777 == 0o711
    assert info.agent_socket == f"{directory}/{SOCKET_NAME}"


def test_an_egress_sandbox_is_told_where_the_egress_proxy_socket_is(short_dir: Path) -> None:
    """With an allow-list the agent forwards its egress port to the proxy's socket."""
    client = FakeClient(inspect_doc(host_port=""))
    client.attrs["Mounts"] = [{"Destination": SOCKET_MOUNT, "Source": "/x"}]
    rt = runtime(client, short_dir)
    rt._thd_create(spec(network="none", egress=("pypi.org:443",)))
    [(_, options)] = client.containers.created
    environment = options["environment"]
    assert environment["AGENT_EGRESS_SOCKET"] == f"{SOCKET_MOUNT}/{EGRESS_SOCKET_NAME}"
    assert environment["AGENT_EGRESS_PORT"] == str(EGRESS_PORT)


def test_a_networkless_sandbox_without_a_socket_directory_is_refused() -> None:
    """A runtime without ``socket_dir`` cannot make ``network: none`` sandboxes."""
    client = FakeClient()
    with pytest.raises(ContainerFailed, match="need a socket directory"):
        runtime(client)._thd_create(spec(network="none"))
    assert client.containers.created == []


def test_a_socket_path_too_long_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    """Socket paths over a Unix address's 107 bytes: ``SocketPathTooLong``, nothing created."""
    client = FakeClient()
    rt = runtime(client)
    rt.socket_dir = tmp_path / ("d" * 120)
    with pytest.raises(SocketPathTooLong, match="use a shorter --state-dir or --instance"):
        rt._thd_create(spec(network="none"))
    assert client.containers.created == []
    assert not rt.socket_dir.exists()


def test_a_missing_image_is_image_missing_naming_the_template() -> None:
    """The engine's ImageNotFound on create becomes ``ImageMissing`` with the build hint for
    the sandbox's template; nothing is pulled and nothing is left."""
    client = FakeClient()
    client.fail_create = docker.errors.ImageNotFound("no such image")
    rt = runtime(client)
    the_spec = ContainerSpec(
        SANDBOX, 1.0, "s", SandboxSettings(idle_timeout=60, template="py"), image="py-img"
    )
    with pytest.raises(ImageMissing) as caught:
        rt._thd_create(the_spec)
    assert str(caught.value) == missing_image_message("py-img", "py")
    assert "'py-img'" in str(caught.value) and "'py'" in str(caught.value)


def test_a_container_that_fails_to_start_is_removed_by_name() -> None:
    """A failure after create (start refused) removes the half-made container (force) and
    re-raises the failure."""
    client = FakeClient()
    client.fail_start = api_error("cannot start")
    rt = runtime(client)
    with pytest.raises(docker.errors.APIError):
        rt._thd_create(spec())
    container = client.containers.by_name[f"twistedgw-{SANDBOX}"]
    assert container.removed_with == {"force": True}


def test_a_container_whose_agent_is_unreachable_is_refused_and_removed() -> None:
    """No published port and no socket after start: ``ContainerFailed``, container removed."""
    client = FakeClient(inspect_doc(host_port=""))
    rt = runtime(client)
    with pytest.raises(ContainerFailed, match="no port, no socket"):
        rt._thd_create(spec())
    assert client.containers.by_name[f"twistedgw-{SANDBOX}"].removed_with == {"force": True}


# -- parsing inspect ---------------------------------------------------------------------------


def test_inspect_document_is_read_into_container_info() -> None:
    """Every field: ids, created time, bridge address, published agent port on loopback,
    secret from the environment, running, pool label, settings from labels."""
    attrs = inspect_doc(labels={LABEL_POOL: "true"})
    info = container_info_from_attrs(attrs)
    assert info.sandbox_id == SANDBOX
    assert info.container_id == "f00d" * 16
    assert info.created_at == 1_700_000_000.5
    assert info.ip_address == "172.17.0.9"
    assert (info.agent_host, info.agent_port) == ("127.0.0.1", 49153)
    assert info.agent_secret == "s3cret"
    assert info.running is True and info.exit_code is None and info.oom_killed is False
    assert info.for_pool is True
    assert info.agent_socket is None


def test_an_exited_container_reports_its_exit_code_and_oom() -> None:
    """Not running: the exit code is kept, and an OOM kill is reported."""
    info = container_info_from_attrs(inspect_doc(running=False, exit_code=137, oom=True))
    assert (info.running, info.exit_code, info.oom_killed) == (False, 137, True)
    assert container_info_from_attrs(inspect_doc(labels={LABEL_POOL: "false"})).for_pool is False


@pytest.mark.parametrize("host_ip", ["0.0.0.0", ""])
def test_a_port_published_on_every_interface_is_dialled_on_loopback(host_ip: str) -> None:
    """``0.0.0.0`` or no host address: the agent is still dialled on 127.0.0.1."""
    info = container_info_from_attrs(inspect_doc(host_ip=host_ip, host_port="40001"))
    assert (info.agent_host, info.agent_port) == ("127.0.0.1", 40001)


def test_a_port_published_on_another_loopback_address_is_dialled_there() -> None:
    """A binding on a specific address (``127.0.0.2``) is used as given; the first binding
    with a host port wins."""
    attrs = inspect_doc(host_ip="127.0.0.2", host_port="40002")
    attrs["NetworkSettings"]["Ports"][f"{AGENT_PORT}/tcp"].insert(0, {"HostIp": "127.0.0.3"})
    info = container_info_from_attrs(attrs)
    assert (info.agent_host, info.agent_port) == ("127.0.0.2", 40002)


def test_the_address_comes_from_the_first_network_when_the_bridge_has_none() -> None:
    """A container on a user network has no top-level IPAddress: the first network's is used,
    skipping networks without one."""
    attrs = inspect_doc(ip="", networks={"a": {"IPAddress": ""}, "b": {"IPAddress": "10.1.2.3"}})
    assert container_info_from_attrs(attrs).ip_address == "10.1.2.3"
    assert container_info_from_attrs(inspect_doc(ip="", networks={})).ip_address == ""


def test_the_agent_socket_comes_from_the_socket_mount_only() -> None:
    """The socket path is the mount at ``SOCKET_MOUNT``'s source plus the socket name; other
    mounts are ignored."""
    attrs = inspect_doc(
        host_port="",
        mounts=[
            {"Destination": "/data", "Source": "/srv/data"},
            {"Destination": SOCKET_MOUNT, "Source": "/state/sockets/x"},
        ],
    )
    info = container_info_from_attrs(attrs)
    assert info.agent_socket == f"/state/sockets/x/{SOCKET_NAME}"
    assert info.agent_port == 0


def test_a_sparse_inspect_document_gives_empty_defaults() -> None:
    """An inspect answer missing whole sections is read without errors, as empty values."""
    info = container_info_from_attrs({})
    assert (info.sandbox_id, info.container_id, info.created_at) == ("", "", 0.0)
    assert (info.agent_host, info.agent_port, info.agent_secret) == ("127.0.0.1", 0, "")
    assert info.running is False and info.agent_socket is None
    env_only = inspect_doc(env=["NOEQUALS", f"{SECRET_ENV}=a=b"])
    assert container_info_from_attrs(env_only).agent_secret == "a=b"


def test_image_facts_are_read_from_inspect_and_a_missing_image_is_none() -> None:
    """``inspect_image``: id, size, creation time and labels; ``None`` when absent."""
    client = FakeClient()
    client.api.images["img"] = {
        "Id": "sha256:abc",
        "Size": 1234,
        "Created": "2026-11-26T00:00:00Z",
        "Config": {"Labels": {"k": "v"}},
    }
    rt = runtime(client)
    facts = rt._thd_inspect_image("img")
    assert facts is not None
    assert (facts.image_id, facts.size, facts.created) == (
        "sha256:abc",
        1234,
        "2026-11-26T00:00:00Z",
    )
    assert dict(facts.labels) == {"k": "v"}
    assert rt._thd_inspect_image("absent") is None
    client.api.images["bare"] = {}
    bare = rt._thd_inspect_image("bare")
    assert bare is not None and (bare.image_id, bare.size, dict(bare.labels)) == ("", 0, {})


# -- listing, removing, pausing ----------------------------------------------------------------


def test_listing_asks_only_for_this_instances_labels_and_skips_vanished_ones() -> None:
    """``containers(all=True)`` filtered by this instance's labels; each inspected; one removed
    between list and inspect is skipped."""
    client = FakeClient()
    client.api.summaries = [{"Id": "one"}, {"Id": "gone"}]
    client.api.inspected["one"] = inspect_doc(container_id="one")
    rt = runtime(client)
    infos = rt._thd_list()
    assert [info.container_id for info in infos] == ["one"]
    assert client.api.calls[0] == (
        "containers",
        {"all": True, "filters": {"label": instance_labels("inst-a")}},
    )
    assert ("inspect_container", "gone") in client.api.calls


def test_remove_forces_removal_with_volumes_and_clears_the_socket_directory(
    tmp_path: Path,
) -> None:
    """``remove_container(force=True, v=True)``; the sandbox's socket directory is deleted."""
    client = FakeClient()
    rt = runtime(client, tmp_path)
    directory = tmp_path / "sockets" / SANDBOX
    directory.mkdir(parents=True)
    rt._thd_remove("cid", SANDBOX)
    assert client.api.calls == [("remove_container", "cid", {"force": True, "v": True})]
    assert not directory.exists()


def test_remove_never_deletes_outside_the_socket_directory(tmp_path: Path) -> None:
    """A sandbox id that is not a valid id (``..``) deletes nothing on disk."""
    client = FakeClient()
    rt = runtime(client, tmp_path)
    (tmp_path / "sockets").mkdir()
    keep = tmp_path / "keep"
    keep.mkdir()
    rt._thd_remove("cid", "..")
    rt._thd_remove("cid", "")
    assert keep.exists() and (tmp_path / "sockets").exists()


def test_remove_of_a_gone_container_or_one_being_removed_succeeds() -> None:
    """NotFound, and 409 "removal already in progress", are success; another error is not."""
    client = FakeClient()
    rt = runtime(client)
    client.api.remove_error = docker.errors.NotFound("gone")
    rt._thd_remove("cid")
    client.api.remove_error = api_error("removal of container cid is already in progress", 409)
    rt._thd_remove("cid")
    client.api.remove_error = api_error("conflict: something else", 409)
    with pytest.raises(docker.errors.APIError):
        rt._thd_remove("cid")
    client.api.remove_error = api_error("removal already in progress", 500)
    with pytest.raises(docker.errors.APIError):
        rt._thd_remove("cid")


def test_pause_of_a_stopped_container_is_refused() -> None:
    """Pausing a container that is not running is ``ContainerFailed`` naming it (12 chars)."""
    client = FakeClient()
    client.api.state = {"Running": False, "Paused": False}
    with pytest.raises(ContainerFailed, match="container 0123456789ab is not running"):
        runtime(client)._thd_pause("0123456789abcdef", True)
    assert ("pause", "0123456789abcdef") not in client.api.calls


def test_pause_and_unpause_are_idempotent() -> None:
    """Pausing a paused container, or unpausing a running one, asks nothing of the engine."""
    client = FakeClient()
    rt = runtime(client)
    client.api.state = {"Running": True, "Paused": True}
    rt._thd_pause("cid", True)
    client.api.state = {"Running": True, "Paused": False}
    rt._thd_pause("cid", False)
    assert [c[0] for c in client.api.calls] == ["inspect_container", "inspect_container"]
    rt._thd_pause("cid", True)
    client.api.state = {"Running": True, "Paused": True}
    rt._thd_pause("cid", False)
    assert [c[0] for c in client.api.calls[2:]] == [
        "inspect_container",
        "pause",
        "inspect_container",
        "unpause",
    ]


def test_a_pause_that_cannot_freeze_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """runc's "unable to freeze" is retried 0.5 s apart until it works; any other error, or
    the last attempt's, is raised."""
    sleeps: list[float] = []
    monkeypatch.setattr(docker_module.time, "sleep", sleeps.append)
    client = FakeClient()
    rt = runtime(client)
    client.api.pause_failures = [api_error("unable to freeze"), api_error("unable to freeze")]
    rt._thd_pause("cid", True)
    assert [c[0] for c in client.api.calls].count("pause") == 3
    assert sleeps == [0.5, 0.5]

    client.api.calls.clear()
    client.api.pause_failures = [api_error("unable to freeze")] * PAUSE_ATTEMPTS
    with pytest.raises(docker.errors.APIError, match="unable to freeze"):
        rt._thd_pause("cid", True)
    assert [c[0] for c in client.api.calls].count("pause") == PAUSE_ATTEMPTS

    client.api.calls.clear()
    client.api.pause_failures = [api_error("other trouble")]
    with pytest.raises(docker.errors.APIError, match="other trouble"):
        rt._thd_pause("cid", True)
    assert [c[0] for c in client.api.calls].count("pause") == 1


# -- events ------------------------------------------------------------------------------------


def test_watched_events_reach_every_watcher_on_the_reactor_thread() -> None:
    """``die``/``destroy``/``oom`` events become ``ContainerEvent``s (sandbox id from the
    labels, exit code parsed) handed to each watcher through ``callFromThread``; others are
    dropped."""
    rt = runtime()
    seen: list[ContainerEvent] = []
    also: list[ContainerEvent] = []
    rt._watchers = [seen.append, also.append]
    rt._thd_dispatch(
        {
            "Action": "die",
            "Actor": {"ID": "cid", "Attributes": {LABEL_SANDBOX_ID: SANDBOX, "exitCode": "137"}},
        }
    )
    rt._thd_dispatch({"Action": "start", "Actor": {"ID": "cid", "Attributes": {}}})
    rt._thd_dispatch({"status": "oom", "id": "cid2", "Actor": {"Attributes": {}}})
    rt._thd_dispatch(
        {"Action": "destroy", "Actor": {"ID": "cid3", "Attributes": {"exitCode": "x"}}}
    )
    assert (
        seen
        == also
        == [
            ContainerEvent(SANDBOX, "cid", "die", 137),
            ContainerEvent("", "cid2", "oom", None),
            ContainerEvent("", "cid3", "destroy", None),
        ]
    )
    assert len(rt._reactor.calls) == 6
    assert WATCHED_ACTIONS == {"die", "destroy", "oom"}


def test_the_event_stream_is_followed_again_a_second_after_it_breaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The events thread asks for this instance's container events; when the stream fails
    it waits a second and asks again (the engine restarted, say), and the events of the new
    stream reach the watchers."""
    import time

    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    rt = runtime()
    asked: list[dict[str, Any]] = []
    seen: list[ContainerEvent] = []
    rt._watchers = [seen.append]

    def events(**kwargs: Any) -> Any:
        asked.append(kwargs)
        if len(asked) == 1:
            raise requests.exceptions.ConnectionError("engine went away")

        def stream() -> Any:
            yield {"Action": "die", "Actor": {"ID": "cid", "Attributes": {"exitCode": "1"}}}
            rt.running = False  # the service stops: the loop ends after this stream

        return stream()

    rt._client.events = events  # type: ignore[union-attr]
    rt.running = True
    rt._thd_events_loop()
    assert sleeps == [1.0]
    assert (
        asked
        == [
            {"decode": True, "filters": {"label": instance_labels("inst-a"), "type": ["container"]}}
        ]
        * 2
    )
    assert seen == [ContainerEvent("", "cid", "die", 1)]
    assert rt._events_stream is None


# -- errors and the client ---------------------------------------------------------------------


def test_sdk_errors_become_the_runtimes_errors() -> None:
    """ImageNotFound -> ImageMissing (the runtime's image named); APIError -> ContainerFailed
    with the engine's explanation; connection errors -> RuntimeUnavailable and a new client
    next time."""
    rt = runtime()

    def raising(error: Exception) -> Any:
        def f() -> None:
            raise error

        return f

    with pytest.raises(ImageMissing) as missing:
        rt._thd_guard(raising(docker.errors.ImageNotFound("x")))
    assert str(missing.value) == missing_image_message("default-image")
    with pytest.raises(ContainerFailed, match=r"^Docker refused the operation: bad request$"):
        rt._thd_guard(raising(api_error("bad request", 400)))
    for error in (
        docker.errors.DockerException("boom"),
        requests.exceptions.ConnectionError("refused"),
        OSError("socket gone"),
    ):
        rt._client = FakeClient()
        with pytest.raises(RuntimeUnavailable, match=r"^Docker engine unreachable: "):
            rt._thd_guard(raising(error))
        assert rt._client is None
    assert rt._thd_guard(lambda a, b: a + b, 2, 3) == 5


def test_the_client_is_made_once_with_the_call_timeout_and_pool_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``docker.DockerClient(base_url=...)`` with an explicit URL, ``docker.from_env`` without;
    timeout is the call timeout in whole seconds (at least 1), the connection pool the thread
    count plus two; the client is reused."""
    made: list[tuple[str, dict[str, Any]]] = []

    def with_url(**kwargs: Any) -> object:
        made.append(("url", kwargs))
        return object()

    def from_env(**kwargs: Any) -> object:
        made.append(("env", kwargs))
        return object()

    monkeypatch.setattr(docker, "DockerClient", with_url)
    monkeypatch.setattr(docker, "from_env", from_env)
    rt = DockerRuntime(
        CallFromThread(), "img", docker_url="unix:///x.sock", threads=3, call_timeout=7.9
    )
    first = rt._thd_client()
    assert rt._thd_client() is first
    assert made == [("url", {"base_url": "unix:///x.sock", "timeout": 7, "max_pool_size": 5})]
    made.clear()
    DockerRuntime(CallFromThread(), "img", threads=8, call_timeout=0.2)._thd_client()
    assert made == [("env", {"timeout": 1, "max_pool_size": 10})]


def test_calls_are_labelled_by_operation_for_metrics() -> None:
    """A call's metric label is its ``_thd_`` method's name; pause with False is unpause."""
    rt = runtime()
    assert _operation(rt._thd_create, (spec(),)) == "create"
    assert _operation(rt._thd_pause, ("cid", True)) == "pause"
    assert _operation(rt._thd_pause, ("cid", False)) == "unpause"
    assert _operation(rt._thd_pause, ("cid",)) == "pause"
    assert _operation(object(), ()) == "call"
