"""The warm pool: started, agent-ready containers nobody has asked for yet, handed to creators
without a cold start. They are not in the registry (not listed, not reaped, not counted in
--max-sandboxes). Each template has a pool of its own (``--pool-size NAME=N``); a pooled
container's template is its ``settings.template``."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred

from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.core import LifecycleCore
from twistedgw.lifecycle.templates import DEFAULT_TEMPLATE
from twistedgw.runtime.interface import ContainerInfo
from twistedgw.sandbox import Sandbox, SandboxSettings, new_sandbox_id


class WarmPool(LifecycleCore):
    """Fills, hands out and adopts pool containers."""

    #: Pool size per template.
    pool_sizes: dict[str, int]
    _pool: list[Sandbox]
    #: Pool containers being created, per template.
    _pool_filling: dict[str, int]
    _pool_failures: dict[str, int]
    #: Scheduled refill retries (after failures), per template.
    _pool_retry: dict[str, Any]
    _backoff: Any

    @property
    def pool_size(self) -> int:
        """The default template's pool size."""
        return self.pool_sizes.get(DEFAULT_TEMPLATE, 0)

    def _pooled(self, template: str) -> list[Sandbox]:
        return [s for s in self._pool if s.settings.template == template]

    def pool_status(self) -> dict[str, Any]:
        """How full the warm pool is: totals, and per template."""
        per = {
            name: {
                "size": size,
                "ready": len(self._pooled(name)),
                "filling": self._pool_filling.get(name, 0),
            }
            for name, size in sorted(self.pool_sizes.items())
            if size
        }
        return {
            "size": sum(self.pool_sizes.values()),
            "ready": len(self._pool),
            "filling": sum(self._pool_filling.values()),
            "templates": per,
        }

    def _can_hand_out(self, settings: SandboxSettings) -> bool:
        """A pooled container of this create's template serves it (options applied at create
        time need a cold one: env, metadata, no network or egress, the creator's resources)."""
        return (
            bool(self._pooled(settings.template))
            and not settings.env
            and not settings.metadata
            and settings.network == "bridge"
            and settings.egress is None
            and settings.requested is None
        )

    async def _hand_out(self, settings: SandboxSettings) -> Sandbox | None:
        """Give a pool container to a creator (never twice, never back to the pool).

        Its new settings live only in the state file, so the assignment is saved before the
        creator hears of it: a restarted gateway must not pool it again. If that save fails,
        the container is dropped and the caller creates cold.
        """
        ready = self._pooled(settings.template)[0]
        self._pool.remove(ready)
        now = self.now()
        lifetime = settings.max_lifetime
        # The same container, with the creator's settings and a life that starts now (and
        # the resources its template gave it).
        sandbox = attrs.evolve(
            ready,
            created_at=now,
            last_activity=now,
            settings=attrs.evolve(settings, resources=ready.settings.resources),
            expires_at=None if lifetime is None else now + lifetime,
            from_pool=True,
        )
        self._touch(sandbox.sandbox_id)
        self.registry.add(sandbox)
        self.refill_pool()
        try:
            await self.save_state()
        except Exception:
            self._log.failure("could not record a pool hand-out; creating cold instead")
            self.registry.remove(sandbox.sandbox_id)
            d = Deferred.fromCoroutine(self._remove_dead(sandbox.sandbox_id, sandbox.container_id))
            d.addErrback(lambda f: self._log.failure("removing a pool container failed", f))
            return None
        self._log.info(
            "sandbox {sandbox_id} handed out from the warm pool", sandbox_id=sandbox.sandbox_id
        )
        return sandbox

    def refill_pool(self) -> None:
        """Start creating pool containers until each template's pool is (being) filled."""
        if not self.running:
            return
        for template, size in self.pool_sizes.items():
            if template in self._pool_retry:
                continue
            filling = self._pool_filling.get(template, 0)
            missing = size - len(self._pooled(template)) - filling
            for _ in range(max(0, missing)):
                self._pool_filling[template] = self._pool_filling.get(template, 0) + 1
                d = Deferred.fromCoroutine(self._fill_one(template))
                d.addErrback(lambda f: self._log.failure("filling the warm pool failed", f))

    async def _fill_one(self, template: str = DEFAULT_TEMPLATE) -> None:
        sandbox_id = new_sandbox_id()
        self._begin(sandbox_id)
        try:
            spec = await self._container_spec(
                sandbox_id,
                SandboxSettings(idle_timeout=self.policy.idle_timeout, template=template),
                for_pool=True,
            )
            info = await self.runtime.create(spec)
            try:
                await self._wait_ready(info)
            except AgentUnavailable:
                await self.runtime.remove(info.container_id, info.sandbox_id)
                raise
            self._pool.append(self._sandbox_from(info))
            self._pool_failures[template] = 0
        except Exception as e:
            # Back off (about 1, 2, 4 ... 30 s) instead of hammering an engine in trouble (or
            # asking again and again for a template image that is missing).
            failures = self._pool_failures[template] = self._pool_failures.get(template, 0) + 1
            delay = self._backoff(failures - 1)
            self._log.warn(
                "could not add to the warm pool of template {template} ({error}); "
                "retrying in {delay:.1f} s",
                template=template,
                error=str(e),
                delay=delay,
            )
            if template not in self._pool_retry and self.running:
                self._pool_retry[template] = self._reactor.callLater(
                    delay, self._retry_refill, template
                )
        finally:
            self._end(sandbox_id)
            self._pool_filling[template] -= 1

    def _retry_refill(self, template: str = DEFAULT_TEMPLATE) -> None:
        self._pool_retry.pop(template, None)
        self.refill_pool()

    async def _adopt_into_pool(self, info: ContainerInfo) -> None:
        """A pool container from an earlier run: back into its template's pool, or removed if
        that pool is full already (or the template is no longer served)."""
        template = info.settings.template
        held = len(self._pooled(template)) + self._pool_filling.get(template, 0)
        if held < self.pool_sizes.get(template, 0):
            self._pool.append(self._sandbox_from(info))
            self._log.info("adopted pool container {sandbox_id}", sandbox_id=info.sandbox_id)
        else:
            await self._remove_dead(info.sandbox_id, info.container_id)
