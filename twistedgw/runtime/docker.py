"""``DockerRuntime``: ``IContainerRuntime`` on a Docker engine.

``DockerRuntime`` is the only place in the gateway that imports ``docker``. Every docker SDK
call runs on a dedicated, named ``ThreadPool`` owned by the runtime (a ``Service``), never on the
reactor thread and never on the reactor's shared pool (which also serves DNS). Methods that run
in a worker thread are named ``_thd_*``. The Docker events stream, which blocks for as long as
it is open, has a thread of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from twistedgw.metrics import GatewayMetrics, docker_error_kind
from twistedgw.runtime.hardening import (
    AGENT_PORT,
    AGENT_UID,
    DEFAULT_LIMITS,
    EGRESS_PORT,
    EGRESS_SOCKET_NAME,
    MAX_SOCKET_PATH,
    SOCKET_MOUNT,
    SOCKET_NAME,
    ContainerLimits,
    socket_path_length,
)
from twistedgw.runtime.interface import (
    ContainerEvent,
    ContainerFailed,
    ContainerInfo,
    ContainerSpec,
    IContainerRuntime,
    ImageFacts,
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
    float_label,
    instance_labels,
    labels_for,
    settings_from,
)
from twistedgw.sandbox import is_valid_sandbox_id

#: Container events the gateway cares about.
WATCHED_ACTIONS = frozenset({"die", "destroy", "oom"})
#: Tries of a pause that runc could not freeze (0.5 s apart).
PAUSE_ATTEMPTS = 6

T = TypeVar("T")


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # Daemon workers: a docker call stuck past its timeout must not keep the process alive
    # at exit (shutdown abandons it after a bounded wait; reconciliation cleans up later).
    return threading.Thread(*args, daemon=True, **kwargs)


class _DockerThreadPool(ThreadPool):
    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


def _operation(f: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """The ``operation`` label of a Docker call: its ``_thd_`` method's name (``pause`` with
    False is ``unpause``)."""
    name = getattr(f, "__name__", "call").removeprefix("_thd_")
    if name == "pause" and len(args) > 1 and args[1] is False:
        return "unpause"
    return name


def container_info_from_attrs(attrs: Mapping[str, Any]) -> ContainerInfo:
    """Build a ``ContainerInfo`` from a container's ``docker inspect`` document."""
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    network = attrs.get("NetworkSettings") or {}
    state = attrs.get("State") or {}
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
    env = dict(entry.split("=", 1) for entry in (config.get("Env") or []) if "=" in entry)
    running = bool(state.get("Running"))
    agent_socket = None
    for mount in attrs.get("Mounts") or []:
        if mount.get("Destination") == SOCKET_MOUNT and mount.get("Source"):
            agent_socket = f"{mount['Source']}/{SOCKET_NAME}"
    return ContainerInfo(
        sandbox_id=labels.get(LABEL_SANDBOX_ID, ""),
        container_id=attrs.get("Id", ""),
        created_at=float_label(labels, LABEL_CREATED_AT) or 0.0,
        ip_address=ip_address,
        agent_host=host,
        agent_port=port,
        agent_secret=env.get(SECRET_ENV, ""),
        running=running,
        settings=settings_from(labels, env),
        exit_code=None if running else state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        for_pool=labels.get(LABEL_POOL) == "true",
        agent_socket=agent_socket,
    )


def missing_image_message(image: str, template: str = "default") -> str:
    """What a create of a template whose image is missing is told (HTTP 503)."""
    return (
        f"the image {image!r} of template {template!r} is not present in the Docker engine; "
        "build it with sandbox-image/build.sh (the default and the python template), or, for "
        f"a template of your own, with `docker build -t {image} DIR` (README, Templates)"
    )


@implementer(IContainerRuntime)
class DockerRuntime(Service):
    """``IContainerRuntime`` on a Docker engine through the docker SDK.

    Docker outages are answered fast: a health check pings the engine every
    ``health_interval`` seconds, and while the engine is known to be down (or the pool is
    saturated with calls that have not come back), new calls fail at once with
    ``RuntimeUnavailable`` instead of queueing behind stuck ones.

    :param reactor: used to hop threads and to time calls out.
    :param image: the sandbox image name.
    :param instance: this gateway's label value; only containers carrying it are ours.
    :param docker_url: engine address (``None``: from the environment, like the docker CLI).
    :param threads: size of the dedicated docker thread pool.
    :param call_timeout: seconds before a docker call is reported as failed.
    :param container_options: extra ``containers.run`` keyword arguments (operator overrides).
    :param agent_env: environment for the agent (its limits), besides its secret.
    :param limits: resource limits and hardening of every sandbox container.
    :param socket_dir: where per-sandbox agent socket directories are made, for sandboxes
        without a network (``network: none``).
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
        health_interval: float = 2.0,
        limits: ContainerLimits = DEFAULT_LIMITS,
        socket_dir: Path | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._reactor = reactor
        #: Where every call's latency and failure is counted (``_defer``).
        self.metrics = metrics or GatewayMetrics()
        self.image = image
        self.instance = instance
        self._docker_url = docker_url
        self._call_timeout = call_timeout
        self._container_options = dict(container_options or {})
        self._agent_env = dict(agent_env or {})
        self.limits = limits
        self.socket_dir = socket_dir
        self._pool = _DockerThreadPool(minthreads=0, maxthreads=threads, name="docker")
        # The health ping has a thread of its own: queued behind a burst of creates on the
        # shared pool, its timeout would count the queue and call a busy engine down.
        self._health_pool = _DockerThreadPool(minthreads=0, maxthreads=1, name="docker-health")
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._threads = threads
        #: Calls admitted but not yet answered; beyond ``_max_pending`` new calls fail fast
        #: (a burst queues; an engine that stopped answering does not collect a backlog).
        self._pending = 0
        self._max_pending = max(64, threads * 32)
        #: False once a call or health check found the engine unreachable, until one succeeds.
        self.available = True
        self._health = LoopingCall(self._check_health)
        self._health.clock = reactor
        self._health_interval = health_interval
        self._watchers: list[Callable[[ContainerEvent], None]] = []
        self._events_stream: Any = None
        self._events_thread: threading.Thread | None = None
        #: Seconds shutdown waits for in-flight docker calls before abandoning them.
        self.shutdown_timeout = 5.0

    # -- Service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        problem = self.socket_path_problem()
        if problem is not None:
            self._log.error(
                "{problem}; sandboxes with network none will be refused", problem=problem
            )
        self._pool.start()
        self._health_pool.start()
        self._health.start(self._health_interval, now=True)
        if self._watchers:
            self._start_events_thread()

    def stopService(self) -> Deferred[None]:
        """Stop the pool, waiting at most ``shutdown_timeout`` for in-flight docker calls."""
        super().stopService()
        if self._health.running:
            self._health.stop()
        self._close_events_stream()
        stopped: Deferred[None] = Deferred()

        def thd_stop() -> None:
            self._health_pool.stop()
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

    def remove(self, container_id: str, sandbox_id: str = "") -> Deferred[None]:
        return self._defer(self._thd_remove, container_id, sandbox_id)

    def list_containers(self) -> Deferred[list[ContainerInfo]]:
        return self._defer(self._thd_list)

    def pause(self, container_id: str) -> Deferred[None]:
        return self._defer(self._thd_pause, container_id, True)

    def unpause(self, container_id: str) -> Deferred[None]:
        return self._defer(self._thd_pause, container_id, False)

    def watch(self, callback: Callable[[ContainerEvent], None]) -> None:
        self._watchers.append(callback)
        if self.running and self._events_thread is None:
            self._start_events_thread()

    def inspect_image(self, image: str) -> Deferred[ImageFacts | None]:
        return self._defer(self._thd_inspect_image, image)

    # -- health ----------------------------------------------------------------------------

    def _check_health(self) -> Deferred[None]:
        """Ping the engine on the health thread; its answer time alone decides."""
        d: Deferred[None] = deferToThreadPool(
            self._reactor, self._health_pool, self._thd_guard, self._thd_ping
        )
        limit = self._health_interval
        d.addTimeout(limit, self._reactor)

        def settle(result: Any) -> None:
            if not isinstance(result, Failure):
                self._mark(True)
            elif result.check(TimeoutError):
                self._mark(False, f"Docker engine did not answer a ping within {limit:g} s")
            elif result.check(RuntimeUnavailable):
                self._mark(False, result.getErrorMessage())
            else:
                # The engine answered, if with an error: it is up.
                self._log.failure("Docker health check failed", result)

        d.addBoth(settle)
        return d

    def _thd_ping(self) -> None:
        self._thd_client().ping()

    def _mark(self, available: bool, reason: str = "") -> None:
        if available != self.available:
            self.available = available
            if available:
                self._log.info("Docker engine reachable again")
            else:
                self._log.warn("Docker engine unavailable: {reason}", reason=reason)

    # -- plumbing --------------------------------------------------------------------------

    def _defer(
        self,
        f: Callable[..., T],
        *args: Any,
        admit_when_down: bool = False,
        timeout: float | None = None,
    ) -> Deferred[T]:
        if not admit_when_down and not self.available:
            return fail(RuntimeUnavailable("Docker engine unavailable (health check failing)"))
        if self._pending >= self._max_pending:
            return fail(RuntimeUnavailable("Docker engine is not keeping up; try again"))
        self._pending += 1
        operation = _operation(f, args)
        started = self._reactor.seconds()
        d: Deferred[T] = deferToThreadPool(self._reactor, self._pool, self._thd_guard, f, *args)
        # The thread keeps running after a timeout (threads cannot be interrupted); docker
        # operations are idempotent and reconciliation cleans up after an abandoned one.
        limit = timeout if timeout is not None else self._call_timeout + 5
        d.addTimeout(limit, self._reactor)

        def settle(result: Any) -> Any:
            self._pending -= 1
            if isinstance(result, Failure):
                if result.check(TimeoutError):
                    result = Failure(
                        RuntimeUnavailable(f"Docker engine did not answer within {limit:g} s")
                    )
                if result.check(RuntimeUnavailable):
                    self._mark(False, result.getErrorMessage())
                kind = docker_error_kind(result.value)
                self.metrics.docker_errors.labels(operation=operation, error=kind).inc()
            else:
                self._mark(True)
            self.metrics.docker_calls.labels(operation=operation).observe(
                self._reactor.seconds() - started
            )
            return result

        d.addBoth(settle)
        return d

    def _thd_guard(self, f: Callable[..., T], *args: Any) -> T:
        """Run ``f`` in a worker thread, turning SDK errors into ours."""
        import docker.errors
        import requests.exceptions

        try:
            return f(*args)
        except docker.errors.ImageNotFound as e:
            raise ImageMissing(missing_image_message(self.image)) from e
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
                    "timeout": max(1, int(self._call_timeout)),
                    "max_pool_size": self._threads + 2,
                }
                if self._docker_url:
                    self._client = docker.DockerClient(base_url=self._docker_url, **kwargs)
                else:
                    self._client = docker.from_env(**kwargs)
            return self._client

    def _thd_inspect_image(self, image: str) -> ImageFacts | None:
        import docker.errors

        try:
            attrs = self._thd_client().api.inspect_image(image)
        except docker.errors.ImageNotFound:
            return None
        config = attrs.get("Config") or {}
        return ImageFacts(
            image_id=str(attrs.get("Id") or ""),
            size=int(attrs.get("Size") or 0),
            created=str(attrs.get("Created") or ""),
            labels=dict(config.get("Labels") or {}),
        )

    def _thd_create(self, spec: ContainerSpec) -> ContainerInfo:
        import docker.errors
        import docker.types

        client = self._thd_client()
        image = spec.image or self.image
        # The template's limits with the sandbox's resources applied (lifecycle/core.py);
        # without them, the runtime's own with the sandbox's resources.
        limits = spec.limits or self.limits.for_resources(spec.settings.resources)
        name = f"twistedgw-{spec.sandbox_id}"
        environment = {**self._agent_env, SECRET_ENV: spec.agent_secret}
        if spec.settings.env:
            environment[COMMAND_ENV] = json.dumps(dict(spec.settings.env))
        options: dict[str, Any] = {
            "name": name,
            "hostname": "sandbox",
            "labels": labels_for(spec, self.instance),
            "environment": environment,
            # Published on loopback only, on an ephemeral host port.
            "ports": {f"{AGENT_PORT}/tcp": ("127.0.0.1", None)},
            "ulimits": [docker.types.Ulimit(name="nofile", soft=limits.nofile, hard=limits.nofile)],
            **limits.run_options(),
        }
        if spec.settings.network == "none":
            # No network at all: the agent listens on a Unix socket in a per-sandbox host
            # directory mounted into the container (the only host path a sandbox gets).
            directory = self._thd_socket_dir(spec.sandbox_id)
            del options["ports"]
            options["network_mode"] = "none"
            options["volumes"] = {str(directory): {"bind": SOCKET_MOUNT, "mode": "rw"}}
            environment["AGENT_UNIX_SOCKET"] = f"{SOCKET_MOUNT}/{SOCKET_NAME}"
            if spec.settings.egress is not None:
                # Egress by allow-list: the agent forwards 127.0.0.1:EGRESS_PORT to the
                # gateway's proxy on this socket (twistedgw/egress).
                environment["AGENT_EGRESS_SOCKET"] = f"{SOCKET_MOUNT}/{EGRESS_SOCKET_NAME}"
                environment["AGENT_EGRESS_PORT"] = str(EGRESS_PORT)
        options.update(self._container_options)
        try:
            # create + start rather than run(): run() would try to pull a missing image from a
            # registry (slow, and none may be reachable); a missing image is the operator's
            # to build (ImageMissing).
            try:
                container = client.containers.create(image, **options)
            except docker.errors.ImageNotFound as e:
                raise ImageMissing(missing_image_message(image, spec.settings.template)) from e
            container.start()
            # Inspect again for the published port and the bridge address.
            container.reload()
            info = container_info_from_attrs(container.attrs)
            if not info.agent_port and not info.agent_socket:
                raise ContainerFailed("the agent is not reachable (no port, no socket)")
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

    def socket_path_problem(self) -> str | None:
        """Why network-less sandboxes cannot work here (agent socket paths too long for a
        Unix socket address), or ``None``."""
        if self.socket_dir is None:
            return None
        length = socket_path_length(self.socket_dir)
        if length <= MAX_SOCKET_PATH:
            return None
        return (
            f"agent socket paths under {self.socket_dir.absolute()} would be {length} bytes, "
            f"over the {MAX_SOCKET_PATH} a Unix socket address holds: use a shorter "
            "--state-dir or --instance"
        )

    def _thd_socket_dir(self, sandbox_id: str) -> Path:
        if self.socket_dir is None:
            raise ContainerFailed("sandboxes without a network need a socket directory")
        problem = self.socket_path_problem()
        if problem is not None:
            raise SocketPathTooLong(f"network none is unavailable on this gateway: {problem}")
        directory = self.socket_dir / sandbox_id
        directory.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o711)  # others may pass through, not list
        try:
            # Only the agent gets in: sandbox code cannot even reach the socket.
            os.chown(directory, AGENT_UID, AGENT_UID)
            directory.chmod(0o700)
        except PermissionError:
            directory.chmod(0o777)  # a gateway not running as root
        return directory

    def _thd_remove(self, container_id: str, sandbox_id: str = "") -> None:
        import docker.errors

        client = self._thd_client()
        try:
            client.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            # "removal already in progress" means someone else is doing our job.
            if not (e.status_code == 409 and "in progress" in str(e)):
                raise
        if self.socket_dir is not None and is_valid_sandbox_id(sandbox_id):
            shutil.rmtree(self.socket_dir / sandbox_id, ignore_errors=True)

    def _thd_pause(self, container_id: str, pause: bool) -> None:
        api = self._thd_client().api
        state = api.inspect_container(container_id)["State"]
        if pause and not state.get("Running"):
            raise ContainerFailed(f"container {container_id[:12]} is not running")
        if bool(state.get("Paused")) == pause:
            return  # already so
        if not pause:
            api.unpause(container_id)
            return
        import docker.errors

        # runc gives up freezing a cgroup whose processes stay busy in the kernel for a
        # moment ("unable to freeze", seen on a loaded host after heavy file I/O): retry.
        for attempt in range(PAUSE_ATTEMPTS):
            try:
                api.pause(container_id)
                return
            except docker.errors.APIError as e:
                if "unable to freeze" not in str(e) or attempt == PAUSE_ATTEMPTS - 1:
                    raise
                time.sleep(0.5)

    def _filters(self) -> dict[str, list[str]]:
        return {"label": instance_labels(self.instance)}

    def _thd_list(self) -> list[ContainerInfo]:
        import docker.errors

        client = self._thd_client()
        infos = []
        for summary in client.api.containers(all=True, filters=self._filters()):
            try:
                attrs = client.api.inspect_container(summary["Id"])
            except docker.errors.NotFound:
                continue  # removed between list and inspect
            infos.append(container_info_from_attrs(attrs))
        return infos

    # -- events ----------------------------------------------------------------------------

    def _start_events_thread(self) -> None:
        self._events_thread = threading.Thread(
            target=self._thd_events_loop, name="docker-events", daemon=True
        )
        self._events_thread.start()

    def _close_events_stream(self) -> None:
        stream, self._events_stream = self._events_stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass

    def _thd_events_loop(self) -> None:
        """Follow the engine's event stream for our containers; reconnect after failures."""
        import time

        while self.running:
            try:
                client = self._thd_client()
                filters = {**self._filters(), "type": ["container"]}
                stream = client.events(decode=True, filters=filters)
                self._events_stream = stream
                for event in stream:
                    self._thd_dispatch(event)
            except Exception as e:
                if self.running:
                    self._log.debug("docker events stream interrupted: {error}", error=e)
            finally:
                self._events_stream = None
            if self.running:
                time.sleep(1.0)

    def _thd_dispatch(self, event: Mapping[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        if action not in WATCHED_ACTIONS:
            return
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        exit_code: int | None
        try:
            exit_code = int(attributes["exitCode"])
        except (KeyError, ValueError):
            exit_code = None
        container_event = ContainerEvent(
            sandbox_id=attributes.get(LABEL_SANDBOX_ID, ""),
            container_id=str(actor.get("ID") or event.get("id") or ""),
            action=action,
            exit_code=exit_code,
        )
        for callback in list(self._watchers):
            self._reactor.callFromThread(callback, container_event)
