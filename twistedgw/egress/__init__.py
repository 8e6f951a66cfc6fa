"""Egress by allow-list: the per-sandbox HTTP/CONNECT proxy (``proxy``), what it allows
(``policy``), how it resolves names (``resolver``), and its listeners (``service``)."""
