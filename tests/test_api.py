"""The REST API over an in-memory runtime, through treq's StubTreq (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import request


async def call(treq: StubTreq, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    """A JSON call (JSON bodies say so) whose answer must be JSON."""
    if "data" in kwargs:
        kwargs.setdefault("headers", {"Content-Type": "application/json"})
    code, headers, body = await request(treq, method, path, **kwargs)
    assert headers.getRawHeaders(b"content-type") == [b"application/json"], body
    return code, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_create_get_list_delete(treq: StubTreq, runtime: FakeRuntime) -> None:
    """The seed flow over REST, with exactly the seed's fields and words."""
    code, created = await call(treq, "POST", "/sandboxes")
    assert code == 200
    assert set(created) == {"sandbox_id", "status", "message"}
    assert created["status"] == "created"
    assert created["message"] == "Sandbox container created successfully"
    sandbox_id = created["sandbox_id"]
    assert len(sandbox_id) == 32

    code, info = await call(treq, "GET", f"/sandboxes/{sandbox_id}")
    assert code == 200
    assert set(info) == {"sandbox_id", "status", "created_at", "ip_address"}
    assert info["ip_address"].startswith("172.17.")
    assert isinstance(info["created_at"], float)

    code, listing = await call(treq, "GET", "/sandboxes")
    assert code == 200
    assert listing == [info]

    code, deleted = await call(treq, "DELETE", f"/sandboxes/{sandbox_id}")
    assert code == 200
    assert deleted == {"message": f"Sandbox {sandbox_id} successfully deleted"}
    assert runtime.containers == {}

    code, error = await call(treq, "GET", f"/sandboxes/{sandbox_id}")
    assert code == 404
    assert sandbox_id in error["error"]


@pytest.mark.parametrize(
    "sandbox_id", ["nope", "..", "%2e%2e", "a" * 5000, "%C3%A9", "0" * 32, "abcd1234"]
)
@pytest_twisted.ensureDeferred
async def test_unknown_and_odd_ids_are_404(treq: StubTreq, sandbox_id: str) -> None:
    """Unknown, malformed or path-like ids give a JSON 404 for GET and DELETE."""
    for method in ("GET", "DELETE"):
        code, error = await call(treq, method, f"/sandboxes/{sandbox_id}")
        assert code == 404
        assert "error" in error


@pytest_twisted.ensureDeferred
async def test_a_double_slash_is_a_308_with_a_relative_location(treq: StubTreq) -> None:
    """Routing merges ``//`` in a path: the answer is a 308 whose Location (relative, no host
    from the request) names the merged path, query kept, which then answers as usual."""
    sandbox = "0" * 32
    response = await treq.get(
        f"http://127.0.0.1:8003/sandboxes//{sandbox}/events?since=1", allow_redirects=False
    )
    assert response.code == 308
    location = f"/sandboxes/{sandbox}/events?since=1"
    assert response.headers.getRawHeaders(b"Location") == [location.encode()]
    assert json.loads(await response.content()) == {
        "error": f"moved to {location}",
        "location": location,
    }
    code, _ = await call(treq, "GET", location)
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_bad_bodies_are_400(treq: StubTreq, runtime: FakeRuntime) -> None:
    """A create with a body that is not a JSON object is refused, creating nothing."""
    for body in (b"{not json", b"[1]", b"\xff", b"null", b"[" * 50_000):
        code, error = await call(treq, "POST", "/sandboxes", data=body)
        assert code == 400, body
        assert "error" in error
    assert runtime.containers == {}
    code, _ = await call(treq, "POST", "/sandboxes", data=b"{}")
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413(treq: StubTreq) -> None:
    """A huge create body is refused with 413 before parsing."""
    code, error = await call(treq, "POST", "/sandboxes", data=b" " * (65 * 1024))
    assert code == 413
    assert "larger" in error["error"]


@pytest_twisted.ensureDeferred
async def test_docker_down_is_503_json(treq: StubTreq, runtime: FakeRuntime) -> None:
    """When the engine is unreachable, create and delete answer 503 JSON and lose nothing."""
    _, created = await call(treq, "POST", "/sandboxes")
    runtime.available = False
    code, error = await call(treq, "POST", "/sandboxes")
    assert code == 503
    assert "Docker" in error["error"]
    code, error = await call(treq, "DELETE", f"/sandboxes/{created['sandbox_id']}")
    assert code == 503
    # The sandbox is still known: a failed delete loses nothing.
    code, _ = await call(treq, "GET", f"/sandboxes/{created['sandbox_id']}")
    assert code == 200
    runtime.available = True
    code, _ = await call(treq, "DELETE", f"/sandboxes/{created['sandbox_id']}")
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_unknown_route_and_method_are_json(treq: StubTreq) -> None:
    """Routing errors are JSON too."""
    code, error = await call(treq, "GET", "/nope")
    assert code == 404
    assert "error" in error
    code, error = await call(treq, "PUT", "/sandboxes")
    assert code == 405
    assert "error" in error


@pytest_twisted.ensureDeferred
async def test_ws_route_refuses_unknown_sandbox(treq: StubTreq) -> None:
    """/ws/{id} for an unknown id is a JSON 404 before any upgrade."""
    code, error = await call(treq, "GET", "/ws/" + "f" * 32)
    assert code == 404
    assert "not found" in error["error"]


@pytest_twisted.ensureDeferred
async def test_integers_beyond_float_range_are_400(treq: StubTreq, runtime: FakeRuntime) -> None:
    """``max_lifetime``, ``idle_timeout`` and keepalive's ``extend_by`` written as integers
    beyond float range are a 400, not a 500."""
    huge = b"1" + b"0" * 400
    for field in (b"max_lifetime", b"idle_timeout"):
        code, error = await call(treq, "POST", "/sandboxes", data=b'{"%s": %s}' % (field, huge))
        assert code == 400 and "range" in error["error"], field
    assert runtime.containers == {}
    code, created = await call(treq, "POST", "/sandboxes")
    path = f"/sandboxes/{created['sandbox_id']}/keepalive"
    code, error = await call(treq, "POST", path, data=b'{"extend_by": %s}' % huge)
    assert code == 400 and "range" in error["error"]


@pytest_twisted.ensureDeferred
async def test_malformed_sandbox_ids_never_reach_a_handler(
    treq: StubTreq, manager: SandboxManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route converter answers a malformed id with the same JSON 404 as an unknown id,
    on every sandbox route, before any handler (or the manager) sees it."""
    looked_up: list[str] = []
    real_lookup = manager.lookup

    def lookup(sandbox_id: str, owner: str | None = None) -> Any:
        looked_up.append(sandbox_id)
        return real_lookup(sandbox_id, owner)

    monkeypatch.setattr(manager, "lookup", lookup)
    for method, path in [
        ("GET", "/sandboxes/NOT-AN-ID"),
        ("DELETE", "/sandboxes/NOT-AN-ID"),
        ("POST", "/sandboxes/NOT-AN-ID/keepalive"),
        ("GET", "/ws/NOT-AN-ID"),
    ]:
        code, error = await call(treq, method, path)
        assert (code, error) == (404, {"error": "Sandbox NOT-AN-ID not found"}), (method, path)
    assert looked_up == []
    code, _ = await call(treq, "GET", "/sandboxes/" + "f" * 32)
    assert code == 404 and looked_up == ["f" * 32]


@pytest.mark.parametrize(
    "name", ["A=B", "PATH=/x", "A B", "A\n", "A\x00", "1A", "", "Ä", "A-B", "X" * 257]
)
@pytest_twisted.ensureDeferred
async def test_env_names_the_agent_would_refuse_are_400_at_creation(
    treq: StubTreq, runtime: FakeRuntime, name: str
) -> None:
    """An ``env`` name that is not a whole shell variable name is refused when the sandbox is
    created (400, naming ``env``), so it never reaches the agent, which would exit on it and
    leave the client a 503 after the ready timeout."""
    code, body = await call(treq, "POST", "/sandboxes", json={"env": {name: "x"}})
    assert code == 400 and "'env' name" in body["error"]
    assert runtime.containers == {}


@pytest_twisted.ensureDeferred
async def test_whole_env_names_are_accepted_at_creation(
    treq: StubTreq, manager: SandboxManager
) -> None:
    """Names of letters, digits and ``_`` (not starting with a digit, up to 256) are fine."""
    env = {"A": "1", "_x9": "2", "Y" * 256: "3"}
    code, created = await call(treq, "POST", "/sandboxes", json={"env": env})
    assert code == 200
    assert manager.lookup(created["sandbox_id"]).settings.env == env


@pytest_twisted.ensureDeferred
async def test_events_of_a_paused_sandbox_are_409_at_once(
    treq: StubTreq, manager: SandboxManager
) -> None:
    """A paused sandbox's agent is frozen: its event stream is refused 409 at once (found by
    schemathesis: it waited for the agent's recovery, then answered 503)."""
    sandbox = await manager.create()
    await manager.pause(sandbox.sandbox_id)
    code, error = await call(treq, "GET", f"/sandboxes/{sandbox.sandbox_id}/events")
    assert code == 409
    assert "paused" in error["error"]
