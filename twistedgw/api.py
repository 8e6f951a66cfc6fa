"""The REST edge (Klein): ``/sandboxes`` routes and the ``/ws/{id}`` upgrade.

One error hierarchy (``APIError``) and one error table turn failures into JSON bodies
``{"error": ...}``; anything unexpected is logged and answered with a JSON 500.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException

from twistedgw.agentlink import AgentUnavailable
from twistedgw.auth import QUERY_PARAMETER, Authenticator, Unauthorized
from twistedgw.manager import (
    CapacityExceeded,
    InvalidSettings,
    Recovering,
    SandboxManager,
    SandboxNotFound,
)
from twistedgw.runtime import ContainerFailed, ImageMissing, RuntimeUnavailable

#: Largest request body read for JSON routes.
MAX_BODY_BYTES = 64 * 1024


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


def _read_json_body(request: IRequest) -> dict[str, Any] | None:
    """The request's JSON object body, or None when it is empty; ``APIError`` 400/413
    otherwise (any JSON that is not an object is a 400 too)."""
    content = request.content
    if content is None:
        return None
    raw = content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


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
        body = _read_json_body(request)
        owner = self._owner(request)
        key = request.getHeader("Idempotency-Key")
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

    @app.route("/ws/<string:sandbox_id>")
    def websocket(self, request: IRequest, sandbox_id: str) -> IResource:
        # Refuse unknown ids with a JSON 404 before upgrading; ClientSide checks again.
        self.manager.lookup(sandbox_id, self._owner(request))
        if self._ws_resource is None:
            raise APIError(503, "WebSocket proxy not configured")
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
    header = request.getHeader("Authorization")
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


class HeaderDeadlineChannel(HTTPChannel):
    """An ``HTTPChannel`` that drops clients who do not finish a request's headers within
    ``header_timeout`` seconds of connecting (or of their previous request ending).

    twisted.web's own timeout is an idle timeout, which a slowloris client resets with every
    byte it trickles in; this one is a deadline.
    """

    header_timeout = 10.0
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.callLater(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def allHeadersReceived(self) -> None:
        self._disarm()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.persistent and self.transport is not None and not self.requests:
            self._arm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)


def make_site(api: GatewayAPI, header_timeout: float = 10.0) -> Site:
    """A twisted.web ``Site`` serving ``api``: tracebacks hidden, tokens kept out of the
    access log, and slow request headers cut off after ``header_timeout`` seconds."""
    site = Site(api.resource(), logFormatter=access_log_line)
    site.displayTracebacks = False

    class Channel(HeaderDeadlineChannel):
        pass

    Channel.header_timeout = header_timeout
    site.protocol = Channel  # type: ignore[method-assign,assignment]
    return site
