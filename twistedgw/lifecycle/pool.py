"""The warm pool: started, agent-ready containers nobody has asked for yet, handed to creators
without a cold start. They are not in the registry (not listed, not reaped, not counted in
--max-sandboxes)."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred

from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.core import LifecycleCore
from twistedgw.runtime.interface import ContainerInfo, ContainerSpec
from twistedgw.sandbox import Sandbox, SandboxSettings, new_agent_secret, new_sandbox_id


class WarmPool(LifecycleCore):
    """Fills, hands out and adopts pool containers."""

    pool_size: int
    _pool: list[Sandbox]
    _pool_filling: int
    _pool_failures: int
    _pool_retry: Any
    _backoff: Any

    def pool_status(self) -> dict[str, int]:
        """How full the warm pool is."""
        return {"size": self.pool_size, "ready": len(self._pool), "filling": self._pool_filling}

    async def _hand_out(self, settings: SandboxSettings) -> Sandbox | None:
        """Give a pool container to a creator (never twice, never back to the pool).

        Its new settings live only in the state file, so the assignment is saved before the
        creator hears of it: a restarted gateway must not pool it again. If that save fails,
        the container is dropped and the caller creates cold.
        """
        ready = self._pool.pop(0)
        now = self.now()
        lifetime = settings.max_lifetime
        # The same container, with the creator's settings and a life that starts now.
        sandbox = attrs.evolve(
            ready,
            created_at=now,
            last_activity=now,
            settings=settings,
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
        """Start creating pool containers until the pool is (being) filled."""
        if not self.running or self._pool_retry is not None:
            return
        missing = self.pool_size - len(self._pool) - self._pool_filling
        for _ in range(max(0, missing)):
            self._pool_filling += 1
            d = Deferred.fromCoroutine(self._fill_one())
            d.addErrback(lambda f: self._log.failure("filling the warm pool failed", f))

    async def _fill_one(self) -> None:
        sandbox_id = new_sandbox_id()
        spec = ContainerSpec(
            sandbox_id=sandbox_id,
            created_at=self.now(),
            agent_secret=new_agent_secret(),
            settings=SandboxSettings(idle_timeout=self.policy.idle_timeout),
            for_pool=True,
        )
        self._begin(sandbox_id)
        try:
            info = await self.runtime.create(spec)
            try:
                await self._wait_ready(info)
            except AgentUnavailable:
                await self.runtime.remove(info.container_id, info.sandbox_id)
                raise
            self._pool.append(self._sandbox_from(info))
            self._pool_failures = 0
        except Exception as e:
            # Back off (about 1, 2, 4 ... 30 s) instead of hammering an engine in trouble.
            self._pool_failures += 1
            delay = self._backoff(self._pool_failures - 1)
            self._log.warn(
                "could not add to the warm pool ({error}); retrying in {delay:.1f} s",
                error=str(e),
                delay=delay,
            )
            if self._pool_retry is None and self.running:
                self._pool_retry = self._reactor.callLater(delay, self._retry_refill)
        finally:
            self._end(sandbox_id)
            self._pool_filling -= 1

    def _retry_refill(self) -> None:
        self._pool_retry = None
        self.refill_pool()

    async def _adopt_into_pool(self, info: ContainerInfo) -> None:
        """A pool container from an earlier run: back into the pool, or removed if the pool
        is full already."""
        if len(self._pool) + self._pool_filling < self.pool_size:
            self._pool.append(self._sandbox_from(info))
            self._log.info("adopted pool container {sandbox_id}", sandbox_id=info.sandbox_id)
        else:
            await self._remove_dead(info.sandbox_id, info.container_id)
