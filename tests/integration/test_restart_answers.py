"""A restarted gateway's first answers: polled from the first accepted connection, every
answer about running sandboxes is complete or a 503 with Retry-After, never [] or 404."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import requests

from tests.integration.conftest import GatewayProcess


def _judge(response: requests.Response, expected: set[str], path: str) -> bool:
    """True for a complete answer, False for a 503 with Retry-After; fails on anything else."""
    if response.status_code == 503:
        assert response.headers.get("Retry-After") == "1", (path, response.headers)
        return False
    assert response.status_code == 200, (path, response.status_code, response.text)
    body = response.json()
    if path == "/sandboxes":
        assert {s["sandbox_id"] for s in body} == expected, (path, body)
    else:
        assert body["sandbox_id"] in expected and body["status"] == "idle", (path, body)
    return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_restart_never_answers_404_or_a_short_list(make_gateway: Any, sig: int) -> None:
    """Kill (or stop) a gateway over running sandboxes and start another on the same instance;
    GET /sandboxes and GET /sandboxes/{id}, polled in a tight loop while it starts, answer
    either the full picture or 503 + Retry-After until it has recovered them."""
    first: GatewayProcess = make_gateway()
    ids = [first.create() for _ in range(3)]
    first.stop(sig)

    second = GatewayProcess(first.instance)
    second.launch()
    paths = ["/sandboxes", *(f"/sandboxes/{sandbox_id}" for sandbox_id in ids)]
    answers = {"503": 0, "complete": 0}
    session = requests.Session()
    try:
        deadline = time.monotonic() + 60
        complete_rounds = 0
        while complete_rounds < 3:
            assert time.monotonic() < deadline, f"no complete answers: {answers}"
            assert second.process is not None and second.process.poll() is None, second.tail()
            round_complete = True
            for path in paths:
                try:
                    response = session.get(second.url + path, timeout=10)
                except requests.ConnectionError:
                    round_complete = False  # not listening yet
                    break
                complete = _judge(response, set(ids), path)
                answers["complete" if complete else "503"] += 1
                round_complete = round_complete and complete
            complete_rounds = complete_rounds + 1 if round_complete else 0
        assert second.get("/healthz").json()["ready"] is True
    finally:
        second.stop()
        session.close()
