"""Reading a request (JSON bodies, headers, flags) and writing a JSON answer."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

from twistedgw.web.errors import APIError

#: Largest request body read for JSON routes.
MAX_BODY_BYTES = 64 * 1024


def json_answer(request: IRequest, status: int, body: Any) -> bytes:
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


def read_json_body(request: IRequest) -> dict[str, Any] | None:
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


def header_text(request: IRequest, name: bytes) -> str | None:
    """A header as text; ``APIError`` 400 when it is not UTF-8."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, f"{name.decode()} header is not valid UTF-8") from None


def wants_details(request: IRequest) -> bool:
    """``?details=true`` (or 1, yes) asks for the fields beyond the seed's."""
    args = request.args or {}
    value = (args.get(b"details") or [b""])[0].lower()
    return value in (b"1", b"true", b"yes")
