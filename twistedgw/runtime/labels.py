"""The label codec: how a sandbox's identity and settings are written onto its container
(labels, and environment variables for what labels cannot carry) and read back. Docker is the
source of truth, so this is the gateway's on-disk format; tests and the bench import the label
names from here."""

from __future__ import annotations

import json
from collections.abc import Mapping

from twistedgw.runtime.hardening import size_bytes
from twistedgw.runtime.interface import ContainerSpec
from twistedgw.sandbox import ResourceRequest, Resources, SandboxSettings
from twistedgw.state import SavedSandbox

#: Label keys on every container this gateway creates.
LABEL_MANAGED = "org.twistedgw.managed"
LABEL_INSTANCE = "org.twistedgw.instance"
LABEL_SANDBOX_ID = "org.twistedgw.sandbox-id"
LABEL_CREATED_AT = "org.twistedgw.created-at"
LABEL_IDLE_TIMEOUT = "org.twistedgw.idle-timeout"
LABEL_MAX_LIFETIME = "org.twistedgw.max-lifetime"
LABEL_IDEMPOTENCY = "org.twistedgw.idempotency-key"
LABEL_META_PREFIX = "org.twistedgw.meta."
LABEL_OWNER = "org.twistedgw.owner"
#: Set on warm-pool containers (created before anyone asked for them).
LABEL_POOL = "org.twistedgw.pool"
LABEL_NETWORK = "org.twistedgw.network"
#: Egress allow-list (JSON list of ``host:port``).
LABEL_EGRESS = "org.twistedgw.egress"
#: What the sandbox got (server defaults < template < creator), always set together, in CPUs
#: and bytes. A template image's own ``org.twistedgw.memory`` label (its default, e.g. ``2g``)
#: has the same key: the container's label, always written, overrides the inherited one.
LABEL_CPUS = "org.twistedgw.cpus"
LABEL_MEMORY = "org.twistedgw.memory"
LABEL_DISK = "org.twistedgw.disk"
#: What the creator asked for (JSON ``{"cpus", "memory", "disk"}``, ``null``: the template's),
#: so that an Idempotency-Key retry after a restart is matched against the same request.
LABEL_REQUESTED = "org.twistedgw.requested"
#: The template a container was made from (always set: an image may carry one of its own).
LABEL_TEMPLATE = "org.twistedgw.sandbox-template"

#: Swarm backend only: what the state file holds on one host (last activity, whether a client
#: ever attached, a lifetime extended by keepalive), as JSON on the sandbox's service, updated
#: in place (a label-only update does not restart the task). ``SavedSandbox`` in state.py.
LABEL_STATE = "org.twistedgw.state"
#: Swarm backend only: the reaper's lease on a sandbox (JSON ``{"holder", "expires"}``).
LABEL_REAPER_LEASE = "org.twistedgw.reaper-lease"

#: Environment variable carrying the per-sandbox agent secret into the container.
SECRET_ENV = "SANDBOX_AGENT_SECRET"
#: Environment variable carrying the creator's environment for commands (JSON object).
COMMAND_ENV = "SANDBOX_COMMAND_ENV"


def float_label(labels: Mapping[str, str], key: str) -> float | None:
    try:
        return float(labels[key])
    except (KeyError, ValueError):
        return None


def settings_from(labels: Mapping[str, str], env: Mapping[str, str]) -> SandboxSettings:
    """Recover a sandbox's settings from its container's labels and environment."""
    try:
        command_env = json.loads(env.get(COMMAND_ENV, "{}"))
        if not isinstance(command_env, dict):
            command_env = {}
    except ValueError:
        command_env = {}
    return SandboxSettings(
        idle_timeout=float_label(labels, LABEL_IDLE_TIMEOUT) or 3600.0,
        max_lifetime=float_label(labels, LABEL_MAX_LIFETIME),
        metadata={
            key[len(LABEL_META_PREFIX) :]: value
            for key, value in labels.items()
            if key.startswith(LABEL_META_PREFIX)
        },
        env={str(k): str(v) for k, v in command_env.items()},
        idempotency_key=labels.get(LABEL_IDEMPOTENCY) or None,
        owner=labels.get(LABEL_OWNER) or None,
        network="none" if labels.get(LABEL_NETWORK) == "none" else "bridge",
        egress=_egress_from(labels),
        template=labels.get(LABEL_TEMPLATE) or "default",
        requested=_requested_from(labels),
        resources=_resources_from(labels),
    )


def _requested_from(labels: Mapping[str, str]) -> ResourceRequest | None:
    try:
        value = json.loads(labels[LABEL_REQUESTED])
        return ResourceRequest(
            cpus=None if value.get("cpus") is None else float(value["cpus"]),
            memory=None if value.get("memory") is None else int(value["memory"]),
            disk=None if value.get("disk") is None else int(value["disk"]),
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _egress_from(labels: Mapping[str, str]) -> tuple[str, ...] | None:
    try:
        value = json.loads(labels[LABEL_EGRESS])
    except (KeyError, ValueError):
        return None
    if not isinstance(value, list):
        return None
    return tuple(str(item) for item in value)


def _resources_from(labels: Mapping[str, str]) -> Resources | None:
    try:
        return Resources(
            cpus=float(labels[LABEL_CPUS]),
            memory=size_bytes(labels[LABEL_MEMORY]),
            disk=size_bytes(labels[LABEL_DISK]),
        )
    except (KeyError, ValueError):
        return None


def labels_for(spec: ContainerSpec, instance: str) -> dict[str, str]:
    """The labels of ``spec``'s container, on gateway ``instance`` (decoded by
    ``settings_from`` and the engine's listing)."""
    settings = spec.settings
    labels = {
        LABEL_MANAGED: "true",
        LABEL_INSTANCE: instance,
        LABEL_SANDBOX_ID: spec.sandbox_id,
        LABEL_CREATED_AT: repr(spec.created_at),
        LABEL_IDLE_TIMEOUT: repr(settings.idle_timeout),
        LABEL_TEMPLATE: settings.template,
    }
    if settings.max_lifetime is not None:
        labels[LABEL_MAX_LIFETIME] = repr(settings.max_lifetime)
    if settings.idempotency_key:
        labels[LABEL_IDEMPOTENCY] = settings.idempotency_key
    if settings.owner:
        labels[LABEL_OWNER] = settings.owner
    if spec.for_pool:
        labels[LABEL_POOL] = "true"
    if settings.network == "none":
        labels[LABEL_NETWORK] = "none"
    if settings.egress is not None:
        labels[LABEL_EGRESS] = json.dumps(list(settings.egress))
    if settings.requested is not None:
        labels[LABEL_REQUESTED] = json.dumps(
            {
                "cpus": settings.requested.cpus,
                "memory": settings.requested.memory,
                "disk": settings.requested.disk,
            }
        )
    if settings.resources is not None:
        labels[LABEL_CPUS] = repr(settings.resources.cpus)
        labels[LABEL_MEMORY] = str(settings.resources.memory)
        labels[LABEL_DISK] = str(settings.resources.disk)
    for key, value in settings.metadata.items():
        labels[LABEL_META_PREFIX + key] = value
    return labels


def instance_labels(instance: str) -> list[str]:
    """``key=value`` label filters selecting every container of gateway ``instance``."""
    return [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={instance}"]


def state_label(saved: SavedSandbox) -> str:
    """``LABEL_STATE``'s value for ``saved`` (pool hand-outs are not kept: no pool in Swarm)."""
    return json.dumps(
        {
            "last_activity": saved.last_activity,
            "ever_connected": saved.ever_connected,
            "expires_at": saved.expires_at,
        },
        sort_keys=True,
    )


def saved_from_label(labels: Mapping[str, str]) -> SavedSandbox | None:
    """The ``SavedSandbox`` in ``LABEL_STATE`` (``None``: absent or unreadable)."""
    try:
        raw = json.loads(labels[LABEL_STATE])
        expires_at = raw.get("expires_at")
        return SavedSandbox(
            last_activity=float(raw["last_activity"]),
            ever_connected=bool(raw.get("ever_connected", False)),
            expires_at=None if expires_at is None else float(expires_at),
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
