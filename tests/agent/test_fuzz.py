"""Hypothesis fuzzing through the black-box suite: any message, text or binary, valid or not,
gets a JSON reply; the agent never dies; its memory stays bounded.

Commands the fuzzer may make valid are drawn from a harmless set (the agent really runs them);
every other field, and the message as a whole, is arbitrary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import unix_connect

from tests.agent.blackbox import AgentServer

REPLY_TYPES = {"result", "error", "output", "sessions", "session_closed"}
SAFE_COMMANDS = ["true", "echo fuzz", "exit 3", "printf '\\377'", "echo err >&2"]
KEYS = [
    "type", "request_id", "command", "timeout", "cwd", "env", "stdin", "stream",
    "interactive", "session", "data", "eof",
]  # fmt: skip
TYPES = ["command", "cancel", "stdin", "list_sessions", "close_session", "bogus", ""]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def message_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object shaped like a protocol message, with arbitrary field values."""
    obj: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=7)):
        if key == "command":
            obj[key] = draw(st.one_of(st.sampled_from(SAFE_COMMANDS), json_leaf.filter(
                lambda v: not isinstance(v, str))))  # fmt: skip
        elif key == "type":
            obj[key] = draw(st.one_of(st.sampled_from(TYPES), json_leaf))
        elif key == "timeout":
            obj[key] = draw(st.one_of(st.floats(0.001, 5), json_leaf))
        elif key == "cwd":
            obj[key] = draw(st.one_of(st.sampled_from(["/tmp", ".", "/", "nope"]), json_leaf))
        else:
            obj[key] = draw(json_value)
    return obj


payloads = st.one_of(
    message_objects().map(lambda o: (json.dumps(o), False)),
    message_objects().map(lambda o: (json.dumps(o, ensure_ascii=False), False)),
    json_value.map(lambda v: (json.dumps(v), False)),
    st.text(max_size=200).map(lambda t: (t, False)),
    st.binary(max_size=200).map(lambda b: (b, True)),
)


@pytest.fixture(scope="module")
def server() -> Iterator[AgentServer]:
    srv = AgentServer("host", AGENT_MAX_TIMEOUT="10", AGENT_MAX_SESSIONS="4")
    yield srv
    srv.stop()


def test_any_message_gets_a_json_reply_and_the_agent_survives(server: AgentServer) -> None:
    """Each of 300 arbitrary messages (protocol-shaped objects, any JSON, any text, any binary),
    on a fresh connection, gets a JSON object reply of a known type (an error with a string
    ``error_code``), the agent stays alive and its RSS grows by less than 20 MiB."""
    headers = {"Authorization": f"Bearer {server.secret}"}
    rss_before = server.rss_kib()

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads)
    def one_message(payload: tuple[str | bytes, bool]) -> None:
        data, binary = payload
        with unix_connect(server.socket, "ws://localhost/agent", additional_headers=headers) as ws:
            ws.send(data if not binary else bytes(data))  # type: ignore[arg-type]
            reply = json.loads(ws.recv(timeout=15))
        assert isinstance(reply, dict)
        assert reply.get("type") in REPLY_TYPES
        if reply["type"] == "error":
            assert isinstance(reply["error_code"], str)
        assert server.alive()

    one_message()
    grown_mib = (server.rss_kib() - rss_before) / 1024
    assert grown_mib < 20, f"agent RSS grew by {grown_mib:.1f} MiB over the fuzz run"
