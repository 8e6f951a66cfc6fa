"""The gateway's configuration: one frozen object built from the command-line ``Options``.

Every option value the wiring needs, and the limits derived from them (the agent leg's
message limit, the state file's path), live here, so ``tap.makeService`` reads names rather
than option strings.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrs import field, frozen

from twistedgw.egress.policy import EgressPolicy
from twistedgw.lifecycle.resources import ResourcePolicy
from twistedgw.proxy.ports import DEFAULT_PREVIEW_PORTS, PortSet, parse_ports


def agent_message_limit(max_message_size: int, max_output: int) -> int:
    """Largest message accepted from an agent.

    A result carries up to ``max_output`` bytes of stdout and of stderr, and JSON may spell a
    byte as six characters (``\\u0000``), so the agent leg admits that much, and never less
    than what clients may send.
    """
    return max(max_message_size, 2 * 6 * max_output + 64 * 1024)


def state_path(options: Mapping[str, Any]) -> Path:
    """Where this instance keeps its state file."""
    if options["state-dir"]:
        base = Path(options["state-dir"])
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "twistedgw"
    return base / f"{options['instance']}.json"


def _listed(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def listen_interface(port: str) -> str | None:
    """The interface a listening endpoint string binds to (``None``: all of them)."""
    # An endpoint string escapes colons in values with a backslash (tcp6:80:interface=\:\:1).
    match = re.search(r"interface=((?:\\.|[^:])*)", port)
    interface = match.group(1).replace("\\", "") if match else None
    if port.startswith("unix:"):
        interface = "localhost"
    return interface


def is_loopback(interface: str) -> bool:
    """Whether a listening interface is this machine's loopback."""
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


@frozen
class GatewayConfig:
    """All of ``twistd sandboxgw``'s settings, checked (by ``Options``) and derived."""

    port: str
    image: str
    instance: str
    tokens: tuple[str, ...]
    state_file: Path
    # Sandboxes and their lifecycle.
    idle_timeout: float
    max_idle_timeout: float
    default_lifetime: float | None
    max_lifetime: float | None
    #: Warm pool size per template (``default``: --pool-size N).
    pool_sizes: Mapping[str, int]
    #: Templates besides the default (``--image``): name to image.
    templates: Mapping[str, str]
    max_sandboxes: int
    agent_ready_timeout: float
    reap_interval: float
    # Container limits and hardening.
    memory: str
    cpus: float
    pids_limit: int
    nofile: int
    writable_root: bool
    home_size: str
    tmp_size: str
    container_runtime: str | None
    # The Docker engine.
    docker_url: str | None
    docker_threads: int
    docker_timeout: float
    # Commands and messages.
    max_message_size: int
    agent_message_limit: int
    default_timeout: float
    max_timeout: float
    max_output: int
    output_kill_limit: int
    # Process handles (issue 14): passed to the agents.
    result_retention: float
    process_log_size: int
    max_background: int
    # The edge.
    open_handshake_timeout: float
    max_connections: int
    max_http_connections: int
    body_timeout: float
    allowed_hosts: tuple[str, ...]
    allowed_origins: frozenset[str]
    ping_interval: float
    # Egress by allow-list and per-create resources (issue 17).
    egress: EgressPolicy = field(factory=EgressPolicy)
    resources: ResourcePolicy = field(factory=ResourcePolicy)
    # Files, snapshots, pause.
    max_upload: int = 1024 * 1024 * 1024
    paused_timeout: float = 86400.0
    snapshot_dir_option: str | None = None
    # Port previews.
    preview_ports: PortSet = field(factory=lambda: parse_ports(DEFAULT_PREVIEW_PORTS))
    #: ``docker`` (containers, state file) or ``swarm`` (services, state in the cluster).
    backend: str = "docker"
    # Operations (issue 19): log lines as text or JSON; /metrics on a port of its own.
    log_format: str = "text"
    metrics_port: str | None = None

    @property
    def snapshot_dir(self) -> Path:
        """Where snapshots (tars and their sidecars) are kept."""
        if self.snapshot_dir_option:
            return Path(self.snapshot_dir_option)
        return self.state_file.parent / "snapshots" / self.instance

    @property
    def preview_key_file(self) -> Path:
        """The key that signs preview URLs (created once, mode 0600)."""
        return self.state_file.parent / f"{self.instance}.preview-key"

    @property
    def socket_dir(self) -> Path:
        """Where network-less sandboxes' agent socket directories live."""
        return self.state_file.parent / "sockets" / self.instance

    @property
    def listens_on_loopback_only(self) -> bool:
        interface = listen_interface(self.port)
        return interface is not None and is_loopback(interface)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GatewayConfig:
        """The configuration of parsed (``postOptions``-checked) ``Options``."""
        return cls(
            port=options["port"],
            image=options["image"],
            instance=options["instance"],
            tokens=tuple(options["tokens"]),
            state_file=state_path(options),
            idle_timeout=options["idle-timeout"],
            max_idle_timeout=options["max-idle-timeout"],
            default_lifetime=options["default-lifetime"] or None,
            max_lifetime=options["max-lifetime"] or None,
            pool_sizes=dict(options["pool-sizes"]),
            templates=dict(options["templates"]),
            max_sandboxes=options["max-sandboxes"],
            agent_ready_timeout=options["agent-ready-timeout"],
            reap_interval=options["reap-interval"],
            memory=options["memory"],
            cpus=options["cpus"],
            pids_limit=options["pids-limit"],
            nofile=options["nofile"],
            writable_root=bool(options["writable-root"]),
            home_size=options["home-size"],
            tmp_size=options["tmp-size"],
            container_runtime=options["container-runtime"],
            docker_url=options["docker-url"],
            docker_threads=options["docker-threads"],
            docker_timeout=options["docker-timeout"],
            max_message_size=options["max-message-size"],
            agent_message_limit=agent_message_limit(
                options["max-message-size"], options["max-output"]
            ),
            default_timeout=options["default-timeout"],
            max_timeout=options["max-timeout"],
            max_output=options["max-output"],
            output_kill_limit=options["output-kill-limit"],
            result_retention=options["result-retention"],
            process_log_size=options["process-log-size"],
            max_background=options["max-background"],
            open_handshake_timeout=options["open-handshake-timeout"],
            max_connections=options["max-connections"],
            max_http_connections=options["max-http-connections"],
            body_timeout=options["body-timeout"],
            allowed_hosts=tuple(_listed(options["allowed-hosts"])),
            max_upload=options.get("max-upload", 1024 * 1024 * 1024),
            paused_timeout=options.get("paused-timeout", 86400.0),
            snapshot_dir_option=options.get("snapshot-dir"),
            log_format=options.get("log-format", "text"),
            metrics_port=options.get("metrics-port"),
            allowed_origins=frozenset(
                o.lower().rstrip("/") for o in _listed(options["allowed-origins"])
            ),
            ping_interval=options["ping-interval"],
            egress=options.get("egress-policy") or EgressPolicy(),
            resources=options.get("resource-policy") or ResourcePolicy(),
            preview_ports=options.get("preview-port-set") or parse_ports(DEFAULT_PREVIEW_PORTS),
            backend=options.get("backend") or "docker",
        )
