"""The REST edge (Klein): ``/sandboxes`` routes and the ``/ws/{id}`` upgrade.

One error hierarchy (``APIError``) and one error table turn failures into JSON bodies
``{"error": ...}``; anything unexpected is logged and answered with a JSON 500.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException

from twistedgw.agentlink import AgentUnavailable
from twistedgw.auth import QUERY_PARAMETER, Authenticator, Unauthorized
from twistedgw.edge import MAX_BODY_BYTES, EdgePolicy, GatewayChannel, GatewayRequest
from twistedgw.manager import (
    CapacityExceeded,
    IdempotencyConflict,
    InvalidSettings,
    Recovering,
    SandboxManager,
    SandboxNotFound,
)
from twistedgw.runtime import ContainerFailed, ImageMissing, RuntimeUnavailable


class APIError(Exception):
    """An error with an HTTP status, answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


def _bounded_int(text: str) -> int:
    """JSON integers must fit a float (every number field is seconds or a count): a larger
    one would overflow wherever it meets a float."""
    value = int(text)
    if abs(value) > _FLOAT_MAX:
        raise APIError(400, "a number in the request body is out of range")
    return value


_FLOAT_MAX = int(1.7976931348623157e308)


def _read_json_body(request: IRequest) -> dict[str, Any] | None:
    """The request's JSON object body, or None when it is empty; ``APIError`` 400/413/415
    otherwise (any JSON that is not an object is a 400 too)."""
    content = request.content
    if content is None:
        return None
    raw = content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return None
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
    if content_type.lower() != b"application/json":
        # Browsers send text/plain (and form types) across sites without asking first.
        raise APIError(415, "request bodies must be application/json")
    try:
        body = json.loads(raw, parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _header_text(request: IRequest, name: bytes) -> str | None:
    """A header as text; ``APIError`` 400 when it is not UTF-8."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, f"{name.decode()} header is not valid UTF-8") from None


def _wants_details(request: IRequest) -> bool:
    """``?details=true`` (or 1, yes) asks for the fields beyond the seed's."""
    args = request.args or {}
    value = (args.get(b"details") or [b""])[0].lower()
    return value in (b"1", b"true", b"yes")


class GatewayAPI:
    """REST routes over a ``SandboxManager``, plus the WebSocket resource at ``/ws/{id}``."""

    app = Klein()
    _log = Logger()

    def __init__(
        self,
        manager: SandboxManager,
        ws_resource: IResource | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.manager = manager
        self._ws_resource = ws_resource
        self.authenticator = authenticator or Authenticator.from_tokens([])

    def _owner(self, request: IRequest) -> str | None:
        """The caller's owner id (``None`` in open mode); raises ``Unauthorized``."""
        return owner_of(self.authenticator, request)

    def resource(self) -> IResource:
        """The twisted.web resource serving this API."""
        return self.app.resource()

    # -- errors ----------------------------------------------------------------------------

    @app.handle_errors(APIError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, APIError)
        return _json(request, error.status, {"error": error.message})

    @app.handle_errors(SandboxNotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, SandboxNotFound)
        body: dict[str, Any] = {"error": f"Sandbox {error.sandbox_id} not found"}
        if error.tombstone is not None:
            # Removed recently: say when and why, so "it vanished" is explainable.
            body.update(error.tombstone.to_json())
            body["error"] = f"Sandbox {error.sandbox_id} was removed ({error.tombstone.reason})"
        return _json(request, 404, body)

    @app.handle_errors(Unauthorized)
    def _unauthorized(self, request: IRequest, failure: Failure) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="twistedgw"')
        return _json(request, 401, {"error": failure.getErrorMessage()})

    @app.handle_errors(IdempotencyConflict)
    def _idempotency_conflict(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, 422, {"error": failure.getErrorMessage()})

    @app.handle_errors(InvalidSettings)
    def _invalid_settings(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, 400, {"error": failure.getErrorMessage()})

    @app.handle_errors(CapacityExceeded)
    def _capacity(self, request: IRequest, failure: Failure) -> bytes:
        request.setHeader(b"Retry-After", b"5")
        return _json(request, 429, {"error": failure.getErrorMessage()})

    @app.handle_errors(Recovering)
    def _recovering(self, request: IRequest, failure: Failure) -> bytes:
        request.setHeader(b"Retry-After", str(Recovering.retry_after).encode("ascii"))
        return _json(request, 503, {"error": failure.getErrorMessage()})

    @app.handle_errors(RuntimeUnavailable)
    def _runtime_unavailable(self, request: IRequest, failure: Failure) -> bytes:
        self._log.warn("Docker unavailable: {error}", error=failure.getErrorMessage())
        return _json(request, 503, {"error": f"Docker unavailable: {failure.getErrorMessage()}"})

    @app.handle_errors(ImageMissing)
    def _image_missing(self, request: IRequest, failure: Failure) -> bytes:
        self._log.error("{error}", error=failure.getErrorMessage())
        return _json(request, 503, {"error": failure.getErrorMessage()})

    @app.handle_errors(AgentUnavailable)
    def _agent_unavailable(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, 503, {"error": f"sandbox agent: {failure.getErrorMessage()}"})

    @app.handle_errors(ContainerFailed)
    def _container_failed(self, request: IRequest, failure: Failure) -> bytes:
        self._log.error("Docker refused: {error}", error=failure.getErrorMessage())
        return _json(request, 502, {"error": failure.getErrorMessage()})

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        status = error.code or 400
        if status == 405:
            allowed = getattr(error, "valid_methods", None) or []
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return _json(request, status, {"error": error.description or error.name})

    @app.handle_errors(CancelledError)
    def _cancelled(self, request: IRequest, failure: Failure) -> bytes:
        # The client went away; nobody reads this.
        return b""

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self._log.failure(
            "unhandled error on {method} {uri}", failure, method=request.method, uri=request.uri
        )
        return _json(request, 500, {"error": "internal server error"})

    # -- routes ----------------------------------------------------------------------------

    @app.route("/sandboxes", methods=["POST"])
    async def create_sandbox(self, request: IRequest) -> bytes:
        owner = self._owner(request)
        key = _header_text(request, b"idempotency-key")
        body = _read_json_body(request)
        settings = self.manager.settings_for(body, key, owner)
        sandbox = await self.manager.create(settings)
        return _json(
            request,
            200,
            {
                "sandbox_id": sandbox.sandbox_id,
                "status": "created",
                "message": "Sandbox container created successfully",
            },
        )

    @app.route("/sandboxes", methods=["GET"])
    def list_sandboxes(self, request: IRequest) -> bytes:
        owner = self._owner(request)
        details = _wants_details(request)
        return _json(request, 200, [s.to_json(details) for s in self.manager.visible_to(owner)])

    @app.route("/sandboxes/<string:sandbox_id>", methods=["GET"])
    def get_sandbox(self, request: IRequest, sandbox_id: str) -> bytes:
        sandbox = self.manager.lookup(sandbox_id, self._owner(request))
        return _json(request, 200, sandbox.to_json(_wants_details(request)))

    @app.route("/sandboxes/<string:sandbox_id>/keepalive", methods=["POST"])
    def keepalive(self, request: IRequest, sandbox_id: str) -> bytes:
        owner = self._owner(request)
        body = _read_json_body(request) or {}
        if set(body) - {"extend_by"}:
            raise APIError(400, "body must be a JSON object with at most 'extend_by'")
        extend_by = body.get("extend_by")
        if extend_by is not None and (
            isinstance(extend_by, bool)
            or not isinstance(extend_by, int | float)
            or not 0 < extend_by < float("inf")
        ):
            raise APIError(400, "'extend_by' must be a number of seconds greater than 0")
        sandbox = self.manager.keepalive(sandbox_id, extend_by, owner)
        return _json(request, 200, sandbox.to_json(details=True))

    @app.route("/sandboxes/<string:sandbox_id>", methods=["DELETE"])
    async def delete_sandbox(self, request: IRequest, sandbox_id: str) -> bytes:
        sandbox = await self.manager.delete(sandbox_id, owner=self._owner(request))
        return _json(
            request, 200, {"message": f"Sandbox {sandbox.sandbox_id} successfully deleted"}
        )

    @app.route("/ws/<string:sandbox_id>", methods=["GET"])
    def websocket(self, request: IRequest, sandbox_id: str) -> IResource:
        # Refuse unknown ids with a JSON 404 before upgrading; ClientSide checks again.
        self.manager.lookup(sandbox_id, self._owner(request))
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            # Never Autobahn's HTML status page (nor its ?redirect=).
            request.setHeader(b"Upgrade", b"websocket")
            raise APIError(426, "this route takes WebSocket upgrades only")
        if self._ws_resource is None:
            raise APIError(503, "WebSocket proxy not configured")
        handed_over = getattr(getattr(request, "channel", None), "handed_over", None)
        if handed_over is not None:
            handed_over()  # the proxy's own connection cap counts it from here on
        return self._ws_resource

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        # Answers from the first accepted connection; "ready" turns true once the sandboxes
        # running before a restart are recovered (sandbox routes answer 503 until then).
        body: dict[str, Any] = {"status": "ok", "ready": self.manager.recovered}
        if not self.authenticator.enabled:
            body["sandboxes"] = len(self.manager.registry)
            body["pool"] = self.manager.pool_status()
        return _json(request, 200, body)


def owner_of(authenticator: Authenticator, request: IRequest) -> str | None:
    """Authenticate a twisted.web request; the caller's owner id or ``Unauthorized``."""
    args = request.args or {}
    query = (args.get(QUERY_PARAMETER.encode()) or [b""])[0].decode("utf-8", "replace")
    try:
        header = _header_text(request, b"authorization")
    except APIError:
        if authenticator.enabled:
            raise Unauthorized("Authorization header is not valid UTF-8") from None
        raise
    return authenticator.owner_for(header, query or None)


def access_log_line(timestamp: str, request: Any) -> str:
    """An access log line in combined format, without the query string (which may carry an
    access token) and without any header but the user agent."""
    path = request.uri.split(b"?", 1)[0].decode("ascii", "replace")
    agent = (request.getHeader(b"user-agent") or b"-").decode("ascii", "replace")
    peer = getattr(request.getClientAddress(), "host", "-")
    method = request.method.decode("ascii", "replace")
    proto = request.clientproto.decode("ascii", "replace")
    agent = agent.replace('"', "'")
    length = request.sentLength or "-"
    return (
        f'"{peer}" - - {timestamp} "{method} {path} {proto}" {request.code} {length} "-" "{agent}"'
    )


def make_site(
    api: GatewayAPI, header_timeout: float = 10.0, policy: EdgePolicy | None = None
) -> Site:
    """A twisted.web ``Site`` serving ``api`` behind the edge checks of ``policy``
    (``twistedgw.edge``): tracebacks hidden, tokens kept out of the access log, slow or
    oversized requests refused before they cost anything."""
    if policy is None:
        policy = EdgePolicy(authenticator=api.authenticator, header_timeout=header_timeout)
    site = Site(api.resource(), logFormatter=access_log_line, timeout=policy.idle_timeout)
    site.displayTracebacks = False
    site.requestFactory = GatewayRequest
    site.http_channels = set()  # type: ignore[attr-defined]

    class Channel(GatewayChannel):
        pass

    Channel.policy = policy
    site.protocol = Channel  # type: ignore[method-assign,assignment]
    return site
