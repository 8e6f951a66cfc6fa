"""Per-create resources (``cpus``, ``memory``, ``disk``) within the operator's maxima.

One model for what a sandbox gets, layered (README, "Resources and templates"):

1. the server's defaults (``--cpus``, ``--memory``, ``--home-size``, ``--tmp-size``);
2. over them, its template's image labels (``org.twistedgw.memory``, ``home-size``,
   ``tmp-size``; ``lifecycle/templates.py``), each capped at the maxima;
3. over those, the creator's ``cpus``, ``memory`` and ``disk``, refused (400) beyond the
   maxima.

The maxima are one set: ``--max-cpus``, ``--max-memory``, ``--max-disk`` (``disk`` is the
home tmpfs; /tmp and /var/tmp are capped by it too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.runtime.hardening import ContainerLimits, size_bytes
from twistedgw.sandbox import ResourceRequest, Resources

#: The creation body's resource fields.
RESOURCE_FIELDS = ("cpus", "memory", "disk")
#: The server's defaults unless told otherwise (--cpus 1, --memory 1g, --home-size 256m).
SERVER_RESOURCES = Resources(cpus=1.0, memory=1024**3, disk=256 * 1024**2)
#: The maxima unless told otherwise (--max-memory 2g, --max-disk 1g, each at least the
#: server's default; --max-cpus: --cpus): room for the python template's labels (home 1g,
#: memory 2g) out of the box.
DEFAULT_MAXIMA = Resources(cpus=1.0, memory=2 * 1024**3, disk=1024**3)


@frozen
class ResourcePolicy:
    """The server's resources per sandbox (the defaults) and the most a creator may ask for
    (``--max-cpus``, ``--max-memory``, ``--max-disk``)."""

    defaults: Resources = SERVER_RESOURCES
    maxima: Resources = DEFAULT_MAXIMA

    def from_body(self, body: Mapping[str, Any]) -> ResourceRequest | None:
        """The creator's resources (``None``: none asked for; a field left out: the
        template's); ``InvalidSettings`` names the field and its maximum."""
        if not any(body.get(name) is not None for name in RESOURCE_FIELDS):
            return None
        cpus = body.get("cpus")
        if cpus is not None and (
            isinstance(cpus, bool)
            or not isinstance(cpus, int | float)
            or not math.isfinite(cpus)
            or cpus <= 0
        ):
            raise InvalidSettings("'cpus' must be a number greater than 0")
        if cpus is not None and cpus > self.maxima.cpus:
            raise InvalidSettings(f"'cpus' exceeds the server maximum of {self.maxima.cpus:g}")
        return ResourceRequest(
            cpus=None if cpus is None else float(cpus),
            memory=_size(body, "memory", self.maxima.memory),
            disk=_size(body, "disk", self.maxima.disk),
        )

    def resolve(
        self, limits: ContainerLimits | None, request: ResourceRequest | None
    ) -> tuple[Resources, ContainerLimits | None]:
        """What a sandbox gets: the creator's ``request`` over its template's ``limits``
        (the server's with the image's labels, already within the maxima; ``None``: the
        runtime's own, taken to be the server defaults), and those limits with it applied."""
        base = self.defaults if limits is None else resources_of(limits)
        asked = request or ResourceRequest()
        got = Resources(
            cpus=base.cpus if asked.cpus is None else asked.cpus,
            memory=base.memory if asked.memory is None else asked.memory,
            disk=base.disk if asked.disk is None else asked.disk,
        )
        if limits is None or request is None:
            return got, limits
        return got, limits.for_resources(got, most_tmp=self.maxima.disk)


def resources_of(limits: ContainerLimits) -> Resources:
    """The ``cpus``, ``memory`` and ``disk`` (home size) of container ``limits``."""
    return Resources(
        cpus=float(limits.cpus),
        memory=size_bytes(limits.memory),
        disk=size_bytes(limits.home_size),
    )


def _size(body: Mapping[str, Any], name: str, most: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidSettings(f"'{name}' must be bytes or a size like '512m' or '2g'")
    try:
        size = size_bytes(value)
    except ValueError:
        raise InvalidSettings(f"'{name}' must be bytes or a size like '512m' or '2g'") from None
    if size < 4 * 1024**2:
        raise InvalidSettings(f"'{name}' must be at least 4m")
    if size > most:
        raise InvalidSettings(
            f"'{name}' exceeds the server maximum of {most} bytes ({_human(most)})"
        )
    return size


def _human(size: int) -> str:
    for unit, factor in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}b"
