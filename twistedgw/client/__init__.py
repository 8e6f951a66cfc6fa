"""``twistedgw.client``: a Python client for the twistedgw gateway, sync and asyncio.

    from twistedgw.client import Sandbox

    with Sandbox.create(url="http://127.0.0.1:8003") as sb:
        result = sb.run("echo hello")
        print(result.stdout, result.exit_code)

``Sandbox`` (sync) is a thin wrapper over ``AsyncSandbox`` (asyncio: httpx for REST, the
``websockets`` library for commands). Install with the ``client`` extra
(``pip install 'twistedgw[client]'``). Every error is a ``TwistedgwError``."""

from twistedgw.client._async import (
    DEFAULT_URL,
    AsyncFiles,
    AsyncProcess,
    AsyncPty,
    AsyncSandbox,
)
from twistedgw.client._sync import Files, Process, Pty, Sandbox
from twistedgw.client.backoff import Backoff
from twistedgw.client.errors import (
    AuthError,
    CommandTimeout,
    ConnectionLost,
    GatewayError,
    PathNotFound,
    SandboxGone,
    TwistedgwError,
)
from twistedgw.client.results import CommandResult, FileEntry, ProcessInfo, SandboxInfo

__all__ = [
    "DEFAULT_URL",
    "AsyncFiles",
    "AsyncProcess",
    "AsyncPty",
    "AsyncSandbox",
    "AuthError",
    "Backoff",
    "CommandResult",
    "CommandTimeout",
    "ConnectionLost",
    "FileEntry",
    "Files",
    "GatewayError",
    "PathNotFound",
    "Process",
    "ProcessInfo",
    "Pty",
    "Sandbox",
    "SandboxGone",
    "SandboxInfo",
    "TwistedgwError",
]
