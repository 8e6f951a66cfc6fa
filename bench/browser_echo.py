"""Browser console benchmark (issue 16): keystroke echo as the page sees it, and page load.

    python bench/browser_echo.py [--keys 200] [--json PATH]

Starts its own gateway (no tokens, loopback) and a headless Debian Chromium
(/usr/bin/chromium through /usr/bin/chromedriver; ``scripts/ensure-browser.sh``), opens
``/ui/``, creates a sandbox and waits for the shell prompt in its terminal. Then, ``--keys``
times, it types one character through xterm.js's own input path (``term.input``, as a key
press would) and times, in the page (``performance.now()``), until the character is parsed
into the terminal's buffer: the round trip page -> gateway -> agent -> PTY -> bash's echo ->
agent -> gateway -> page, plus xterm.js's parsing. Each character is erased again before the
next. Also reported: the page's load (navigation timing) and bytes of the assets.
Everything it creates (the gateway, its container, the browser) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import docker
import requests
from benchlib import host_busy_pct, percentile
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from twistedgw.runtime.labels import LABEL_INSTANCE
from twistedgw.testing.process import GatewayProcess

#: Types one character and resolves with the milliseconds until it is in the buffer.
ECHO_SCRIPT = """
const done = arguments[arguments.length - 1];
const term = window.twistedgwConsole.state.terminal.term;
const line = () => term.buffer.active.getLine(term.buffer.active.baseY + term.buffer.active.cursorY)
    .translateToString(true);
const before = line();
const start = performance.now();
const listener = term.onWriteParsed(() => {
  if (line() === before + arguments[0]) {
    listener.dispose();
    done(performance.now() - start);
  }
});
term.input(arguments[0], true);
"""

#: Erases the character typed and resolves once the line is back as it was.
ERASE_SCRIPT = """
const done = arguments[arguments.length - 1];
const term = window.twistedgwConsole.state.terminal.term;
const line = () => term.buffer.active.getLine(term.buffer.active.baseY + term.buffer.active.cursorY)
    .translateToString(true);
const want = arguments[0];
const listener = term.onWriteParsed(() => {
  if (line() === want) { listener.dispose(); done(true); }
});
term.input("\\x7f", true);
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    client = docker.from_env()
    instance = f"bench-ui-{secrets.token_hex(3)}"
    gateway = GatewayProcess(instance)
    profile = tempfile.TemporaryDirectory(prefix="bench-ui-")
    driver = None
    busy_before = host_busy_pct()
    try:
        gateway.start()
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(argument)
        options.add_argument(f"--user-data-dir={profile.name}")
        driver = webdriver.Chrome(
            options=options, service=Service(executable_path="/usr/bin/chromedriver")
        )
        driver.set_script_timeout(30)
        driver.get(gateway.url + "/ui/")
        timing = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "const r = performance.getEntriesByType('resource');"
            "return {dom: n.domContentLoadedEventEnd, load: n.loadEventEnd,"
            " bytes: n.transferSize + r.reduce((a, e) => a + e.transferSize, 0)};"
        )
        sandbox_id = requests.post(gateway.url + "/sandboxes", timeout=60).json()["sandbox_id"]
        driver.execute_script("window.twistedgwConsole.refreshSandboxes()")
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const wait = () => document.querySelector(`tr[data-id='${arguments[0]}'] button`)"
            " ? done(document.querySelector(`tr[data-id='${arguments[0]}'] button`).click())"
            " : setTimeout(wait, 50); wait();",
            sandbox_id,
        )
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const t = () => window.twistedgwConsole.state.terminal;"
            "const wait = () =>"
            " (t() && t().text().includes('$')) ? done(true) : setTimeout(wait, 50);"
            "wait();"
        )
        samples = []
        for i in range(args.keys):
            char = "abcdefghijklmnopqrstuvwxyz"[i % 26]
            prompt = driver.execute_script(
                "const t = window.twistedgwConsole.state.terminal.term; const b = t.buffer.active;"
                "return b.getLine(b.baseY + b.cursorY).translateToString(true);"
            )
            samples.append(float(driver.execute_async_script(ECHO_SCRIPT, char)))
            driver.execute_async_script(ERASE_SCRIPT, prompt)
        result: dict[str, Any] = {
            "keys": args.keys,
            "echo_ms": {
                "p50": statistics.median(samples),
                "p95": percentile(samples, 95),
                "max": max(samples),
            },
            "page": {
                "dom_content_loaded_ms": timing["dom"],
                "load_ms": timing["load"],
                "bytes": timing["bytes"],
            },
            "host_busy_pct": {"before": busy_before, "after": host_busy_pct()},
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    finally:
        if driver is not None:
            driver.quit()
        gateway.stop()
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"}
        ):
            container.remove(force=True)
        profile.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
