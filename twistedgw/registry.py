"""``SandboxRegistry``: the sandboxes this gateway serves, in memory, by id."""

from __future__ import annotations

from collections.abc import Iterator

from attrs import define, field

from twistedgw.sandbox import Sandbox


@define
class SandboxRegistry:
    """The sandboxes this gateway knows, by id. Reactor thread only."""

    _sandboxes: dict[str, Sandbox] = field(factory=dict)

    def add(self, sandbox: Sandbox) -> None:
        """Remember ``sandbox`` (replacing any record with the same id)."""
        self._sandboxes[sandbox.sandbox_id] = sandbox

    def get(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with this id, or None."""
        return self._sandboxes.get(sandbox_id)

    def remove(self, sandbox_id: str) -> Sandbox | None:
        """Forget a sandbox; returns the record that was removed, if any."""
        return self._sandboxes.pop(sandbox_id, None)

    def __iter__(self) -> Iterator[Sandbox]:
        # A snapshot, so callers may remove entries while iterating.
        return iter(list(self._sandboxes.values()))

    def __len__(self) -> int:
        return len(self._sandboxes)

    def __contains__(self, sandbox_id: object) -> bool:
        return sandbox_id in self._sandboxes
