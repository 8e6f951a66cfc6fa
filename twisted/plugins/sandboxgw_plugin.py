"""twistd dropin for ``twistd sandboxgw``; imports nothing from twistedgw so --help stays cheap."""

from twisted.application.service import ServiceMaker

sandboxgw = ServiceMaker(
    "sandboxgw",
    "twistedgw.tap",
    "Sandbox gateway: Docker containers as sandboxes over REST and WebSocket.",
    "sandboxgw",
)
