"""Pieces shared by the tests of the docker SDK calls (``tests/test_docker_calls.py`` for
``DockerRuntime``, ``tests/test_swarm_calls.py`` for ``SwarmRuntime``): an SDK error with an
HTTP status, and a reactor that runs ``callFromThread`` at once and records it."""

from __future__ import annotations

from typing import Any

import docker.errors
import requests


def api_error(message: str, status: int = 500) -> docker.errors.APIError:
    """A ``docker.errors.APIError`` as the SDK raises it for an engine answer of ``status``
    (``message`` as the engine's explanation)."""
    response = requests.models.Response()
    response.status_code = status
    return docker.errors.APIError(message, response=response, explanation=message)


class CallFromThread:
    """The reactor's ``callFromThread``, run at once and recorded (``calls``); ``seconds``
    is always 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append((f, *args))
        f(*args)

    def seconds(self) -> float:
        return 0.0
