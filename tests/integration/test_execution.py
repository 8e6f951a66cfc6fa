"""Command execution on the real image: timeouts, limits, streaming, stdin, cancel, sessions,
backpressure. Every test goes through a real gateway process over loopback."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.helpers import (
    agent_pid,
    container_processes,
    recv,
    rss_kib,
    run,
    send,
    wait_for,
)


@pytest.fixture(scope="module")
def sandbox(gateway: GatewayProcess) -> Iterator[str]:
    sandbox_id = gateway.create()
    yield sandbox_id
    gateway.delete(sandbox_id)


@pytest.fixture
def ws(gateway: GatewayProcess, sandbox: str) -> Iterator[Any]:
    with connect(f"{gateway.ws_url}/ws/{sandbox}", max_size=None) as client:
        yield client


def test_seed_message_gets_seed_result(ws: Any) -> None:
    """Only seed fields in, the seed's result out (with additive fields only)."""
    result = run(ws, "echo hi", request_id="seed")
    assert result["request_id"] == "seed"
    assert (result["success"], result["output"], result["error"], result["returncode"]) == (
        True,
        "hi\n",
        "",
        0,
    )
    assert result["type"] == "result"
    assert result["timed_out"] is False and result["cancelled"] is False
    assert result["truncated"] is False
    assert result["duration_ms"] >= 0


def test_timeout_kills_the_process_tree(
    ws: Any, gateway: GatewayProcess, docker_client: Any, sandbox: str
) -> None:
    """On timeout the whole process group dies and the result says so, with partial output."""
    started = time.monotonic()
    result = run(ws, "echo partial; sh -c 'sleep 1000 & sleep 1000'", timeout=1)
    assert time.monotonic() - started < 5
    assert result["timed_out"] is True
    assert result["success"] is False
    assert result["returncode"] == -9
    assert result["output"] == "partial\n"
    container = docker_client.containers.get(f"twistedgw-{sandbox}")
    wait_for(lambda: not any("sleep 1000" in p for p in container_processes(container)))


def test_timeout_above_server_maximum_is_refused(ws: Any) -> None:
    """A timeout over the server's maximum gets an error reply, not a silent clamp."""
    result = run(ws, "true", timeout=10**9)
    assert result["success"] is False
    assert result["error_code"] == "invalid_timeout"


def test_flood_is_capped_and_stopped(
    ws: Any, gateway: GatewayProcess, docker_client: Any, sandbox: str
) -> None:
    """`yes` is cut at the output limit: head and tail kept, truncated, producer killed; neither
    gateway nor agent memory grows beyond a few tens of MiB."""
    assert gateway.process is not None
    container = docker_client.containers.get(f"twistedgw-{sandbox}")
    agent = agent_pid(container)
    gateway_before, agent_before = rss_kib(gateway.process.pid), rss_kib(agent)
    started = time.monotonic()
    result = run(ws, "yes", timeout=60)
    elapsed = time.monotonic() - started
    assert result["truncated"] is True
    assert result.get("output_limit_exceeded") is True
    assert result["timed_out"] is False
    assert len(result["output"]) <= 1024 * 1024 + 1024
    assert result["output"].startswith("y\ny\n") and result["output"].endswith("y\n")
    for command in ("cat /dev/zero | base64", "head -c 300000000 /dev/urandom"):
        flood = run(ws, command, timeout=60)
        assert flood["truncated"] is True, command
    gateway_after, agent_after = rss_kib(gateway.process.pid), rss_kib(agent)
    print(
        f"flood: yes stopped after {elapsed:.2f} s; gateway RSS {gateway_before} -> "
        f"{gateway_after} KiB, agent RSS {agent_before} -> {agent_after} KiB"
    )
    assert gateway_after - gateway_before < 40 * 1024
    assert agent_after - agent_before < 40 * 1024


@pytest.mark.serial  # a latency figure: the first chunk within 0.5 s
def test_streaming_sends_chunks_in_order_then_result(ws: Any) -> None:
    """stream: true sends output chunks as they are produced, in order, then the result."""
    send(
        ws,
        {
            "command": "for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.3; done",
            "request_id": "s1",
            "stream": True,
        },
    )
    chunks: list[tuple[float, str, str]] = []
    started = time.monotonic()
    while True:
        message = recv(ws)
        if message["type"] == "output":
            assert message["request_id"] == "s1"
            chunks.append((time.monotonic() - started, message["stream"], message["data"]))
        else:
            result = message
            break
    stdout = "".join(data for _, stream, data in chunks if stream == "stdout")
    stderr = "".join(data for _, stream, data in chunks if stream == "stderr")
    assert stdout == "1\n2\n3\n"
    assert stderr == "e1\ne2\ne3\n"
    first_stdout = next(t for t, stream, _ in chunks if stream == "stdout")
    assert first_stdout < 0.5, "the first chunk must arrive before the command ends"
    assert result["type"] == "result" and result["returncode"] == 0
    assert result["output"] == "" and result["error"] == ""


def test_cancel_kills_the_command(ws: Any) -> None:
    """A cancel message kills the command; its result says cancelled."""
    send(ws, {"command": "sleep 100", "request_id": "long"})
    time.sleep(0.3)
    started = time.monotonic()
    send(ws, {"type": "cancel", "request_id": "long"})
    result = recv(ws)
    assert time.monotonic() - started < 3
    assert (result["request_id"], result["cancelled"], result["success"]) == ("long", True, False)
    send(ws, {"type": "cancel", "request_id": "nothing-runs"})
    error = recv(ws)
    assert (error["type"], error["error_code"]) == ("error", "unknown_request")


def test_stdin_cwd_and_env(ws: Any) -> None:
    """stdin is fed then closed; cwd and env apply to the command."""
    assert run(ws, "cat", stdin="hello")["output"] == "hello"
    assert run(ws, "wc -c", stdin="x" * 100_000)["output"].strip() == "100000"
    assert run(ws, "pwd", cwd="/tmp")["output"] == "/tmp\n"
    result = run(ws, "echo $GREETING", env={"GREETING": "hi there"})
    assert result["output"] == "hi there\n"
    bad = run(ws, "pwd", cwd="/does/not/exist")
    assert bad["success"] is False and bad["error_code"] == "invalid_cwd"


def test_interactive_input(ws: Any) -> None:
    """An interactive command reads what stdin messages send, until eof."""
    send(ws, {"command": 'read a; read b; echo "$a-$b"', "request_id": "i1", "interactive": True})
    send(ws, {"type": "stdin", "request_id": "i1", "data": "x\n"})
    send(ws, {"type": "stdin", "request_id": "i1", "data": "y\n", "eof": True})
    result = recv(ws)
    assert (result["request_id"], result["output"]) == ("i1", "x-y\n")
    send(ws, {"type": "stdin", "request_id": "i1", "data": "late"})
    assert recv(ws)["error_code"] == "unknown_request"


def test_sessions_keep_shell_state(ws: Any) -> None:
    """A session keeps cd, exports and functions; sessions are independent; commands without
    a session start fresh."""
    assert run(ws, "cd /tmp && export FOO=bar && greet() { echo hi $1; }", session="a")["success"]
    assert run(ws, "pwd; echo $FOO; greet you", session="a")["output"] == "/tmp\nbar\nhi you\n"
    assert run(ws, "pwd; echo ${FOO:-unset}", session="b")["output"] == "/home/sandbox\nunset\n"
    assert run(ws, "pwd; echo ${FOO:-unset}")["output"] == "/home/sandbox\nunset\n"
    send(ws, {"type": "list_sessions", "request_id": "ls"})
    listing = recv(ws)
    assert listing["type"] == "sessions"
    assert {"a", "b"} <= {s["session"] for s in listing["sessions"]}
    send(ws, {"type": "close_session", "session": "b", "request_id": "cb"})
    assert recv(ws)["type"] == "session_closed"


def test_session_survives_timeout_and_cancel(ws: Any) -> None:
    """A hung command in a session times out without wedging the session."""
    assert run(ws, "cd /var", session="t")["success"]
    result = run(ws, "sleep 100", session="t", timeout=1)
    assert result["timed_out"] is True
    assert run(ws, "pwd", session="t")["output"] == "/var\n"
    result = run(ws, "while :; do :; done", session="t", timeout=1)
    assert result["timed_out"] is True
    assert run(ws, "echo works", session="t")["output"] == "works\n"


def test_many_commands_in_flight_across_connections(gateway: GatewayProcess, sandbox: str) -> None:
    """Four connections with 25 commands each in flight: every result pairs with its id."""
    errors: list[str] = []

    def client(n: int) -> None:
        try:
            with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
                for i in range(25):
                    send(ws, {"command": f"echo {n}-{i}", "request_id": f"{n}-{i}"})
                for _ in range(25):
                    result = recv(ws)
                    if result["output"] != result["request_id"] + "\n":
                        errors.append(str(result))
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_non_utf8_output_is_replaced(ws: Any) -> None:
    """Invalid UTF-8 never crashes anything: it is decoded with replacement characters."""
    result = run(ws, r"printf 'a\377b\n'; printf '\300' >&2")
    assert result["output"] == "a\ufffdb\n"
    assert result["error"] == "\ufffd"
    send(
        ws,
        {
            "command": r"printf '\342\202'; sleep 0.2; printf '\254\n'",
            "stream": True,
            "request_id": "split",
        },
    )
    data = ""
    while (message := recv(ws))["type"] == "output":
        data += message["data"]
    assert data == "\u20ac\n"


def test_zombies_are_reaped(ws: Any, docker_client: Any, sandbox: str) -> None:
    """Orphaned children are reaped by the container's init."""
    for _ in range(5):
        run(ws, "sh -c 'sleep 0.1 &' ; true")
    time.sleep(0.5)
    container = docker_client.containers.get(f"twistedgw-{sandbox}")
    states = [state for _, state in container.top(ps_args="-o pid,stat")["Processes"]]
    assert not [s for s in states if s.startswith("Z")]


def test_oversized_message_closes_1009(gateway: GatewayProcess, sandbox: str) -> None:
    """A client message over --max-message-size is refused with close code 1009 (which the
    client may notice while still sending, or on its next read)."""
    with connect(f"{gateway.ws_url}/ws/{sandbox}", max_size=None) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.send(json.dumps({"command": "true", "stdin": "x" * (17 * 1024 * 1024)}))
            ws.recv(timeout=30)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_slow_reader_keeps_memory_flat(
    gateway: GatewayProcess, sandbox: str, docker_client: Any
) -> None:
    """A client that stops reading while a command streams pauses the agent: gateway and agent
    memory stay flat, the producer blocks, and nothing is lost once the client reads again."""
    assert gateway.process is not None
    size = 200_000_000
    expected = int(
        subprocess.run(
            f"head -c {size} /dev/zero | base64 | wc -c",
            shell=True,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    container = docker_client.containers.get(f"twistedgw-{sandbox}")
    agent = agent_pid(container)
    gateway_before, agent_before = rss_kib(gateway.process.pid), rss_kib(agent)
    with connect(f"{gateway.ws_url}/ws/{sandbox}", max_size=None, max_queue=4) as ws:
        send(
            ws,
            {
                "command": f"head -c {size} /dev/zero | base64",
                "stream": True,
                "request_id": "big",
                "timeout": 600,
            },
        )
        time.sleep(8)  # not reading
        gateway_paused, agent_paused = rss_kib(gateway.process.pid), rss_kib(agent)
        assert any("head -c" in p for p in container_processes(container)), (
            "the producer should be blocked, not finished"
        )
        received = 0
        while (message := recv(ws, 120))["type"] == "output":
            received += len(message["data"])
        assert message["returncode"] == 0
    print(
        f"slow reader: gateway RSS {gateway_before} -> {gateway_paused} KiB while paused; "
        f"agent RSS {agent_before} -> {agent_paused} KiB; {received} chars delivered"
    )
    assert received == expected
    assert gateway_paused - gateway_before < 30 * 1024
    assert agent_paused - agent_before < 30 * 1024
