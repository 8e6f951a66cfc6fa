"""The OpenAPI document (``twistedgw.web.openapi``): valid, complete, served, and true to the
messages the gateway and its agents build."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_twisted
from openapi_spec_validator import validate
from treq.testing import StubTreq

from twistedgw import protocol
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.testing.rest import request
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator
from twistedgw.web.openapi import (
    CLIENT_MESSAGES,
    DOCUMENT,
    DOCUMENT_BYTES,
    EXCLUDED_PATHS,
    SERVER_MESSAGES,
    SNAPSHOT_PATH,
    build_document,
    main,
    snapshot_text,
)
from twistedgw.web.site import PUBLIC_PATHS

#: Methods werkzeug adds by itself (HEAD with GET, OPTIONS nowhere here).
_IMPLIED = {"HEAD", "OPTIONS"}


def klein_routes(app: Any = GatewayAPI.app) -> set[tuple[str, str]]:
    """``(openapi path, method)`` of every route in a Klein app's table."""
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in _IMPLIED:
                routes.add((path, method.lower()))
    return routes


def document_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


def test_every_route_has_a_spec_entry_and_every_entry_a_route() -> None:
    """The Klein route table and the document's paths name the same (path, method) pairs,
    apart from the explicit exclusion list; a route added without a spec entry fails here."""
    routes = {r for r in klein_routes() if r[0] not in EXCLUDED_PATHS}
    assert routes == document_routes(DOCUMENT)


def test_a_route_without_an_entry_is_caught() -> None:
    """The comparison above notices a route the document lacks (a Klein app with one more)."""
    from klein import Klein

    app = Klein()
    app.url_map.converters.update(GatewayAPI.app.url_map.converters)
    for rule in GatewayAPI.app.url_map.iter_rules():
        app.route(rule.rule, methods=list(rule.methods or ()))(lambda request: b"")
    app.route("/sandboxes/<sandbox_id>/undocumented", methods=["POST"])(lambda request: b"")
    missing = {r for r in klein_routes(app) if r[0] not in EXCLUDED_PATHS}
    missing -= document_routes(DOCUMENT)
    assert missing == {("/sandboxes/{sandbox_id}/undocumented", "post")}


def test_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document, and it says 3.1."""
    validate(build_document())
    assert DOCUMENT["openapi"].startswith("3.1")
    assert json.loads(DOCUMENT_BYTES) == DOCUMENT


REPO = Path(__file__).resolve().parents[1]


def test_document_is_the_reviewed_snapshot() -> None:
    """The built document is exactly ``docs/openapi.json``, the reviewed copy in the repository
    (clients generate code from it): any change to a path, schema, description, tag or example
    must come with a rewritten snapshot (``python -m twistedgw.web.openapi``) shown in the
    diff. The first differing top-level key and path are named on failure."""
    snapshot = json.loads((REPO / SNAPSHOT_PATH).read_text(encoding="utf-8"))
    built = build_document()
    for key in sorted(set(snapshot) | set(built)):
        if key == "paths" and key in snapshot and key in built:
            for path in sorted(set(snapshot["paths"]) | set(built["paths"])):
                assert built["paths"].get(path) == snapshot["paths"].get(path), path
        if key == "components" and key in snapshot and key in built:
            for name in sorted(set(snapshot[key]["schemas"]) | set(built[key]["schemas"])):
                assert built[key]["schemas"].get(name) == snapshot[key]["schemas"].get(name), name
        assert built.get(key) == snapshot.get(key), key
    assert snapshot_text(built) == (REPO / SNAPSHOT_PATH).read_text(encoding="utf-8")


def test_served_document_is_the_built_one() -> None:
    """What ``/openapi.json`` serves (``DOCUMENT_BYTES``) decodes to the built document."""
    assert json.loads(DOCUMENT_BYTES) == build_document() == DOCUMENT


def test_snapshot_writer_writes_the_built_document(tmp_path: Path) -> None:
    """``python -m twistedgw.web.openapi PATH`` writes the sorted, indented document."""
    target = tmp_path / "openapi.json"
    assert main([str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    assert text == snapshot_text(build_document())
    assert text.endswith("}\n") and text.startswith('{\n  "components": {')
    assert json.loads(text) == build_document()


def test_every_operation_documents_the_error_shape() -> None:
    """Every JSON error answer of every operation is the ``Error`` (or ``NotFound``) shape,
    and 401 and 404 are documented wherever a token or an id can be wrong."""
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            for status, answer in responses.items():
                if int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema["$ref"].rsplit("/", 1)[1] in ("Error", "NotFound"), (
                        path,
                        method,
                        status,
                    )
            if "{sandbox_id}" in path:
                assert "404" in responses, (path, method)
            if op.get("security") != []:
                assert "401" in responses, (path, method)


def _schema(name: str) -> dict[str, Any]:
    """A component schema that resolves its ``$ref``s against the whole document."""
    return {"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]}


def _valid(name: str, instance: Any) -> None:
    jsonschema.validate(instance, _schema(name), cls=jsonschema.Draft202012Validator)


def test_websocket_messages_match_what_the_protocol_module_builds() -> None:
    """A result, a command error and an output chunk as ``twistedgw.protocol`` builds them
    satisfy their schemas; a result without ``returncode`` does not."""
    now = datetime(2026, 11, 26)
    result = protocol.result_message("r-1", "ls", 0, "out", "", 1.5, now=now, pid=7)
    _valid("WsResult", result)
    _valid("WsError", protocol.command_error("r-2", "ls", "nope", "invalid_command", now=now))
    _valid(
        "WsOutput", {"type": "output", "request_id": "r", "stream": "pty", "data": "x", "offset": 0}
    )
    del result["returncode"]
    with pytest.raises(jsonschema.ValidationError):
        _valid("WsResult", result)


def test_websocket_message_lists_name_schemas_that_exist() -> None:
    """``x-websocket`` lists every client and server message, each defined in components."""
    schemas = DOCUMENT["components"]["schemas"]
    listed = DOCUMENT["x-websocket"]
    for side, names in (("client", CLIENT_MESSAGES), ("server", SERVER_MESSAGES)):
        assert [ref["$ref"].rsplit("/", 1)[1] for ref in listed[side]] == list(names)
        for name in names:
            assert name in schemas
    # The PTY messages of issue 16 are described.
    assert {"WsPty", "WsResize"} <= set(CLIENT_MESSAGES)


def test_create_options_name_every_option_the_gateway_accepts() -> None:
    """The create body's schema lists exactly the fields ``settings_from_body`` (and the
    route's ``from_snapshot``) take: an option added there must be described here."""
    from twistedgw.lifecycle.options import EGRESS_AND_RESOURCE_FIELDS

    accepted = {"idle_timeout", "max_lifetime", "env", "metadata", "network", "template"}
    accepted |= set(EGRESS_AND_RESOURCE_FIELDS) | {"from_snapshot"}
    assert set(DOCUMENT["components"]["schemas"]["CreateOptions"]["properties"]) == accepted


@pytest_twisted.ensureDeferred
async def test_openapi_json_is_served_without_a_token(manager: SandboxManager) -> None:
    """``GET /openapi.json`` answers the document as JSON, also on a token gateway (the
    edge lets it through like /healthz), while other routes still need the token."""
    api = GatewayAPI(manager, authenticator=Authenticator.from_tokens(["s3cret"]))
    treq = StubTreq(api.resource())
    code, headers, body = await request(treq, "GET", "/openapi.json")
    assert code == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(body) == DOCUMENT
    assert b"/openapi.json" in PUBLIC_PATHS
    code, _, _ = await request(treq, "GET", "/sandboxes")
    assert code == 401
