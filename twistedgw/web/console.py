"""The browser console at ``/ui``: a small page, one JS module and a style sheet, plus the
few files of xterm.js it needs out of ``twistedgw/web/ui/node_modules`` (installed by
``npm ci`` in ``scripts/ensure-ui.sh``, pinned by ``package-lock.json``).

Only the files named in ``ASSETS`` are served: a URL is looked up in that table, never joined
onto a directory, so no path (``..``, encoded slashes, symlinks) reaches another file. The page
is public; every data call it makes carries the token the user typed (see ``ui/console.js``),
and the edge checks it like any API call. Every answer carries a Content-Security-Policy that
allows scripts from this origin only (no inline script, no CDN).

If the npm assets are missing, ``/ui`` answers 503 with a page saying how to install them;
the gateway itself starts and serves its API regardless.
"""

from __future__ import annotations

from pathlib import Path

from attrs import frozen
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

#: Where the console's files and its npm package live.
UI_DIR = Path(__file__).resolve().parent / "ui"

HTML = "text/html; charset=utf-8"
JS = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"

#: Scripts and connections to this origin only. xterm.js sets styles on its elements and adds
#: a ``<style>`` element for its theme, hence ``'unsafe-inline'`` for styles (not scripts).
#: ``blob:`` downloads are anchors, which CSP does not restrict.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@frozen
class Asset:
    """A file the console serves: its path below ``UI_DIR``, its content type, and whether it
    comes from npm (missing until ``scripts/ensure-ui.sh`` has run)."""

    path: str
    content_type: str
    npm: bool = False


#: Where the gateway serves the console.
PREFIX = b"/ui/"

#: URL path below ``/ui/`` -> the file served. Nothing else is.
ASSETS: dict[str, Asset] = {
    "": Asset("index.html", HTML),
    "index.html": Asset("index.html", HTML),
    "console.js": Asset("console.js", JS),
    "console.css": Asset("console.css", CSS),
    "vendor/xterm.mjs": Asset("node_modules/@xterm/xterm/lib/xterm.mjs", JS, npm=True),
    "vendor/xterm.css": Asset("node_modules/@xterm/xterm/css/xterm.css", CSS, npm=True),
    "vendor/addon-fit.mjs": Asset("node_modules/@xterm/addon-fit/lib/addon-fit.mjs", JS, npm=True),
}

MISSING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>twistedgw console: assets missing</title></head>
<body><h1>The browser console's assets are not installed</h1>
<p>The gateway runs, but the console needs xterm.js from npm, which is not installed here:
{missing}.</p>
<p>Install them from the repository's root with <code>scripts/ensure-ui.sh</code> (it runs
<code>npm ci</code> in <code>twistedgw/web/ui</code>; <code>./start.sh</code> and
<code>./tests/run.sh</code> do it for you), then reload this page.</p>
</body></html>
"""


def missing_assets(ui_dir: Path = UI_DIR) -> list[str]:
    """The asset files (paths below ``ui_dir``) that are not there."""
    return sorted({a.path for a in ASSETS.values() if not (ui_dir / a.path).is_file()})


def _secure_headers(request: IRequest) -> None:
    request.setHeader(b"Content-Security-Policy", CSP.encode())
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-cache")


class ConsoleResource(Resource):
    """Serves ``/ui/<name>`` for the names of ``ASSETS`` (GET and HEAD), 404 for any other."""

    isLeaf = True

    def __init__(self, ui_dir: Path | None = None) -> None:
        super().__init__()
        self.ui_dir = UI_DIR if ui_dir is None else ui_dir
        #: path -> (mtime_ns, size, bytes): the assets are small (xterm.mjs, the largest,
        #: about 400 KiB) and read once, then again only when the file changes.
        self._cache: dict[Path, tuple[int, int, bytes]] = {}

    def _read(self, path: Path) -> bytes:
        stat = path.stat()
        cached = self._cache.get(path)
        if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            return cached[2]
        content = path.read_bytes()
        self._cache[path] = (stat.st_mtime_ns, stat.st_size, content)
        return content

    def render_GET(self, request: IRequest) -> bytes | int:
        _secure_headers(request)
        # The raw path, not unquoted: a name is looked up as sent, so ``%2e%2e`` or ``%2f``
        # name no asset.
        path = request.path or b""
        name = path[len(PREFIX) :].decode("latin-1") if path.startswith(PREFIX) else "\0"
        asset = ASSETS.get(name)
        if asset is None:
            return self._plain(request, 404, "not found: the console has no such file\n")
        missing = missing_assets(self.ui_dir)
        if missing:
            if asset.content_type != HTML:
                return self._plain(
                    request, 503, "console assets missing: run scripts/ensure-ui.sh\n"
                )
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", HTML.encode())
            listed = ", ".join(f"<code>{m}</code>" for m in missing)
            return MISSING_PAGE.format(missing=listed).encode()
        request.setHeader(b"Content-Type", asset.content_type.encode())
        return self._read(self.ui_dir / asset.path)

    render_HEAD = render_GET

    @staticmethod
    def _plain(request: IRequest, status: int, text: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return text.encode()
