"""Start the agent: configuration, logging, the listening socket, the event loop."""

from __future__ import annotations

import os
import signal
import socket
import sys

from agent import egress, log
from agent.child import Reaper
from agent.config import AgentConfig, ConfigError
from agent.dispatch import Agent
from agent.loop import Loop
from agent.server import AgentHTTP
from twistedgw import protocol

EXIT_CONFIG = 2


def listen(config: AgentConfig) -> tuple[socket.socket, str]:
    """The listening socket: the Unix socket ``AGENT_UNIX_SOCKET`` or TCP ``AGENT_PORT``."""
    if config.unix_socket:
        # Sandboxes without a network: the gateway reaches the agent through a socket in a
        # directory it bind-mounts into the container.
        if os.path.exists(config.unix_socket):
            os.unlink(config.unix_socket)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(config.unix_socket)
            os.chmod(config.unix_socket, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock, config.unix_socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", config.port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock, f"0.0.0.0:{config.port}"


def serve(config: AgentConfig, loop: Loop) -> int:
    """Listen and serve until SIGTERM/SIGINT; returns the exit code."""
    try:
        sock, where = listen(config)
    except OSError as e:
        print(f"agent: cannot listen: {e}", file=sys.stderr, flush=True)
        return 1
    agent = Agent(config, loop, Reaper(loop))
    loop.serve(sock, lambda: AgentHTTP(agent, protocol.AGENT_MAX_MESSAGE_SIZE))
    egress.start(loop, config.egress_socket, config.egress_port)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    log.info("agent listening on %s (%r)", where, config)
    try:
        loop.run()
    finally:
        agent.kill_all()
        sock.close()
    log.info("agent stopped")
    return 0


def main() -> int:
    """Start the agent; returns the process exit code."""
    try:
        config = AgentConfig.from_environ(os.environ)
    except ConfigError as e:
        print(f"agent: configuration error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    log.set_level(config.log_level)
    return serve(config, Loop())
