"""Creation options: the operator's limits (``LifecyclePolicy``) and a creation request's body
turned into ``SandboxSettings`` (``settings_from_body``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from twistedgw.egress.policy import EgressPolicy
from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.lifecycle.resources import RESOURCE_FIELDS, ResourcePolicy
from twistedgw.lifecycle.templates import DEFAULT_TEMPLATE
from twistedgw.protocol import ProtocolError, validate_env
from twistedgw.sandbox import ResourceRequest, SandboxSettings

METADATA_KEY_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
MAX_METADATA = 32
MAX_METADATA_VALUE = 256
#: The gateway's own cap on a creation ``env`` value (names and entries: ``protocol``).
MAX_ENV_VALUE = 32 * 1024


@frozen
class LifecyclePolicy:
    """Server-side limits on sandboxes (the operator's options)."""

    idle_timeout: float = 3600.0
    max_idle_timeout: float = 86400.0
    default_lifetime: float | None = None
    max_lifetime: float | None = None
    max_sandboxes: int = 200
    #: Egress by allow-list and per-create resources (issue 17).
    egress: EgressPolicy = field(factory=EgressPolicy)
    resources: ResourcePolicy = field(factory=ResourcePolicy)
    #: Template names a creator may choose (``--template``), the default first.
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)


DEFAULT_LIFECYCLE = LifecyclePolicy()


def _positive_seconds(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidSettings(f"'{key}' must be a number of seconds greater than 0")
    if value == float("inf"):
        raise InvalidSettings(f"'{key}' must be finite")
    return float(value)


def _string_map(
    body: Mapping[str, Any], key: str, name_re: re.Pattern[str], most: int, longest: int
) -> dict[str, str]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > most:
        raise InvalidSettings(f"'{key}' must be an object with at most {most} entries")
    for name, item in value.items():
        if not name_re.match(name):
            raise InvalidSettings(f"'{key}' name {name[:64]!r} is not allowed")
        if not isinstance(item, str) or "\x00" in item or len(item) > longest:
            raise InvalidSettings(
                f"'{key}' value of {name!r} must be a string of at most {longest} characters"
            )
    return dict(value)


def _creation_env(value: Any) -> dict[str, str]:
    """The creation body's ``env``: the protocol's one env rule, plus the value cap."""
    if value is None:
        return {}
    try:
        return validate_env(value, max_value_length=MAX_ENV_VALUE)
    except ProtocolError as e:
        raise InvalidSettings(e.message) from None


# -- templates (issue 18): {"template": NAME} -------------------------------------------------


def _template(policy: LifecyclePolicy, body: Mapping[str, Any]) -> str:
    """The creation body's ``template``: one of the operator's, else the default."""
    name = body.get("template")
    if name is None:
        return DEFAULT_TEMPLATE
    if not isinstance(name, str) or name not in policy.templates:
        what = f"unknown template {name[:64]!r}" if isinstance(name, str) else "'template' "
        what += "" if isinstance(name, str) else "must be a template's name"
        raise InvalidSettings(f"{what}; known templates: {', '.join(policy.templates)}")
    return name


# -------------------------------------------------------------------------------------------


def settings_from_body(
    policy: LifecyclePolicy,
    body: Mapping[str, Any] | None,
    idempotency_key: str | None = None,
    owner: str | None = None,
) -> SandboxSettings:
    """A creation request's settings: its JSON body (``None``: empty), its Idempotency-Key
    and its owner, validated against the operator's ``policy``; raises ``InvalidSettings``."""
    body = body or {}
    known = {"idle_timeout", "max_lifetime", "env", "metadata", "network", "template"}
    unknown = set(body) - known - set(EGRESS_AND_RESOURCE_FIELDS)
    if unknown:
        raise InvalidSettings(f"unknown creation option(s): {', '.join(sorted(unknown))}")
    idle_timeout = _positive_seconds(body, "idle_timeout") or policy.idle_timeout
    if idle_timeout > policy.max_idle_timeout:
        raise InvalidSettings(
            f"'idle_timeout' exceeds the server maximum of {policy.max_idle_timeout:g} s"
        )
    lifetime = _positive_seconds(body, "max_lifetime") or policy.default_lifetime
    if policy.max_lifetime is not None:
        if lifetime is not None and lifetime > policy.max_lifetime:
            raise InvalidSettings(
                f"'max_lifetime' exceeds the server maximum of {policy.max_lifetime:g} s"
            )
        lifetime = lifetime or policy.max_lifetime
    network = body.get("network", "bridge")
    if network not in ("bridge", "none"):
        raise InvalidSettings('\'network\' must be "bridge" or "none"')
    egress, requested = egress_and_resources(policy, body)
    if egress is not None:
        if "network" in body and network != "none":
            raise InvalidSettings("'egress' sandboxes have no network but the egress proxy")
        network = "none"
    key = None
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 256:
            raise InvalidSettings("Idempotency-Key must be 1-256 characters")
        # Scoped to the owner: one client's key never returns another's sandbox.
        scoped = f"{owner or ''}\x00{idempotency_key}".encode()
        key = hashlib.sha256(scoped).hexdigest()[:40]
    return SandboxSettings(
        idle_timeout=idle_timeout,
        max_lifetime=lifetime,
        metadata=_string_map(body, "metadata", METADATA_KEY_RE, MAX_METADATA, MAX_METADATA_VALUE),
        env=_creation_env(body.get("env")),
        idempotency_key=key,
        owner=owner,
        network=network,
        egress=egress,
        template=_template(policy, body),
        requested=requested,
    )


# -- egress and resources (issue 17) -------------------------------------------------------

#: The creation body's fields parsed by ``egress_and_resources``.
EGRESS_AND_RESOURCE_FIELDS = ("egress", *RESOURCE_FIELDS)


def egress_and_resources(
    policy: LifecyclePolicy, body: Mapping[str, Any]
) -> tuple[tuple[str, ...] | None, ResourceRequest | None]:
    """The body's ``egress`` allow-list (``None``: no egress proxy) and its ``cpus``,
    ``memory`` and ``disk`` (``None``: none asked for; the template's apply), checked against
    the operator's caps."""
    egress = None
    if body.get("egress") is not None:
        try:
            egress = policy.egress.creation_patterns(body["egress"])
        except ValueError as e:
            raise InvalidSettings(str(e)) from None
    return egress, policy.resources.from_body(body)
