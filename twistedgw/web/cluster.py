"""Serving sandboxes another gateway created (Swarm backend).

With several gateways on one cluster, a sandbox created through gateway A is unknown to
gateway B until B's next reconciliation. ``ClusterLookup`` wraps the API resource: a request
naming a sandbox id this gateway does not know (``/sandboxes/<id>...``, ``/ws/<id>``), and a
create with an ``Idempotency-Key``, first waits, boundedly, for one reconciliation (shared
with any other in progress), then goes to the API as usual. So "create on A, then use it on
B" answers at once instead of 404, and a keyed retry on B finds what the first try made on A
(two tries racing on two gateways at the same moment can still make two sandboxes).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from twistedgw.sandbox import is_valid_sandbox_id


def named_sandbox(path: bytes) -> str | None:
    """The sandbox id a request path names, if any."""
    parts = path.split(b"?", 1)[0].split(b"/")
    if len(parts) >= 3 and parts[0] == b"" and parts[1] in (b"sandboxes", b"ws"):
        try:
            sandbox_id = parts[2].decode("ascii")
        except UnicodeDecodeError:
            return None
        return sandbox_id if is_valid_sandbox_id(sandbox_id) else None
    return None


class ClusterLookup(Resource):
    """``inner`` (a leaf, the Klein API), after a reconciliation for unknown sandbox ids."""

    isLeaf = True
    _log = Logger()

    def __init__(self, inner: IResource, manager: Any, clock: Any, timeout: float = 5.0) -> None:
        super().__init__()
        self._inner = inner
        self._manager = manager
        self._clock = clock
        self._timeout = timeout

    def render(self, request: Any) -> Any:
        manager = self._manager
        if not self._needs_lookup(request):
            return self._inner.render(request)
        d = manager.reconcile()
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(lambda f: self._log.debug("lookup reconciliation failed: {f}", f=f))
        d.addCallback(lambda _: self._render_inner(request))
        return NOT_DONE_YET

    def _needs_lookup(self, request: Any) -> bool:
        """An unknown sandbox id, or a create with an ``Idempotency-Key`` (its retry may
        come to this gateway after the first try went to another)."""
        if not self._manager.recovered:
            return False  # the API answers 503 until then anyway
        if request.method == b"POST" and request.path.split(b"?", 1)[0] == b"/sandboxes":
            return request.getHeader(b"idempotency-key") is not None
        sandbox_id = named_sandbox(request.path)
        return sandbox_id is not None and sandbox_id not in self._manager.registry

    def _render_inner(self, request: Any) -> None:
        if getattr(request, "_disconnected", False):
            return
        result = self._inner.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
