"""The browser console's static route (``/ui``, ``twistedgw.web.console``), in memory: what
it serves and with which headers, that nothing outside its table is reachable, that it is
public on a token gateway while the API is not, and the page it answers without assets."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.server import Site

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.testing.rest import request
from twistedgw.web import console
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator
from twistedgw.web.site import LOOPBACK_HOSTS, EdgePolicy, make_site

from .test_edge import Conn
from .test_edge import request as raw_request

TOKEN = "u" * 32


@pytest.fixture
def ui_dir(tmp_path: Path) -> Path:
    """A console directory with its own files and stand-ins for the npm assets."""
    target = tmp_path / "ui"
    target.mkdir()
    for name in ("index.html", "console.js", "console.css"):
        shutil.copy(console.UI_DIR / name, target / name)
    for asset in console.ASSETS.values():
        if asset.npm:
            path = target / asset.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"/* stand-in for {asset.path} */\n")
    # Files beside and below the console that must never be served.
    (target / "package.json").write_text('{"secret": "package"}')
    (target / "node_modules" / "@xterm" / "xterm" / "package.json").write_text("{}")
    (tmp_path / "outside.txt").write_text("outside the console")
    return target


@pytest.fixture
def ui_treq(manager: SandboxManager, ui_dir: Path, monkeypatch: pytest.MonkeyPatch) -> StubTreq:
    monkeypatch.setattr(console, "UI_DIR", ui_dir)
    return StubTreq(GatewayAPI(manager).resource())


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ui/", b"text/html; charset=utf-8"),
        ("/ui/index.html", b"text/html; charset=utf-8"),
        ("/ui/console.js", b"text/javascript; charset=utf-8"),
        ("/ui/console.css", b"text/css; charset=utf-8"),
        ("/ui/vendor/xterm.mjs", b"text/javascript; charset=utf-8"),
        ("/ui/vendor/addon-fit.mjs", b"text/javascript; charset=utf-8"),
        ("/ui/vendor/xterm.css", b"text/css; charset=utf-8"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_assets_are_served_with_their_type_and_csp(
    ui_treq: StubTreq, ui_dir: Path, path: str, content_type: bytes
) -> None:
    """Each console file is served with its content type (a module script must be JS, or the
    browser refuses it), nosniff, and a CSP that allows scripts from this origin only."""
    code, headers, body = await request(ui_treq, "GET", path)
    assert code == 200
    assert headers.getRawHeaders(b"content-type") == [content_type]
    assert headers.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
    (csp,) = headers.getRawHeaders(b"content-security-policy")
    directives = dict(d.strip().split(" ", 1) for d in csp.decode().split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    name = console.ASSETS[path.removeprefix("/ui/")].path
    assert body == (ui_dir / name).read_bytes()


@pytest_twisted.ensureDeferred
async def test_ui_without_slash_redirects_to_the_page(ui_treq: StubTreq) -> None:
    """``/ui`` sends the browser to ``/ui/``, where the page's relative URLs resolve."""
    code, headers, _ = await request(ui_treq, "GET", "/ui", allow_redirects=False)
    assert code in (301, 308)
    assert headers.getRawHeaders(b"location")[0].endswith(b"/ui/")


def test_page_has_no_inline_script_nor_remote_source() -> None:
    """The shipped page loads its script from a file of this origin (the CSP forbids inline
    scripts) and nothing from another host."""
    page = (console.UI_DIR / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
    assert scripts, "the page loads its module"
    for attributes, content in scripts:
        assert 'src="' in attributes and content.strip() == ""
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)
    assert not re.search(r"""\bon[a-z]+=["']""", page), "inline event handler"


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../setup.py",
        "/ui/%2e%2e/outside.txt",
        "/ui/..%2foutside.txt",
        "/ui/vendor/../../outside.txt",
        "/ui/vendor/%2e%2e%2f%2e%2e%2foutside.txt",
        "/ui/package.json",
        "/ui/node_modules/@xterm/xterm/package.json",
        "/ui/vendor/",
        "/ui/vendor/package.json",
        "/ui//etc/passwd",
        "/ui/%2fetc%2fpasswd",
        "/ui/index.html%00.js",
    ],
)
@pytest_twisted.ensureDeferred
async def test_nothing_outside_the_console_table_is_served(ui_treq: StubTreq, path: str) -> None:
    """Traversal (``..``, encoded slashes and dots, NUL) and files beside the console (its
    package.json, node_modules) get no file: only the names of ``ASSETS`` are served."""
    code, _, body = await request(ui_treq, "GET", path, allow_redirects=False)
    # Double slashes get werkzeug's 308 to the merged path (whose answer is then a 404).
    assert code == 404 or (code == 308 and "//" in path.replace("%2f", "/")), (path, body[:200])
    assert b"outside the console" not in body
    assert b"secret" not in body
    assert b"root:" not in body


@pytest_twisted.ensureDeferred
async def test_missing_npm_assets_get_a_page_saying_how_to_install(
    ui_treq: StubTreq, ui_dir: Path
) -> None:
    """Without node_modules, the page is a 503 naming what is missing and the command that
    installs it; the API still answers (the gateway does not need the console to run)."""
    shutil.rmtree(ui_dir / "node_modules")
    code, headers, body = await request(ui_treq, "GET", "/ui/")
    assert code == 503
    assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert b"scripts/ensure-ui.sh" in body
    assert b"node_modules/@xterm/xterm/lib/xterm.mjs" in body
    assert headers.getRawHeaders(b"content-security-policy")
    code, _, body = await request(ui_treq, "GET", "/ui/vendor/xterm.mjs")
    assert code == 503 and b"ensure-ui.sh" in body
    code, _, _ = await request(ui_treq, "GET", "/healthz")
    assert code == 200


@pytest.fixture
def token_site(manager: SandboxManager, ui_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    monkeypatch.setattr(console, "UI_DIR", ui_dir)
    auth = Authenticator.from_tokens([TOKEN])
    return make_site(
        GatewayAPI(manager, authenticator=auth),
        policy=EdgePolicy(authenticator=auth, allowed_hosts=LOOPBACK_HOSTS),
    )


def test_console_is_public_on_a_token_gateway_but_the_api_is_not(
    token_site: Site, clock: Clock
) -> None:
    """The page loads without a token (the user types it into the page); the API behind it
    still answers 401 without one."""
    conn = Conn(token_site, clock)
    conn.send(raw_request("GET", "/ui/"))
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"<title>twistedgw console</title>" in conn.transport.value()
    conn = Conn(token_site, clock)
    conn.send(raw_request("GET", "/sandboxes"))
    assert conn.transport.value().startswith(b"HTTP/1.1 401 ")
    conn = Conn(token_site, clock)
    conn.send(raw_request("GET", "/uix/sandboxes"))
    assert conn.transport.value().startswith(b"HTTP/1.1 401 ")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_console_takes_only_get_and_head(ui_treq: StubTreq, method: str) -> None:
    """The console is read-only: other methods are 405."""
    code, _, _ = await request(ui_treq, method, "/ui/index.html")
    assert code == 405
    code, _, body = await request(ui_treq, "HEAD", "/ui/console.js")
    assert code == 200 and body == b""
