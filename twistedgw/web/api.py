"""The REST edge (Klein): ``/sandboxes`` routes and the ``/ws/{id}`` upgrade.

Routes that need a token carry ``@authenticated``; sandbox ids in paths are checked by the
``sandbox`` route converter before any handler runs; failures are answered from the one table
in ``twistedgw.web.errors`` (JSON bodies ``{"error": ...}``, a JSON 500 for anything else).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.routing import BaseConverter

from twistedgw import protocol
from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.errors import SandboxNotFound
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import settings_from_body
from twistedgw.metrics import CONTENT_TYPE, GatewayMetrics
from twistedgw.proxy.files import AgentFiles
from twistedgw.sandbox import is_valid_sandbox_id
from twistedgw.snapshots import Snapshot, SnapshotStore
from twistedgw.web.auth import QUERY_PARAMETER, Authenticator, Unauthorized
from twistedgw.web.console import ConsoleResource
from twistedgw.web.errors import APIError, error_answer
from twistedgw.web.events import HEARTBEAT, EventStream, SandboxEvents
from twistedgw.web.files import FileRoutes
from twistedgw.web.openapi import DOCUMENT_BYTES
from twistedgw.web.previews import PreviewRoutes, port_number
from twistedgw.web.requests import header_text, json_answer, read_json_body, wants_details

R = TypeVar("R")


class SandboxIdConverter(BaseConverter):
    """``<sandbox:...>`` in a route: only a well-formed sandbox id reaches the handler; any
    other text is answered 404 (not found, like an id that is not ours) during routing."""

    def to_python(self, value: str) -> str:
        if not is_valid_sandbox_id(value):
            raise SandboxNotFound(value)
        return value


def owner_of(authenticator: Authenticator, request: IRequest) -> str | None:
    """Authenticate a twisted.web request; the caller's owner id or ``Unauthorized``."""
    args = request.args or {}
    query = (args.get(QUERY_PARAMETER.encode()) or [b""])[0].decode("utf-8", "replace")
    try:
        header = header_text(request, b"authorization")
    except APIError:
        if authenticator.enabled:
            raise Unauthorized("Authorization header is not valid UTF-8") from None
        raise
    return authenticator.owner_for(header, query or None)


def authenticated(route: Callable[..., R]) -> Callable[..., R]:
    """A route that needs a token: the caller's owner id (``None`` in open mode) is passed as
    ``owner``, before the route reads anything else; ``Unauthorized`` (401) otherwise."""

    @functools.wraps(route)
    def checked(self: GatewayAPI, request: IRequest, *args: Any, **kwargs: Any) -> R:
        owner = owner_of(self.authenticator, request)
        request.owner = owner  # type: ignore[attr-defined]  # for the access log
        return route(self, request, *args, owner=owner, **kwargs)

    return checked


class GatewayAPI:
    """REST routes over a ``SandboxManager``, plus the WebSocket resource at ``/ws/{id}``."""

    app = Klein()
    app.url_map.converters["sandbox"] = SandboxIdConverter
    _log = Logger()

    def __init__(
        self,
        manager: SandboxManager,
        ws_resource: IResource | None = None,
        authenticator: Authenticator | None = None,
        events: SandboxEvents | None = None,
        heartbeat: float = HEARTBEAT,
        clock: Any = None,
        files: FileRoutes | None = None,
        snapshots: SnapshotStore | None = None,
        previews: PreviewRoutes | None = None,
        metrics: GatewayMetrics | None = None,
        serve_metrics: bool = True,
    ) -> None:
        self.manager = manager
        #: What ``GET /metrics`` serves (``serve_metrics`` False: --metrics-port does).
        self.metrics = metrics or getattr(manager, "metrics", None) or GatewayMetrics()
        self.serve_metrics = serve_metrics
        self._ws_resource = ws_resource
        self.authenticator = authenticator or Authenticator.from_tokens([])
        #: The gateway's own sandbox events (the reaper's ``idle_warning``).
        self.events = events or SandboxEvents()
        self.heartbeat = heartbeat
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.files = files or FileRoutes(
            manager, self.authenticator, AgentFiles(getattr(manager, "_reactor", None))
        )
        self.snapshots = snapshots
        #: Port previews (the edge hands their requests over before any route runs).
        self.previews = previews or PreviewRoutes.unsigned(
            manager, self.authenticator, getattr(manager, "_reactor", clock)
        )
        self.console_files = ConsoleResource()

    def resource(self) -> IResource:
        """The twisted.web resource serving this API."""
        return self.app.resource()

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        """Every failure, answered from the one table in ``twistedgw.web.errors``."""
        answer = error_answer(request, failure, self._log)
        if answer.body is None:
            return b""
        for name, value in answer.headers:
            request.setHeader(name, value)
        return json_answer(request, answer.status, answer.body)

    # -- routes ----------------------------------------------------------------------------

    @app.route("/sandboxes", methods=["POST"])
    @authenticated
    async def create_sandbox(self, request: IRequest, owner: str | None) -> bytes:
        key = header_text(request, b"idempotency-key")
        body = read_json_body(request)
        snapshot = None
        if body is not None and "from_snapshot" in body:
            snapshot = self._snapshot(body.pop("from_snapshot"), owner)
        settings = settings_from_body(self.manager.policy, body, key, owner)
        sandbox = await self.manager.create(settings)
        if snapshot is not None:
            assert self.snapshots is not None
            try:
                await self.snapshots.restore(snapshot, sandbox)
            except BaseException:
                # A sandbox without the files asked for is not what was asked for.
                await self.manager.delete(sandbox.sandbox_id, owner=owner)
                raise
        return json_answer(
            request,
            200,
            {
                "sandbox_id": sandbox.sandbox_id,
                "status": "created",
                "message": "Sandbox container created successfully",
            },
        )

    @app.route("/sandboxes", methods=["GET"])
    @authenticated
    def list_sandboxes(self, request: IRequest, owner: str | None) -> bytes:
        details = wants_details(request)
        return json_answer(
            request, 200, [s.to_json(details) for s in self.manager.visible_to(owner)]
        )

    @app.route("/sandboxes/<sandbox:sandbox_id>", methods=["GET"])
    @authenticated
    def get_sandbox(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        sandbox = self.manager.lookup(sandbox_id, owner)
        return json_answer(request, 200, sandbox.to_json(wants_details(request)))

    @app.route("/sandboxes/<sandbox:sandbox_id>/keepalive", methods=["POST"])
    @authenticated
    def keepalive(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        body = read_json_body(request) or {}
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
        return json_answer(request, 200, sandbox.to_json(details=True))

    @app.route("/sandboxes/<sandbox:sandbox_id>", methods=["DELETE"])
    @authenticated
    async def delete_sandbox(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        sandbox = await self.manager.delete(sandbox_id, owner=owner)
        return json_answer(
            request, 200, {"message": f"Sandbox {sandbox.sandbox_id} successfully deleted"}
        )

    @app.route("/sandboxes/<sandbox:sandbox_id>/events", methods=["GET"])
    @authenticated
    async def sandbox_events(self, request: IRequest, sandbox_id: str, owner: str | None) -> None:
        """Server-Sent Events: process ``started``/``exited`` (ids, ``Last-Event-ID``),
        ``idle_warning`` and ``removed`` (see ``twistedgw.web.events``). A paused sandbox's
        agent cannot answer: 409 at once, as for the file routes."""
        sandbox = self.files.sandbox(sandbox_id, owner)
        last = header_text(request, b"last-event-id")
        if not last:
            args = request.args or {}
            raw = (args.get(b"last_event_id") or [b""])[0]
            last = raw.decode("utf-8", "replace")
        if last and len(last) > protocol.MAX_EVENT_ID_LENGTH:
            raise APIError(400, "Last-Event-ID is longer than 64 characters")
        try:
            link = await self.manager.open_agent(sandbox)
        except AgentUnavailable:
            raise APIError(503, "sandbox agent unreachable") from None
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        channel = getattr(request, "channel", None)
        if channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)  # a quiet stream is not an idle connection
        stream = EventStream(
            request, sandbox, self.manager, self.events, self.clock, self.heartbeat
        )
        stream.start(link, last or None)
        await stream.done

    @app.route("/sandboxes/<sandbox:sandbox_id>/pause", methods=["POST"])
    @authenticated
    async def pause(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        sandbox = await self.manager.pause(sandbox_id, owner)
        return json_answer(request, 200, sandbox.to_json(details=True))

    @app.route("/sandboxes/<sandbox:sandbox_id>/resume", methods=["POST"])
    @authenticated
    async def resume(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        sandbox = await self.manager.resume(sandbox_id, owner)
        return json_answer(request, 200, sandbox.to_json(details=True))

    # -- snapshots (twistedgw.snapshots) ---------------------------------------------------

    def _store(self) -> SnapshotStore:
        if self.snapshots is None:
            raise APIError(503, "snapshots are not configured on this gateway")
        return self.snapshots

    def _snapshot(self, snapshot_id: Any, owner: str | None) -> Snapshot:
        if not isinstance(snapshot_id, str):
            raise APIError(400, "'from_snapshot' must be a snapshot id")
        return self._store().get(snapshot_id, owner)

    @app.route("/sandboxes/<sandbox:sandbox_id>/snapshots", methods=["POST"])
    @authenticated
    async def snapshot(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        sandbox = self.files.sandbox(sandbox_id, owner)
        snapshot = await self._store().create(sandbox, owner)
        return json_answer(request, 201, snapshot.to_json())

    @app.route("/snapshots", methods=["GET"])
    @authenticated
    def list_snapshots(self, request: IRequest, owner: str | None) -> bytes:
        return json_answer(request, 200, [s.to_json() for s in self._store().visible_to(owner)])

    @app.route("/snapshots/<snapshot_id>", methods=["DELETE"])
    @authenticated
    def delete_snapshot(self, request: IRequest, snapshot_id: str, owner: str | None) -> bytes:
        self._store().delete(snapshot_id, owner)
        return json_answer(request, 200, {"message": f"Snapshot {snapshot_id} deleted"})

    # -- files (twistedgw.web.files; HEAD goes with GET) -------------------------------------

    @app.route("/sandboxes/<sandbox:sandbox_id>/files", methods=["GET", "DELETE"])
    @authenticated
    async def files_item(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        return await self.files.forward(request, sandbox_id, owner, b"")

    @app.route("/sandboxes/<sandbox:sandbox_id>/files", methods=["PUT"])
    @app.route("/sandboxes/<sandbox:sandbox_id>/files/archive", methods=["PUT"])
    @authenticated
    async def files_upload(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        return await self.files.finish_upload(request, sandbox_id, owner)

    @app.route("/sandboxes/<sandbox:sandbox_id>/files/list", methods=["GET"])
    @authenticated
    async def files_list(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        return await self.files.forward(request, sandbox_id, owner, b"/list")

    @app.route("/sandboxes/<sandbox:sandbox_id>/files/mkdir", methods=["POST"])
    @authenticated
    async def files_mkdir(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        return await self.files.forward(request, sandbox_id, owner, b"/mkdir")

    @app.route("/sandboxes/<sandbox:sandbox_id>/files/archive", methods=["GET"])
    @authenticated
    async def files_archive(self, request: IRequest, sandbox_id: str, owner: str | None) -> bytes:
        return await self.files.forward(request, sandbox_id, owner, b"/archive")

    # -- port previews (twistedgw.web.previews; the proxying happens at the edge) ----------

    @app.route("/sandboxes/<sandbox:sandbox_id>/ports/<port>/url", methods=["POST"])
    @authenticated
    def preview_url(
        self, request: IRequest, sandbox_id: str, port: str, owner: str | None
    ) -> bytes:
        answer = self.previews.create_url(
            sandbox_id, port_number(port), owner, read_json_body(request)
        )
        host = header_text(request, b"host")
        if host:
            scheme = "https" if request.isSecure() else "http"
            answer["url"] = f"{scheme}://{host}{answer['path']}"
        return json_answer(request, 200, answer)

    @app.route("/ws/<sandbox:sandbox_id>", methods=["GET"])
    @authenticated
    def websocket(self, request: IRequest, sandbox_id: str, owner: str | None) -> IResource:
        # Refuse unknown ids with a JSON 404 before upgrading; ClientSide checks again.
        self.manager.lookup(sandbox_id, owner)
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

    @app.route("/templates", methods=["GET"])
    @authenticated
    async def list_templates(self, request: IRequest, owner: str | None) -> bytes:
        # Asked of the engine now: a template built since start-up shows as present.
        await self.manager.templates.refresh(self.manager.runtime)
        return json_answer(request, 200, self.manager.templates.describe())

    @app.route("/ui", methods=["GET", "HEAD"])
    def console_redirect(self, request: IRequest) -> bytes:
        # The page's relative URLs (console.js, vendor/...) resolve below /ui/.
        request.setResponseCode(301)
        request.setHeader(b"Location", b"/ui/")
        return b""

    @app.route("/ui/", methods=["GET", "HEAD"], branch=True)
    def console(self, request: IRequest) -> IResource:
        # The browser console's page and assets are public; its data calls carry the token.
        return self.console_files

    @app.route("/metrics", methods=["GET"])
    @authenticated
    def prometheus(self, request: IRequest, owner: str | None) -> bytes:
        # Gateway-wide numbers, no sandbox ids: any token may read them.
        if not self.serve_metrics:
            raise APIError(404, "metrics are served on --metrics-port")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self.metrics.exposition()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        # Public, like /healthz: the contract is no secret.
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        return DOCUMENT_BYTES

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        # Answers from the first accepted connection; "ready" turns true once the sandboxes
        # running before a restart are recovered (sandbox routes answer 503 until then).
        body: dict[str, Any] = {"status": "ok", "ready": self.manager.recovered}
        if not self.authenticator.enabled:
            body["sandboxes"] = len(self.manager.registry)
            body["pool"] = self.manager.pool_status()
        return json_answer(request, 200, body)
