"""Container runtimes: the ``IContainerRuntime`` interface and ``DockerRuntime``.

``DockerRuntime`` is the only place in the gateway that imports ``docker``. Every docker SDK
call runs on a dedicated, named ``ThreadPool`` owned by the runtime (a ``Service``), never on the
reactor thread and never on the reactor's shared pool (which also serves DNS). Methods that run
in a worker thread are named ``_thd_*``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

#: Port the agent listens on inside the container.
AGENT_PORT = 8765

#: Label keys on every container this gateway creates.
LABEL_MANAGED = "org.twistedgw.managed"
LABEL_INSTANCE = "org.twistedgw.instance"
LABEL_SANDBOX_ID = "org.twistedgw.sandbox-id"
LABEL_CREATED_AT = "org.twistedgw.created-at"

#: Environment variable carrying the per-sandbox agent secret into the container.
SECRET_ENV = "SANDBOX_AGENT_SECRET"

T = TypeVar("T")


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # Daemon workers: a docker call stuck past its timeout must not keep the process alive
    # at exit (shutdown abandons it after a bounded wait; reconciliation cleans up later).
    return threading.Thread(*args, daemon=True, **kwargs)


class _DockerThreadPool(ThreadPool):
    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


class RuntimeError_(Exception):
    """Base class of runtime failures (the trailing underscore avoids the builtin)."""


class RuntimeUnavailable(RuntimeError_):
    """The container engine could not be reached, or did not answer in time."""


class ImageMissing(RuntimeError_):
    """The sandbox image is not present in the engine."""


class ContainerFailed(RuntimeError_):
    """The engine refused or failed an operation on a container."""


@frozen
class ContainerSpec:
    """What to create: one sandbox container."""

    sandbox_id: str
    created_at: float
    agent_secret: str


@frozen
class ContainerInfo:
    """What the gateway needs to know about one of its containers."""

    sandbox_id: str
    container_id: str
    created_at: float
    ip_address: str
    agent_host: str
    agent_port: int
    agent_secret: str
    running: bool


class IContainerRuntime(Interface):
    """Creates, lists and removes sandbox containers. All methods return Deferreds."""

    def create(spec: ContainerSpec) -> Deferred[ContainerInfo]:
        """Create and start a container for ``spec``; fires with its ``ContainerInfo``.

        Fails with ``RuntimeUnavailable``, ``ImageMissing`` or ``ContainerFailed``. A failed
        create leaves no container behind (best effort; reconciliation removes leftovers).
        """

    def remove(container_id: str) -> Deferred[None]:
        """Remove a container (killing it if running). Removing a missing one succeeds."""

    def list_containers() -> Deferred[list[ContainerInfo]]:
        """All containers of this gateway instance, running or not."""


def container_info_from_attrs(attrs: Mapping[str, Any]) -> ContainerInfo:
    """Build a ``ContainerInfo`` from a container's ``docker inspect`` document."""
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    network = attrs.get("NetworkSettings") or {}
    ip_address = network.get("IPAddress") or ""
    if not ip_address:
        for net in (network.get("Networks") or {}).values():
            if net and net.get("IPAddress"):
                ip_address = net["IPAddress"]
                break
    host, port = "127.0.0.1", 0
    bindings = (network.get("Ports") or {}).get(f"{AGENT_PORT}/tcp") or []
    for binding in bindings:
        if binding.get("HostPort"):
            host = binding.get("HostIp") or "127.0.0.1"
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            port = int(binding["HostPort"])
            break
    secret = ""
    for entry in config.get("Env") or []:
        if entry.startswith(SECRET_ENV + "="):
            secret = entry.split("=", 1)[1]
    try:
        created_at = float(labels.get(LABEL_CREATED_AT, "0"))
    except ValueError:
        created_at = 0.0
    return ContainerInfo(
        sandbox_id=labels.get(LABEL_SANDBOX_ID, ""),
        container_id=attrs.get("Id", ""),
        created_at=created_at,
        ip_address=ip_address,
        agent_host=host,
        agent_port=port,
        agent_secret=secret,
        running=bool((attrs.get("State") or {}).get("Running")),
    )


@implementer(IContainerRuntime)
class DockerRuntime(Service):
    """``IContainerRuntime`` on a Docker engine through the docker SDK.

    :param reactor: used to hop threads and to time calls out.
    :param image: the sandbox image name.
    :param instance: this gateway's label value; only containers carrying it are ours.
    :param docker_url: engine address (``None``: from the environment, like the docker CLI).
    :param threads: size of the dedicated docker thread pool.
    :param call_timeout: seconds before a docker call is reported as failed.
    :param container_options: extra ``containers.run`` keyword arguments (operator overrides).
    :param agent_env: environment for the agent (its limits), besides its secret.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        image: str,
        instance: str = "default",
        docker_url: str | None = None,
        threads: int = 8,
        call_timeout: float = 30.0,
        container_options: Mapping[str, Any] | None = None,
        agent_env: Mapping[str, str] | None = None,
    ) -> None:
        self._reactor = reactor
        self.image = image
        self.instance = instance
        self._docker_url = docker_url
        self._call_timeout = call_timeout
        self._container_options = dict(container_options or {})
        self._agent_env = dict(agent_env or {})
        self._pool = _DockerThreadPool(minthreads=0, maxthreads=threads, name="docker")
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._threads = threads
        #: Seconds shutdown waits for in-flight docker calls before abandoning them.
        self.shutdown_timeout = 5.0

    # -- Service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred[None]:
        """Stop the pool, waiting at most ``shutdown_timeout`` for in-flight docker calls."""
        super().stopService()
        stopped: Deferred[None] = Deferred()

        def thd_stop() -> None:
            self._pool.stop()
            self._reactor.callFromThread(lambda: None if stopped.called else stopped.callback(None))

        threading.Thread(target=thd_stop, name="docker-pool-stop", daemon=True).start()

        def abandon(result: Any, timeout: float) -> None:
            self._log.warn(
                "abandoning docker calls still running after {timeout} s", timeout=timeout
            )

        stopped.addTimeout(self.shutdown_timeout, self._reactor, onTimeoutCancel=abandon)
        return stopped

    # -- IContainerRuntime -----------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        return self._defer(self._thd_create, spec)

    def remove(self, container_id: str) -> Deferred[None]:
        return self._defer(self._thd_remove, container_id)

    def list_containers(self) -> Deferred[list[ContainerInfo]]:
        return self._defer(self._thd_list)

    # -- plumbing --------------------------------------------------------------------------

    def _defer(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        d: Deferred[T] = deferToThreadPool(self._reactor, self._pool, self._thd_guard, f, *args)
        # The thread keeps running after a timeout (threads cannot be interrupted); docker
        # operations are idempotent and reconciliation cleans up after an abandoned one.
        clock: IReactorTime = self._reactor
        d.addTimeout(self._call_timeout + 5, clock)

        def translate(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                raise RuntimeUnavailable(
                    f"Docker engine did not answer within {self._call_timeout + 5:.0f} s"
                )
            return failure

        d.addErrback(translate)
        return d

    def _thd_guard(self, f: Callable[..., T], *args: Any) -> T:
        """Run ``f`` in a worker thread, turning SDK errors into ours."""
        import docker.errors
        import requests.exceptions

        try:
            return f(*args)
        except docker.errors.ImageNotFound as e:
            raise ImageMissing(
                f"sandbox image {self.image!r} is not present; build it with sandbox-image/build.sh"
            ) from e
        except docker.errors.APIError as e:
            raise ContainerFailed(f"Docker refused the operation: {e.explanation or e}") from e
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as e:
            with self._client_lock:
                self._client = None  # reconnect (and renegotiate the API version) next time
            raise RuntimeUnavailable(f"Docker engine unreachable: {e}") from e

    def _thd_client(self) -> Any:
        import docker

        with self._client_lock:
            if self._client is None:
                kwargs: dict[str, Any] = {
                    "timeout": int(self._call_timeout),
                    "max_pool_size": self._threads,
                }
                if self._docker_url:
                    self._client = docker.DockerClient(base_url=self._docker_url, **kwargs)
                else:
                    self._client = docker.from_env(**kwargs)
            return self._client

    def _labels(self, spec: ContainerSpec) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_INSTANCE: self.instance,
            LABEL_SANDBOX_ID: spec.sandbox_id,
            LABEL_CREATED_AT: repr(spec.created_at),
        }

    def _thd_create(self, spec: ContainerSpec) -> ContainerInfo:
        import docker.errors

        client = self._thd_client()
        name = f"twistedgw-{spec.sandbox_id}"
        options: dict[str, Any] = {
            "detach": True,
            "name": name,
            "hostname": "sandbox",
            "labels": self._labels(spec),
            "environment": {**self._agent_env, SECRET_ENV: spec.agent_secret},
            # Published on loopback only, on an ephemeral host port.
            "ports": {f"{AGENT_PORT}/tcp": ("127.0.0.1", None)},
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "log_config": {"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}},
        }
        options.update(self._container_options)
        try:
            container = client.containers.run(self.image, **options)
            container.reload()
            info = container_info_from_attrs(container.attrs)
            if not info.agent_port:
                raise ContainerFailed("the agent port was not published")
            return info
        except BaseException:
            # Leave nothing behind: the container may exist even though run() failed.
            try:
                client.containers.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
            except Exception:
                self._log.failure("could not remove half-created container {name}", name=name)
            raise

    def _thd_remove(self, container_id: str) -> None:
        import docker.errors

        client = self._thd_client()
        try:
            client.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            # "removal already in progress" means someone else is doing our job.
            if e.status_code == 409 and "in progress" in str(e):
                return
            raise

    def _thd_list(self) -> list[ContainerInfo]:
        import docker.errors

        client = self._thd_client()
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.instance}"]}
        infos = []
        for summary in client.api.containers(all=True, filters=filters):
            try:
                attrs = client.api.inspect_container(summary["Id"])
            except docker.errors.NotFound:
                continue  # removed between list and inspect
            infos.append(container_info_from_attrs(attrs))
        return infos
