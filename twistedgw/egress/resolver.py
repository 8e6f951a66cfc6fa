"""How the egress proxy turns names into addresses: ``IEgressResolver``.

The proxy resolves every name itself and connects to the address it checked, never to the
name, so a DNS answer that changes between check and connect (rebinding) cannot slip through.
``SystemResolver`` asks the reactor's name resolver (``getaddrinfo`` in a thread). Tests
inject ``HostsResolver``, a fixed table.

A gateway under test can be given a table too, through ``TEST_HOSTS_ENV``. It cannot change
a real name by accident: only names under the reserved ``.test`` top-level domain (RFC 6761;
no real DNS answers for it) are taken from the file, the file must start with
``TEST_HOSTS_MAGIC``, and the gateway logs a warning at start-up when it is in use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

#: Environment variable naming a test hosts file (see the module docstring).
TEST_HOSTS_ENV = "TWISTEDGW_EGRESS_TEST_HOSTS"
#: First line a test hosts file must carry.
TEST_HOSTS_MAGIC = "# twistedgw egress test hosts: not for production"
#: The only names a test hosts file may map.
TEST_SUFFIX = ".test"

_log = Logger()


class IEgressResolver(Protocol):
    """Names to addresses for the egress proxy."""

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        """Every address of ``host`` (may be empty: unknown name)."""


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


class SystemResolver:
    """The reactor's name resolver (``getaddrinfo`` on its thread pool)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        receiver = _Collect()
        self._reactor.nameResolver.resolveHostName(receiver, host, portNumber=port)
        return receiver.done


class HostsResolver:
    """A fixed table of names; other names go to ``fallback`` (or resolve to nothing)."""

    def __init__(
        self, hosts: Mapping[str, Sequence[str]], fallback: IEgressResolver | None = None
    ) -> None:
        self.hosts = {name.lower().rstrip("."): list(addrs) for name, addrs in hosts.items()}
        self.fallback = fallback
        #: Every name asked for, in order (tests read it).
        self.asked: list[str] = []

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        self.asked.append(host)
        if host in self.hosts:
            return succeed(list(self.hosts[host]))
        if self.fallback is not None:
            return self.fallback.resolve(host, port)
        return succeed([])


def read_test_hosts(path: Path) -> dict[str, list[str]]:
    """A test hosts file: the magic first line, then ``ADDRESS NAME...`` lines for ``.test``
    names. ``ValueError`` for anything else."""
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != TEST_HOSTS_MAGIC:
        raise ValueError(f"{path} does not start with {TEST_HOSTS_MAGIC!r}")
    hosts: dict[str, list[str]] = {}
    for line in lines[1:]:
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        address, names = fields[0], fields[1:]
        for name in names:
            name = name.lower().rstrip(".")
            if not name.endswith(TEST_SUFFIX):
                raise ValueError(f"{path}: {name!r} is not a {TEST_SUFFIX} name")
            hosts.setdefault(name, []).append(address)
    return hosts


def resolver_from_environ(reactor: Any, environ: Mapping[str, str] = os.environ) -> IEgressResolver:
    """The system resolver, or (under test) a ``.test`` table in front of it."""
    system = SystemResolver(reactor)
    path = environ.get(TEST_HOSTS_ENV)
    if not path:
        return system
    hosts = read_test_hosts(Path(path))
    _log.warn(
        "egress: TEST resolver in use ({env}={path}): {count} .test names are mapped; "
        "this is for the test suite only",
        env=TEST_HOSTS_ENV,
        path=path,
        count=len(hosts),
    )
    return HostsResolver(hosts, fallback=system)
