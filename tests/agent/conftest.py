"""Agent tests: the package lives in sandbox-image/ (``import agent``), next to the repository's
``twistedgw`` (for ``twistedgw.protocol``)."""

from __future__ import annotations

import sys
from pathlib import Path

AGENT_ROOT = Path(__file__).resolve().parents[2] / "sandbox-image"
if str(AGENT_ROOT) not in sys.path:
    sys.path.insert(0, str(AGENT_ROOT))
