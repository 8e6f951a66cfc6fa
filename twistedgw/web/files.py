"""The file routes' gateway side: ``/sandboxes/{id}/files...`` as requests to the agent.

Downloads, listings, ``mkdir`` and ``DELETE`` are plain routes (``FileRoutes.forward``).
Uploads (``PUT /files`` and ``PUT /files/archive``) start at the edge, before any body byte
is read: ``FileRoutes.begin_upload`` (the ``EdgePolicy.on_streamed`` hook) authenticates,
finds the sandbox, checks ``--max-upload`` against ``Content-Length``, opens the agent
request and makes an ``UploadBody`` the request's ``body_sink``; each chunk then goes on to
the agent as it arrives. The route runs once the body is complete and answers with the
agent's answer. An agent answer that comes before the body is complete (no such directory,
disk full) is sent to the client at once, and the upload is dropped.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlencode

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IRequest, IResponse

from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.errors import SandboxNotFound
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.proxy.files import (
    AgentFiles,
    UploadBody,
    error_extra,
    error_text,
    read_answer,
    set_transfer_buffer,
    stream_response,
)
from twistedgw.sandbox import Sandbox, SandboxPaused, is_valid_sandbox_id
from twistedgw.web.auth import QUERY_PARAMETER, Authenticator, Unauthorized
from twistedgw.web.errors import APIError
from twistedgw.web.requests import json_answer

#: Default ``--max-upload``: bytes per request.
DEFAULT_MAX_UPLOAD = 1024 * 1024 * 1024
#: The upload routes (``PUT``), path only.
UPLOAD_PATH = re.compile(rb"/sandboxes/([^/]+)/files(/archive)?/?")
#: Response headers passed on from the agent.
PASSED_HEADERS = (
    b"content-type",
    b"last-modified",
    b"accept-ranges",
    b"content-range",
)


def agent_target(route: bytes, args: dict[bytes, list[bytes]]) -> bytes:
    """The agent's request target for a route and the client's query (less the token)."""
    query = [
        (name, value)
        for name, values in sorted(args.items())
        if name != QUERY_PARAMETER.encode()
        for value in values
    ]
    for name, value in query:
        if name == b"path" and (not value or b"\x00" in value):
            raise APIError(400, "'path' must be a non-empty path without NUL")
    return b"/files" + route + (b"?" + urlencode(query).encode("ascii") if query else b"")


def check_path(args: dict[bytes, list[bytes]], required: bool = True) -> None:
    values = args.get(b"path")
    if not values:
        if required:
            raise APIError(400, "'path' is required")
        return
    if not values[0] or b"\x00" in values[0]:
        raise APIError(400, "'path' must be a non-empty path without NUL")


def query_args(query: bytes) -> dict[bytes, list[bytes]]:
    """A raw query string's arguments as bytes, like ``request.args``. (``parse_qs`` of
    bytes decodes the percent-escapes and then insists on ASCII: ``?path=%C2%80`` raised.)
    Latin-1 maps every byte to one character and back, so nothing is lost or refused."""
    parsed = parse_qs(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return {
        name.encode("latin-1"): [value.encode("latin-1") for value in values]
        for name, values in parsed.items()
    }


class FileRoutes:
    """The file routes over a manager's sandboxes."""

    _log = Logger()

    def __init__(
        self,
        manager: SandboxManager,
        authenticator: Authenticator,
        files: AgentFiles,
        max_upload: int = DEFAULT_MAX_UPLOAD,
    ) -> None:
        self.manager = manager
        self.authenticator = authenticator
        self.files = files
        self.max_upload = max_upload

    def sandbox(self, sandbox_id: str, owner: str | None) -> Sandbox:
        """The caller's sandbox, running (``SandboxPaused`` when paused)."""
        sandbox = self.manager.lookup(sandbox_id, owner)
        if sandbox.paused:
            raise SandboxPaused(f"sandbox {sandbox_id} is paused; resume it first")
        return sandbox

    # -- plain routes ----------------------------------------------------------------------

    async def forward(
        self, request: IRequest, sandbox_id: str, owner: str | None, route: bytes
    ) -> bytes:
        """Send the request to the agent and answer with what it answers, streaming any body
        it sends."""
        sandbox = self.sandbox(sandbox_id, owner)
        args = request.args or {}
        check_path(args, required=route == b"" or route == b"/mkdir")
        target = agent_target(route, args)
        headers: dict[bytes, bytes] = {}
        wanted = request.getHeader(b"range")
        if wanted is not None:
            headers[b"Range"] = wanted
        method = request.method
        response = await self.files.request(sandbox, method, target, headers)
        sandbox.touch(self.manager.now())
        if response.code >= 400 or response.code == 201 or method in (b"DELETE", b"POST"):
            answer = await read_answer(response)
            if answer.status >= 400:
                raise APIError(answer.status, error_text(answer), error_extra(answer))
            return json_answer(request, answer.status, answer.body)
        request.setResponseCode(response.code)
        for name in PASSED_HEADERS:
            values = response.headers.getRawHeaders(name)
            if values:
                request.setHeader(name, values[0])
        request.setHeader(b"Cache-Control", b"no-store")
        if method == b"HEAD":
            size = response.headers.getRawHeaders(b"x-file-size")
            if size:
                request.setHeader(b"Content-Length", size[0])
        elif response.length is not UNKNOWN_LENGTH:
            request.setHeader(b"Content-Length", str(response.length).encode("ascii"))
        if method == b"HEAD":
            response.deliverBody(_Discard())
            return b""
        await stream_response(request, response)
        return b""

    # -- uploads ---------------------------------------------------------------------------

    def begin_upload(self, request: Any) -> None:
        """The edge's ``on_streamed`` hook: start the agent upload for ``request``."""
        channel = request.channel
        raw_path = getattr(channel, "_path", b"")
        path, _, query = raw_path.partition(b"?")
        match = UPLOAD_PATH.fullmatch(path)
        if match is None:
            return
        try:
            self._begin_upload(request, match, query)
        except Unauthorized as e:
            channel.refuse(401, str(e))
        except SandboxNotFound as e:
            channel.refuse(404, f"Sandbox {e.sandbox_id} not found")
        except SandboxPaused as e:
            channel.refuse(409, str(e))
        except APIError as e:
            channel.refuse(e.status, e.message)
        except Exception:
            # Raised here it would drop the connection without an answer.
            self._log.failure("starting an upload failed")
            channel.refuse(500, "internal server error")

    def _begin_upload(self, request: Any, match: re.Match[bytes], query: bytes) -> None:
        channel = request.channel
        sandbox_id = match.group(1).decode("utf-8", "replace")
        archive = match.group(2) is not None
        args = query_args(query)
        token = (args.get(QUERY_PARAMETER.encode()) or [b""])[0].decode("utf-8", "replace")
        header = request.requestHeaders.getRawHeaders(b"authorization")
        authorization = header[0].decode("utf-8", "replace") if header else None
        owner = self.authenticator.owner_for(authorization, token or None)
        if not is_valid_sandbox_id(sandbox_id):
            raise SandboxNotFound(sandbox_id)
        sandbox = self.sandbox(sandbox_id, owner)
        sandbox.touch(self.manager.now())
        check_path(args, required=not archive)
        target = agent_target(b"/archive" if archive else b"", args)
        chunked = request.requestHeaders.hasHeader(b"transfer-encoding")
        length = None if chunked else channel.length
        if length is not None and length > self.max_upload:
            raise APIError(413, f"upload larger than --max-upload ({self.max_upload} bytes)")
        request.cap_body(self.max_upload)
        set_transfer_buffer(channel.transport)
        body = UploadBody(channel.transport, length)
        request.body_sink = body
        response = self.files.request(sandbox, b"PUT", target, {}, body)
        request.upload_response = response

        def early(result: IResponse) -> IResponse | None:
            if body.ended or result.code < 400:
                return result
            # The agent answered before the whole body went out (no such directory, disk
            # full): nothing more goes to it; the rest of the body is read and dropped, and
            # the route answers once it is in. (Answering at once and closing would reset
            # the connection under a client still sending, which then never reads the
            # answer; common clients read nothing before their body is sent anyway.)
            body.abort("the agent answered early")
            request.early_answer = Deferred.fromCoroutine(read_answer(result))
            return None

        def failed(failure: Failure) -> Failure | None:
            if body.ended:
                return failure  # the route is waiting for it
            body.abort("the agent connection failed")
            request.early_failure = failure
            return None

        response.addCallbacks(early, failed)
        # The client went away (or was refused): drop the upload.
        request.notifyFinish().addErrback(lambda f: body.abort("the client went away"))

    async def finish_upload(self, request: Any, sandbox_id: str, owner: str | None) -> bytes:
        """The upload route: the body is complete; answer with the agent's answer."""
        body = getattr(request, "body_sink", None)
        response = getattr(request, "upload_response", None)
        if not isinstance(body, UploadBody) or response is None:
            # Not started at the edge (an in-memory test site without the hook).
            self.sandbox(sandbox_id, owner)
            raise APIError(500, "upload not streamed")
        body.end()
        result = await response
        if result is None:
            early = getattr(request, "early_answer", None)
            if early is None:
                failure = getattr(request, "early_failure", None)
                reason = failure.getErrorMessage() if failure is not None else "no answer"
                raise AgentUnavailable(f"file upload failed: {reason}")
            result_answer = await early
            raise APIError(
                result_answer.status, error_text(result_answer), error_extra(result_answer)
            )
        answer = await read_answer(result)
        if answer.status >= 400:
            raise APIError(answer.status, error_text(answer), error_extra(answer))
        return json_answer(request, answer.status, answer.body)


class _Discard:
    def makeConnection(self, transport: Any) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass
