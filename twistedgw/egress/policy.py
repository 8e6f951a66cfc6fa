"""What an egress sandbox may reach: host patterns, the operator's caps, and the address rule.

Pure logic, no I/O: ``HostPattern`` (``example.com:443``, ``*.example.org``), the operator's
``EgressPolicy`` (server-wide allow-list that creators may only narrow, most patterns per
sandbox, address ranges allowed despite the address rule), ``decide_name`` (may this host and
port be asked for at all) and ``refused_address`` (may this resolved address be connected to).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from attrs import field, frozen

#: Ports a pattern without one allows.
DEFAULT_PORTS = frozenset({80, 443})
#: Most patterns a sandbox may have unless the operator says otherwise (``--egress-max``).
DEFAULT_MAX_PATTERNS = 32

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST_RE = re.compile(rf"\A{_LABEL}(?:\.{_LABEL})*\Z")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no brackets around an IPv6 literal."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def valid_host(host: str) -> bool:
    """A DNS name of ASCII labels, or an IP literal."""
    return len(host) <= 253 and (_HOST_RE.match(host) is not None or _ip(host) is not None)


@frozen
class HostPattern:
    """One allow-list entry: an exact host or ``*.domain`` (any name below ``domain``, not
    ``domain`` itself), and the ports it allows (80 and 443 unless one is given)."""

    host: str
    ports: frozenset[int] = field(default=DEFAULT_PORTS)

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    def matches(self, host: str, port: int) -> bool:
        """Whether ``host`` (normalized) on ``port`` is allowed by this pattern."""
        if port not in self.ports:
            return False
        if self.wildcard:
            return host.endswith(self.host[1:])
        return host == self.host

    def within(self, wider: HostPattern) -> bool:
        """Whether everything this pattern allows, ``wider`` allows too."""
        if not self.ports <= wider.ports:
            return False
        if not wider.wildcard:
            return not self.wildcard and self.host == wider.host
        suffix = wider.host[1:]  # ".example.org"
        if self.wildcard:
            return self.host == wider.host or self.host[1:].endswith(suffix)
        return self.host.endswith(suffix)

    def __str__(self) -> str:
        if self.ports == DEFAULT_PORTS:
            return self.host
        return ",".join(f"{self.host}:{port}" for port in sorted(self.ports))


def parse_pattern(text: object) -> HostPattern:
    """``host``, ``host:port``, ``*.domain`` or ``*.domain:port``; ``ValueError`` otherwise."""
    if not isinstance(text, str) or not 0 < len(text) <= 260:
        raise ValueError("an egress pattern must be a non-empty string like 'example.com:443'")
    raw = text.strip().lower()
    host, ports = raw, DEFAULT_PORTS
    if raw.startswith("[") and "]" in raw:  # [v6]:port
        close = raw.index("]")
        host, rest = raw[: close + 1], raw[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"egress pattern {text[:64]!r} is not host[:port]")
            ports = frozenset({_port(rest[1:], text)})
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        ports = frozenset({_port(port_text, text)})
    host = normalize_host(host)
    name = host[2:] if host.startswith("*.") else host
    if not valid_host(name) or (host.startswith("*.") and _ip(name) is not None):
        raise ValueError(f"egress pattern {text[:64]!r} is not a host name or '*.domain'")
    return HostPattern(host, ports)


def _port(text: str, pattern: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ValueError(f"egress pattern {pattern[:64]!r} has no valid port")
    return int(text)


def parse_patterns(items: Iterable[object]) -> tuple[HostPattern, ...]:
    return tuple(parse_pattern(item) for item in items)


def parse_cidrs(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Address ranges (``10.0.0.0/8``); ``ValueError`` names a bad one."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address range like 10.1.0.0/16") from None
    return tuple(networks)


@frozen
class EgressPolicy:
    """The operator's egress settings.

    :ivar allow: the server-wide allow-list (``--egress-allow``); every creator pattern must
        lie within one of these. ``None``: no server-wide list (any name, subject to the
        address rule).
    :ivar max_patterns: most patterns per sandbox (``--egress-max``).
    :ivar allow_cidrs: ranges connected to although the address rule refuses them
        (``--egress-allow-cidr``).
    """

    allow: tuple[HostPattern, ...] | None = None
    max_patterns: int = DEFAULT_MAX_PATTERNS
    allow_cidrs: tuple[IPNetwork, ...] = ()

    def creation_patterns(self, value: object) -> tuple[str, ...]:
        """A creation body's ``egress`` list, checked; its patterns in normal form.

        ``ValueError`` with a one-line reason for a bad list, too many patterns, or a pattern
        wider than the server-wide list.
        """
        if not isinstance(value, list):
            raise ValueError("'egress' must be a list of host patterns like 'example.com:443'")
        if len(value) > self.max_patterns:
            raise ValueError(f"'egress' has more than the server maximum of {self.max_patterns}")
        patterns = parse_patterns(value)
        if self.allow is not None:
            for pattern in patterns:
                if not any(pattern.within(wide) for wide in self.allow):
                    raise ValueError(
                        f"'egress' pattern {str(pattern)!r} is not within the server's allow-list"
                    )
        normal: list[str] = []
        for pattern in patterns:
            host = f"[{pattern.host}]" if ":" in pattern.host else pattern.host
            for port in sorted(pattern.ports):
                text = f"{host}:{port}"
                if text not in normal:
                    normal.append(text)
        return tuple(normal)


@frozen
class Decision:
    """An egress decision: allowed or not, and a one-line reason."""

    allowed: bool
    reason: str
    #: A short, fixed word for metrics (``allowed``, ``not_listed``, ``address``...).
    kind: str


def decide_name(
    patterns: Sequence[HostPattern], policy: EgressPolicy, host: str, port: int
) -> Decision:
    """Whether a sandbox with ``patterns`` may ask for ``host``:``port`` (before resolving)."""
    host = normalize_host(host)
    if not valid_host(host):
        return Decision(False, f"{host[:64]!r} is not a host name", "bad_request")
    if not any(p.matches(host, port) for p in patterns):
        return Decision(False, f"{host}:{port} is not in this sandbox's egress list", "not_listed")
    if policy.allow is not None and not any(p.matches(host, port) for p in policy.allow):
        return Decision(False, f"{host}:{port} is not in the server's egress list", "not_listed")
    return Decision(True, f"{host}:{port} is in this sandbox's egress list", "allowed")


def address_kind(address: IPAddress) -> str | None:
    """Why an address is off limits by default (``None``: a global unicast address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def refused_address(text: str, policy: EgressPolicy) -> str | None:
    """Why ``text`` (a resolved address) may not be connected to, or ``None``."""
    address = _ip(text.split("%", 1)[0])
    if address is None:
        return f"{text[:64]!r} is not an address"
    kind = address_kind(address)
    if kind is None:
        return None
    check = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        check = address.ipv4_mapped
    if any(check in network for network in policy.allow_cidrs):
        return None
    return f"{kind} address {address}"
