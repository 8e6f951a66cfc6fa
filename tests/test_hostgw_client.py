"""The client library (``twistedgw.client``, sync and asyncio) end to end against an
in-process gateway whose sandboxes are real agent processes on the host (``tests.hostgw``):
the fast counterpart of ``tests/integration/test_client.py``."""

from __future__ import annotations

import pytest_twisted

from tests.hostgw import host_gateway, in_thread
from twistedgw.client import Sandbox


@pytest_twisted.ensureDeferred
async def test_sync_run_passes_stdout_stderr_and_the_exit_code_through() -> None:
    """A command's stdout and stderr come back apart (and to their callbacks, in order) and a
    non-zero exit is a result with that exit code, not an exception."""
    async with host_gateway() as gw:

        def scenario() -> None:
            out: list[str] = []
            err: list[str] = []
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                result = sb.run(
                    "echo one; echo two >&2; echo three; exit 3",
                    on_stdout=out.append,
                    on_stderr=err.append,
                )
            assert result.stdout == "one\nthree\n"
            assert result.stderr == "two\n"
            assert (result.exit_code, result.success) == (3, False)
            assert "".join(out) == "one\nthree\n"
            assert "".join(err) == "two\n"

        await in_thread(scenario)
