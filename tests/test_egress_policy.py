"""The egress allow-list (``twistedgw.egress.policy``), pure logic: pattern syntax and
matching (ports, wildcards, IPv6 literals), narrowing the server's list, the stored normal
form, name decisions and the address rule, with the exact reasons clients and logs see."""

from __future__ import annotations

import ipaddress

import pytest

from twistedgw.egress.policy import (
    DEFAULT_MAX_PATTERNS,
    DEFAULT_PORTS,
    Decision,
    EgressPolicy,
    HostPattern,
    address_kind,
    decide_name,
    normalize_host,
    parse_cidrs,
    parse_pattern,
    parse_patterns,
    refused_address,
    valid_host,
)


def test_defaults() -> None:
    """A pattern without a port allows 80 and 443; a sandbox may have 32 patterns."""
    assert DEFAULT_PORTS == frozenset({80, 443})
    assert DEFAULT_MAX_PATTERNS == 32
    assert EgressPolicy() == EgressPolicy(allow=None, max_patterns=32, allow_cidrs=())


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[::1]:443", HostPattern("::1", frozenset({443}))),
        ("[2001:DB8::1]", HostPattern("2001:db8::1", DEFAULT_PORTS)),
        ("  *.Example.ORG ", HostPattern("*.example.org", DEFAULT_PORTS)),
        ("1.2.3.4:22", HostPattern("1.2.3.4", frozenset({22}))),
        ("a-b.c", HostPattern("a-b.c", DEFAULT_PORTS)),
    ],
)
def test_patterns_parse_to_host_and_ports(text: str, pattern: HostPattern) -> None:
    """Host names are lowered and stripped; IPv6 literals lose their brackets."""
    assert parse_pattern(text) == pattern


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "an egress pattern must be a non-empty string like 'example.com:443'"),
        ("a" * 261, "an egress pattern must be a non-empty string like 'example.com:443'"),
        (None, "an egress pattern must be a non-empty string like 'example.com:443'"),
        ("[::1]x", "egress pattern '[::1]x' is not host[:port]"),
        ("[::1]:http", "egress pattern '[::1]:http' has no valid port"),
        ("-a.test", "egress pattern '-a.test' is not a host name or '*.domain'"),
        ("*.10.0.0.1", "egress pattern '*.10.0.0.1' is not a host name or '*.domain'"),
        ("x" * 70 + "!", f"egress pattern {'x' * 64!r} is not a host name or '*.domain'"),
    ],
)
def test_bad_patterns_say_what_is_wrong(text: object, message: str) -> None:
    """Each bad pattern is refused with a one-line reason quoting at most 64 characters."""
    with pytest.raises(ValueError) as refused:
        parse_pattern(text)
    assert str(refused.value) == message


def test_a_260_character_pattern_is_judged_on_its_host() -> None:
    """Up to 260 characters the text is parsed (here: a name too long to be a host)."""
    with pytest.raises(ValueError, match="is not a host name"):
        parse_pattern("a" * 260)


def test_host_validity() -> None:
    """Hosts are names of 1-63 character labels (no leading or trailing dash, at most 253
    characters) or IP literals."""
    label = "a" * 63
    assert valid_host(label) and not valid_host("a" * 64)
    assert valid_host(".".join([label] * 3) + ".b" * 31)  # 253 characters
    assert not valid_host(".".join([label] * 3) + ".b" * 32)
    assert not valid_host(".".join([label] * 3) + ".b" * 30 + ".bc")  # 254 characters
    assert valid_host("::1") and valid_host("10.0.0.1")
    assert not valid_host("a-.test") and not valid_host("a_b.test") and not valid_host("")
    assert normalize_host(" [FE80::1] ") == "fe80::1"
    assert normalize_host("Example.COM.") == "example.com"


def test_matching_needs_the_port_and_the_name() -> None:
    """A pattern matches its ports only; ``*.d`` matches names ending in ``.d``."""
    exact = HostPattern("a.test", frozenset({443}))
    assert exact.matches("a.test", 443)
    assert not exact.matches("a.test", 80) and not exact.matches("b.a.test", 443)
    wild = HostPattern("*.a.test")
    assert wild.wildcard and not exact.wildcard
    assert wild.matches("b.a.test", 80) and wild.matches("c.b.a.test", 443)
    assert not wild.matches("a.test", 80) and not wild.matches("ba.test", 80)
    assert not wild.matches("b.a.test", 8080)


@pytest.mark.parametrize(
    ("narrow", "wide", "within"),
    [
        ("a.test:443", "a.test", True),
        ("a.test", "a.test:443", False),
        ("a.test", "b.test", False),
        ("b.a.test", "*.a.test", True),
        ("a.test", "*.a.test", False),
        ("*.b.a.test", "*.a.test", True),
        ("*.a.test", "*.a.test", True),
        ("*.a.test:443", "*.a.test", True),
        ("*.a.test", "*.a.test:443", False),
        ("*.a.test", "a.test", False),
        ("*.a.test", "b.a.test", False),
        ("*.xa.test", "*.a.test", False),
        ("xa.test", "*.a.test", False),
    ],
)
def test_a_pattern_within_a_wider_one(narrow: str, wide: str, within: bool) -> None:
    """A creator's pattern lies within a server pattern when its ports are a subset and its
    names are all covered (a wildcard never fits inside an exact name)."""
    assert parse_pattern(narrow).within(parse_pattern(wide)) is within


def test_a_pattern_prints_as_written() -> None:
    """Default ports print as the bare host; others as one ``host:port`` per port."""
    assert str(HostPattern("a.test")) == "a.test"
    assert str(HostPattern("a.test", frozenset({8443, 22}))) == "a.test:22,a.test:8443"
    assert str(HostPattern("a.test", frozenset({80}))) == "a.test:80"


def test_creation_patterns_are_stored_in_normal_form() -> None:
    """Each pattern becomes ``host:port`` entries (IPv6 bracketed), in order, without
    duplicates."""
    assert EgressPolicy().creation_patterns(["[::1]:443", "A.test", "a.test:443"]) == (
        "[::1]:443",
        "a.test:80",
        "a.test:443",
    )
    assert EgressPolicy().creation_patterns([]) == ()


def test_creation_pattern_refusals_say_why() -> None:
    """A non-list, a list over the cap (not at it), or a pattern outside the server's list
    is refused with its reason."""
    policy = EgressPolicy(allow=parse_patterns(["*.a.test"]), max_patterns=2)
    with pytest.raises(ValueError) as not_list:
        policy.creation_patterns("b.a.test")
    assert str(not_list.value) == "'egress' must be a list of host patterns like 'example.com:443'"
    assert len(policy.creation_patterns(["b.a.test", "c.a.test"])) == 4
    with pytest.raises(ValueError) as too_many:
        policy.creation_patterns(["b.a.test"] * 3)
    assert str(too_many.value) == "'egress' has more than the server maximum of 2"
    with pytest.raises(ValueError) as outside:
        policy.creation_patterns(["b.test:8080"])
    assert (
        str(outside.value) == "'egress' pattern 'b.test:8080' is not within the server's allow-list"
    )


def test_address_ranges_parse_loosely_and_name_a_bad_one() -> None:
    """Ranges may have host bits set and spaces around; a bad one is named."""
    assert parse_cidrs([" 10.1.2.3/16 ", "fd00::/8"]) == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("fd00::/8"),
    )
    with pytest.raises(ValueError) as bad:
        parse_cidrs(["10.0.0.0/8", "x"])
    assert str(bad.value) == "'x' is not an address range like 10.1.0.0/16"


def test_name_decisions_have_fixed_kinds_and_one_line_reasons() -> None:
    """A bad name, a name outside the sandbox's list, one outside the server's list, and an
    allowed one each get their kind (the metrics label) and reason."""
    patterns = parse_patterns(["a.test", "*.b.test:8443"])
    policy = EgressPolicy()
    assert decide_name(patterns, policy, "bad host", 80) == Decision(
        False, "'bad host' is not a host name", "bad_request"
    )
    assert decide_name(patterns, policy, "c.test", 80) == Decision(
        False, "c.test:80 is not in this sandbox's egress list", "not_listed"
    )
    assert decide_name(patterns, policy, "x.B.test.", 8443) == Decision(
        True, "x.b.test:8443 is in this sandbox's egress list", "allowed"
    )
    server = EgressPolicy(allow=parse_patterns(["*.b.test"]))
    assert decide_name(patterns, server, "a.test", 443) == Decision(
        False, "a.test:443 is not in the server's egress list", "not_listed"
    )
    assert decide_name(patterns, server, "x.b.test", 8443).kind == "not_listed"
    assert decide_name(patterns, EgressPolicy(allow=patterns), "a.test", 80).allowed


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("fd00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("100.64.0.1", "reserved"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    """Each internal range has its kind; a global unicast address has none."""
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_refused_addresses_say_which_kind() -> None:
    """A refused address reads ``<kind> address <address>``; a scope id is ignored; a range
    allowed by the operator opens it (IPv4-mapped forms too); text that is not an address
    is refused as such."""
    policy = EgressPolicy()
    assert refused_address("127.0.0.1", policy) == "loopback address 127.0.0.1"
    assert refused_address("fe80::1%eth0", policy) == "link-local address fe80::1"
    assert refused_address("8.8.8.8", policy) is None
    assert refused_address("nope", policy) == "'nope' is not an address"
    opened = EgressPolicy(allow_cidrs=parse_cidrs(["10.0.0.0/8"]))
    assert refused_address("10.9.9.9", opened) is None
    assert refused_address("::ffff:10.0.0.1", opened) is None
    assert refused_address("192.168.0.1", opened) == "private address 192.168.0.1"
