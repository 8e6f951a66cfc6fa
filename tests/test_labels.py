"""The label codec: a sandbox's identity and settings written onto its container and read
back (Docker is the source of truth, so this is the gateway's on-disk format)."""

from __future__ import annotations

import json

import pytest

from twistedgw.runtime.interface import ContainerSpec
from twistedgw.runtime.labels import (
    COMMAND_ENV,
    LABEL_CREATED_AT,
    LABEL_IDEMPOTENCY,
    LABEL_IDLE_TIMEOUT,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_MAX_LIFETIME,
    LABEL_NETWORK,
    LABEL_OWNER,
    LABEL_POOL,
    LABEL_SANDBOX_ID,
    LABEL_TEMPLATE,
    float_label,
    labels_for,
    settings_from,
)
from twistedgw.sandbox import ResourceRequest, SandboxSettings

SANDBOX = "b" * 32


def spec(settings: SandboxSettings, for_pool: bool = False) -> ContainerSpec:
    return ContainerSpec(SANDBOX, 1_700_000_000.25, "secret", settings, for_pool)


def test_every_setting_is_labelled_and_read_back() -> None:
    """All settings survive the round trip through labels and the command environment."""
    settings = SandboxSettings(
        idle_timeout=90.5,
        max_lifetime=600.0,
        metadata={"team": "a", "x.y": "z"},
        env={"A": "1", "B": "two words"},
        idempotency_key="k" * 40,
        owner="owner-1",
        network="none",
    )
    labels = labels_for(spec(settings), "gw-1")
    assert labels == {
        LABEL_MANAGED: "true",
        LABEL_INSTANCE: "gw-1",
        LABEL_SANDBOX_ID: SANDBOX,
        LABEL_CREATED_AT: "1700000000.25",
        LABEL_IDLE_TIMEOUT: "90.5",
        LABEL_MAX_LIFETIME: "600.0",
        LABEL_IDEMPOTENCY: "k" * 40,
        LABEL_OWNER: "owner-1",
        LABEL_NETWORK: "none",
        LABEL_TEMPLATE: "default",
        "org.twistedgw.meta.team": "a",
        "org.twistedgw.meta.x.y": "z",
    }
    env = {COMMAND_ENV: json.dumps(settings.env)}
    assert settings_from(labels, env) == settings


def test_optional_settings_leave_no_label() -> None:
    """No lifetime, key, owner, metadata or network option: no such labels; read back as
    the defaults (the template is always labelled). A pool container is labelled so."""
    labels = labels_for(spec(SandboxSettings(idle_timeout=60), for_pool=True), "gw-1")
    assert set(labels) == {
        LABEL_MANAGED,
        LABEL_INSTANCE,
        LABEL_SANDBOX_ID,
        LABEL_CREATED_AT,
        LABEL_IDLE_TIMEOUT,
        LABEL_POOL,
        LABEL_TEMPLATE,
    }
    assert labels[LABEL_POOL] == "true"
    assert settings_from(labels, {}) == SandboxSettings(idle_timeout=60)


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"', "null"])
def test_an_unreadable_command_env_is_empty(raw: str) -> None:
    """A command environment that is not a JSON object reads as no environment."""
    assert settings_from({}, {COMMAND_ENV: raw}).env == {}


def test_damaged_labels_read_as_defaults() -> None:
    """A missing or non-numeric idle timeout is the default hour; a bad lifetime is none; an
    empty owner or key is none; any network label but ``none`` is the bridge."""
    labels = {
        LABEL_IDLE_TIMEOUT: "soon",
        LABEL_MAX_LIFETIME: "forever",
        LABEL_OWNER: "",
        LABEL_IDEMPOTENCY: "",
        LABEL_NETWORK: "host",
    }
    assert settings_from(labels, {}) == SandboxSettings(idle_timeout=3600.0)
    assert float_label({"k": "1.5"}, "k") == 1.5
    assert float_label({"k": "x"}, "k") is None
    assert float_label({}, "k") is None


@pytest.mark.parametrize(
    "requested",
    [
        ResourceRequest(cpus=1.5, memory=512 * 2**20, disk=2 * 2**30),
        ResourceRequest(memory=256 * 2**20),
        ResourceRequest(disk=2**30),
        ResourceRequest(cpus=0.5),
    ],
)
def test_a_creators_resource_request_is_read_back_part_by_part(
    requested: ResourceRequest,
) -> None:
    """What a creator asked for (any of cpus, memory, disk; the others left to the template)
    survives the label round trip as asked: a part not asked for stays ``None``, and one part
    missing does not lose the others."""
    settings = SandboxSettings(idle_timeout=60, requested=requested)
    labels = labels_for(spec(settings), "gw-1")
    assert settings_from(labels, {}).requested == requested
