"""The reaper's lease: with several gateways on one cluster, each sandbox is reaped once.

Before a gateway removes a sandbox for its time, it takes that sandbox's lease: a label on
the sandbox's service (``LABEL_REAPER_LEASE``: holder and expiry) written with
compare-and-swap on the service's version (``IClusterLabels``). A lease held by another
gateway and not yet expired means "not yours"; a lost race (the version moved) means the
same. A holder that dies mid-way loses its claim after ``ttl`` seconds. The clock is injected
(``reactor.seconds``), so the logic is tested with ``twisted.internet.task.Clock``.

Taking the lease also brings the cluster's newest saved facts (``LABEL_STATE``), which the
reaper merges before deciding again: another gateway may have seen the sandbox busy.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Mapping
from typing import Any

from attrs import frozen
from twisted.logger import Logger

from twistedgw.runtime.labels import LABEL_REAPER_LEASE, saved_from_label
from twistedgw.sandbox import Sandbox
from twistedgw.state import SavedSandbox


@frozen
class Lease:
    holder: str
    expires: float


def parse_lease(labels: Mapping[str, str]) -> Lease | None:
    try:
        raw = json.loads(labels[LABEL_REAPER_LEASE])
        return Lease(str(raw["holder"]), float(raw["expires"]))
    except (KeyError, ValueError, TypeError):
        return None


def encode_lease(lease: Lease) -> str:
    return json.dumps({"holder": lease.holder, "expires": lease.expires}, sort_keys=True)


def claim(current: Lease | None, holder: str, now: float, ttl: float) -> Lease | None:
    """The lease ``holder`` may write now, or ``None`` when another holds it unexpired."""
    if current is not None and current.holder != holder and current.expires > now:
        return None
    return Lease(holder, now + ttl)


def new_holder_id() -> str:
    """This gateway process's name as a lease holder."""
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


class NoLease:
    """One gateway per set of sandboxes (the Docker backend): always granted."""

    async def try_acquire(self, sandbox: Sandbox) -> tuple[bool, SavedSandbox | None]:
        return True, None


class ClusterLease:
    """Per-sandbox leases on service labels (``IClusterLabels``); see the module doc."""

    _log = Logger()

    def __init__(self, labels: Any, clock: Any, holder: str, ttl: float = 60.0) -> None:
        self._labels = labels
        self._clock = clock
        self.holder = holder
        self.ttl = ttl

    async def try_acquire(self, sandbox: Sandbox) -> tuple[bool, SavedSandbox | None]:
        """``(granted, the cluster's saved facts)``; never raises (a failure: not granted)."""
        try:
            version, labels = await self._labels.read_labels(sandbox.container_id)
            lease = claim(parse_lease(labels), self.holder, self._clock.seconds(), self.ttl)
            if lease is None:
                return False, None
            written = await self._labels.write_labels(
                sandbox.container_id, version, {LABEL_REAPER_LEASE: encode_lease(lease)}
            )
            return bool(written), saved_from_label(labels)
        except Exception as e:
            self._log.debug(
                "no reaper lease on {sandbox_id}: {error}",
                sandbox_id=sandbox.sandbox_id,
                error=str(e),
            )
            return False, None
