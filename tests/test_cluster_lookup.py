"""``ClusterLookup`` (Swarm backend): a request naming a sandbox this gateway does not know, or a
keyed create, waits for one bounded reconciliation before the API answers it; everything else
goes straight through. Driven with Twisted's ``DummyRequest``, a ``Clock`` and a stand-in
manager, so the waiting, the timeout and the order are checked exactly."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from twistedgw.web.cluster import ClusterLookup, named_sandbox

KNOWN = "a" * 32
UNKNOWN = "b" * 32


class Inner(Resource):
    """The API: records what it rendered and answers with ``answer``."""

    isLeaf = True

    def __init__(self, answer: Any = b"inner") -> None:
        super().__init__()
        self.answer = answer
        self.rendered: list[bytes] = []

    def render(self, request: Any) -> Any:
        self.rendered.append(request.path)
        return self.answer


class Manager:
    def __init__(self, recovered: bool = True) -> None:
        self.recovered = recovered
        self.registry = {KNOWN}
        self.reconciles: list[Deferred[None]] = []
        self.result: Deferred[None] | None = None

    def reconcile(self) -> Deferred[None]:
        d: Deferred[None] = self.result if self.result is not None else Deferred()
        self.reconciles.append(d)
        return d


def request(path: str, method: bytes = b"GET", **headers: str) -> DummyRequest:
    req = DummyRequest(path.lstrip("/").split("/"))
    req.path = path.encode()
    req.uri = req.path
    req.method = method
    for name, value in headers.items():
        req.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return req


def lookup(manager: Manager, inner: Inner, timeout: float = 5.0) -> tuple[ClusterLookup, Clock]:
    clock = Clock()
    return ClusterLookup(inner, manager, clock, timeout=timeout), clock


def test_a_known_sandbox_goes_straight_to_the_api() -> None:
    """A sandbox in the registry, and paths naming none, are rendered at once, unreconciled."""
    manager, inner = Manager(), Inner()
    resource, _ = lookup(manager, inner)
    for path in (f"/sandboxes/{KNOWN}", f"/ws/{KNOWN}", "/sandboxes", "/healthz"):
        assert resource.render(request(path)) == b"inner"
    assert manager.reconciles == []
    assert len(inner.rendered) == 4


def test_an_unknown_sandbox_waits_for_one_reconciliation_then_is_answered() -> None:
    """An unknown id: a reconciliation is started and the API renders only when it is done;
    the answer is written and the request finished."""
    manager, inner = Manager(), Inner()
    resource, _ = lookup(manager, inner)
    req = request(f"/sandboxes/{UNKNOWN}/files")
    assert resource.render(req) is NOT_DONE_YET
    assert len(manager.reconciles) == 1 and inner.rendered == []
    manager.reconciles[0].callback(None)
    assert inner.rendered == [f"/sandboxes/{UNKNOWN}/files".encode()]
    assert req.written == [b"inner"] and req.finished == 1


def test_a_reconciliation_that_does_not_end_is_waited_for_at_most_the_timeout() -> None:
    """A stuck reconciliation delays the answer by the timeout, not forever."""
    manager, inner = Manager(), Inner()
    resource, clock = lookup(manager, inner, timeout=2.5)
    req = request(f"/ws/{UNKNOWN}")
    resource.render(req)
    clock.advance(2.4)
    assert inner.rendered == []
    clock.advance(0.2)
    assert inner.rendered == [f"/ws/{UNKNOWN}".encode()] and req.finished == 1


def test_a_failed_reconciliation_still_lets_the_api_answer() -> None:
    """The API answers (a 404 of its own, say) even when the reconciliation failed."""
    manager, inner = Manager(), Inner()
    manager.result = fail(RuntimeError("engine down"))
    resource, _ = lookup(manager, inner)
    req = request(f"/sandboxes/{UNKNOWN}")
    assert resource.render(req) is NOT_DONE_YET
    assert inner.rendered == [f"/sandboxes/{UNKNOWN}".encode()]
    assert req.written == [b"inner"]


def test_a_client_gone_during_the_wait_is_not_answered() -> None:
    """A request whose client disconnected while waiting is not rendered."""
    manager, inner = Manager(), Inner()
    resource, _ = lookup(manager, inner)
    req = request(f"/sandboxes/{UNKNOWN}")
    resource.render(req)
    req._disconnected = True
    manager.reconciles[0].callback(None)
    assert inner.rendered == [] and req.written == []


def test_an_api_answer_that_is_not_done_yet_is_left_to_the_api() -> None:
    """If the API answers later itself (NOT_DONE_YET), nothing is written or finished here."""
    manager, inner = Manager(), Inner(answer=NOT_DONE_YET)
    manager.result = succeed(None)
    resource, _ = lookup(manager, inner)
    req = request(f"/sandboxes/{UNKNOWN}")
    resource.render(req)
    assert len(inner.rendered) == 1 and req.written == [] and req.finished == 0


def test_a_keyed_create_waits_for_a_reconciliation_and_an_unkeyed_one_does_not() -> None:
    """``POST /sandboxes`` with an Idempotency-Key looks first (its first try may have gone
    to another gateway); without one, or another method, it goes straight through."""
    manager, inner = Manager(), Inner()
    resource, _ = lookup(manager, inner)
    assert resource.render(request("/sandboxes", b"POST")) == b"inner"
    assert resource.render(request("/sandboxes", b"GET", idempotency_key="k")) == b"inner"
    assert manager.reconciles == []
    keyed = request("/sandboxes?x=1", b"POST", idempotency_key="k")
    assert resource.render(keyed) is NOT_DONE_YET
    assert len(manager.reconciles) == 1


def test_nothing_waits_before_the_gateway_has_recovered() -> None:
    """Until start-up recovery is done the API answers 503 anyway: no reconciliation."""
    manager, inner = Manager(recovered=False), Inner()
    resource, _ = lookup(manager, inner)
    assert resource.render(request(f"/sandboxes/{UNKNOWN}")) == b"inner"
    assert resource.render(request("/sandboxes", b"POST", idempotency_key="k")) == b"inner"
    assert manager.reconciles == []


def test_only_sandbox_and_websocket_paths_name_a_sandbox() -> None:
    """The id is the third segment of an absolute ``/sandboxes/`` or ``/ws/`` path (query
    ignored), and only a valid id counts."""
    assert named_sandbox(f"/sandboxes/{UNKNOWN}?path=/x/y".encode()) == UNKNOWN
    assert named_sandbox(f"/ws/{UNKNOWN}/more".encode()) == UNKNOWN
    assert named_sandbox(f"/previews/{UNKNOWN}".encode()) is None
    assert named_sandbox(f"sandboxes/{UNKNOWN}".encode()) is None
    assert named_sandbox(b"/sandboxes/\xff" + UNKNOWN.encode()[1:]) is None
    assert named_sandbox(b"/sandboxes/not-an-id") is None
    assert named_sandbox(b"/ws") is None
