"""Per-create resources (``cpus``, ``memory``, ``disk``) within the operator's maxima."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.runtime.hardening import size_bytes
from twistedgw.sandbox import Resources

#: The creation body's resource fields.
RESOURCE_FIELDS = ("cpus", "memory", "disk")
#: The server's defaults unless told otherwise (--cpus 1, --memory 1g, --home-size 256m).
SERVER_RESOURCES = Resources(cpus=1.0, memory=1024**3, disk=256 * 1024**2)


@frozen
class ResourcePolicy:
    """The server's resources per sandbox (the defaults) and the most a creator may ask for
    (``--max-cpus``, ``--max-memory``, ``--max-disk``)."""

    defaults: Resources = SERVER_RESOURCES
    maxima: Resources = SERVER_RESOURCES

    def from_body(self, body: Mapping[str, Any]) -> Resources | None:
        """The creator's resources (``None``: none asked for, the server's apply);
        ``InvalidSettings`` names the field and its maximum."""
        if not any(body.get(name) is not None for name in RESOURCE_FIELDS):
            return None
        cpus = body.get("cpus")
        if cpus is None:
            cpus = self.defaults.cpus
        elif (
            isinstance(cpus, bool)
            or not isinstance(cpus, int | float)
            or not math.isfinite(cpus)
            or cpus <= 0
        ):
            raise InvalidSettings("'cpus' must be a number greater than 0")
        if cpus > self.maxima.cpus:
            raise InvalidSettings(f"'cpus' exceeds the server maximum of {self.maxima.cpus:g}")
        memory = _size(body, "memory", self.defaults.memory, self.maxima.memory)
        disk = _size(body, "disk", self.defaults.disk, self.maxima.disk)
        return Resources(cpus=float(cpus), memory=memory, disk=disk)


def _size(body: Mapping[str, Any], name: str, default: int, most: int) -> int:
    value = body.get(name)
    if value is None:
        return default
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
