"""REST calls for fast tests: treq's ``StubTreq`` over the Klein app, in memory."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq

#: The base URL of the in-memory gateway (StubTreq needs one; nothing is resolved).
BASE = "http://gateway.test"


async def request(
    treq: StubTreq, method: str, path: str, token: str | None = None, **kwargs: Any
) -> tuple[int, Any, bytes]:
    """``method path`` (with ``token`` as a bearer token): status, headers and body."""
    if token:
        headers = dict(kwargs.pop("headers", {}))
        headers["Authorization"] = f"Bearer {token}"
        kwargs["headers"] = headers
    response = await treq.request(method, BASE + path, **kwargs)  # type: ignore[attr-defined]
    return response.code, response.headers, await response.content()


async def call(
    treq: StubTreq, method: str, path: str, token: str | None = None, **kwargs: Any
) -> tuple[int, Any]:
    """``method path``: status and JSON body."""
    code, _, body = await request(treq, method, path, token, **kwargs)
    return code, json.loads(body)
