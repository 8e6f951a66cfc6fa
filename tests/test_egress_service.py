"""The egress resolvers and ``EgressProxies`` in memory: the system resolver against a fake
name resolver, the ``.test`` table and its file format, and the per-sandbox listeners
against a recording reactor (no socket is listened on, no name is looked up)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from twistedgw.egress import service as service_module
from twistedgw.egress.policy import EgressPolicy
from twistedgw.egress.proxy import EgressProxyFactory
from twistedgw.egress.resolver import (
    TEST_HOSTS_ENV,
    TEST_HOSTS_MAGIC,
    HostsResolver,
    SystemResolver,
    read_test_hosts,
    resolver_from_environ,
)
from twistedgw.egress.service import BACKLOG, EgressProxies
from twistedgw.runtime.hardening import AGENT_UID, EGRESS_SOCKET_NAME
from twistedgw.sandbox import Sandbox, SandboxSettings

# -- resolvers ---------------------------------------------------------------------------------


class NameResolver:
    """``IHostnameResolver``: answers each lookup at once with ``addresses``."""

    def __init__(self, addresses: list[Any]) -> None:
        self.addresses = addresses
        self.asked: list[tuple[str, int]] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0) -> Any:
        self.asked.append((hostName, portNumber))
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()
        return receiver


class Reactor:
    def __init__(self, name_resolver: Any = None) -> None:
        self.nameResolver = name_resolver


def result(d: Deferred[Any]) -> Any:
    found: list[Any] = []
    d.addBoth(found.append)
    [value] = found
    return value


def test_system_resolver_collects_each_address_once_in_order() -> None:
    """The reactor's name resolver is asked with the port; its addresses (v4 and v6, each
    once, in the order given) are the answer."""
    names = NameResolver(
        [
            IPv4Address("TCP", "93.184.216.34", 443),
            IPv6Address("TCP", "2606:2800:220:1::1", 443),
            IPv4Address("TCP", "93.184.216.34", 443),
        ]
    )
    answer = result(SystemResolver(Reactor(names)).resolve("example.com", 443))
    assert answer == ["93.184.216.34", "2606:2800:220:1::1"]
    assert names.asked == [("example.com", 443)]
    assert result(SystemResolver(Reactor(NameResolver([]))).resolve("nx.example", 80)) == []


def test_hosts_resolver_answers_from_its_table_then_the_fallback() -> None:
    """Table names (kept lower-case, without a trailing dot) answer a copy of their list;
    others go to the fallback, or resolve to nothing; every name asked is recorded."""

    class Fallback:
        def resolve(self, host: str, port: int) -> Deferred[list[str]]:
            return succeed([f"fallback-{host}-{port}"])

    hosts = HostsResolver({"Api.Test.": ["127.0.0.2"]}, fallback=Fallback())
    first = result(hosts.resolve("api.test", 80))
    assert first == ["127.0.0.2"]
    first.append("mutated")
    assert result(hosts.resolve("api.test", 80)) == ["127.0.0.2"]
    assert result(hosts.resolve("other.example", 443)) == ["fallback-other.example-443"]
    assert result(HostsResolver({}).resolve("other.example", 443)) == []
    assert hosts.asked == ["api.test", "api.test", "other.example"]


def test_a_test_hosts_file_maps_dot_test_names_with_comments_and_blank_lines(
    tmp_path: Path,
) -> None:
    """After the magic line: ``ADDRESS NAME...`` lines (names folded to lower case, trailing
    dots dropped, several addresses per name kept in order), comments and blank lines
    skipped."""
    path = tmp_path / "hosts"
    path.write_text(
        f"{TEST_HOSTS_MAGIC}\n"
        "# a comment\n"
        "\n"
        "127.0.0.1 A.test b.test.  # trailing comment\n"
        "127.0.0.2 a.test\n"
        "   \n"
    )
    assert read_test_hosts(path) == {"a.test": ["127.0.0.1", "127.0.0.2"], "b.test": ["127.0.0.1"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "does not start with"),
        ("127.0.0.1 a.test\n", "does not start with"),
        (f"{TEST_HOSTS_MAGIC}\n127.0.0.1 a.test pypi.org\n", "'pypi.org' is not a .test name"),
        (f"{TEST_HOSTS_MAGIC}\n127.0.0.1 test\n", "'test' is not a .test name"),
    ],
)
def test_a_test_hosts_file_refuses_anything_else(tmp_path: Path, text: str, message: str) -> None:
    """No magic first line, or a name outside ``.test`` (even ``test`` itself): ValueError."""
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_test_hosts(path)


def test_the_environment_chooses_the_resolver(tmp_path: Path) -> None:
    """Without the variable (or empty): the system resolver; with it: the file's table in
    front of the system resolver."""
    reactor = Reactor()
    assert isinstance(resolver_from_environ(reactor, {}), SystemResolver)
    assert isinstance(resolver_from_environ(reactor, {TEST_HOSTS_ENV: ""}), SystemResolver)
    path = tmp_path / "hosts"
    path.write_text(f"{TEST_HOSTS_MAGIC}\n127.0.0.9 gw.test\n")
    chosen = resolver_from_environ(reactor, {TEST_HOSTS_ENV: str(path)})
    assert isinstance(chosen, HostsResolver)
    assert chosen.hosts == {"gw.test": ["127.0.0.9"]}
    assert isinstance(chosen.fallback, SystemResolver)


# -- EgressProxies -----------------------------------------------------------------------------


class Port:
    def __init__(self, path: str, stop_error: Exception | None = None) -> None:
        self.path = path
        self.stopped = 0
        self.stop_error = stop_error
        self.deferred: Deferred[None] | None = None

    def stopListening(self) -> Deferred[None] | None:
        self.stopped += 1
        self.deferred = fail(self.stop_error) if self.stop_error else succeed(None)
        return self.deferred

    def outcome(self) -> Any:
        """What stopping came to after the service's callbacks."""
        assert self.deferred is not None
        return result(self.deferred)


class ListeningReactor:
    """``listenUNIX`` recorded; it leaves a file where the socket would be."""

    def __init__(self) -> None:
        self.listens: list[tuple[str, Any, int, int]] = []
        self.ports: list[Port] = []
        self.error: Exception | None = None
        self.stop_error: Exception | None = None
        #: Whether a file was at the socket's path when listening began, per listen.
        self.existed: list[bool] = []

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Port:
        if self.error is not None:
            raise self.error
        self.existed.append(os.path.lexists(address))
        Path(address).write_bytes(b"")
        self.listens.append((address, factory, backlog, mode))
        port = Port(address, self.stop_error)
        self.ports.append(port)
        return port


@pytest.fixture
def chowns(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """``os.chown`` recorded instead of done."""
    calls: list[tuple[str, int, int]] = []

    def chown(path: Any, uid: int, gid: int) -> None:
        calls.append((str(path), uid, gid))

    monkeypatch.setattr(service_module.os, "chown", chown)
    return calls


def egress_sandbox(directory: Path | None, sandbox_id: str = "a" * 32, **settings: Any) -> Sandbox:
    settings = {"network": "none", "egress": ("example.com:443",), **settings}
    return Sandbox(
        sandbox_id, "cid", 0.0, "", "", 0, "s", 0.0,
        SandboxSettings(idle_timeout=10.0, **settings),
        agent_socket=str(directory / "agent.sock") if directory is not None else None,
    )  # fmt: skip


def test_an_egress_sandbox_gets_a_private_listener_beside_its_agent_socket(
    tmp_path: Path, chowns: list[Any]
) -> None:
    """``proxy.sock`` in the agent socket's directory, with the large backlog, mode 0600, given
    to the agent's uid; its factory carries the sandbox's patterns and the gateway's policy;
    adding the same sandbox again changes nothing."""
    reactor = ListeningReactor()
    policy = EgressPolicy(max_patterns=3)
    proxies = EgressProxies(reactor, policy, HostsResolver({}))
    sandbox = egress_sandbox(tmp_path)
    proxies.sandbox_added(sandbox)
    proxies.sandbox_added(sandbox)
    path = str(tmp_path / EGRESS_SOCKET_NAME)
    [(address, factory, backlog, mode)] = reactor.listens
    assert (address, backlog, mode) == (path, BACKLOG, 0o600)
    assert isinstance(factory, EgressProxyFactory)
    assert factory.sandbox_id == "a" * 32 and factory.policy is policy
    assert [str(p) for p in factory.patterns] == ["example.com:443"]
    assert chowns == [(path, AGENT_UID, AGENT_UID)]
    assert proxies.listeners["a" * 32] == (reactor.ports[0], factory)
    assert proxies.socket_path(sandbox) == tmp_path / EGRESS_SOCKET_NAME


def test_sandboxes_without_egress_or_socket_directory_get_no_listener(
    tmp_path: Path, chowns: list[Any]
) -> None:
    """No ``egress`` list: nothing; an egress sandbox without a socket directory: nothing
    (logged); no socket path for it."""
    reactor = ListeningReactor()
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    proxies.sandbox_added(egress_sandbox(tmp_path, egress=None))
    no_dir = egress_sandbox(None)
    proxies.sandbox_added(no_dir)
    assert reactor.listens == [] and proxies.listeners == {}
    assert proxies.socket_path(no_dir) is None


def test_an_empty_egress_list_still_gets_a_listener(tmp_path: Path, chowns: list[Any]) -> None:
    """``egress: []`` (nothing allowed) is an egress sandbox: its proxy refuses everything."""
    reactor = ListeningReactor()
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    proxies.sandbox_added(egress_sandbox(tmp_path, egress=()))
    assert len(reactor.listens) == 1


def test_a_stale_socket_is_replaced(tmp_path: Path, chowns: list[Any]) -> None:
    """A socket file left by an earlier gateway is removed before listening again."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(str(tmp_path / EGRESS_SOCKET_NAME))
    finally:
        stale.close()
    assert (tmp_path / EGRESS_SOCKET_NAME).is_socket()
    reactor = ListeningReactor()
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    proxies.sandbox_added(egress_sandbox(tmp_path))
    assert reactor.existed == [False]


def test_a_listen_failure_leaves_no_listener(tmp_path: Path, chowns: list[Any]) -> None:
    """``listenUNIX`` failing: logged, no listener kept, nothing chowned."""
    reactor = ListeningReactor()
    reactor.error = OSError("address in use")
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    proxies.sandbox_added(egress_sandbox(tmp_path))
    assert proxies.listeners == {} and chowns == []


def test_without_root_the_socket_is_opened_to_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway that may not chown: the socket becomes mode 0666 instead, and is kept."""

    def refuse(path: Any, uid: int, gid: int) -> None:
        raise PermissionError("not root")

    monkeypatch.setattr(service_module.os, "chown", refuse)
    reactor = ListeningReactor()
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    proxies.sandbox_added(egress_sandbox(tmp_path))
    assert (tmp_path / EGRESS_SOCKET_NAME).stat().st_mode & 0o777 == 0o666
    assert len(proxies.listeners) == 1


def test_removal_and_stop_close_connections_and_stop_listening(
    tmp_path: Path, chowns: list[Any]
) -> None:
    """A removed sandbox's listener stops and its connections are dropped (a socket already
    gone is no error); removing again is harmless; stopping the service stops the rest."""
    reactor = ListeningReactor()
    reactor.stop_error = FileNotFoundError("directory gone")
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    proxies.startService()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = egress_sandbox(tmp_path / "a"), egress_sandbox(tmp_path / "b", "b" * 32)
    proxies.sandbox_added(first)
    proxies.sandbox_added(second)
    closed: list[str] = []
    for sandbox_id, (_, factory) in proxies.listeners.items():
        factory.close_all = lambda sandbox_id=sandbox_id: closed.append(sandbox_id)  # type: ignore[method-assign]
    proxies.sandbox_removed(first)
    proxies.sandbox_removed(first)
    assert [p.stopped for p in reactor.ports] == [1, 0] and closed == ["a" * 32]
    assert not isinstance(reactor.ports[0].outcome(), Failure)  # FileNotFoundError trapped
    proxies.stopService()
    assert [p.stopped for p in reactor.ports] == [1, 1] and closed == ["a" * 32, "b" * 32]
    assert proxies.listeners == {} and not proxies.running


def test_other_stop_errors_are_not_swallowed(tmp_path: Path, chowns: list[Any]) -> None:
    """Only a missing socket file is expected when stopping; other errors stay failures."""
    reactor = ListeningReactor()
    reactor.stop_error = PermissionError("no")
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    proxies.sandbox_added(egress_sandbox(tmp_path))
    proxies.sandbox_removed(egress_sandbox(tmp_path))
    outcome = reactor.ports[0].outcome()
    assert outcome.check(PermissionError)
