"""What the gateway asks of a container runtime: ``IContainerRuntime``, the records it takes
and returns, and its failures. No engine is imported here; ``twistedgw.runtime.docker`` is
the Docker implementation (and ``tests``' fakes another)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from attrs import field, frozen
from twisted.internet.defer import Deferred
from zope.interface import Interface

from twistedgw.runtime.hardening import ContainerLimits
from twistedgw.sandbox import SandboxSettings
from twistedgw.state import SavedSandbox


class RuntimeFailure(Exception):
    """Base class of runtime failures."""


class RuntimeUnavailable(RuntimeFailure):
    """The container engine could not be reached, or did not answer in time."""


class ImageMissing(RuntimeFailure):
    """The sandbox image is not present in the engine."""


class ContainerFailed(RuntimeFailure):
    """The engine refused or failed an operation on a container."""


class SocketPathTooLong(ContainerFailed):
    """A network-less sandbox's agent socket path would not fit a Unix socket address: the
    operator's ``--state-dir`` and ``--instance`` are too long for ``network: none``."""


@frozen
class ContainerSpec:
    """What to create: one sandbox container."""

    sandbox_id: str
    created_at: float
    agent_secret: str
    settings: SandboxSettings
    #: Create it for the warm pool (labelled so; no creator yet).
    for_pool: bool = False
    #: The image of its template (``None``: the runtime's own image).
    image: str | None = None
    #: Its template's limits (``None``: the runtime's own limits).
    limits: ContainerLimits | None = None


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
    settings: SandboxSettings
    exit_code: int | None = None
    oom_killed: bool = False
    #: Created for the warm pool (its labels describe the pool, not a creator's sandbox).
    for_pool: bool = False
    agent_socket: str | None = None
    #: What the cluster keeps of the sandbox's mutable state (Swarm; ``None`` elsewhere).
    saved: SavedSandbox | None = None


@frozen
class ImageFacts:
    """What the engine says about an image (``inspect_image``)."""

    image_id: str
    #: Bytes, as ``docker image ls`` counts them.
    size: int
    #: When it was built (the engine's RFC 3339 text).
    created: str
    labels: Mapping[str, str] = field(factory=dict)


@frozen
class ContainerEvent:
    """A lifecycle event of one of our containers (``die``, ``destroy``, ``oom``)."""

    sandbox_id: str
    container_id: str
    action: str
    exit_code: int | None = None


class IContainerRuntime(Interface):  # pragma: no mutate block (zope declarations, no code)
    """Creates, lists and removes sandbox containers. All methods return Deferreds."""

    def create(spec: ContainerSpec) -> Deferred[ContainerInfo]:
        """Create and start a container for ``spec``; fires with its ``ContainerInfo``.

        Fails with ``RuntimeUnavailable``, ``ImageMissing`` or ``ContainerFailed``. A failed
        create leaves no container behind (best effort; reconciliation removes leftovers).
        """

    def remove(container_id: str, sandbox_id: str = "") -> Deferred[None]:
        """Remove a container (killing it if running) and what the runtime keeps for its
        sandbox. Removing a missing one succeeds."""

    def list_containers() -> Deferred[list[ContainerInfo]]:
        """All containers of this gateway instance, running or not."""

    def watch(callback: Callable[[ContainerEvent], None]) -> None:
        """Call ``callback`` on the reactor thread for each event of our containers."""

    def pause(container_id: str) -> Deferred[None]:
        """Freeze every process of a running container (its memory stays); pausing a
        paused one succeeds. ``ContainerFailed`` for a missing or stopped container."""

    def unpause(container_id: str) -> Deferred[None]:
        """Thaw a paused container; unpausing a running one succeeds. ``ContainerFailed``
        for a missing container."""

    def inspect_image(image: str) -> Deferred[ImageFacts | None]:
        """What the engine knows about ``image`` (``None``: it is not present)."""


class IClusterLabels(Interface):  # pragma: no mutate block (zope declarations, no code)
    """Labels of a sandbox that can change after creation, with compare-and-swap: what a
    cluster runtime (Swarm) offers for state that must outlive any one gateway."""

    def read_labels(container_id: str) -> Deferred[tuple[int, dict[str, str]]]:
        """The sandbox's version (changes on every write) and its labels; ``ContainerFailed``
        if it is gone."""

    def write_labels(
        container_id: str, version: int, changes: Mapping[str, str | None]
    ) -> Deferred[bool]:
        """Apply ``changes`` (``None`` removes a label) if the sandbox is still at
        ``version``; ``False`` (nothing written) if someone wrote since."""
