"""Hostile input against the real engine and image: hardening settings, resource bombs,
oversized and slow input, dead peers, fuzzed messages, odd ids, and token ownership."""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import socket
import string
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.helpers import recv, rss_kib, run, send, wait_for
from twistedgw.protocol import ProtocolError as MessageError
from twistedgw.protocol import parse_message


@pytest.fixture(scope="module")
def hostile(docker_client: Any) -> Iterator[GatewayProcess]:
    """A gateway with small limits so bombs hit them quickly."""
    from tests.integration.conftest import remove_instance_containers

    gateway = GatewayProcess(
        f"it-{secrets.token_hex(4)}",
        "--memory",
        "256m",
        "--pids-limit",
        "64",
        "--home-size",
        "32m",
        "--tmp-size",
        "16m",
        "--open-handshake-timeout",
        "2",
        "--ping-interval",
        "1",
        "--max-connections",
        "20",
        "--reap-interval",
        "1",
    )
    gateway.start()
    yield gateway
    gateway.stop()
    remove_instance_containers(docker_client, gateway.instance)


#: Run in a sandbox by docker exec: uid, effective and ambient capabilities, oom_score_adj and
#: command line of every other process.
IDENTITY_PROBE = r"""
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().replace(b"\0", b" ").decode().strip()
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/oom_score_adj") as f:
            oom = f.read().strip()
    except OSError:
        continue
    if args:
        print(status["Uid"].split()[0], status["CapEff"].strip(), status["CapAmb"].strip(),
              oom, args, sep="|")
"""


def container_identities(container: Any) -> dict[str, tuple[str, str, str, str]]:
    """(uid, effective capabilities, ambient capabilities, oom_score_adj) of every process in
    a sandbox, by command line (read from /proc with docker exec)."""
    result = container.exec_run(["python3", "-c", IDENTITY_PROBE], user="root")
    assert result.exit_code == 0, result.output
    table = {}
    for line in result.output.decode().splitlines():
        uid, eff, amb, oom, args = line.split("|", 4)
        table[args] = (uid, eff, amb, oom)
    return table


#: CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7): the agent's capability mask.
AGENT_CAPS = f"{(1 << 5) | (1 << 6) | (1 << 7):016x}"


def test_every_container_is_hardened(hostile: GatewayProcess, docker_client: Any) -> None:
    """Each sandbox keeps only the agent's three capabilities, runs read-only, limited in
    memory (no swap), CPU, processes, files and logs, with no-new-privileges, Docker's default
    seccomp and no host mounts. Inside, tini (PID 1) runs the supervisor and the agent as the
    user `agent` (uid 999) with KILL, SETGID and SETUID only, and commands run as `sandbox`
    (uid 1000) with no capability at all and a raised oom_score_adj."""
    ids = [hostile.create() for _ in range(2)]
    for sandbox_id in ids:
        container = docker_client.containers.get(f"twistedgw-{sandbox_id}")
        attrs = container.attrs
        host = attrs["HostConfig"]
        assert attrs["Config"]["User"] in ("", "root", "0")  # only until the supervisor drops
        entrypoint = attrs["Config"]["Entrypoint"]
        assert entrypoint[:3] == ["/usr/bin/tini", "--", "/usr/bin/setpriv"]
        assert entrypoint[-2:] == ["--", "/opt/agent/supervise"]
        assert host["CapDrop"] == ["ALL"]
        assert sorted(host["CapAdd"]) == ["KILL", "SETGID", "SETUID"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert not any("seccomp" in opt for opt in host["SecurityOpt"]), "default seccomp kept"
        assert host["Privileged"] is False
        assert host["ReadonlyRootfs"] is True
        assert set(host["Tmpfs"]) == {"/home/sandbox", "/tmp", "/var/tmp"}
        assert "size=32m" in host["Tmpfs"]["/home/sandbox"]
        assert host["Memory"] == 256 * 1024 * 1024
        assert host["MemorySwap"] == host["Memory"]
        assert host["NanoCpus"] == 10**9
        assert host["PidsLimit"] == 64
        assert {u["Name"]: u["Soft"] for u in host["Ulimits"]} == {"nofile": 1024}
        assert host["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-size": "10m", "max-file": "2"},
        }
        assert not host["Binds"] and not attrs["Mounts"]
        assert host["NetworkMode"] in ("default", "bridge")
        bindings = attrs["NetworkSettings"]["Ports"]["8765/tcp"]
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
        with connect(f"{hostile.ws_url}/ws/{sandbox_id}") as ws:
            send(ws, {"command": "sleep 30", "request_id": "probe"})
            table: dict[str, tuple[str, str, str, str]] = {}
            for _ in range(100):
                table = container_identities(container)
                if "sleep 30" in table:
                    break
                time.sleep(0.1)
            supervisor = next(k for k in table if k.startswith("/bin/sh /opt/agent/supervise"))
            tini = next(k for k in table if k.startswith("/usr/bin/tini -- /usr/bin/setpriv"))
            assert table[tini][0] == "0"
            assert table[supervisor][:3] == ("999", AGENT_CAPS, AGENT_CAPS)
            assert table["python3 -u -m agent"] == ("999", AGENT_CAPS, AGENT_CAPS, "0")
            command = table["sleep 30"]
            assert command[:3] == ("1000", "0" * 16, "0" * 16)
            assert int(command[3]) > 0
            send(ws, {"type": "cancel", "request_id": "probe"})
            assert recv(ws)["cancelled"] is True
            status = run(
                ws, "grep -E '^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Amb)|NoNewPrivs):' /proc/self/status"
            )["output"]
            fields = dict(line.split(":", 1) for line in status.splitlines())
            assert fields["Uid"].split() == ["1000"] * 4
            assert fields["Gid"].split() == ["1000"] * 4
            assert fields["Groups"].split() in ([], ["1000"])
            for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(fields[cap], 16) == 0, cap
            assert fields["NoNewPrivs"].strip() == "1"
    for sandbox_id in ids:
        hostile.delete(sandbox_id)


def pids_max(docker_client: Any, sandbox_id: str) -> int:
    """The pids limit the kernel enforces on a sandbox's cgroup (read on the host)."""
    cid = docker_client.containers.get(f"twistedgw-{sandbox_id}").id
    for path in (
        f"/sys/fs/cgroup/pids/docker/{cid}/pids.max",
        f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/pids.max",
    ):
        try:
            with open(path) as f:
                return int(f.read())
        except OSError:
            continue
    raise AssertionError("no pids cgroup found for the container")


def test_fork_bomb_is_contained(hostile: GatewayProcess, docker_client: Any) -> None:
    """A fork bomb in A hits A's pids limit; the gateway and sandbox B keep answering promptly,
    and A is still deletable."""
    a, b = hostile.create(), hostile.create()
    with connect(f"{hostile.ws_url}/ws/{a}") as ws_a, connect(f"{hostile.ws_url}/ws/{b}") as ws_b:
        send(ws_a, {"command": "bomb() { bomb | bomb; }; bomb", "timeout": 8, "request_id": "bomb"})
        time.sleep(2)
        for _ in range(5):
            started = time.monotonic()
            assert hostile.get("/sandboxes").status_code == 200
            assert run(ws_b, "echo fine")["output"] == "fine\n"
            assert time.monotonic() - started < 2.0
        result = recv(ws_a, timeout=30)
        assert result["request_id"] == "bomb"
        assert result["timed_out"] is True
        assert "Resource temporarily unavailable" in result["error"]
        assert pids_max(docker_client, a) == 64
    started = time.monotonic()
    assert hostile.delete(a).status_code == 200
    assert time.monotonic() - started < 15
    hostile.delete(b)


def test_memory_hog_is_killed_inside_its_limit(hostile: GatewayProcess) -> None:
    """A command allocating beyond the memory limit is OOM-killed; the result says so; the
    gateway's own memory does not move."""
    assert hostile.process is not None
    sandbox_id = hostile.create()
    before = rss_kib(hostile.process.pid)
    with connect(f"{hostile.ws_url}/ws/{sandbox_id}") as ws:
        result = run(ws, "python3 -c 'a = bytearray(1024 ** 3); print(len(a))'", timeout=60)
        assert result["success"] is False
        assert result["returncode"] == -9
        assert result.get("oom_killed") is True
        assert run(ws, "echo alive")["output"] == "alive\n"
    assert rss_kib(hostile.process.pid) - before < 20 * 1024
    hostile.delete(sandbox_id)


def test_disk_fill_stops_at_the_bound(hostile: GatewayProcess) -> None:
    """Writing past the writable space fails with ENOSPC at the configured size; the root
    filesystem is not writable at all."""
    sandbox_id = hostile.create()
    with connect(f"{hostile.ws_url}/ws/{sandbox_id}") as ws:
        result = run(
            ws, "head -c 100M /dev/zero > big; echo rc=$?; du -m big | cut -f1", timeout=60
        )
        assert "No space left on device" in result["error"]
        assert int(result["output"].split()[-1]) <= 32
        result = run(ws, "touch /usr/evil || echo refused")
        assert "refused" in result["output"]
        assert run(ws, "rm big && echo ok")["output"] == "ok\n"
    hostile.delete(sandbox_id)


def test_oversized_rest_body_is_413(hostile: GatewayProcess) -> None:
    """A huge REST body is refused with 413 JSON."""
    response = requests.post(
        hostile.url + "/sandboxes", data=b"{" + b" " * 200_000 + b"}", timeout=30
    )
    assert response.status_code == 413
    assert "error" in response.json()


def test_slowloris_is_dropped_while_others_connect(hostile: GatewayProcess) -> None:
    """Connections that trickle their headers are dropped after the handshake timeout (2 s
    here), while a normal client connects and works meanwhile."""
    sandbox_id = hostile.create()
    slow = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", hostile.port))
        s.sendall(b"GET /ws/" + sandbox_id.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    started = time.monotonic()
    with connect(f"{hostile.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo normal")["output"] == "normal\n"
    for s in slow:
        s.settimeout(10)
        try:
            while True:
                s.sendall(b"X-Slow: 1\r\n")  # a byte now and then: an idle timeout never fires
                if s.recv(1024) == b"":
                    break
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
        finally:
            s.close()
    assert time.monotonic() - started < 8
    hostile.delete(sandbox_id)


def test_connection_cap_answers_503(hostile: GatewayProcess) -> None:
    """Beyond --max-connections (20 here), WebSocket handshakes get HTTP 503."""
    sandbox_id = hostile.create()
    with contextlib.ExitStack() as stack:
        for _ in range(20):
            stack.enter_context(connect(f"{hostile.ws_url}/ws/{sandbox_id}"))
        with pytest.raises(InvalidStatus) as info:
            connect(f"{hostile.ws_url}/ws/{sandbox_id}")
        assert info.value.response.status_code == 503
    hostile.delete(sandbox_id)


def test_dead_peer_is_detected_by_ping(hostile: GatewayProcess) -> None:
    """A client that vanishes without closing (never answers pings) is dropped: the sandbox
    goes idle within a few ping intervals."""
    sandbox_id = hostile.create()
    s = socket.create_connection(("127.0.0.1", hostile.port))
    s.sendall(
        f"GET /ws/{sandbox_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert b"101" in s.recv(4096).split(b"\r\n")[0]
    assert hostile.get(f"/sandboxes/{sandbox_id}").json()["status"] == "connected"
    wait_for(lambda: hostile.get(f"/sandboxes/{sandbox_id}").json()["status"] == "idle", timeout=10)
    s.close()
    hostile.delete(sandbox_id)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, 1e308, -0.0, 3.5])
    if kind == 3:
        return "".join(
            rng.choice(string.printable + "\u00e9\u4e2d\U0001f600\x00")
            for _ in range(rng.randrange(0, 40))
        )
    if kind == 4:
        return "x" * rng.choice([0, 1, 1000, 100_000])
    if kind == 5:
        return rng.choice(["echo hi", "true", "exit 7", "cat", "sleep 0.1"])
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["command", "type", "x", "env", "A"]): _random_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


FIELDS = [
    "command",
    "request_id",
    "type",
    "timeout",
    "cwd",
    "env",
    "stdin",
    "stream",
    "interactive",
    "session",
    "data",
    "eof",
]
TYPES = ["command", "cancel", "stdin", "list_sessions", "close_session", "bogus", 5, None]


def fuzz_messages(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        roll = rng.random()
        if roll < 0.1:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif roll < 0.2:
            yield json.dumps(_random_value(rng)).encode()
        else:
            message: dict[str, Any] = {f: _random_value(rng) for f in rng.sample(FIELDS, 4)}
            if rng.random() < 0.5:
                message["type"] = rng.choice(TYPES)
            if rng.random() < 0.3:
                message["timeout"] = rng.choice([0.5, 1, 2])
            yield json.dumps(message).encode()


def test_fuzzed_messages_never_crash_gateway_or_agent(
    hostile: GatewayProcess, docker_client: Any
) -> None:
    """Random field types, sizes, unicode and nesting, through the gateway and straight to the
    agent: every answer is JSON; every message gets an answer (no message of this corpus
    starts a command, so there is at least one per message); every message the gateway must
    refuse gets an error reply with the code its validator gives it (counted per code); and
    both keep working."""
    sandbox_id = hostile.create()
    refusals: Counter[str] = Counter()
    messages = list(fuzz_messages(1234, 400))
    with connect(f"{hostile.ws_url}/ws/{sandbox_id}", max_size=None) as ws:
        for payload in messages:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                ws.send(payload)
                refusals["binary_message"] += 1
                continue
            ws.send(text)
            try:
                parsed = parse_message(payload, False)
            except MessageError as e:
                refusals[e.code] += 1
                continue
            is_command = (
                parsed.get("type", "command") == "command"
                if isinstance(parsed, dict)
                else type(parsed).__name__ == "Command"
            )
            assert not is_command, "the corpus changed: recount the answers"
        # Drain: every answer must be JSON; stop once quiet.
        answers: list[dict[str, Any]] = []
        try:
            while True:
                answers.append(json.loads(ws.recv(timeout=5)))
        except TimeoutError:
            pass
        errors = Counter(a.get("error_code") for a in answers if a.get("type") == "error")
        missing = {code: n - errors[code] for code, n in refusals.items() if errors[code] < n}
        assert not missing, f"refused messages without an error reply: {missing}"
        assert len(answers) >= len(messages)
        assert run(ws, "echo survived")["output"] == "survived\n"
    # Straight to the agent, past the gateway's validation (as a compromised gateway might).
    attrs = docker_client.containers.get(f"twistedgw-{sandbox_id}").attrs
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    port = attrs["NetworkSettings"]["Ports"]["8765/tcp"][0]["HostPort"]
    with connect(
        f"ws://127.0.0.1:{port}/agent",
        max_size=None,
        additional_headers={"Authorization": f"Bearer {env['SANDBOX_AGENT_SECRET']}"},
    ) as agent:
        for payload in fuzz_messages(99, 300):
            try:
                agent.send(payload.decode("utf-8"))
            except UnicodeDecodeError:
                agent.send(payload)
        try:
            while True:
                json.loads(agent.recv(timeout=5))
        except TimeoutError:
            pass
        send(agent, {"command": "echo agent ok", "request_id": "final"})
        while (message := recv(agent))["request_id"] != "final":
            pass
        assert message["output"] == "agent ok\n"
    assert hostile.get("/healthz").status_code == 200
    hostile.delete(sandbox_id)


@pytest.mark.parametrize(
    "odd",
    [
        "..",
        "%2e%2e",
        "%2E%2E%2Fetc",
        "a" * 5000,
        "%C3%A9t%C3%A9",
        "0" * 32,
        "ABCDEF0123456789" * 2,
        "%00",
    ],
)
def test_odd_ids_are_404(hostile: GatewayProcess, odd: str) -> None:
    """Path-like, huge, non-ASCII or wrongly shaped ids are 404 on REST and on the handshake."""
    for method in ("GET", "DELETE"):
        response = requests.request(method, f"{hostile.url}/sandboxes/{odd}", timeout=10)
        assert response.status_code == 404
        assert "error" in response.json()
    with pytest.raises(InvalidStatus) as info:
        connect(f"{hostile.ws_url}/ws/{odd}")
    assert info.value.response.status_code == 404


def test_tokens_protect_routes_and_sandboxes(make_gateway: Any, tmp_path: Any) -> None:
    """With a tokens file, requests without a token get 401, and one token cannot reach
    another token's sandbox over REST or WebSocket; tokens never reach the log."""
    alpha, bravo = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{alpha}\n{bravo}\n")
    gateway: GatewayProcess = make_gateway("--tokens-file", str(tokens))
    assert requests.get(gateway.url + "/sandboxes", timeout=10).status_code == 401
    a = {"Authorization": f"Bearer {alpha}"}
    b = {"Authorization": f"Bearer {bravo}"}
    sandbox_id = gateway.create(headers=a)
    assert (
        requests.get(f"{gateway.url}/sandboxes/{sandbox_id}", headers=b, timeout=10).status_code
        == 404
    )
    with pytest.raises(InvalidStatus) as info:
        connect(f"{gateway.ws_url}/ws/{sandbox_id}")
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        connect(f"{gateway.ws_url}/ws/{sandbox_id}", additional_headers=b)
    assert info.value.response.status_code == 404
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}?access_token={alpha}") as ws:
        assert run(ws, "echo mine")["output"] == "mine\n"
    assert (
        requests.delete(f"{gateway.url}/sandboxes/{sandbox_id}", headers=a, timeout=30).status_code
        == 200
    )
    log = gateway.tail(10_000)
    assert alpha not in log and bravo not in log


def test_many_threads_of_garbage_do_not_stop_service(hostile: GatewayProcess) -> None:
    """Concurrent junk requests (bad JSON, odd methods, huge headers) all get answers, and the
    gateway keeps serving."""
    errors: list[str] = []

    def junk() -> None:
        for body in (b"[", b"null", b'{"idle_timeout": "x"}', b"\xff" * 100):
            response = requests.post(
                hostile.url + "/sandboxes",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            if response.status_code != 400:
                errors.append(f"{body!r}: {response.status_code}")
        response = requests.request("PATCH", hostile.url + "/sandboxes", timeout=30)
        if response.status_code != 405:
            errors.append(f"PATCH: {response.status_code}")

    threads = [threading.Thread(target=junk) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert hostile.get("/healthz").status_code == 200


def test_network_none_sandbox(make_gateway: Any, docker_client: Any) -> None:
    """A sandbox created with network "none" has no network interface but loopback, its agent
    is reached through a Unix socket in a per-sandbox directory, and that directory is removed
    with the sandbox."""
    gateway: GatewayProcess = make_gateway()
    response = requests.post(gateway.url + "/sandboxes", json={"network": "none"}, timeout=60)
    assert response.status_code == 200
    sandbox_id = response.json()["sandbox_id"]
    attrs = docker_client.containers.get(f"twistedgw-{sandbox_id}").attrs
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    assert not attrs["NetworkSettings"]["Ports"]
    mounts = attrs["Mounts"]
    assert [m["Destination"] for m in mounts] == ["/run/twistedgw"]
    socket_dir = mounts[0]["Source"]
    assert gateway.get(f"/sandboxes/{sandbox_id}").json()["ip_address"] == ""
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "ls /sys/class/net")["output"].split() == ["lo"]
        assert run(ws, "echo kept > f && cat f")["output"] == "kept\n"
    assert gateway.delete(sandbox_id).status_code == 200
    import os

    assert not os.path.exists(socket_dir)
    bad = requests.post(gateway.url + "/sandboxes", json={"network": "host"}, timeout=10)
    assert bad.status_code == 400


def test_network_none_where_socket_paths_are_too_long_is_a_clear_503(
    make_gateway: Any, docker_client: Any
) -> None:
    """On a gateway whose --state-dir and --instance make agent socket paths longer than the
    107 bytes a Unix socket address holds, a network-none create is refused with a 503 that
    names both options (it used to fail after the agent-ready timeout with a TypeError), no
    container of it is left, the start-up log already said so, and sandboxes with a network
    still work."""
    from twistedgw.runtime.labels import LABEL_INSTANCE

    instance = f"it-{secrets.token_hex(4)}-{'x' * 40}"
    gateway: GatewayProcess = make_gateway(instance=instance)
    response = requests.post(gateway.url + "/sandboxes", json={"network": "none"}, timeout=60)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert "network none is unavailable" in error
    assert "bytes" in error and "--state-dir or --instance" in error
    label = f"{LABEL_INSTANCE}={instance}"
    assert docker_client.containers.list(all=True, filters={"label": label}) == []
    assert "sandboxes with network none will be refused" in gateway.tail(200)
    sandbox_id = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo up")["output"] == "up\n"
