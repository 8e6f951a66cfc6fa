"""The protocol over the process model, without a socket: a Connection on a real loop."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from agent.child import Reaper
from agent.config import AgentConfig
from agent.dispatch import Agent, Connection
from agent.loop import Loop


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


class Harness:
    def __init__(self, loop: Loop, **config: Any) -> None:
        self.loop = loop
        cfg = AgentConfig(
            secret=b"s",
            child_env={"PATH": "/usr/bin:/bin", "HOME": os.getcwd()},
            shell="/bin/sh",
            cwd=os.getcwd(),
            **config,
        )
        self.agent = Agent(cfg, loop, Reaper(loop))
        self.sent: list[dict[str, Any]] = []
        self.conn: Connection = self.agent.connect(lambda b: self.sent.append(json.loads(b)))

    def send(self, message: Any) -> None:
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.conn.handle(payload, False)

    def wait_for(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            for msg in self.sent:
                if msg.get("type") == kind:
                    self.sent.remove(msg)
                    return msg
            self.loop.run_once(0.05)
        raise AssertionError(f"no {kind!r} message within {timeout} s; got {self.sent}")


def test_a_command_runs_and_its_result_is_sent(loop: Loop) -> None:
    """A command's result carries its request id, stdout, stderr and exit code 3 with ``success``
    false, and the connection no longer holds the run."""
    h = Harness(loop)
    h.send({"request_id": "r1", "command": "echo out; echo err >&2; exit 3"})
    result = h.wait_for("result")
    assert result["request_id"] == "r1"
    assert (result["output"], result["error"], result["returncode"]) == ("out\n", "err\n", 3)
    assert result["success"] is False
    assert h.conn.runs == {}


def test_bad_json_gets_an_error_reply_at_once(loop: Loop) -> None:
    """A message that is not JSON is answered with an ``invalid_json`` error at once, without
    running the loop."""
    h = Harness(loop)
    h.send(b"{not json")
    assert h.sent[0]["error_code"] == "invalid_json"


def test_a_timeout_above_the_maximum_is_refused_not_clamped(loop: Loop) -> None:
    """Drift item: the old agent clamped it silently, the gateway refused it."""
    h = Harness(loop, default_timeout=30.0, max_timeout=60.0)
    h.send({"request_id": "r", "command": "true", "timeout": 61})
    assert h.sent[0]["error_code"] == "invalid_timeout"


def test_connection_loss_kills_commands_sent_with_on_disconnect_kill(loop: Loop) -> None:
    """The seed's behaviour, now opt-in: ``on_disconnect: kill``."""
    h = Harness(loop)
    h.send({"request_id": "r", "command": "sleep 30", "on_disconnect": "kill"})
    run = h.conn.runs["r"]
    pid = getattr(run, "pid", None)
    assert pid
    h.conn.lost()
    deadline = loop.time() + 5
    while loop.time() < deadline and pid in h.agent.reaper.waiting:
        loop.run_once(0.05)
    assert pid not in h.agent.reaper.waiting  # reaped: it was killed
    assert h.sent == []  # nothing is sent after the connection is gone


def test_backpressure_pauses_a_streamed_command_until_resumed(loop: Loop) -> None:
    """While the connection's output is paused a streamed command sends nothing; once resumed its
    output chunk and a successful result arrive."""
    h = Harness(loop)
    h.conn.set_output_paused(True)
    h.send({"request_id": "r", "command": "echo a", "stream": True})
    for _ in range(20):
        loop.run_once(0.02)
    assert h.sent == []  # paused: the pipe is not read, nothing is sent
    h.conn.set_output_paused(False)
    chunk = h.wait_for("output")
    assert chunk["data"] == "a\n"
    assert h.wait_for("result")["success"] is True
