"""Dashboard page weight and first render on the dev stack.

``python -m bench.dashboard [--runs 15] [--tasks 6] [--nodes 2]`` starts ``xpando dev`` on free
ports in a temporary data folder (offline nodes), submits ``--tasks`` tasks so the views have
something to show, and prints:

- **weight**: bytes of the dashboard's own JavaScript and CSS (``api/dashboard/static``), raw
  and gzipped (goal: under 100 KB raw), and of each view's HTML;
- **server**: time to the whole HTML of each view over loopback HTTP (httpx with the session
  cookie), p50 and max of ``--runs``;
- **browser**: in Debian's chromium (Playwright, ``executable_path``), each view loaded
  ``--runs`` times: time to first byte, DOMContentLoaded and first contentful paint from the
  Navigation and Paint Timing APIs, p50 and max (goal: first render under 300 ms).

Asserts nothing (timings are not tests). Without chromium it prints the weight and server
figures only.
"""

from __future__ import annotations

import argparse
import gzip
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

STATIC = Path(__file__).resolve().parent.parent / "api" / "dashboard" / "static"
VIEWS = {"network": "/", "tasks": "/tasks", "mother-core": "/knowledge", "economy": "/economy"}
CHROMIUM = Path(os.environ.get("XPANDO_CHROMIUM", "/usr/bin/chromium"))
PROMPTS = [
    "How do I set a retry policy on an activity?",
    "What does asyncio.gather do with exceptions?",
    "How do I declare a path parameter in FastAPI?",
    "How do I send a transaction with solders?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values):6.1f} ms  max {max(values):6.1f} ms"


def weight() -> None:
    print("weight (own JS + CSS, api/dashboard/static):")
    total = total_gz = 0
    for path in sorted(STATIC.iterdir()):
        raw = path.read_bytes()
        zipped = len(gzip.compress(raw))
        total, total_gz = total + len(raw), total_gz + zipped
        print(f"  {path.name:<12} {len(raw):7,d} B   gzip {zipped:6,d} B")
    print(f"  {'total':<12} {total:7,d} B   gzip {total_gz:6,d} B   (goal < 100 KB)")


def start_dev(root: Path, nodes: int) -> tuple[subprocess.Popen[bytes], str, str]:
    data_dir = root / "data"
    env = {
        **os.environ,
        "XPANDO_DATA_DIR": str(data_dir),
        "XPANDO_API_PORT": str(_free_port()),
        "XPANDO_TEMPORAL_PORT": str(_free_port()),
        "XPANDO_TEMPORAL_UI_PORT": str(_free_port()),
        "XPANDO_DEV_NODES": str(nodes),
        "XPANDO_LOG_FORMAT": "json",
    }
    for name in ("XPANDO_DATABASE_URL", "XPANDO_TEMPORAL_ADDRESS"):
        env.pop(name, None)
    log = (root / "dev.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "dev"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    while b"xpando is ready" not in (root / "dev.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((root / "dev.log").read_text()[-3000:])
        time.sleep(0.2)
    key = (data_dir / "dev-api-key").read_text().strip()
    return proc, f"http://127.0.0.1:{env['XPANDO_API_PORT']}", key


def submit(base: str, key: str, count: int) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    ids = [
        httpx.post(
            f"{base}/v1/tasks", json={"prompt": PROMPTS[i % len(PROMPTS)]}, headers=auth
        ).json()["task_id"]
        for i in range(count)
    ]
    deadline = time.monotonic() + 120
    while ids and time.monotonic() < deadline:
        ids = [
            t
            for t in ids
            if httpx.get(f"{base}/v1/tasks/{t}", headers=auth).json()["status"] == "running"
        ]
        time.sleep(0.3)


def server_times(base: str, key: str, runs: int) -> None:
    print(f"server (whole HTML over loopback HTTP, {runs} runs each):")
    with httpx.Client(base_url=base, cookies={"xpando_session": key}) as http:
        for view, path in VIEWS.items():
            times, size = [], 0
            for _ in range(runs):
                started = time.perf_counter()
                resp = http.get(path)
                times.append((time.perf_counter() - started) * 1000)
                size = len(resp.content)
                assert resp.status_code == 200, resp.status_code
            print(f"  {view:<12} {_ms(times)}   HTML {size:6,d} B")


def browser_times(base: str, key: str, runs: int) -> None:
    if not CHROMIUM.exists():
        print(f"browser: skipped, no chromium at {CHROMIUM}")
        return
    from playwright.sync_api import sync_playwright

    print(f"browser (chromium, {runs} loads each; goal: first render < 300 ms):")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.goto(f"{base}/signin#key={key}")
        page.wait_for_url(f"{base}/")
        for view, path in VIEWS.items():
            ttfb, dcl, fcp = [], [], []
            for _ in range(runs):
                page.goto(f"{base}{path}", wait_until="load")
                timing = page.evaluate(
                    """() => {
                      const n = performance.getEntriesByType('navigation')[0];
                      const p = performance.getEntriesByName('first-contentful-paint')[0];
                      return [n.responseStart, n.domContentLoadedEventEnd, p ? p.startTime : -1];
                    }"""
                )
                ttfb.append(timing[0])
                dcl.append(timing[1])
                if timing[2] >= 0:
                    fcp.append(timing[2])
            line = f"  {view:<12} first byte {_ms(ttfb)} | DOMContentLoaded {_ms(dcl)}"
            if fcp:
                line += f" | first paint {_ms(fcp)}"
            print(line)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    weight()
    with tempfile.TemporaryDirectory(prefix="xpando-bench-dashboard-") as tmp:
        proc, base, key = start_dev(Path(tmp), args.nodes)
        try:
            submit(base, key, args.tasks)
            server_times(base, key, args.runs)
            browser_times(base, key, args.runs)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
