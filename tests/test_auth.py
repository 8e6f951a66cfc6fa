"""API tokens: authentication, ownership, and keeping tokens out of logs."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.web.test.requesthelper import DummyRequest

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.testing.rest import BASE, call
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator, Unauthorized, owner_id, read_tokens
from twistedgw.web.site import access_log_line

A = "token-alpha-0123456789"
B = "token-bravo-0123456789"


def test_open_mode_has_no_owner() -> None:
    """Without tokens everyone is the anonymous owner."""
    assert Authenticator.from_tokens([]).owner_for(None, None) is None


def test_tokens_are_checked() -> None:
    """A listed token (header or query) gives its owner id; anything else is refused."""
    auth = Authenticator.from_tokens([A, B])
    assert auth.owner_for(f"Bearer {A}", None) == owner_id(A)
    assert auth.owner_for(f"bearer {B}", None) == owner_id(B)
    assert auth.owner_for(None, A) == owner_id(A)
    assert owner_id(A) != owner_id(B) and A not in owner_id(A)
    for header, query in [
        (None, None),
        ("Bearer nope", None),
        (f"Basic {A}", None),
        ("Bearer", None),
        (None, A[:-1]),
    ]:
        with pytest.raises(Unauthorized):
            auth.owner_for(header, query)


def test_read_tokens(tmp_path: Path) -> None:
    """Tokens come from a file (comments skipped) and the environment; weak ones are refused."""
    path = tmp_path / "tokens"
    path.write_text(f"# team tokens\n{A}\n\n")
    assert read_tokens(path, {"TWISTEDGW_TOKENS": f" {B} ,"}) == [A, B]
    with pytest.raises(ValueError):
        read_tokens(None, {"TWISTEDGW_TOKENS": "short"})


@pytest_twisted.ensureDeferred
async def test_routes_need_a_token_and_sandboxes_belong_to_it(manager: SandboxManager) -> None:
    """Every route answers 401 JSON without a token; another token cannot list, see, keep
    alive or delete a sandbox (404, as if it did not exist)."""
    treq = StubTreq(GatewayAPI(manager, authenticator=Authenticator.from_tokens([A, B])).resource())
    for method, path in [
        ("POST", "/sandboxes"),
        ("GET", "/sandboxes"),
        ("GET", "/sandboxes/" + "0" * 32),
        ("DELETE", "/sandboxes/" + "0" * 32),
    ]:
        code, body = await call(treq, method, path, None)
        assert code == 401 and "token" in body["error"]
        code, body = await call(treq, method, path, "wrong-token-0123456789")
        assert code == 401
    code, created = await call(treq, "POST", "/sandboxes", A)
    assert code == 200
    sandbox_id = created["sandbox_id"]
    assert [s["sandbox_id"] for s in (await call(treq, "GET", "/sandboxes", A))[1]] == [sandbox_id]
    assert (await call(treq, "GET", "/sandboxes", B))[1] == []
    for method, path in [
        ("GET", f"/sandboxes/{sandbox_id}"),
        ("POST", f"/sandboxes/{sandbox_id}/keepalive"),
        ("GET", f"/ws/{sandbox_id}"),
        ("DELETE", f"/sandboxes/{sandbox_id}"),
    ]:
        code, body = await call(treq, method, path, B)
        assert code == 404, (method, path)
    code, _ = await call(treq, "GET", f"/sandboxes/{sandbox_id}?access_token={A}", None)
    assert code == 200
    code, _ = await call(treq, "DELETE", f"/sandboxes/{sandbox_id}", A)
    assert code == 200
    # Even the removal record is private to the owner.
    code, body = await call(treq, "GET", f"/sandboxes/{sandbox_id}", B)
    assert code == 404 and "reason" not in body
    code, body = await call(treq, "GET", f"/sandboxes/{sandbox_id}", A)
    assert body["reason"] == "deleted"


@pytest_twisted.ensureDeferred
async def test_idempotency_keys_are_per_owner(manager: SandboxManager) -> None:
    """The same Idempotency-Key from two tokens makes two sandboxes."""
    treq = StubTreq(GatewayAPI(manager, authenticator=Authenticator.from_tokens([A, B])).resource())
    _, a = await call(treq, "POST", "/sandboxes", A, headers={"Idempotency-Key": "k"})
    response = await treq.post(
        BASE + "/sandboxes", headers={"Idempotency-Key": "k", "Authorization": f"Bearer {B}"}
    )
    b = json.loads(await response.content())
    assert a["sandbox_id"] != b["sandbox_id"]


def test_access_log_has_no_query_string() -> None:
    """The access log never carries the query string, where a browser's token travels."""
    request = DummyRequest([b"sandboxes"])
    request.uri = f"/sandboxes?access_token={A}".encode()
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 10
    line = access_log_line("[now]", request)
    assert A not in line
    assert '"GET /sandboxes HTTP/1.1" 200 10' in line


def test_access_log_line_survives_bytes_that_are_not_ascii() -> None:
    """A request line and user agent with non-ASCII bytes (any client can send them) give a
    log line with replacement characters, not an exception; quotes in the agent are made
    single so the line stays parseable."""
    request = DummyRequest([b"x"])
    request.uri = b"/caf\xc3\xa9?q=1"
    request.method = b"G\xffT"
    request.clientproto = b"HTTP/1.\xff"
    request.code = 404
    request.sentLength = 0
    request.requestHeaders.setRawHeaders(b"user-agent", [b'bot "v1" \xc3\xa9'])
    line = access_log_line("[now]", request)
    assert '"G\ufffdT /caf\ufffd\ufffd HTTP/1.\ufffd" 404 - "-" "bot \'v1\' \ufffd\ufffd"' in line


def test_a_wrong_header_token_is_refused_even_with_a_valid_query_token() -> None:
    """The header wins: a wrong bearer token is refused even when ``access_token`` in the
    query is valid (one credential per request, never "any of them")."""
    auth = Authenticator.from_tokens([A, B])
    with pytest.raises(Unauthorized, match="invalid"):
        auth.owner_for("Bearer wrong-token-0123456789", A)
    # A header that is not a bearer token is not a credential: the query token counts.
    assert auth.owner_for(f"Basic {B}", A) == owner_id(A)
    assert auth.owner_for(f"Bearer {B}", A) == owner_id(B)


@pytest_twisted.ensureDeferred
async def test_rest_refuses_a_wrong_header_token_with_a_valid_query_token(
    manager: SandboxManager,
) -> None:
    """Over REST too: a valid ``access_token`` does not rescue a wrong Authorization header."""
    treq = StubTreq(GatewayAPI(manager, authenticator=Authenticator.from_tokens([A])).resource())
    code, body = await call(treq, "GET", f"/sandboxes?access_token={A}", "wrong-token-0123456789")
    assert code == 401 and "invalid" in body["error"]
    code, _ = await call(treq, "GET", f"/sandboxes?access_token={A}", None)
    assert code == 200


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timing attack cannot be seen in a unit test, so this pins the primitive: every
    configured token is compared with ``hmac.compare_digest``, even after a match."""
    import twistedgw.web.auth as auth_module

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", recording)
    auth = Authenticator.from_tokens([A, B])
    assert auth.owner_for(f"Bearer {A}", None) == owner_id(A)
    assert compared == [(A.encode(), A.encode()), (A.encode(), B.encode())]
    compared.clear()
    with pytest.raises(Unauthorized):
        auth.owner_for(None, "nope-nope-nope-nope")
    assert len(compared) == 2


@pytest_twisted.ensureDeferred
async def test_healthz_hides_counts_when_tokens_are_on(manager: SandboxManager) -> None:
    """``/healthz`` needs no token, so with tokens configured it says only whether the gateway
    is up and ready, never how many sandboxes or pool containers it has; in open mode it
    shows the counts."""
    await manager.create()
    closed = StubTreq(GatewayAPI(manager, authenticator=Authenticator.from_tokens([A])).resource())
    code, body = await call(closed, "GET", "/healthz")
    assert code == 200 and body == {"status": "ok", "ready": True}
    opened = StubTreq(GatewayAPI(manager).resource())
    code, body = await call(opened, "GET", "/healthz")
    assert code == 200
    assert body["sandboxes"] == 1 and body["pool"] == manager.pool_status()


def test_tokens_of_16_characters_are_the_shortest_accepted(tmp_path: Path) -> None:
    """16 characters is enough, 15 is not; a token with a space inside is refused; the error
    says what a token must be."""
    assert read_tokens(None, {"TWISTEDGW_TOKENS": "x" * 16}) == ["x" * 16]
    with pytest.raises(ValueError, match=r"^API tokens must be at least 16 characters"):
        read_tokens(None, {"TWISTEDGW_TOKENS": "x" * 15})
    path = tmp_path / "tokens"
    path.write_text("two words-0123456789\n")
    with pytest.raises(ValueError, match="without spaces"):
        read_tokens(path, {})


def test_owner_ids_are_stable_across_releases() -> None:
    """Owner ids are stored in container labels and the state file: a token's id must stay
    what earlier releases derived (24 hex digits of a domain-separated SHA-256), or a
    restarted gateway would hide every sandbox from its creator."""
    assert owner_id("sekrit-token") == "fe91f7eedb8f2d840cad17b2"


def test_the_two_refusals_say_which_and_spaces_after_bearer_are_allowed() -> None:
    """No token at all and a wrong token are told apart in the 401's message; one or more
    spaces may follow ``Bearer`` (RFC 7235's 1*SP), in any case of the scheme."""
    auth = Authenticator.from_tokens([A])
    with pytest.raises(Unauthorized) as missing:
        auth.owner_for(None, None)
    assert str(missing.value) == "missing API token (Authorization: Bearer ...)"
    with pytest.raises(Unauthorized) as wrong:
        auth.owner_for(f"Bearer {B}", None)
    assert str(wrong.value) == "invalid API token"
    assert auth.owner_for(f"Bearer   {A}", None) == owner_id(A)
    assert auth.owner_for(f"bearer {A}", None) == owner_id(A)


@pytest_twisted.ensureDeferred
async def test_no_sandbox_route_acts_on_another_tokens_sandbox(manager: SandboxManager) -> None:
    """Pause, resume, events, snapshots, files and preview URLs of another token's sandbox are
    a 404, as if it did not exist, and change nothing (it is not paused); its owner gets 200."""
    treq = StubTreq(GatewayAPI(manager, authenticator=Authenticator.from_tokens([A, B])).resource())
    code, created = await call(treq, "POST", "/sandboxes", A)
    sandbox_id = created["sandbox_id"]
    base = f"/sandboxes/{sandbox_id}"
    for method, path in [
        ("POST", f"{base}/pause"),
        ("POST", f"{base}/resume"),
        ("GET", f"{base}/events"),
        ("POST", f"{base}/snapshots"),
        ("GET", f"{base}/files?path=/etc/hostname"),
        ("GET", f"{base}/files/list?path=/"),
        ("POST", f"{base}/files/mkdir?path=/tmp/x"),
        ("POST", f"{base}/ports/8000/url"),
    ]:
        code, body = await call(treq, method, path, B)
        assert code == 404, (method, path, body)
    assert manager.lookup(sandbox_id).paused is False
    code, paused = await call(treq, "POST", f"{base}/pause", A)
    assert code == 200 and paused["paused"] is True
    code, _ = await call(treq, "POST", f"{base}/resume", B)
    assert code == 404 and manager.lookup(sandbox_id).paused is True
    code, resumed = await call(treq, "POST", f"{base}/resume", A)
    assert code == 200 and resumed["paused"] is False
