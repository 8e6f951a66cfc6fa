"""The WebSocket proxy, one client connection paired with one agent connection:
``client`` (the client side, its factory and resource), ``agent`` (the agent side, and
connecting to an agent), ``flow`` (backpressure between the two). Close codes are the
protocol's (``twistedgw.protocol``)."""
