"""``sandbox-image/build.sh`` takes its Debian mirror from the host's apt sources (one-line and
deb822), with environment overrides; checked through ``--print-mirror`` (no Docker needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "sandbox-image" / "build.sh"


def mirrors(apt_etc: Path, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if "MIRROR" not in k}
    result = subprocess.run(
        ["bash", str(BUILD), "--print-mirror"],
        env={**environ, "APT_ETC": str(apt_etc), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.split()


def test_one_line_sources_list(tmp_path: Path) -> None:
    """Options in brackets and comments are skipped; deb-src and other suites are not used."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example:3142/debian/ bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
    )
    assert mirrors(tmp_path) == [
        "http://mirror.example:3142/debian",
        "http://security.example/debian-security",
    ]


def test_deb822_sources(tmp_path: Path) -> None:
    """deb822 stanzas: the one serving bookworm, not a disabled or foreign one."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "a-node.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.example/node_20.x\nSuites: nodistro\n"
        "Components: main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\n"
        "# a comment inside a stanza\n"
        "URIs: http://local.mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://local.mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert mirrors(tmp_path) == [
        "http://local.mirror.example/debian",
        "http://local.mirror.example/debian-security",
    ]


def test_environment_overrides_and_default(tmp_path: Path) -> None:
    """DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR win; with no usable source, deb.debian.org."""
    assert mirrors(tmp_path) == [
        "http://deb.debian.org/debian",
        "http://deb.debian.org/debian-security",
    ]
    (tmp_path / "sources.list").write_text("deb http://mirror.example/debian bookworm main\n")
    assert mirrors(
        tmp_path,
        DEBIAN_MIRROR="http://override.example/debian",
        DEBIAN_SECURITY_MIRROR="http://override.example/security",
    ) == ["http://override.example/debian", "http://override.example/security"]
