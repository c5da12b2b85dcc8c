"""The built site in a real browser: headless Chromium over its DevTools protocol.

Serves ``site/`` (built by ``make docs``) on localhost, opens the home page, a tutorial
and an API page, and asserts that every image loaded, no request failed and no console
error or uncaught exception was raised; screenshots go to ``site/_screenshots/`` for a
person to look at.  Skips, with the reason, where ``site/`` is not built or Debian's
``chromium`` is not installed (``make docs-browser`` installs it when run as root).
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
PAGES = {
    "home": "index.html",
    "tutorial": "tutorials/evidence_khat/index.html",
    "api": "reference/viax/index.html",
}
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]
# JavaScript run in the page after load: images that did not load.
BROKEN_IMAGES = """[...document.images]
  .filter(img => !img.complete || img.naturalWidth === 0)
  .map(img => img.currentSrc || img.src)"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reports failures itself
        pass


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, url: str):
        import websocket

        self.socket = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        self.socket.settimeout(60)
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < deadline:
            if any(e.get("method") == method for e in self.events[seen:]):
                return
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.socket.recv()))
        raise TimeoutError(f"no {method} within {timeout} s")

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds`` (late console messages)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.socket.settimeout(left)
            try:
                self.events.append(json.loads(self.socket.recv()))
            except Exception:  # websocket's timeout: nothing more arrived
                break

    def close(self) -> None:
        self.socket.close()


def _problems(events: list[dict]) -> list[str]:
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            problems.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            problems.append(f"console error: {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            problems.append(f"request failed: {params.get('errorText')} ({params.get('type')})")
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            response = params["response"]
            problems.append(f"HTTP {response['status']}: {response['url']}")
    return problems


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (SITE / "index.html").exists():
        pytest.skip(f"{SITE} is not built: run `make docs` first")
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "Chromium not found: install Debian's `chromium` package "
            "(`make docs-browser` does when run as root)"
        )
    pytest.importorskip("websocket", reason="websocket-client (the test extra) not installed")

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start (exit code {process.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            targets = json.load(r)
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable")
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        yield tools, f"http://127.0.0.1:{server.server_address[1]}/"
        tools.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", list(PAGES))
def test_page_renders_without_errors(browser, name):
    tools, base = browser
    if not (SITE / PAGES[name]).exists():
        pytest.fail(f"{PAGES[name]} is missing from the built site")
    tools.events.clear()
    tools.call("Page.navigate", url=base + PAGES[name])
    tools.wait_for("Page.loadEventFired")
    tools.drain(1.0)
    broken = tools.call("Runtime.evaluate", expression=BROKEN_IMAGES, returnByValue=True)
    count = tools.call("Runtime.evaluate", expression="document.images.length", returnByValue=True)[
        "result"
    ]["value"]
    title = tools.call("Runtime.evaluate", expression="document.title", returnByValue=True)
    # The whole page (up to 8000 px), so that a person sees every figure.
    metrics = tools.call("Page.getLayoutMetrics")
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    clip = {"x": 0, "y": 0, "width": 1280, "height": min(size["height"], 8000), "scale": 1}
    shot = tools.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
    out = SITE / "_screenshots"
    out.mkdir(exist_ok=True)
    (out / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))

    problems = _problems(tools.events)
    problems += [f"image did not load: {src}" for src in broken["result"]["value"]]
    assert not problems, f"{PAGES[name]}:\n" + "\n".join(problems)
    assert "viax" in title["result"]["value"]
    if name == "tutorial":
        assert count >= 1, "the tutorial page shows no figure"
