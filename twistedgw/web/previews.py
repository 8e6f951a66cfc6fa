"""The port preview routes' gateway side (see ``twistedgw.proxy.ports``).

``PreviewRoutes.begin`` is the edge's ``on_preview`` hook: it runs once a request's headers
are in (before any body byte), for ``/sandboxes/{id}/ports/{port}/...`` (API token, like
every route) and ``/previews/{id}/{port}/{expiry}/{signature}/...`` (the signature instead of
a token), and either refuses the request with a JSON answer or takes the connection over
with a ``PreviewTunnel``. ``PreviewRoutes.create_url`` serves
``POST /sandboxes/{id}/ports/{port}/url``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

from twisted.logger import Logger

from twistedgw.lifecycle.errors import SandboxNotFound
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.proxy.ports import (
    DEFAULT_PREVIEW_PORTS,
    DEFAULT_URL_TTL,
    MAX_URL_TTL,
    SIGNED_PATH,
    TOKEN_PATH,
    URL_ROUTE,
    BodyEnd,
    PortSet,
    PreviewTunnel,
    URLSigner,
    is_upgrade,
    parse_ports,
    strip_token,
    upstream_head,
)
from twistedgw.sandbox import Sandbox, SandboxPaused, is_valid_sandbox_id
from twistedgw.web.auth import QUERY_PARAMETER, Authenticator, Unauthorized
from twistedgw.web.errors import APIError


def is_preview(method: bytes, path: bytes) -> bool:
    """Whether a request (method, path without query) goes to a sandbox's port."""
    if path.startswith(b"/previews/"):
        return True
    if not path.startswith(b"/sandboxes/") or b"/ports/" not in path:
        return False
    if method == b"POST" and URL_ROUTE.fullmatch(path):
        return False
    return TOKEN_PATH.fullmatch(path) is not None


class PreviewRoutes:
    """Port previews of a manager's sandboxes."""

    _log = Logger()

    def __init__(
        self,
        manager: SandboxManager,
        authenticator: Authenticator,
        signer: URLSigner,
        reactor: Any,
        ports: PortSet | None = None,
    ) -> None:
        self.manager = manager
        self.authenticator = authenticator
        self.signer = signer
        self.reactor = reactor
        self.ports = ports or parse_ports(DEFAULT_PREVIEW_PORTS)

    @classmethod
    def unsigned(
        cls, manager: SandboxManager, authenticator: Authenticator, reactor: Any
    ) -> PreviewRoutes:
        """Previews with a key of this process only (signed URLs die with it): for gateways
        built without a state directory (tests)."""
        import os

        return cls(manager, authenticator, URLSigner(os.urandom(32), manager.now), reactor)

    def check_port(self, port: int) -> None:
        if port not in self.ports:
            raise APIError(
                403, f"port {port} may not be previewed (--preview-ports {self.ports.describe()})"
            )

    def _running(self, sandbox_id: str, owner: str | None) -> Sandbox:
        sandbox = self.manager.lookup(sandbox_id, owner)
        if sandbox.paused:
            raise SandboxPaused(f"sandbox {sandbox_id} is paused; resume it first")
        return sandbox

    # -- the edge hook ---------------------------------------------------------------------

    def begin(self, request: Any) -> None:
        """Refuse the request, or start its tunnel (``channel.tunnel``)."""
        channel = request.channel
        try:
            self._begin(request)
        except Unauthorized as e:
            channel.refuse(401, str(e))
        except SandboxNotFound as e:
            channel.refuse(404, f"Sandbox {e.sandbox_id} not found")
        except SandboxPaused as e:
            channel.refuse(409, str(e))
        except APIError as e:
            channel.refuse(e.status, e.message)

    def _begin(self, request: Any) -> None:
        channel = request.channel
        raw = getattr(channel, "_path", b"")
        path, _, query = raw.partition(b"?")
        match = SIGNED_PATH.fullmatch(path)
        if match is not None:
            sandbox_id = match.group(1).decode("utf-8", "replace")
            port = int(match.group(2))
            expiry = int(match.group(3))
            signature = match.group(4).decode("ascii")
            rest = match.group(5)
            prefix = path[: len(path) - len(rest or b"")]
            if not is_valid_sandbox_id(sandbox_id) or not self.signer.valid(
                sandbox_id, port, expiry, signature
            ):
                raise APIError(403, "this preview URL is forged or has expired")
            owner = None
        else:
            match = TOKEN_PATH.fullmatch(path)
            if match is None:
                raise APIError(404, "no such preview route")
            args = parse_qs(query, keep_blank_values=True)
            token = (args.get(QUERY_PARAMETER.encode()) or [b""])[0].decode("utf-8", "replace")
            header = request.requestHeaders.getRawHeaders(b"authorization")
            authorization = header[0].decode("utf-8", "replace") if header else None
            owner = self.authenticator.owner_for(authorization, token or None)
            sandbox_id = match.group(1).decode("utf-8", "replace")
            if not is_valid_sandbox_id(sandbox_id):
                raise SandboxNotFound(sandbox_id)
            port = int(match.group(2))
            rest = match.group(3)
            prefix = path[: len(path) - len(rest or b"")]
        sandbox = self._running(sandbox_id, owner)
        self.check_port(port)
        method = getattr(channel, "_command", b"GET")
        if rest is None:
            # Relative links in the page resolve against the directory: add the slash.
            location = prefix + b"/" + (b"?" + query if query else b"")
            channel.answer_redirect(location)
            return
        headers = list(request.requestHeaders.getAllRawHeaders())
        flat = [(name, value) for name, values in headers for value in values]
        upgrade = is_upgrade(flat)
        chunked = request.requestHeaders.hasHeader(b"transfer-encoding")
        body = BodyEnd(None if chunked else channel.length, chunked, upgrade)
        target = rest + (b"?" + strip_token(query) if query and strip_token(query) else b"")
        peer = channel.transport.getPeer() if channel.transport is not None else None
        host = request.requestHeaders.getRawHeaders(b"host")
        head = upstream_head(
            method,
            target,
            getattr(channel, "_version", b"HTTP/1.1"),
            flat,
            port,
            str(getattr(peer, "host", "unknown")),
            host[0] if host else None,
            prefix,
            b"https" if request.isSecure() else b"http",
        )
        manager = self.manager

        def touch() -> None:
            sandbox.touch(manager.now())

        touch()
        label = f"{method.decode('ascii', 'replace')} {rest.decode('utf-8', 'replace')[:200]}"
        channel.tunnel = PreviewTunnel(
            self.reactor, channel, sandbox, port, head, body, touch, label=label
        )

    # -- POST /sandboxes/{id}/ports/{port}/url ---------------------------------------------

    def create_url(
        self, sandbox_id: str, port: int, owner: str | None, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        """A signed URL path for the caller's sandbox and port; ``expires_in`` seconds in the
        body (default ``DEFAULT_URL_TTL``, at most ``MAX_URL_TTL``)."""
        self.manager.lookup(sandbox_id, owner)
        self.check_port(port)
        body = body or {}
        if set(body) - {"expires_in"}:
            raise APIError(400, "body must be a JSON object with at most 'expires_in'")
        ttl = body.get("expires_in", DEFAULT_URL_TTL)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_URL_TTL:
            raise APIError(
                400, f"'expires_in' must be a number of seconds above 0, at most {MAX_URL_TTL}"
            )
        path, expiry = self.signer.path(sandbox_id, port, ttl)
        return {"path": path, "expires_at": expiry, "port": port}


def port_number(text: str) -> int:
    """A port in a route, 1-65535 (``APIError`` 404 otherwise)."""
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise APIError(404, "no such port")
    return int(text)
