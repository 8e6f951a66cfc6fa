"""File uploads at the HTTP edge, in memory: what is refused from the request headers alone,
before any body byte is read or any agent is contacted (``FileRoutes.begin_upload``)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.web.server import Site

from tests.test_edge import TOKEN, Conn, request
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.proxy.files import AgentFiles
from twistedgw.sandbox import SandboxSettings
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator, owner_id
from twistedgw.web.errors import APIError
from twistedgw.web.files import FileRoutes, agent_target
from twistedgw.web.site import LOOPBACK_HOSTS, EdgePolicy, make_site


def files_site(manager: SandboxManager, clock: Clock, tokens: list[str] | None = None) -> Site:
    auth = Authenticator.from_tokens(tokens or [])
    routes = FileRoutes(manager, auth, AgentFiles(clock), max_upload=1000)
    api = GatewayAPI(manager, authenticator=auth, files=routes)
    return make_site(api, policy=EdgePolicy(authenticator=auth, allowed_hosts=LOOPBACK_HOSTS))


def upload(conn: Conn, path: str, length: int, *headers: str) -> None:
    conn.send(request("PUT", path, f"Content-Length: {length}", *headers))


@pytest_twisted.ensureDeferred
async def test_unknown_sandbox_is_404_before_the_body(
    manager: SandboxManager, clock: Clock
) -> None:
    """An upload to a sandbox that does not exist is answered 404 from the headers, and the
    connection closes: the body is never waited for."""
    conn = Conn(files_site(manager, clock), clock)
    upload(conn, "/sandboxes/" + "0" * 32 + "/files?path=x", 500)
    status, _, body = conn.response()
    assert status == 404
    assert "not found" in body["error"]
    assert conn.transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_over_max_upload_is_413_before_the_body(
    manager: SandboxManager, clock: Clock
) -> None:
    """A Content-Length over --max-upload is 413 at once, for files and for tars."""
    sandbox = await manager.create()
    for route in ("files", "files/archive"):
        conn = Conn(files_site(manager, clock), clock)
        upload(conn, f"/sandboxes/{sandbox.sandbox_id}/{route}?path=x", 1001)
        status, _, body = conn.response()
        assert status == 413, route
        assert "--max-upload" in body["error"]


@pytest_twisted.ensureDeferred
async def test_paused_sandbox_and_bad_paths_are_refused(
    manager: SandboxManager, clock: Clock
) -> None:
    """A paused sandbox takes no upload (409); a missing or NUL path is 400."""
    sandbox = await manager.create()
    base = f"/sandboxes/{sandbox.sandbox_id}/files"
    for target, wanted in ((base, 400), (base + "?path=", 400), (base + "?path=a%00b", 400)):
        conn = Conn(files_site(manager, clock), clock)
        upload(conn, target, 10)
        assert conn.response()[0] == wanted, target
    await manager.pause(sandbox.sandbox_id)
    conn = Conn(files_site(manager, clock), clock)
    upload(conn, base + "?path=x", 10)
    status, _, body = conn.response()
    assert status == 409
    assert "paused" in body["error"]


@pytest_twisted.ensureDeferred
async def test_another_tokens_sandbox_is_404_for_uploads(
    manager: SandboxManager, clock: Clock
) -> None:
    """On a token gateway an upload without a token is 401, and with a token that does not
    own the sandbox 404, both from the headers."""
    other = "o" * 32
    sandbox = await manager.create(SandboxSettings(idle_timeout=100, owner=owner_id(TOKEN)))
    site = files_site(manager, clock, [TOKEN, other])
    path = f"/sandboxes/{sandbox.sandbox_id}/files?path=x"
    conn = Conn(site, clock)
    upload(conn, path, 10)
    assert conn.response()[0] == 401
    conn = Conn(site, clock)
    upload(conn, path, 10, f"Authorization: Bearer {other}")
    assert conn.response()[0] == 404


@pytest_twisted.ensureDeferred
async def test_non_ascii_query_values_get_an_answer(manager: SandboxManager, clock: Clock) -> None:
    """Percent-escaped non-ASCII query values (``?path=%C2%80``, found by schemathesis) are
    read as UTF-8 bytes: an unknown sandbox is a JSON 404 and a real one gets past the query
    (413 here, from the size cap); before, parsing raised and the connection dropped without
    any answer."""
    conn = Conn(files_site(manager, clock), clock)
    upload(conn, "/sandboxes/0/files/archive?path=%C2%80", 0)
    status, _, body = conn.response()
    assert status == 404 and "not found" in body["error"]
    sandbox = await manager.create()
    conn = Conn(files_site(manager, clock), clock)
    upload(conn, f"/sandboxes/{sandbox.sandbox_id}/files?path=%C3%A9&mkdirs=%C2%80", 1001)
    assert conn.response()[0] == 413


@pytest.mark.parametrize("second", [b"", b"a\x00b"])
def test_every_path_value_is_checked_not_only_the_first(second: bytes) -> None:
    """``?path=ok&path=`` (or a NUL in a later value): 400 before anything is asked of the
    agent; the agent's target keeps the query sorted, without the token."""
    args = {b"path": [b"ok", second]}
    with pytest.raises(APIError) as refused:
        agent_target(b"/list", args)
    assert (refused.value.status, refused.value.message) == (
        400,
        "'path' must be a non-empty path without NUL",
    )
    target = agent_target(b"/list", {b"path": [b"a b"], b"depth": [b"2"], b"access_token": [b"t"]})
    assert target == b"/files/list?depth=2&path=a+b"
    assert agent_target(b"", {}) == b"/files"
