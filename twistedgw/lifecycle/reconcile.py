"""Reconciliation: the registry and the pool brought in line with the runtime, the source of
truth. A periodic full listing (``reconcile``, driven by the reaper) and Docker events
(``_on_event``) adopt running containers of ours and forget vanished or dead ones."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from twistedgw.lifecycle.core import CLOSE_SANDBOX_GONE, exit_detail
from twistedgw.lifecycle.pool import WarmPool
from twistedgw.lifecycle.shared import Shared
from twistedgw.runtime.interface import ContainerEvent
from twistedgw.sandbox import REASON_EXITED, Tombstone, is_valid_sandbox_id


class Reconciliation(WarmPool):
    """Keeps the registry and the pool true to the runtime."""

    _reconciling: Shared[None] | None
    _recovery_failures: int

    def reconcile(self) -> Deferred[None]:
        """Bring the registry in line with the runtime (the source of truth).

        One reconcile runs at a time: a call while one is in progress shares its outcome.
        The first success after ``startService`` marks the registry as recovered.
        """
        if self._reconciling is None:
            running = Deferred.fromCoroutine(self._reconcile())

            def done(result: Any) -> Any:
                self._reconciling = None
                self._touched = None
                if not isinstance(result, Failure) and not self.recovered:
                    self.recovered = True
                    self._recovery_failures = 0
                    self._log.info(
                        "recovered {count} sandboxes from Docker; serving them",
                        count=len(self.registry),
                    )
                return result

            running.addBoth(done)
            if running.called:
                return running
            self._reconciling = Shared(running)
        return self._reconciling.follow()

    async def _reconcile(self) -> None:
        # What the templates' images are now (a rebuilt image may bring new labels).
        await self.templates.refresh(self.runtime)
        # Ids that anything else creates, hands out, removes or forgets from here on are
        # left alone by this pass: its listing may predate the change.
        touched: set[str] = set()
        self._touched = touched
        registered = {s.sandbox_id for s in self.registry}
        in_pool_before = {p.sandbox_id for p in self._pool}
        infos = await self.runtime.list_containers()
        seen: set[str] = set()
        for info in infos:
            sandbox_id = info.sandbox_id
            if (
                not is_valid_sandbox_id(sandbox_id)
                or sandbox_id in self._in_flight
                or sandbox_id in touched
            ):
                seen.add(sandbox_id)
                continue
            seen.add(info.sandbox_id)
            known = self.registry.get(info.sandbox_id)
            in_pool = any(p.sandbox_id == info.sandbox_id for p in self._pool)
            if info.running and (info.agent_port or info.agent_socket) and info.agent_secret:
                # A cluster's saved facts (Swarm) are fresher than the file read at start-up.
                saved = info.saved or self._saved.get(info.sandbox_id)
                if info.saved is not None:
                    self._state.seen(info.sandbox_id, info.saved)
                    if known is not None:
                        self.merge_saved(known, info.saved)
                if known is not None or in_pool:
                    continue
                if info.for_pool and (saved is None or saved.assigned is None):
                    await self._adopt_into_pool(info)
                    continue
                self.registry.add(self._sandbox_from(info, saved))
                self._log.info("adopted running sandbox {sandbox_id}", sandbox_id=info.sandbox_id)
                continue
            if in_pool:
                self._pool = [p for p in self._pool if p.sandbox_id != info.sandbox_id]
            # A container of ours that is not running cannot serve anyone: remove it.
            detail = exit_detail(info.exit_code, info.oom_killed)
            self._log.warn(
                "sandbox {sandbox_id}: container is not running ({detail}); removing it",
                sandbox_id=info.sandbox_id,
                detail=detail,
            )
            await self._remove_dead(info.sandbox_id, info.container_id)
            if known is not None:
                self._forget(known, CLOSE_SANDBOX_GONE, REASON_EXITED, detail)
            else:
                self.graveyard.bury(
                    Tombstone(
                        info.sandbox_id, REASON_EXITED, self.now(), detail, info.settings.owner
                    )
                )
        self._pool = [
            p for p in self._pool if p.sandbox_id in seen or p.sandbox_id not in in_pool_before
        ]
        self.refill_pool()
        for sandbox in self.registry:
            sandbox_id = sandbox.sandbox_id
            if (
                sandbox_id in registered
                and sandbox_id not in seen
                and sandbox_id not in self._in_flight
                and sandbox_id not in touched
            ):
                self._log.warn(
                    "sandbox {sandbox_id}: container vanished; forgetting it",
                    sandbox_id=sandbox.sandbox_id,
                )
                self._forget(
                    sandbox,
                    CLOSE_SANDBOX_GONE,
                    REASON_EXITED,
                    "container removed outside the gateway",
                )

    def _on_event(self, event: ContainerEvent) -> None:
        """A Docker event about one of our containers (reactor thread)."""
        if event.action in ("die", "destroy") and event.sandbox_id not in self._in_flight:
            before = len(self._pool)
            self._pool = [p for p in self._pool if p.container_id != event.container_id]
            if len(self._pool) != before:
                self._log.warn("a warm pool container died; replacing it")
                if event.action == "die":
                    d = Deferred.fromCoroutine(
                        self._remove_dead(event.sandbox_id, event.container_id)
                    )
                    d.addErrback(lambda f: self._log.failure("removing a dead container failed", f))
                self.refill_pool()
                return
        sandbox = self.registry.get(event.sandbox_id)
        if sandbox is None or event.sandbox_id in self._in_flight:
            return  # not one we serve, or our own removal
        if sandbox.container_id != event.container_id:
            return
        if event.action == "oom":
            self._log.warn("sandbox {sandbox_id}: out of memory", sandbox_id=event.sandbox_id)
            return
        if event.action == "die":
            detail = exit_detail(event.exit_code, False)
        else:
            detail = "container removed outside the gateway"
        self._log.warn(
            "sandbox {sandbox_id}: container {action} ({detail})",
            sandbox_id=event.sandbox_id,
            action=event.action,
            detail=detail,
        )
        self._forget(sandbox, CLOSE_SANDBOX_GONE, REASON_EXITED, detail)
        if event.action == "die":
            d = Deferred.fromCoroutine(self._remove_dead(event.sandbox_id, event.container_id))
            d.addErrback(lambda f: self._log.failure("removing a dead container failed", f))
