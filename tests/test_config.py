"""Every command-line option of ``twistd sandboxgw`` reaches its ``GatewayConfig`` field and
the object it configures (``twistedgw.config``, ``twistedgw.tap.makeService``), and the
edge's allowed hosts follow the listening interface (``twistedgw.tap.edge_policy``)."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.application.service import IServiceCollection
from twisted.internet import reactor

from twistedgw.config import GatewayConfig, is_loopback, listen_interface, state_path
from twistedgw.egress.policy import EgressPolicy, HostPattern
from twistedgw.lifecycle.resources import ResourcePolicy, Resources
from twistedgw.logging import JsonLogObserver
from twistedgw.proxy.agent import WebSocketAgents
from twistedgw.proxy.ports import DEFAULT_PREVIEW_PORTS, PortSet, parse_ports
from twistedgw.service import ProxyService
from twistedgw.tap import Options, edge_policy, makeService

TOKEN = "token-alpha-0123456789"


def every_option(tmp_path: Path) -> list[str]:
    """A non-default value for every option and flag of ``Options``."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    return [
        "--port", "tcp:0:interface=127.0.0.2",
        "--image", "img:x",
        "--idle-timeout", "11",
        "--max-idle-timeout", "22",
        "--default-lifetime", "33",
        "--max-lifetime", "44",
        "--max-sandboxes", "5",
        "--memory", "768m",
        "--cpus", "1.5",
        "--pids-limit", "100",
        "--nofile", "2048",
        "--home-size", "300m",
        "--max-cpus", "3",
        "--max-memory", "3g",
        "--max-disk", "2g",
        "--egress-allow", "pypi.org:443,*.example.com",
        "--egress-max", "7",
        "--egress-allow-cidr", "10.0.0.0/8",
        "--tmp-size", "100m",
        "--container-runtime", "runsc",
        "--tokens-file", str(tokens),
        "--state-dir", str(tmp_path / "state"),
        "--reap-interval", "13",
        "--docker-threads", "3",
        "--docker-timeout", "14",
        "--docker-url", "tcp://docker.invalid:2375",
        "--backend", "docker",
        "--instance", "inst-7",
        "--agent-ready-timeout", "15",
        "--max-message-size", "12345",
        "--default-timeout", "16",
        "--max-timeout", "17",
        "--max-output", "2000",
        "--output-kill-limit", "3000",
        "--result-retention", "18",
        "--process-log-size", "4000",
        "--max-background", "9",
        "--open-handshake-timeout", "19",
        "--max-connections", "21",
        "--max-http-connections", "23",
        "--body-timeout", "24",
        "--allowed-hosts", "gw.example, Other.Example",
        "--allowed-origins", "https://App.example/, http://x:81",
        "--preview-ports", "3000,8000-8100",
        "--max-upload", "5555",
        "--paused-timeout", "25",
        "--snapshot-dir", str(tmp_path / "snaps"),
        "--log-format", "json",
        "--metrics-port", "9100",
        "--ping-interval", "26",
        "--writable-root",
        "--insecure-no-auth",
        "--template", "python=py:img",
        "--pool-size", "2",
        "--pool-size", "python=1",
    ]  # fmt: skip


@pytest.fixture
def options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Options:
    monkeypatch.delenv("TWISTEDGW_TOKENS", raising=False)
    parsed = Options()
    parsed.parseOptions(every_option(tmp_path))
    return parsed


def test_the_test_sets_every_option(tmp_path: Path) -> None:
    """``every_option`` names every parameter and flag ``Options`` has (backend aside, each
    with a value that is not its default), so a new option cannot be missed here."""
    args = every_option(tmp_path)
    given = {a[2:] for a in args if a.startswith("--")}
    declared = {p[0] for p in Options.optParameters} | {f[0] for f in Options.optFlags}
    assert declared | {"template", "pool-size"} == given
    defaults = {p[0]: p[2] for p in Options.optParameters}
    for name, value in itertools.pairwise(args):
        if name.startswith("--") and name[2:] in defaults and name != "--backend":
            assert str(defaults[name[2:]]) != value, name


def test_every_option_reaches_its_config_field(options: Options, tmp_path: Path) -> None:
    """``GatewayConfig.from_options`` takes each option into its own field (and derives the
    state file, agent message limit, lists, egress and resource policies from them)."""
    config = GatewayConfig.from_options(options)
    expected = {
        "port": "tcp:0:interface=127.0.0.2",
        "image": "img:x",
        "instance": "inst-7",
        "tokens": (TOKEN,),
        "state_file": tmp_path / "state" / "inst-7.json",
        "idle_timeout": 11.0,
        "max_idle_timeout": 22.0,
        "default_lifetime": 33.0,
        "max_lifetime": 44.0,
        "pool_sizes": {"default": 2, "python": 1},
        "templates": {"python": "py:img"},
        "max_sandboxes": 5,
        "agent_ready_timeout": 15.0,
        "reap_interval": 13.0,
        "memory": "768m",
        "cpus": 1.5,
        "pids_limit": 100,
        "nofile": 2048,
        "writable_root": True,
        "home_size": "300m",
        "tmp_size": "100m",
        "container_runtime": "runsc",
        "docker_url": "tcp://docker.invalid:2375",
        "docker_threads": 3,
        "docker_timeout": 14.0,
        "max_message_size": 12345,
        "agent_message_limit": 2 * 6 * 2000 + 64 * 1024,
        "default_timeout": 16.0,
        "max_timeout": 17.0,
        "max_output": 2000,
        "output_kill_limit": 3000,
        "result_retention": 18.0,
        "process_log_size": 4000,
        "max_background": 9,
        "open_handshake_timeout": 19.0,
        "max_connections": 21,
        "max_http_connections": 23,
        "body_timeout": 24.0,
        "allowed_hosts": ("gw.example", "Other.Example"),
        "allowed_origins": frozenset({"https://app.example", "http://x:81"}),
        "ping_interval": 26.0,
        "egress": EgressPolicy(
            allow=(
                HostPattern("pypi.org", frozenset({443})),
                HostPattern("*.example.com", frozenset({80, 443})),
            ),
            max_patterns=7,
            allow_cidrs=(ipaddress.ip_network("10.0.0.0/8"),),
        ),
        "resources": ResourcePolicy(
            defaults=Resources(cpus=1.5, memory=768 << 20, disk=300 << 20),
            maxima=Resources(cpus=3.0, memory=3 << 30, disk=2 << 30),
        ),
        "max_upload": 5555,
        "paused_timeout": 25.0,
        "snapshot_dir_option": str(tmp_path / "snaps"),
        "preview_ports": PortSet(((3000, 3000), (8000, 8100))),
        "backend": "docker",
        "log_format": "json",
        "metrics_port": "tcp:9100:interface=127.0.0.1",
    }
    assert {a.name for a in attrs.fields(GatewayConfig)} == set(expected)
    actual = {name: getattr(config, name) for name in expected}
    assert actual == expected
    assert config.snapshot_dir == tmp_path / "snaps"
    assert config.preview_key_file == tmp_path / "state" / "inst-7.preview-key"
    assert config.socket_dir == tmp_path / "state" / "sockets" / "inst-7"
    assert config.listens_on_loopback_only


def test_defaults_fill_the_optional_config_fields(tmp_path: Path) -> None:
    """Without the later options, the config falls back to its documented defaults, and the
    snapshots live beside the state file; zero lifetimes mean none."""
    options = Options()
    options.parseOptions(["--port", "tcp:0", "--state-dir", str(tmp_path)])
    config = GatewayConfig.from_options(options)
    assert (config.default_lifetime, config.max_lifetime) == (None, None)
    assert config.snapshot_dir_option is None
    assert config.snapshot_dir == tmp_path / "snapshots" / "default"
    assert config.preview_ports == parse_ports(DEFAULT_PREVIEW_PORTS)
    assert (config.backend, config.log_format, config.metrics_port) == ("docker", "text", None)
    assert (config.max_upload, config.paused_timeout) == (1024**3, 86400.0)
    minimal = {**options, "snapshot-dir": None}
    for key in ("max-upload", "paused-timeout", "log-format", "metrics-port", "backend"):
        minimal.pop(key)
    for key in ("egress-policy", "resource-policy", "preview-port-set"):
        minimal.pop(key)
    bare = GatewayConfig.from_options(minimal)
    assert (bare.max_upload, bare.paused_timeout, bare.log_format) == (1024**3, 86400.0, "text")
    assert (bare.metrics_port, bare.backend) == (None, "docker")
    assert bare.egress == EgressPolicy() and bare.resources == ResourcePolicy()
    assert bare.preview_ports == parse_ports(DEFAULT_PREVIEW_PORTS)


def test_swarm_backend_reaches_the_config(tmp_path: Path) -> None:
    """``--backend swarm`` is kept in the config (it picks the runtime)."""
    options = Options()
    options.parseOptions(["--port", "tcp:0", "--backend", "swarm", "--state-dir", str(tmp_path)])
    assert GatewayConfig.from_options(options).backend == "swarm"


def test_state_path_follows_state_dir_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state file is ``<dir>/<instance>.json``: --state-dir, else $XDG_STATE_HOME/twistedgw,
    else ~/.local/state/twistedgw."""
    assert state_path({"state-dir": str(tmp_path), "instance": "a"}) == tmp_path / "a.json"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_path({"state-dir": None, "instance": "b"}) == tmp_path / "xdg/twistedgw/b.json"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_path({"state-dir": "", "instance": "c"}) == (
        tmp_path / "home/.local/state/twistedgw/c.json"
    )


@pytest.mark.parametrize(
    ("port", "interface", "loopback"),
    [
        ("tcp:80", None, False),
        ("tcp:80:interface=127.0.0.1", "127.0.0.1", True),
        (r"tcp6:80:interface=\:\:1", "::1", True),
        ("tcp:80:interface=10.1.2.3:backlog=5", "10.1.2.3", False),
        ("unix:/run/gw.sock", "localhost", True),
        ("tcp:80:interface=gw.example", "gw.example", False),
    ],
)
def test_listen_interface_and_loopback(port: str, interface: str | None, loopback: bool) -> None:
    """The interface is read from the endpoint string (escaped colons included); a unix
    socket counts as localhost; loopback means localhost or a loopback address."""
    assert listen_interface(port) == interface
    assert (interface is not None and is_loopback(interface)) is loopback


def named(service: Any, name: str) -> Any:
    return IServiceCollection(service).getServiceNamed(name)


def test_every_option_reaches_the_service_it_configures(options: Options, tmp_path: Path) -> None:
    """makeService hands each setting on: container limits, the Docker client, the agents'
    environment, the manager, the WebSocket factory, the edge, /metrics on its own port, the
    JSON log observer, uploads and preview ports; one metrics registry is shared."""
    root = makeService(options)
    assert isinstance(root.observer, JsonLogObserver)  # type: ignore[attr-defined]

    runtime = named(root, "docker-runtime")
    limits = runtime.limits
    assert (limits.memory, limits.cpus, limits.pids, limits.nofile) == ("768m", 1.5, 100, 2048)
    assert (limits.home_size, limits.tmp_size, limits.runtime) == ("300m", "100m", "runsc")
    assert limits.read_only_root is False
    assert (runtime.image, runtime.instance) == ("img:x", "inst-7")
    assert runtime._docker_url == "tcp://docker.invalid:2375"
    assert (runtime._threads, runtime._call_timeout) == (3, 14.0)
    assert runtime.socket_dir == tmp_path / "state" / "sockets" / "inst-7"
    assert runtime._agent_env == {
        "AGENT_MAX_OUTPUT": "2000",
        "AGENT_KILL_OUTPUT": "3000",
        "AGENT_DEFAULT_TIMEOUT": "16.0",
        "AGENT_MAX_TIMEOUT": "17.0",
        "AGENT_RESULT_RETENTION": "18.0",
        "AGENT_LOG_SIZE": "4000",
        "AGENT_MAX_BACKGROUND": "9",
    }

    manager = named(root, "sandbox-manager")
    metrics = manager.metrics
    assert runtime.metrics is metrics
    policy = manager.policy
    assert (policy.idle_timeout, policy.max_idle_timeout) == (11.0, 22.0)
    assert (policy.default_lifetime, policy.max_lifetime, policy.max_sandboxes) == (33, 44, 5)
    assert policy.templates == ("default", "python")
    assert policy.egress.max_patterns == 7
    assert policy.resources.maxima.cpus == 3.0
    assert manager.pool_sizes == {"default": 2, "python": 1}
    assert (manager._agent_ready_timeout, manager._max_message_size) == (15.0, 89536)
    assert manager.paused_timeout == 25.0
    assert manager._state.path == tmp_path / "state" / "inst-7.json"
    # The manager reaches agents over WebSockets, timed and dialled by the real reactor.
    assert isinstance(manager.agents, WebSocketAgents) and manager.agents._reactor is reactor

    [proxy] = [s for s in IServiceCollection(root) if isinstance(s, ProxyService)]
    factory = proxy.factory
    assert factory.metrics is metrics
    assert (factory.policy.default_timeout, factory.policy.max_timeout) == (16.0, 17.0)
    assert (factory.maxMessagePayloadSize, factory.maxFramePayloadSize) == (12345, 12345)
    assert factory.openHandshakeTimeout == 19.0
    assert (factory.autoPingInterval, factory.autoPingTimeout) == (26.0, 26.0)
    assert factory.maxConnections == 21
    assert factory.authenticator.enabled

    edge = named(root, "http").factory.protocol.policy
    assert (edge.header_timeout, edge.body_timeout) == (19.0, 24.0)
    assert edge.max_connections <= 23
    assert {"gw.example", "other.example", "localhost"} <= edge.allowed_hosts
    assert edge.allowed_origins == frozenset({"https://app.example", "http://x:81"})
    assert edge.authenticator.enabled
    assert edge.on_streamed.__self__.max_upload == 5555
    assert edge.on_preview.__self__.ports == PortSet(((3000, 3000), (8000, 8100)))

    scrape = named(root, "metrics")
    assert scrape.endpoint._interface == "127.0.0.1"
    assert scrape.endpoint._port == 9100
    assert not root.running


def test_metrics_are_served_on_the_main_port_without_metrics_port(tmp_path: Path) -> None:
    """Without --metrics-port there is no separate metrics listener, and text logs."""
    options = Options()
    options.parseOptions(["--port", "tcp:0", "--state-dir", str(tmp_path)])
    root = makeService(options)
    names = {s.name for s in IServiceCollection(root)}
    assert "metrics" not in names
    assert root.observer is None  # type: ignore[attr-defined]


def config_for(port: str, hosts: str = "") -> GatewayConfig:
    options = Options()
    options.parseOptions(["--port", port, "--insecure-no-auth", "--allowed-hosts", hosts])
    return GatewayConfig.from_options(options)


def test_edge_policy_on_loopback_allows_loopback_names_only() -> None:
    """A gateway on 127.0.0.1 answers to loopback names (and the extra hosts), no IP literal."""
    policy = edge_policy(config_for("tcp:0:interface=127.0.0.1", "GW.example"))
    assert policy.allowed_hosts is not None
    assert {"localhost", "127.0.0.1", "gw.example"} <= policy.allowed_hosts
    assert policy.any_ip_host is False
    assert not policy.host_allowed("10.0.0.1")
    assert not policy.authenticator.enabled


def test_edge_policy_on_one_address_adds_that_address() -> None:
    """A gateway bound to one non-loopback address answers to that address too."""
    policy = edge_policy(config_for("tcp:0:interface=10.1.2.3"))
    assert policy.allowed_hosts is not None and "10.1.2.3" in policy.allowed_hosts
    assert policy.any_ip_host is False


def test_edge_policy_on_all_interfaces_accepts_ip_literals() -> None:
    """A gateway bound to all interfaces accepts any IP literal in ``Host``."""
    policy = edge_policy(config_for("tcp:0"))
    assert policy.any_ip_host is True
    assert policy.host_allowed("192.0.2.7")
    assert not policy.host_allowed("evil.example")
