"""Headless Chromium driven over the DevTools protocol (websocket-client): open a page, collect console
errors, exceptions and failed loads, inspect its images and tables, take a full-page screenshot."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

PAGE_FACTS = """JSON.stringify({
  images: Array.from(document.images).map(i => ({src: i.src.slice(0, 64), complete: i.complete,
                                                 width: i.naturalWidth, height: i.naturalHeight})),
  tables: Array.from(document.querySelectorAll('table')).map(t => ({id: t.id, rows: t.tBodies[0] ?
                                                                    t.tBodies[0].rows.length : 0})),
  title: document.title
})"""


@dataclass
class PageReport:
    """What the page did: errors of any kind, its images and tables."""

    errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    title: str = ""

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["width"] == 0]


class DevTools:
    """A minimal CDP client over one page target."""

    def __init__(self, ws_url: str, timeout: float) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(json.loads(self.ws.recv()))

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds``."""
        old = self.ws.gettimeout()
        self.ws.settimeout(0.1)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                try:
                    self.events.append(json.loads(self.ws.recv()))
                except Exception:  # websocket timeout: nothing more arrived yet
                    pass
        finally:
            self.ws.settimeout(old)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            out.append(f"network: {p.get('errorText')}")
    return out


def inspect_page(url: str, user_data_dir: Path, screenshot: Path | None = None, timeout: float = 60.0) -> PageReport:
    """Load ``url`` in a fresh headless Chromium profile and report what happened."""
    user_data_dir.mkdir(parents=True, exist_ok=True)
    log = open(user_data_dir / "chromium.log", "w")
    proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={user_data_dir}",
                             "--remote-debugging-port=0", "--window-size=1400,1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        port_file, end = user_data_dir / "DevToolsActivePort", time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError(f"chromium did not start: {(user_data_dir / 'chromium.log').read_text()[-500:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        cdp = DevTools(page["webSocketDebuggerUrl"], timeout)
        for domain in ("Runtime", "Log", "Page", "Network"):
            cdp.call(f"{domain}.enable")
        cdp.call("Page.navigate", url=url)
        cdp.wait_event("Page.loadEventFired", timeout)
        cdp.drain(0.5)
        facts = json.loads(cdp.call("Runtime.evaluate", expression=PAGE_FACTS, returnByValue=True)["result"]["value"])
        if screenshot is not None:
            size = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
            cdp.call("Emulation.setDeviceMetricsOverride", width=1400, height=int(min(size["height"], 12000)),
                     deviceScaleFactor=1, mobile=False)
            shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return PageReport(_errors(cdp.events), facts["images"], facts["tables"], facts["title"])
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
