"""A creation body's validation (``settings_from_body``): the limits, inclusive where they are
maxima, and the exact 400 messages clients read."""

from __future__ import annotations

from typing import Any

import pytest

from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.lifecycle.options import (
    MAX_METADATA,
    MAX_METADATA_VALUE,
    LifecyclePolicy,
    settings_from_body,
)

POLICY = LifecyclePolicy(idle_timeout=100, max_idle_timeout=3600, templates=("default", "python"))


def refused(body: dict[str, Any]) -> str:
    with pytest.raises(InvalidSettings) as caught:
        settings_from_body(POLICY, body)
    return str(caught.value)


def test_limits_are_inclusive_and_short_timeouts_are_allowed() -> None:
    """Half a second of idle timeout, exactly the maximum idle timeout, exactly the most
    metadata entries, and a value of exactly the longest length are all accepted."""
    assert settings_from_body(POLICY, {"idle_timeout": 0.5}).idle_timeout == 0.5
    assert settings_from_body(POLICY, {"idle_timeout": 3600}).idle_timeout == 3600
    full = {f"k{i}": "v" for i in range(MAX_METADATA)}
    assert len(settings_from_body(POLICY, {"metadata": full}).metadata) == MAX_METADATA
    longest = {"k": "v" * MAX_METADATA_VALUE}
    assert settings_from_body(POLICY, {"metadata": longest}).metadata == longest


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"idle_timeout": float("inf")}, "'idle_timeout' must be finite"),
        ({"idle_timeout": 3601}, "'idle_timeout' exceeds the server maximum of 3600 s"),
        (
            {"metadata": {f"k{i}": "v" for i in range(MAX_METADATA + 1)}},
            f"'metadata' must be an object with at most {MAX_METADATA} entries",
        ),
        (
            {"metadata": {"-" + "n" * 80: "v"}},
            "'metadata' name " + repr("-" + "n" * 63) + " is not allowed",
        ),
        (
            {"metadata": {"k": "a\x00b"}},
            f"'metadata' value of 'k' must be a string of at most {MAX_METADATA_VALUE} characters",
        ),
        (
            {"metadata": {"k": 5}},
            f"'metadata' value of 'k' must be a string of at most {MAX_METADATA_VALUE} characters",
        ),
        (
            {"template": "t" * 80},
            "unknown template " + repr("t" * 64) + "; known templates: default, python",
        ),
        ({"template": 7}, "'template' must be a template's name; known templates: default, python"),
        ({"zeta": 1, "alpha": 2}, "unknown creation option(s): alpha, zeta"),
        ({"network": "host"}, '\'network\' must be "bridge" or "none"'),
    ],
)
def test_each_refusal_says_what_is_wrong(body: dict[str, Any], message: str) -> None:
    """The 400's message names the option, the limit and, for a long name, its first 64
    characters."""
    assert refused(body) == message


def test_a_creation_env_value_is_capped_at_32_kib() -> None:
    """A creation ``env`` value of exactly 32 KiB is kept; one character more is a 400 that
    names the variable (commands' own ``env`` has no such cap: this is the creation body's)."""
    from twistedgw.lifecycle.options import MAX_ENV_VALUE

    assert MAX_ENV_VALUE == 32 * 1024
    longest = {"BIG": "v" * MAX_ENV_VALUE}
    assert settings_from_body(POLICY, {"env": longest}).env == longest
    message = refused({"env": {"BIG": "v" * (MAX_ENV_VALUE + 1)}})
    assert message == "'env' value of BIG is longer than 32768 characters"


def test_egress_means_network_none_and_refuses_a_bridge() -> None:
    """An egress list makes the sandbox network-less (its only way out is the egress proxy),
    whether or not the body says ``"network": "none"``; with ``"bridge"`` it is a 400."""
    allowed = {"egress": ["pypi.org:443"]}
    assert settings_from_body(POLICY, allowed).network == "none"
    assert settings_from_body(POLICY, {**allowed, "network": "none"}).network == "none"
    assert refused({**allowed, "network": "bridge"}) == (
        "'egress' sandboxes have no network but the egress proxy"
    )


def test_idempotency_keys_of_1_to_256_characters_are_scoped_to_their_owner() -> None:
    """Keys of 1 and 256 characters are taken, 0 and 257 refused with the rule; the stored key
    is a 40-hex digest of owner and key together: equal for one owner, different for two."""
    for length in (1, 256):
        key = settings_from_body(POLICY, None, idempotency_key="k" * length).idempotency_key
        assert key is not None and len(key) == 40
    for length in (0, 257):
        with pytest.raises(InvalidSettings) as caught:
            settings_from_body(POLICY, None, idempotency_key="k" * length)
        assert str(caught.value) == "Idempotency-Key must be 1-256 characters"

    def stored(owner: str | None) -> str | None:
        return settings_from_body(POLICY, None, idempotency_key="k", owner=owner).idempotency_key

    assert stored("a") == stored("a") != stored("b")
    assert stored(None) != stored("a")
    # Stored in container labels: the format must survive an upgrade of the gateway.
    import hashlib

    assert stored(None) == hashlib.sha256(b"\x00k").hexdigest()[:40]
    assert stored("a") == hashlib.sha256(b"a\x00k").hexdigest()[:40]
