"""The sandbox lifecycle, between the edges and the runtime: ``options`` (the operator's
limits; a creation body turned into settings), ``manager`` (create, delete, keepalive, agent
recovery), ``pool`` (the warm pool), ``reconcile`` (listing and events into the registry),
``errors`` (what it refuses with), and ``core`` and ``shared`` (what the parts share)."""
