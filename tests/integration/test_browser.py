"""The browser console (``/ui``) driven as a person would: Debian's Chromium (headless) through
its chromedriver (Selenium, given both paths so nothing is downloaded), against a real token
gateway, the real engine and image. Each test saves a screenshot in its tmp dir."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess, remove_instance_containers
from tests.integration.helpers import recv, send

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def gateway(docker_client: Any, tmp_path_factory: Any) -> Iterator[GatewayProcess]:
    """A gateway with one API token, on its own port and instance label."""
    tokens = tmp_path_factory.mktemp("ui-tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    gw = GatewayProcess(f"itui-{secrets.token_hex(3)}", "--tokens-file", str(tokens))
    gw.start()
    yield gw
    gw.stop()
    remove_instance_containers(docker_client, gw.instance)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a download directory in the test's tmp dir."""
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "chromium and chromium-driver are missing: run scripts/ensure-browser.sh"
    )
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: Chromium's own sandbox cannot start
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        try:
            driver.save_screenshot(str(tmp_path / "final.png"))
        finally:
            driver.quit()


def until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Polls ``predicate`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except WebDriverException as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def by_id(driver: webdriver.Chrome, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def error_text(driver: webdriver.Chrome) -> str:
    banner = by_id(driver, "error")
    return "" if banner.get_attribute("hidden") is not None else banner.text


def open_console(driver: webdriver.Chrome, gateway: GatewayProcess, token: str = TOKEN) -> None:
    """Loads /ui and enters the token, as a user would."""
    driver.get(gateway.url + "/ui")
    until(lambda: driver.execute_script("return !!window.twistedgwConsole"), what="the page")
    field = by_id(driver, "token")
    field.clear()
    field.send_keys(token)
    by_id(driver, "token-save").click()


def sandbox_rows(driver: webdriver.Chrome) -> list[str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#sandboxes tbody tr")
    return [str(r.get_attribute("data-id")) for r in rows]


def create_in_browser(driver: webdriver.Chrome) -> str:
    """Clicks Create and returns the new sandbox's id (the row the page selects)."""
    before = set(sandbox_rows(driver))
    by_id(driver, "create").click()
    new = until(
        lambda: set(sandbox_rows(driver)) - before or error_text(driver) == "x",
        timeout=90,
        what="the new sandbox's row",
    )
    assert error_text(driver) == ""
    (sandbox_id,) = new
    return str(sandbox_id)


def terminal_text(driver: webdriver.Chrome) -> str:
    """What the terminal shows, read from xterm.js's buffer API (not from pixels)."""
    return str(
        driver.execute_script(
            "const t = window.twistedgwConsole.state.terminal;"
            "if (!t) return '';"
            "const b = t.term.buffer.active; const lines = [];"
            "for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));"
            "return lines.join('\\n');"
        )
    )


def click_when(driver: webdriver.Chrome, selector: str, what: str) -> None:
    """Clicks the element matching ``selector`` once it is there (tables are redrawn when
    they refresh, so it is looked up again until a click lands)."""

    def click() -> bool:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if not found:
            return False
        found[0].click()
        return True

    until(click, what=what)


def terminal_size(driver: webdriver.Chrome) -> list[int]:
    """The terminal's [cols, rows] as xterm.js has them."""
    return list(
        driver.execute_script(
            "const t = window.twistedgwConsole.state.terminal.term; return [t.cols, t.rows];"
        )
    )


def test_console_lists_creates_and_deletes_sandboxes(
    browser: webdriver.Chrome, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """With the token entered, the page lists the caller's sandboxes (a sandbox made over REST
    shows with its status and template), keeps one alive, creates one, and deletes both: the
    rows go and the gateway answers 404 for them."""
    made = requests.post(gateway.url + "/sandboxes", headers=AUTH, timeout=60).json()["sandbox_id"]
    open_console(browser, gateway)
    until(lambda: made in sandbox_rows(browser), what="the REST-made sandbox in the list")
    row = browser.find_element(By.CSS_SELECTOR, f'#sandboxes tr[data-id="{made}"]')
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] in ("idle", "connected") and cells[2] == "default"

    click_when(browser, f'#sandboxes tr[data-id="{made}"] [data-action="keepalive"]', "keepalive")
    until(lambda: f"Kept {made} alive" in by_id(browser, "notice").text, what="keep alive")

    created = create_in_browser(browser)
    info = requests.get(f"{gateway.url}/sandboxes/{created}", headers=AUTH, timeout=30)
    assert info.status_code == 200
    browser.save_screenshot(str(tmp_path / "created.png"))

    for sandbox_id in (created, made):
        button = browser.find_element(
            By.CSS_SELECTOR, f'#sandboxes tr[data-id="{sandbox_id}"] button[data-action="delete"]'
        )
        button.click()
        until(lambda: sandbox_id not in sandbox_rows(browser), what="the row to go")  # noqa: B023
        gone = requests.get(f"{gateway.url}/sandboxes/{sandbox_id}", headers=AUTH, timeout=30)
        assert gone.status_code == 404
    assert error_text(browser) == ""


def test_console_shows_the_gateways_error_for_a_wrong_token(
    browser: webdriver.Chrome, gateway: GatewayProcess
) -> None:
    """A wrong token is not a silent empty list: the page shows the 401 and what to do."""
    open_console(browser, gateway, token="not-" + TOKEN)
    text = until(lambda: error_text(browser), what="an error")
    assert "HTTP 401" in text and "token" in text


def test_console_uploads_and_downloads_a_file(
    browser: webdriver.Chrome, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A file chosen in the page lands in the sandbox byte for byte (read back over REST),
    shows in the listing, and its Download button saves the same bytes in the browser's
    download directory; a missing path's 404 is shown and stays shown."""
    content = bytes(range(256)) * 300 + "é ✓\n".encode()
    local = tmp_path / "payload.bin"
    local.write_bytes(content)
    open_console(browser, gateway)
    sandbox_id = create_in_browser(browser)
    try:
        by_id(browser, "upload-file").send_keys(str(local))
        by_id(browser, "upload-dir").send_keys("inbox")
        by_id(browser, "upload").click()
        until(lambda: "Uploaded" in by_id(browser, "notice").text, what="the upload")
        stored = requests.get(
            f"{gateway.url}/sandboxes/{sandbox_id}/files",
            params={"path": "inbox/payload.bin"},
            headers=AUTH,
            timeout=30,
        )
        assert stored.status_code == 200 and stored.content == content

        click_when(
            browser,
            '#files tr[data-path$="payload.bin"] [data-action="download"]',
            "the file in the listing",
        )
        saved = tmp_path / "downloads" / "payload.bin"
        until(lambda: saved.exists() and saved.stat().st_size == len(content), what="download")
        assert saved.read_bytes() == content

        by_id(browser, "download-path").send_keys("no/such/file")
        by_id(browser, "download").click()
        text = until(lambda: error_text(browser), what="the download error")
        assert "HTTP 404" in text
        # The periodic list refresh succeeds meanwhile: the error stays until the user acts.
        browser.execute_async_script(
            "window.twistedgwConsole.refreshSandboxes({background: true})"
            ".then(arguments[arguments.length - 1]);"
        )
        assert error_text(browser) == text
        browser.save_screenshot(str(tmp_path / "files.png"))
    finally:
        requests.delete(f"{gateway.url}/sandboxes/{sandbox_id}", headers=AUTH, timeout=60)


def test_console_reattaches_to_a_process_from_its_first_byte(
    browser: webdriver.Chrome, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A background process started by another client shows in the page's process list;
    Reattach replays its output from offset 0 into the terminal, then shows its live output."""
    open_console(browser, gateway)
    sandbox_id = create_in_browser(browser)
    try:
        ws_url = f"{gateway.ws_url}/ws/{sandbox_id}?access_token={TOKEN}"
        with connect(ws_url) as ws:
            send(
                ws,
                {
                    "command": "for i in $(seq 1 40); do echo line-$i; sleep 0.25; done",
                    "request_id": "bg-loop",
                    "background": True,
                },
            )
            started = recv(ws)
            assert started["type"] == "started", started
            pid = started["pid"]
        time.sleep(1.0)  # some output is in the log before the browser attaches
        by_id(browser, "processes-refresh").click()
        click_when(
            browser,
            f'#processes tr[data-pid="{pid}"] button[data-action="reattach"]',
            "the process in the list",
        )
        text = until(
            lambda: (
                (t := terminal_text(browser)) and "line-1\n" in t + "\n" and "line-12" in t and t
            ),
            what="replayed and live output",
        )
        lines = [line for line in text.splitlines() if line.startswith("line-")]
        assert lines[:12] == [f"line-{i}" for i in range(1, 13)]
        browser.save_screenshot(str(tmp_path / "reattached.png"))
    finally:
        requests.delete(f"{gateway.url}/sandboxes/{sandbox_id}", headers=AUTH, timeout=60)


def test_console_terminal_runs_what_is_typed_and_reconnects(
    browser: webdriver.Chrome, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A new sandbox opens a terminal (a PTY, xterm.js): typing `echo hi-from-browser` and
    Enter shows the output, read back from xterm's buffer; the PTY has the terminal's size and
    follows the window; after the WebSocket drops, the page re-attaches from its last offset
    and the terminal keeps working without repeating what it showed."""
    open_console(browser, gateway)
    sandbox_id = create_in_browser(browser)
    try:
        until(lambda: "$" in terminal_text(browser), timeout=30, what="the shell prompt")
        surface = browser.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea")
        surface.send_keys("echo hi-from-browser\n")
        until(
            lambda: "\nhi-from-browser" in "\n" + terminal_text(browser),
            what="the echo's output in the terminal",
        )
        browser.save_screenshot(str(tmp_path / "terminal.png"))

        size = terminal_size(browser)
        surface.send_keys("stty size\n")
        until(
            lambda: f"{size[1]} {size[0]}" in terminal_text(browser),
            what=f"stty size to say {size[1]} {size[0]}",
        )
        browser.set_window_size(1000, 700)
        smaller = until(
            lambda: (s := terminal_size(browser)) != size and s,
            what="the terminal to follow the window",
        )
        surface.send_keys("clear; stty size\n")
        until(
            lambda: f"{smaller[1]} {smaller[0]}" in terminal_text(browser),
            what="the PTY to follow the terminal's new size",
        )

        # Drop the WebSocket under the page: it re-attaches from the offset it had shown.
        browser.execute_script("window.twistedgwConsole.state.terminal.socket.ws.close(4999)")
        until(
            lambda: by_id(browser, "terminal-state").text == "connected",
            what="the terminal to reconnect",
        )
        surface.send_keys("echo after-$((40+2))\n")
        text = until(
            lambda: (t := terminal_text(browser)) and "\nafter-42" in "\n" + t and t,
            what="output after the reconnect",
        )
        # Nothing shown twice after the re-attach: the typed line and its output once each.
        assert text.count("after-42") == 1, text
        assert text.count("echo after-$((40+2))") == 1, text
        assert error_text(browser) == ""
        browser.save_screenshot(str(tmp_path / "terminal-reconnected.png"))
    finally:
        requests.delete(f"{gateway.url}/sandboxes/{sandbox_id}", headers=AUTH, timeout=60)


def test_console_works_on_a_gateway_without_tokens(
    browser: webdriver.Chrome, make_gateway: Callable[..., GatewayProcess]
) -> None:
    """On a gateway without tokens (loopback only), nothing needs entering: the page lists
    and creates sandboxes and opens their terminal (WebSockets without ``access_token``)."""
    gateway = make_gateway()
    browser.get(gateway.url + "/ui/")
    until(lambda: browser.execute_script("return !!window.twistedgwConsole"), what="the page")
    sandbox_id = create_in_browser(browser)
    assert requests.get(f"{gateway.url}/sandboxes/{sandbox_id}", timeout=30).status_code == 200
    surface = browser.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea")
    until(lambda: "$" in terminal_text(browser), what="the shell prompt")
    surface.send_keys("echo open-$((6*7))\n")
    until(lambda: "\nopen-42" in "\n" + terminal_text(browser), what="the command's output")
    assert error_text(browser) == ""
