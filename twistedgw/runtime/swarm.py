"""``SwarmRuntime``: ``IContainerRuntime`` on a Docker engine in swarm mode.

Each sandbox is a Swarm service with one replica (``twistedgw-<sandbox id>``), labelled like a
``DockerRuntime`` container (``runtime/labels.py``), on the service and on its task's container.
The service id is the sandbox's ``container_id``: the gateway never touches the task's container
except to pause it.

Reaching the agent: the kernel here has no IPVS, so Swarm's routing mesh forwards nothing, and
``mode=host`` publishing mapped no port. The agent listens on a Unix socket in a named volume
(a per-sandbox tmpfs owned by the agent user) mounted at ``SOCKET_MOUNT``; the gateway connects
through the volume's mountpoint under the engine's data-root (on the node running the task,
which on one node is this host; docs/SCALE-OUT.md for more nodes).

Hardening: what Swarm's service API (1.41) carries is set as for ``DockerRuntime`` (capabilities,
read-only root, pids limit, ulimits, user, tmpfs-sized writable places, CPU and memory limits
plus reservations); what it does not (``no-new-privileges``, ``memswap``, ``shm_size``, a
network-less task) is listed in SECURITY.md's table. The writable places (home, /tmp,
/var/tmp) are ``local``-driver tmpfs volumes, because Swarm's own tmpfs mounts take no
``uid``, ``nosuid``, ``nodev`` or ``noexec`` options.

Every docker SDK call runs on the thread pool inherited from ``DockerRuntime``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from twistedgw.runtime.docker import DockerRuntime, missing_image_message
from twistedgw.runtime.hardening import (
    AGENT_CAPABILITIES,
    AGENT_UID,
    SANDBOX_UID,
    SOCKET_MOUNT,
    SOCKET_NAME,
    size_bytes,
)
from twistedgw.runtime.interface import (
    ContainerEvent,
    ContainerFailed,
    ContainerInfo,
    ContainerSpec,
    IClusterLabels,
    ImageMissing,
)
from twistedgw.runtime.labels import (
    COMMAND_ENV,
    LABEL_CREATED_AT,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_SANDBOX_ID,
    SECRET_ENV,
    float_label,
    instance_labels,
    labels_for,
    saved_from_label,
    settings_from,
)
from twistedgw.sandbox import is_valid_sandbox_id

#: Label Swarm puts on a task's container: the service it belongs to.
SERVICE_ID_LABEL = "com.docker.swarm.service.id"
#: Task states before ``running`` (the task is still being placed or started).
STARTING_STATES = frozenset(
    {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
)
#: Seconds a service may stay without a running task before a listing reports it dead.
START_GRACE = 60.0
#: Seconds a create waits for its task to run.
START_TIMEOUT = 30.0


def service_name(sandbox_id: str) -> str:
    return f"twistedgw-{sandbox_id}"


def volume_names(sandbox_id: str) -> dict[str, str]:
    """The sandbox's volumes by mount point (short names: the agent socket's host path must
    fit a Unix socket address, 108 bytes)."""
    return {
        SOCKET_MOUNT: f"tgw-{sandbox_id}-a",
        "/home/sandbox": f"tgw-{sandbox_id}-home",
        "/tmp": f"tgw-{sandbox_id}-tmp",
        "/var/tmp": f"tgw-{sandbox_id}-vtmp",
    }


def _latest_task(tasks: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    if not tasks:
        return None
    return max(tasks, key=lambda t: (t.get("Version") or {}).get("Index", 0))


@implementer(IClusterLabels)
class SwarmRuntime(DockerRuntime):
    """``IContainerRuntime`` over Swarm services (one replica each); see the module doc.

    Takes ``DockerRuntime``'s arguments (``docker_url`` names the swarm manager's engine);
    ``socket_dir`` is unused (the agent's socket lives in a volume).
    """

    def __init__(self, *args: Any, start_timeout: float = START_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_timeout = start_timeout
        #: Injected for tests of the listing (seconds, epoch).
        self.wall_clock = time.time

    # -- create ----------------------------------------------------------------------------

    def _service_spec(self, spec: ContainerSpec) -> dict[str, Any]:
        """The ``create_service`` arguments for ``spec`` (raw API dicts: the SDK's helpers
        lack ulimits and the pids limit, which API 1.41 has)."""
        import docker.types

        if spec.settings.network == "none" or spec.settings.egress is not None:
            # Swarm attaches no task to the local "none" network, and the egress proxy's
            # socket would have to live in a volume on the task's node (SECURITY.md).
            raise ContainerFailed(
                "the swarm backend does not support network 'none' or an egress list yet"
            )
        limits = spec.limits or self.limits.for_resources(spec.settings.resources)
        if limits.runtime:
            raise ContainerFailed("the swarm backend cannot choose an OCI runtime per service")
        labels = labels_for(spec, self.instance)
        environment = {
            **self._agent_env,
            SECRET_ENV: spec.agent_secret,
            "AGENT_UNIX_SOCKET": f"{SOCKET_MOUNT}/{SOCKET_NAME}",
        }
        if spec.settings.env:
            environment[COMMAND_ENV] = json.dumps(dict(spec.settings.env))
        flags = "nosuid,nodev" + ("" if limits.exec_tmpfs else ",noexec")
        volumes = volume_names(spec.sandbox_id)
        tmpfs_options = {
            SOCKET_MOUNT: f"uid={AGENT_UID},gid={AGENT_UID},mode=0700,size=1m,nosuid,nodev,noexec",
            "/home/sandbox": (
                f"uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0755,"
                f"size={size_bytes(limits.home_size)},{flags}"
            ),
            "/tmp": f"mode=1777,size={size_bytes(limits.tmp_size)},{flags}",
            "/var/tmp": f"mode=1777,size={size_bytes(limits.tmp_size)},{flags}",
        }
        # Enough to find (and remove) a sandbox's volumes: managed, instance, sandbox id.
        volume_labels = {
            k: labels[k] for k in (LABEL_MANAGED, LABEL_INSTANCE, LABEL_SANDBOX_ID) if k in labels
        }
        mounts = [
            docker.types.Mount(
                target=target,
                source=volumes[target],
                type="volume",
                labels=volume_labels,
                driver_config=docker.types.DriverConfig(
                    "local", {"type": "tmpfs", "device": "tmpfs", "o": options}
                ),
            )
            for target, options in tmpfs_options.items()
            if target == SOCKET_MOUNT or limits.read_only_root
        ]
        container_spec = docker.types.ContainerSpec(
            image=spec.image or self.image,
            hostname="sandbox",
            env=environment,
            labels=labels,
            mounts=mounts,
            read_only=limits.read_only_root,
            cap_drop=["ALL"],
            cap_add=[f"CAP_{name}" for name in AGENT_CAPABILITIES],
            stop_grace_period=2_000_000_000,
        )
        container_spec["Ulimits"] = [
            {"Name": "nofile", "Soft": limits.nofile, "Hard": limits.nofile}
        ]
        memory = size_bytes(limits.memory)
        nano_cpus = int(limits.cpus * 1e9)
        resources = docker.types.Resources(
            cpu_limit=nano_cpus,
            mem_limit=memory,
            cpu_reservation=nano_cpus,
            mem_reservation=memory,
        )
        resources["Limits"]["Pids"] = limits.pids
        task_template = docker.types.TaskTemplate(
            container_spec=container_spec,
            resources=resources,
            restart_policy=docker.types.RestartPolicy(condition="none"),
            log_driver={
                "Name": "json-file",
                "Options": {"max-size": limits.log_size, "max-file": "2"},
            },
        )
        return {
            "task_template": task_template,
            "name": service_name(spec.sandbox_id),
            "labels": labels,
            "mode": docker.types.ServiceMode("replicated", replicas=1),
        }

    def _thd_create(self, spec: ContainerSpec) -> ContainerInfo:
        import docker.errors

        client = self._thd_client()
        image = spec.image or self.image
        try:
            # Swarm would accept a service of a missing image and fail its task later ("No
            # such image"); the one-node engine knows at once (SCALE-OUT.md: every node).
            client.api.inspect_image(image)
        except docker.errors.ImageNotFound as e:
            raise ImageMissing(missing_image_message(image, spec.settings.template)) from e
        options = self._service_spec(spec)
        service_id = ""
        try:
            created = client.api.create_service(**options)
            service_id = created["ID"]
            deadline = time.monotonic() + self.start_timeout
            while True:
                service = client.api.inspect_service(service_id)
                task = _latest_task(client.api.tasks(filters={"service": service_id}))
                state = str(((task or {}).get("Status") or {}).get("State") or "")
                if state == "running":
                    break
                if task is not None and state not in STARTING_STATES:
                    message = ((task.get("Status") or {}).get("Err")) or state
                    raise ContainerFailed(f"the sandbox's task did not start: {message}")
                if time.monotonic() > deadline:
                    raise ContainerFailed(
                        f"the sandbox's task did not start within {self.start_timeout:g} s"
                    )
                time.sleep(0.05)
            info = self._info(service, task, self._thd_mountpoints(), self._thd_addresses())
            if not info.agent_socket:
                raise ContainerFailed("the agent is not reachable (no socket volume)")
            return info
        except BaseException:
            try:
                self._thd_remove(service_id or service_name(spec.sandbox_id), spec.sandbox_id)
            except Exception:
                self._log.failure("could not remove a half-created service")
            raise

    # -- listing ---------------------------------------------------------------------------

    def _thd_mountpoints(self) -> dict[str, str]:
        """Volume name -> mountpoint, for this instance's volumes on this engine."""
        answer = self._thd_client().api.volumes(filters={"label": instance_labels(self.instance)})
        return {
            v["Name"]: v["Mountpoint"] for v in (answer or {}).get("Volumes") or [] if v.get("Name")
        }

    def _thd_addresses(self) -> dict[str, str]:
        """Service id -> its task container's address on this engine (the seed's
        ``ip_address``; informational, the gateway never connects to it)."""
        found = self._thd_client().api.containers(filters={"label": instance_labels(self.instance)})
        addresses = {}
        for summary in found or []:
            service_id = (summary.get("Labels") or {}).get(SERVICE_ID_LABEL)
            networks = (summary.get("NetworkSettings") or {}).get("Networks") or {}
            for network in networks.values():
                if service_id and network and network.get("IPAddress"):
                    addresses[service_id] = str(network["IPAddress"])
                    break
        return addresses

    def _info(
        self,
        service: Mapping[str, Any],
        task: Mapping[str, Any] | None,
        mountpoints: Mapping[str, str],
        addresses: Mapping[str, str] | None = None,
    ) -> ContainerInfo:
        spec = service.get("Spec") or {}
        labels = spec.get("Labels") or {}
        container_spec = (spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}
        env = dict(
            entry.split("=", 1) for entry in (container_spec.get("Env") or []) if "=" in entry
        )
        status = (task or {}).get("Status") or {}
        state = str(status.get("State") or "")
        running = state == "running"
        exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
        sandbox_id = labels.get(LABEL_SANDBOX_ID, "")
        mountpoint = mountpoints.get(volume_names(sandbox_id)[SOCKET_MOUNT])
        return ContainerInfo(
            sandbox_id=sandbox_id,
            container_id=str(service.get("ID") or ""),
            created_at=float_label(labels, LABEL_CREATED_AT) or 0.0,
            ip_address=(addresses or {}).get(str(service.get("ID") or ""), ""),
            agent_host="127.0.0.1",
            agent_port=0,
            agent_secret=env.get(SECRET_ENV, ""),
            running=running,
            settings=settings_from(labels, env),
            exit_code=None if running else exit_code,
            oom_killed=False,
            for_pool=labels.get(LABEL_POOL) == "true",
            agent_socket=f"{mountpoint}/{SOCKET_NAME}" if mountpoint else None,
            saved=saved_from_label(labels),
        )

    def _thd_list(self) -> list[ContainerInfo]:
        api = self._thd_client().api
        services = api.services(filters={"label": instance_labels(self.instance)})
        if not services:
            return []
        tasks: dict[str, list[Mapping[str, Any]]] = {}
        ids = [str(service.get("ID")) for service in services]
        for task in api.tasks(filters={"service": ids}) or []:
            tasks.setdefault(str(task.get("ServiceID")), []).append(task)
        mountpoints = self._thd_mountpoints()
        addresses = self._thd_addresses()
        now = self.wall_clock()
        infos = []
        for service in services:
            task = _latest_task(tasks.get(str(service.get("ID")), []))
            state = str(((task or {}).get("Status") or {}).get("State") or "")
            info = self._info(service, task, mountpoints, addresses)
            if (task is None or state in STARTING_STATES) and now - info.created_at < START_GRACE:
                # Being created (perhaps by another gateway): not ours to judge yet.
                continue
            infos.append(info)
        return infos

    # -- IClusterLabels --------------------------------------------------------------------

    def read_labels(self, container_id: str) -> Deferred[tuple[int, dict[str, str]]]:
        return self._defer(self._thd_read_labels, container_id)

    def write_labels(
        self, container_id: str, version: int, changes: Mapping[str, str | None]
    ) -> Deferred[bool]:
        return self._defer(self._thd_write_labels, container_id, version, dict(changes))

    def _thd_read_labels(self, container_id: str) -> tuple[int, dict[str, str]]:
        import docker.errors

        try:
            service = self._thd_client().api.inspect_service(container_id)
        except docker.errors.NotFound as e:
            raise ContainerFailed(f"sandbox service {container_id[:12]} is gone") from e
        version = int((service.get("Version") or {}).get("Index") or 0)
        return version, dict((service.get("Spec") or {}).get("Labels") or {})

    def _thd_write_labels(
        self, container_id: str, version: int, changes: Mapping[str, str | None]
    ) -> bool:
        """A label-only ``service update`` at ``version`` (Swarm refuses a stale version:
        that is the compare-and-swap). The task spec is sent back unchanged, so the task
        is not restarted (checked by tests/integration/test_swarm_cluster.py)."""
        import docker.errors

        api = self._thd_client().api
        try:
            service = api.inspect_service(container_id)
        except docker.errors.NotFound as e:
            raise ContainerFailed(f"sandbox service {container_id[:12]} is gone") from e
        if int((service.get("Version") or {}).get("Index") or 0) != version:
            return False
        spec = dict(service.get("Spec") or {})
        labels = dict(spec.get("Labels") or {})
        for key, value in changes.items():
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value
        spec["Labels"] = labels
        try:
            # The spec goes back verbatim but for its labels, through the raw endpoint: the
            # SDK's update_service rebuilds the task template, and Swarm then restarts the
            # task (seen here), which would kill the sandbox's processes.
            response = api._post_json(
                api._url("/services/{0}/update", container_id),
                data=spec,
                params={"version": version},
            )
            api._raise_for_status(response)
        except docker.errors.APIError as e:
            if "out of sequence" in str(e):
                return False
            raise
        return True

    # -- remove, pause ---------------------------------------------------------------------

    def _thd_remove(self, container_id: str, sandbox_id: str = "") -> None:
        import docker.errors

        api = self._thd_client().api
        try:
            api.remove_service(container_id)
        except docker.errors.NotFound:
            pass
        if not is_valid_sandbox_id(sandbox_id):
            return
        # The task's container goes asynchronously; its volumes can go after it.
        deadline = time.monotonic() + 15.0
        for name in volume_names(sandbox_id).values():
            while True:
                try:
                    api.remove_volume(name, force=False)
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError as e:
                    if e.status_code != 409 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def _thd_task_container(self, service_id: str) -> str:
        api = self._thd_client().api
        found = api.containers(filters={"label": f"{SERVICE_ID_LABEL}={service_id}"})
        if not found:
            raise ContainerFailed(f"sandbox service {service_id[:12]} has no container here")
        return str(found[0]["Id"])

    def _thd_pause(self, container_id: str, pause: bool) -> None:
        super()._thd_pause(self._thd_task_container(container_id), pause)

    # -- events ----------------------------------------------------------------------------

    def _thd_dispatch(self, event: Mapping[str, Any]) -> None:
        """Container events of our tasks, reported against their service (the sandbox's
        ``container_id``)."""
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        service_id = attributes.get(SERVICE_ID_LABEL)
        if not service_id:
            return
        action = str(event.get("Action") or event.get("status") or "")
        if action not in ("die", "oom"):
            return  # a task's container is destroyed only after its service
        try:
            exit_code: int | None = int(attributes["exitCode"])
        except (KeyError, ValueError):
            exit_code = None
        container_event = ContainerEvent(
            sandbox_id=attributes.get(LABEL_SANDBOX_ID, ""),
            container_id=str(service_id),
            action=action,
            exit_code=exit_code,
        )
        for callback in list(self._watchers):
            self._reactor.callFromThread(callback, container_event)
