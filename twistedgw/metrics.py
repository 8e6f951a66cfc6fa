"""The gateway's Prometheus metrics (``prometheus_client``), in the default registry.

Only counters are defined here; serving them (``/metrics``) is the web edge's job. Labels
stay low in cardinality: no sandbox ids or host names (those are in the decision log).
"""

from __future__ import annotations

from prometheus_client import Counter

#: Egress proxy decisions, by outcome (``allowed`` or ``refused``) and a short reason.
EGRESS_DECISIONS = Counter(
    "twistedgw_egress_decisions_total",
    "Egress proxy decisions on sandbox requests.",
    ["decision", "reason"],
)

#: Bytes carried by the egress proxy, ``up`` (sandbox to destination) and ``down``.
EGRESS_BYTES = Counter(
    "twistedgw_egress_bytes_total",
    "Bytes the egress proxy carried between sandboxes and allowed destinations.",
    ["direction"],
)
