"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Built here as a Python dict (once, at import), next to nothing else: ``tests/test_openapi.py``
compares its paths and methods with the Klein route table (a route without an entry here
fails the suite), checks it with openapi-spec-validator, and the integration tests validate
the gateway's real answers against it and fuzz it with schemathesis.

The WebSocket messages of PROTOCOL.md are JSON Schemas in ``components.schemas`` (``Ws*``),
gathered under ``x-websocket`` (``client`` and ``server`` messages) and referenced from the
``/ws/{sandbox_id}`` operation.
"""

from __future__ import annotations

import json
from typing import Any

from twistedgw.protocol import MAX_EVENT_ID_LENGTH
from twistedgw.proxy.ports import MAX_URL_TTL

OPENAPI_VERSION = "3.1.0"

#: Routes that are not part of the API contract (static pages), and need no entry here.
EXCLUDED_PATHS: frozenset[str] = frozenset({"/ui", "/ui/", "/ui/{__rest__}"})

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), 'an error: `{"error": message}`')

#: Answers the HTTP edge (``twistedgw.web.site``) or the error table may give on any route.
_COMMON_ERRORS: dict[str, Schema] = {
    "400": _json(_ref("Error"), "bad request (JSON, option, header or path encoding)"),
    "401": {
        "description": "missing or wrong token (with tokens configured)",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": _ref("Error")}},
    },
    "403": _json(_ref("Error"), "a browser Origin that is not allowed"),
    "408": _json(_ref("Error"), "the body did not arrive within --body-timeout"),
    "413": _json(_ref("Error"), "a body larger than the route takes"),
    "415": _json(_ref("Error"), "a body that is not application/json"),
    "421": _json(_ref("Error"), "a Host this gateway does not serve"),
    "503": {
        "description": "recovering after a restart, Docker unreachable, or too many connections",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": _ref("Error")}},
    },
}

_SANDBOX_ID = {
    "name": "sandbox_id",
    "in": "path",
    "required": True,
    "description": "32 hex digits; anything else is a 404",
    "schema": {"type": "string"},
}
_DETAILS = {
    "name": "details",
    "in": "query",
    "required": False,
    "description": "`true` (or 1, yes) adds the fields beyond the seed's",
    "schema": {"type": "string"},
}
_ACCESS_TOKEN = {
    "name": "access_token",
    "in": "query",
    "required": False,
    "description": "the API token, for clients that cannot send a header (browsers' WebSocket)",
    "schema": {"type": "string"},
}


def _query(name: str, description: str, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


def _op(
    summary: str,
    responses: dict[str, Schema],
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    tags: tuple[str, ...] = ("sandboxes",),
    public: bool = False,
    common: bool = True,
) -> Schema:
    op: Schema = {"summary": summary, "tags": list(tags), "responses": {}}
    if common:
        op["responses"].update(_COMMON_ERRORS)
    op["responses"].update(responses)
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    if public:
        op["security"] = []
    return op


def _sandbox_op(
    summary: str, responses: dict[str, Schema], extra: list[Schema] | None = None, **kw: Any
) -> Schema:
    params = [_SANDBOX_ID, *(extra or [])]
    return _op(
        summary, {"404": _json(_ref("NotFound"), "no such sandbox"), **responses}, params, **kw
    )


_DETAILS_ANSWER = _json(_ref("SandboxDetails"), "the sandbox, with details")
_PAUSED = _json(_ref("Error"), "the sandbox is paused")
_AGENT_DOWN = _json(_ref("Error"), "the sandbox agent is unreachable")
_FILE_ERRORS: dict[str, Schema] = {
    "403": _json(_ref("Error"), "the sandbox user may not"),
    "404": _json(_ref("NotFound"), "no such sandbox or path"),
    "409": _json(_ref("Error"), "paused, or a directory where a file is needed (or the reverse)"),
    "502": _json(_ref("Error"), "the agent gave an answer the gateway cannot pass on"),
    "503": _AGENT_DOWN,
    "507": _json(_ref("Error"), "the sandbox's disk is full"),
}
_PATH_PARAM = _query("path", "a container path; relative to /home/sandbox")
#: The plain file routes and mkdir need a path (list and archive default to the home).
_PATH_REQUIRED = {
    **_query("path", "a container path; relative to /home/sandbox", required=True),
    "schema": {"type": "string", "minLength": 1},
}


def _paths() -> Schema:
    binary = {"type": "string", "format": "binary"}
    return {
        "/sandboxes": {
            "post": _op(
                "Create a sandbox (answers once its agent is ready)",
                {
                    "200": _json(_ref("Created"), "created"),
                    "404": _json(_ref("Error"), "no such snapshot (from_snapshot)"),
                    "409": _PAUSED,
                    "422": _json(_ref("Error"), "Idempotency-Key reused with other options"),
                    "429": {
                        "description": "--max-sandboxes reached",
                        "headers": {"Retry-After": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": _ref("Error")}},
                    },
                    "502": _json(_ref("Error"), "Docker refused the operation"),
                },
                [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "retries with the same key return the same sandbox",
                        "schema": {"type": "string"},
                    }
                ],
                body={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("CreateOptions")}},
                },
            ),
            "get": _op(
                "List the caller's sandboxes",
                {"200": _json({"type": "array", "items": _ref("Sandbox")}, "the sandboxes")},
                [_DETAILS],
            ),
        },
        "/sandboxes/{sandbox_id}": {
            "get": _sandbox_op(
                "Describe a sandbox (404 with the removal reason for 24 h after it went)",
                {"200": _json(_ref("Sandbox"), "the sandbox")},
                [_DETAILS],
            ),
            "delete": _sandbox_op(
                "Delete a sandbox (its clients are closed with 4000)",
                {
                    "200": _json(_ref("Message"), "deleted"),
                    "502": _json(_ref("Error"), "Docker refused the operation"),
                },
            ),
        },
        "/sandboxes/{sandbox_id}/keepalive": {
            "post": _sandbox_op(
                "Count as activity; extend_by pushes the lifetime out",
                {"200": _DETAILS_ANSWER},
                body={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("Keepalive")}},
                },
            )
        },
        "/sandboxes/{sandbox_id}/events": {
            "get": _sandbox_op(
                "Server-Sent Events: process started/exited, idle_warning, removed",
                {
                    "200": {
                        "description": "an event stream; `: heartbeat` comments every 15 s",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "409": _PAUSED,
                    "503": _AGENT_DOWN,
                },
                [
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "maxLength": MAX_EVENT_ID_LENGTH},
                    },
                    _query("last_event_id", "as the Last-Event-ID header"),
                ],
                tags=("events",),
            )
        },
        "/sandboxes/{sandbox_id}/pause": {
            "post": _sandbox_op(
                "docker pause: processes frozen, memory kept",
                {"200": _DETAILS_ANSWER, "502": _json(_ref("Error"), "Docker refused")},
            )
        },
        "/sandboxes/{sandbox_id}/resume": {
            "post": _sandbox_op(
                "docker unpause",
                {"200": _DETAILS_ANSWER, "502": _json(_ref("Error"), "Docker refused")},
            )
        },
        "/sandboxes/{sandbox_id}/snapshots": {
            "post": _sandbox_op(
                "Snapshot the writable state (/home/sandbox, /tmp, /var/tmp)",
                {"201": _json(_ref("Snapshot"), "the snapshot"), **_FILE_ERRORS},
                tags=("snapshots",),
            )
        },
        "/snapshots": {
            "get": _op(
                "List the caller's snapshots",
                {"200": _json({"type": "array", "items": _ref("Snapshot")}, "the snapshots")},
                tags=("snapshots",),
            )
        },
        "/snapshots/{snapshot_id}": {
            "delete": _op(
                "Delete a snapshot",
                {
                    "200": _json(_ref("Message"), "deleted"),
                    "404": _json(_ref("Error"), "no such snapshot (or another token's)"),
                },
                [
                    {
                        "name": "snapshot_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                tags=("snapshots",),
            )
        },
        "/sandboxes/{sandbox_id}/files": {
            "get": _sandbox_op(
                "Download a file (a single Range gets 206)",
                {
                    "200": {
                        "description": "the bytes",
                        "content": {"application/octet-stream": {"schema": binary}},
                    },
                    "206": {
                        "description": "the range asked for",
                        "content": {"application/octet-stream": {"schema": binary}},
                    },
                    "416": _json(_ref("Error"), "a range past the end"),
                    **_FILE_ERRORS,
                },
                [_PATH_REQUIRED],
                tags=("files",),
            ),
            "put": _sandbox_op(
                "Upload a file (temp file, then renamed)",
                {"201": _json(_ref("Written"), "written"), **_FILE_ERRORS},
                [
                    _PATH_REQUIRED,
                    _query("mode", "octal permissions, default 0644"),
                    _query("mkdirs", "`true` creates the parent directories"),
                ],
                body={
                    "required": False,
                    "content": {"application/octet-stream": {"schema": binary}},
                },
                tags=("files",),
            ),
            "delete": _sandbox_op(
                "Delete a file, symlink or empty directory (recursive=true: a tree)",
                {
                    "200": _json({"type": "object", "required": ["deleted"]}, "deleted: the path"),
                    **_FILE_ERRORS,
                },
                [_PATH_REQUIRED, _query("recursive", "`true` deletes a tree")],
                tags=("files",),
            ),
        },
        "/sandboxes/{sandbox_id}/files/list": {
            "get": _sandbox_op(
                "List a directory (depth=N descends N levels)",
                {
                    "200": _json({"type": "array", "items": _ref("FileEntry")}, "entries"),
                    **_FILE_ERRORS,
                },
                [_PATH_PARAM, _query("depth", "levels to descend (default 1)")],
                tags=("files",),
            )
        },
        "/sandboxes/{sandbox_id}/files/mkdir": {
            "post": _sandbox_op(
                "Make a directory with its parents",
                {
                    "201": _json({"type": "object", "required": ["path"]}, "the directory's path"),
                    **_FILE_ERRORS,
                },
                [_PATH_REQUIRED],
                tags=("files",),
            )
        },
        "/sandboxes/{sandbox_id}/files/archive": {
            "get": _sandbox_op(
                "A directory as a tar stream (format=tar.gz compressed)",
                {
                    "200": {
                        "description": "the tar",
                        "content": {
                            "application/x-tar": {"schema": binary},
                            "application/gzip": {"schema": binary},
                        },
                    },
                    **_FILE_ERRORS,
                },
                [_PATH_PARAM, _query("format", "`tar` (default) or `tar.gz`")],
                tags=("files",),
            ),
            "put": _sandbox_op(
                "Extract a tar (or tar.gz) body into a directory; nothing on a bad entry",
                {
                    "201": _json({"type": "object", "required": ["path", "entries"]}, "extracted"),
                    **_FILE_ERRORS,
                },
                [_PATH_PARAM],
                body={
                    "required": False,
                    "content": {"application/octet-stream": {"schema": binary}},
                },
                tags=("files",),
            ),
        },
        "/ws/{sandbox_id}": {
            "get": _sandbox_op(
                "The sandbox's WebSocket: commands and their results (see x-websocket)",
                {
                    "101": {"description": "switching protocols: messages in x-websocket"},
                    "426": {
                        "description": "not a WebSocket upgrade",
                        "headers": {"Upgrade": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": _ref("Error")}},
                    },
                },
                [_ACCESS_TOKEN],
                tags=("websocket",),
            )
        },
        "/sandboxes/{sandbox_id}/ports/{port}/url": {
            "post": _sandbox_op(
                "A signed, expiring URL for one port of the sandbox (opened without a token)",
                {
                    "200": _json(_ref("PreviewUrl"), "the signed URL"),
                    "403": _json(_ref("Error"), "the port is not in --preview-ports"),
                },
                [
                    {
                        "name": "port",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 65535},
                    }
                ],
                body={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("PreviewUrlOptions")}},
                },
                tags=("previews",),
            )
        },
        "/templates": {
            "get": _op(
                "The templates a create may name",
                {"200": _json({"type": "array", "items": _ref("Template")}, "templates")},
                tags=("templates",),
            )
        },
        "/healthz": {
            "get": _op(
                "Liveness; ready once the sandboxes of before a restart are recovered",
                {"200": _json(_ref("Health"), "alive")},
                tags=("operations",),
                public=True,
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics (text format 0.0.4); 404 when --metrics-port serves them",
                {
                    "200": {
                        "description": "the metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": _json(_ref("Error"), "served on --metrics-port instead"),
                },
                tags=("operations",),
            )
        },
        "/openapi.json": {
            "get": _op(
                "This document",
                {"200": _json({"type": "object"}, "the OpenAPI document")},
                tags=("operations",),
                public=True,
            )
        },
    }


def _number(description: str) -> Schema:
    return {"type": "number", "description": description}


def _size(description: str) -> Schema:
    return {"type": ["integer", "string"], "description": description}


def _rest_schemas() -> dict[str, Schema]:
    str_map = {"type": "object", "additionalProperties": {"type": "string"}}
    resources = {
        "type": ["object", "null"],
        "properties": {
            "cpus": {"type": "number"},
            "memory": {"type": "integer"},
            "disk": {"type": "integer"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
            "description": "every error answer; some add fields (a refused tar `entry`)",
        },
        "NotFound": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "sandbox_id": {"type": "string"},
                "status": {"const": "removed"},
                "reason": {"type": "string"},
                "removed_at": {"type": "number"},
                "detail": {"type": "string"},
            },
            "description": "404; for 24 h after a removal, when and why it went",
        },
        "Message": {
            "type": "object",
            "required": ["message"],
            "properties": {"message": {"type": "string"}},
        },
        "CreateOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "idle_timeout": _number("seconds, up to --max-idle-timeout"),
                "max_lifetime": _number("seconds, up to --max-lifetime"),
                "env": {**str_map, "description": "variables every command gets"},
                "metadata": {**str_map, "description": "up to 32 string labels"},
                "network": {"enum": ["bridge", "none"]},
                "template": {"type": "string", "description": "one of GET /templates"},
                "egress": {
                    "type": ["array", "null"],
                    "items": {"type": "string"},
                    "description": "host[:port] patterns the egress proxy allows",
                },
                "cpus": _number("CPUs, up to --max-cpus"),
                "memory": _size("bytes or a size like 512m, up to --max-memory"),
                "disk": _size("home tmpfs, bytes or a size, up to --max-disk"),
                "from_snapshot": {"type": "string", "description": "a snapshot id"},
            },
        },
        "Created": {
            "type": "object",
            "required": ["sandbox_id", "status", "message"],
            "properties": {
                "sandbox_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "status": {"const": "created"},
                "message": {"type": "string"},
            },
        },
        "Sandbox": {
            "type": "object",
            "required": ["sandbox_id", "status", "created_at", "ip_address"],
            "properties": {
                "sandbox_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "status": {"enum": ["connected", "idle"]},
                "created_at": {"type": "number"},
                "ip_address": {"type": "string"},
                "metadata": str_map,
                "state": {"enum": ["created", "connected", "idle"]},
                "clients": {"type": "integer"},
                "last_activity": {"type": "number"},
                "idle_timeout": {"type": "number"},
                "expires_at": {"type": ["number", "null"]},
                "agent_restarts": {"type": "integer"},
                "lost_sessions": {"type": "array", "items": {"type": "string"}},
                "paused": {"type": "boolean"},
                "template": {"type": "string"},
                "network": {"enum": ["bridge", "none"]},
                "egress": {"type": ["array", "null"], "items": {"type": "string"}},
                "resources": resources,
            },
        },
        "SandboxDetails": {
            "allOf": [
                _ref("Sandbox"),
                {"required": ["state", "clients", "last_activity", "paused", "template"]},
            ]
        },
        "PreviewUrlOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "expires_in": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": MAX_URL_TTL,
                    "description": "seconds the URL works (default 3600, at most 7 days)",
                }
            },
        },
        "PreviewUrl": {
            "type": "object",
            "required": ["path", "expires_at", "port"],
            "properties": {
                "url": {"type": "string", "description": "absolute, from the request's Host"},
                "path": {"type": "string", "description": "/previews/{id}/{port}/{expiry}/{sig}/"},
                "expires_at": {"type": "number", "description": "Unix time"},
                "port": {"type": "integer"},
            },
        },
        "Keepalive": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "extend_by": {
                    "type": ["number", "null"],
                    "exclusiveMinimum": 0,
                    "description": "seconds; null or absent: no extension",
                }
            },
        },
        "Snapshot": {
            "type": "object",
            "required": ["snapshot_id", "size", "created_at", "sandbox_id"],
            "properties": {
                "snapshot_id": {"type": "string"},
                "size": {"type": "integer"},
                "created_at": {"type": "number"},
                "sandbox_id": {"type": "string"},
            },
        },
        "Written": {
            "type": "object",
            "required": ["path"],
            "properties": {"path": {"type": "string"}, "size": {"type": "integer"}},
        },
        "FileEntry": {
            "type": "object",
            "required": ["name", "path", "type"],
            "properties": {
                "name": {"type": "string"},
                "path": {"type": "string"},
                "type": {"enum": ["file", "dir", "symlink", "other"]},
                "size": {"type": "integer"},
                "mode": {"type": "string"},
                "mtime": {"type": "number"},
            },
        },
        "Template": {
            "type": "object",
            "required": ["name", "image", "default", "present"],
            "properties": {
                "name": {"type": "string"},
                "image": {"type": "string"},
                "default": {"type": "boolean"},
                "present": {"type": "boolean"},
                "size": {"type": ["integer", "null"]},
                "created": {"type": ["string", "null"]},
                "resources": resources,
                "tmp_size": {"type": "integer"},
                "exec_tmpfs": {"type": "boolean"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "ready"],
            "properties": {
                "status": {"const": "ok"},
                "ready": {"type": "boolean"},
                "sandboxes": {"type": "integer"},
                "pool": {"type": "object"},
            },
        },
    }


def _message(type_: str | None, required: tuple[str, ...], props: Schema, doc: str) -> Schema:
    properties: Schema = {"request_id": {"type": ["string", "null"]}, **props}
    if type_ is not None:
        properties["type"] = {"const": type_}
    return {
        "type": "object",
        "description": doc,
        "required": [*(["type"] if type_ is not None else []), *required],
        "properties": properties,
    }


def _ws_schemas() -> dict[str, Schema]:
    env = {"type": "object", "additionalProperties": {"type": "string"}}
    offsets = {
        "type": "object",
        "properties": {"stdout": {"type": "integer"}, "stderr": {"type": "integer"}},
    }
    size = {"type": "integer", "minimum": 1, "maximum": 4096}
    command_props: Schema = {
        "type": {"const": "command"},
        "command": {"type": "string"},
        "timeout": {"type": "number"},
        "cwd": {"type": "string"},
        "env": env,
        "stdin": {"type": "string"},
        "stream": {"type": "boolean"},
        "interactive": {"type": "boolean"},
        "session": {"type": "string"},
        "ack": {"type": "boolean"},
        "background": {"type": "boolean"},
        "yield_after": {"type": "number"},
        "on_disconnect": {"enum": ["continue", "kill"]},
    }
    result_props: Schema = {
        "command": {"type": ["string", "null"]},
        "success": {"type": "boolean"},
        "output": {"type": "string"},
        "error": {"type": "string"},
        "returncode": {"type": "integer"},
        "timestamp": {"type": "string"},
        "duration_ms": {"type": "number"},
        "truncated": {"type": "boolean"},
        "timed_out": {"type": "boolean"},
        "cancelled": {"type": "boolean"},
        "session": {"type": "string"},
        "output_limit_exceeded": {"type": "boolean"},
        "session_restarted": {"type": "boolean"},
        "oom_killed": {"type": "boolean"},
        "pid": {"type": "integer"},
        "dropped": offsets,
    }
    return {
        # Client to gateway.
        "WsCommand": {
            "type": "object",
            "description": "run a command (no `type`, or `command`); answered by a result",
            "required": ["command"],
            "properties": {"request_id": {"type": "string"}, **command_props},
        },
        "WsCancel": _message("cancel", ("request_id",), {}, "kill a command's process group"),
        "WsStdin": _message(
            "stdin",
            ("request_id",),
            {"data": {"type": "string"}, "eof": {"type": "boolean"}},
            "input for an interactive command (or a PTY); no reply on success",
        ),
        "WsListSessions": _message("list_sessions", (), {}, "answered by `sessions`"),
        "WsCloseSession": _message(
            "close_session", ("session",), {"session": {"type": "string"}}, "kill a session"
        ),
        "WsAttach": _message(
            "attach",
            (),
            {
                "pid": {"type": "integer"},
                "since": {"oneOf": [{"type": "integer"}, offsets]},
                "takeover": {"type": "boolean", "description": "PTY: the only writer"},
                "binary": {"type": "boolean", "description": "PTY output as binary frames"},
            },
            "replay a process's output from an offset, then live, then its result",
        ),
        "WsProcesses": _message("processes", (), {}, "list the processes the agent keeps"),
        "WsSignal": _message(
            "signal",
            ("signal",),
            {
                "pid": {"type": "integer"},
                "signal": {
                    "enum": ["TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT"]
                },
            },
            "signal a process group",
        ),
        "WsSubscribeEvents": _message(
            "subscribe_events",
            (),
            {"last_event_id": {"type": "string"}},
            "process events as `event` messages",
        ),
        "WsWatch": _message(
            "watch",
            ("path", "request_id"),
            {"path": {"type": "string"}, "recursive": {"type": "boolean"}},
            "inotify on a path: `watching`, then `fs_event`s",
        ),
        "WsUnwatch": _message("unwatch", ("request_id",), {}, "end a watch"),
        "WsPty": _message(
            "pty",
            ("request_id", "cols", "rows"),
            {
                "cols": size,
                "rows": size,
                "command": {"type": "string"},
                "cwd": {"type": "string"},
                "env": env,
                "binary": {"type": "boolean", "description": "output as binary frames"},
            },
            "a command on a pseudo-terminal (issue 16): `started`, `output` with stream pty",
        ),
        "WsResize": _message(
            "resize",
            ("cols", "rows"),
            {"pid": {"type": "integer"}, "cols": size, "rows": size},
            "resize a PTY by pid or request_id (issue 16); answered by `resized`",
        ),
        # Gateway to client.
        "WsResult": _message("result", ("command", "success", "returncode"), result_props, ""),
        "WsError": _message(
            "error",
            ("error", "error_code"),
            {**result_props, "error_code": {"type": "string"}},
            "a command or message that was not run (PROTOCOL.md, Errors)",
        ),
        "WsOutput": _message(
            "output",
            ("request_id", "stream", "data", "offset"),
            {
                "stream": {"enum": ["stdout", "stderr", "pty"]},
                "data": {"type": "string"},
                "offset": {"type": "integer"},
                "pid": {"type": "integer"},
            },
            "a chunk of streamed output",
        ),
        "WsStarted": _message(
            "started",
            ("request_id", "pid"),
            {
                "pid": {"type": "integer"},
                "background": {"type": "boolean"},
                "pty": {"type": "boolean"},
                "cols": {"type": "integer"},
                "rows": {"type": "integer"},
            },
            "a command with `ack` or `background`, or a PTY, started",
        ),
        "WsResized": _message(
            "resized",
            (),
            {"pid": {"type": "integer"}, "cols": size, "rows": size},
            "reply to resize (issue 16)",
        ),
        "WsTakenOver": _message(
            "taken_over",
            ("pid",),
            {"pid": {"type": "integer"}},
            "another connection took over a PTY's input (issue 16)",
        ),
        "WsYielded": _message(
            "yielded",
            ("request_id", "pid"),
            {
                "pid": {"type": "integer"},
                "output": {"type": "string"},
                "error": {"type": "string"},
                "offset": offsets,
            },
            "`yield_after` passed; the command runs on",
        ),
        "WsAttached": _message(
            "attached",
            ("pid",),
            {"pid": {"type": "integer"}, "state": {"type": "string"}, "since": offsets},
            "reply to attach, before the replay",
        ),
        "WsEvent": _message(
            "event",
            ("id", "event"),
            {
                "id": {"type": "string"},
                "event": {"enum": ["started", "exited"]},
                "pid": {"type": "integer"},
                "time": {"type": "number"},
            },
            "a process event",
        ),
        "WsSessions": _message(
            "sessions",
            ("sessions",),
            {"sessions": {"type": "array", "items": {"type": "object"}}},
            "",
        ),
        "WsFsEvent": _message(
            "fs_event",
            ("request_id", "event", "path"),
            {
                "event": {"enum": ["created", "modified", "deleted", "moved"]},
                "path": {"type": "string"},
            },
            "a change under a watched path",
        ),
        "WsAgentRestarted": _message(
            "agent_restarted",
            ("lost_requests", "lost_sessions"),
            {
                "lost_requests": {"type": "array", "items": {"type": "string"}},
                "lost_sessions": {"type": "array", "items": {"type": "string"}},
                "timestamp": {"type": "string"},
            },
            "before a 4001 close: what the agent restart lost",
        ),
    }


#: Which Ws* schemas a client sends and which it receives.
CLIENT_MESSAGES = (
    "WsCommand",
    "WsCancel",
    "WsStdin",
    "WsListSessions",
    "WsCloseSession",
    "WsAttach",
    "WsProcesses",
    "WsSignal",
    "WsSubscribeEvents",
    "WsWatch",
    "WsUnwatch",
    "WsPty",
    "WsResize",
)
SERVER_MESSAGES = (
    "WsResult",
    "WsError",
    "WsOutput",
    "WsStarted",
    "WsResized",
    "WsTakenOver",
    "WsYielded",
    "WsAttached",
    "WsEvent",
    "WsSessions",
    "WsFsEvent",
    "WsAgentRestarted",
)


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a new dict each call)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "twistedgw",
            "version": "0.1.0",
            "description": (
                "Sandbox gateway: Docker containers as sandboxes over REST, commands over a "
                "WebSocket (PROTOCOL.md; message schemas under x-websocket). Errors are "
                'always JSON `{"error": ...}`.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"access_token": []}, {}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "access_token": {"type": "apiKey", "in": "query", "name": "access_token"},
            },
            "schemas": {**_rest_schemas(), **_ws_schemas()},
        },
        "x-websocket": {
            "path": "/ws/{sandbox_id}",
            "client": [_ref(name) for name in CLIENT_MESSAGES],
            "server": [_ref(name) for name in SERVER_MESSAGES],
        },
        # Proxied at the HTTP edge before routing (twistedgw.web.previews), any method, the
        # sandbox server's own answers: described here rather than as operations.
        "x-edge-routes": {
            "/sandboxes/{sandbox_id}/ports/{port}/{path}": (
                "HTTP and WebSocket upgrades to 127.0.0.1:{port} in the sandbox, through its "
                "agent; the API token as on every route. 502 nothing listens, 403 port not "
                "allowed, 404 another token's sandbox, 409 paused."
            ),
            "/previews/{sandbox_id}/{port}/{expiry}/{signature}/{path}": (
                "The same through a signed URL (POST .../ports/{port}/url); no token. "
                "403 for an expired or forged signature."
            ),
        },
    }


#: The document as served: built and encoded once.
DOCUMENT: dict[str, Any] = build_document()
DOCUMENT_BYTES: bytes = json.dumps(DOCUMENT, indent=1).encode("utf-8")

#: The reviewed copy of the document in the repository (``tests/test_openapi.py`` fails when
#: the built document differs from it; ``python -m twistedgw.web.openapi`` rewrites it).
SNAPSHOT_PATH = "docs/openapi.json"


def snapshot_text(document: dict[str, Any]) -> str:
    """The snapshot file's text: sorted keys, so a change shows as a small diff."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m twistedgw.web.openapi [PATH]``: write the document's snapshot (default
    ``docs/openapi.json``) after a deliberate change of the API, to be reviewed in the diff."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else SNAPSHOT_PATH
    with open(path, "w", encoding="utf-8") as out:
        out.write(snapshot_text(build_document()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
