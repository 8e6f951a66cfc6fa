"""``SandboxRegistry``: the sandboxes this gateway serves, in memory, by id."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from attrs import define, field

from twistedgw.sandbox import Sandbox


@define
class SandboxRegistry:
    """The sandboxes this gateway knows, by id. Reactor thread only."""

    _sandboxes: dict[str, Sandbox] = field(factory=dict)
    _watchers: list[tuple[Callable[[Sandbox], None], Callable[[Sandbox], None]]] = field(
        factory=list
    )

    def watch(self, added: Callable[[Sandbox], None], removed: Callable[[Sandbox], None]) -> None:
        """Call ``added`` for every sandbox remembered, ``removed`` for every one forgotten
        (the egress proxies follow the registry this way)."""
        self._watchers.append((added, removed))

    def add(self, sandbox: Sandbox) -> None:
        """Remember ``sandbox`` (replacing any record with the same id)."""
        self._sandboxes[sandbox.sandbox_id] = sandbox
        for added, _ in self._watchers:
            added(sandbox)

    def get(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with this id, or None."""
        return self._sandboxes.get(sandbox_id)

    def remove(self, sandbox_id: str) -> Sandbox | None:
        """Forget a sandbox; returns the record that was removed, if any."""
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is not None:
            for _, removed in self._watchers:
                removed(sandbox)
        return sandbox

    def __iter__(self) -> Iterator[Sandbox]:
        # A snapshot, so callers may remove entries while iterating.
        return iter(list(self._sandboxes.values()))

    def __len__(self) -> int:
        return len(self._sandboxes)

    def __contains__(self, sandbox_id: object) -> bool:
        return sandbox_id in self._sandboxes
