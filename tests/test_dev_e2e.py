"""End to end: ``xpando dev`` (what ``make run`` runs) brings the whole network up; a task goes
over HTTP through Temporal to the expert nodes and back; SIGTERM stops every process; a second
start reuses the data folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

READY_S = 120
# Provider keys `xpando dev` would start a node for (cli/dev.py, dev_provider_nodes).
OFFLINE_ONLY = (
    "OPENAI_API_KEY",
    "XPANDO_OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "XPANDO_ANTHROPIC_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "XPANDO_GEMINI_API_KEY",
)


def _children(pid: int) -> set[int]:
    """Every descendant pid of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _auth(data_dir: Path) -> dict[str, str]:
    """The admin key ``xpando dev`` keeps in the data folder, as the README's curl lines use it."""
    return {"Authorization": f"Bearer {(data_dir / 'dev-api-key').read_text().strip()}"}


@contextmanager
def dev_network(
    data_dir: Path, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    log_path = data_dir.parent / "dev.log"
    log = log_path.open("ab")
    start = log.tell()  # a second start appends to the same log
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "dev"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{env['XPANDO_API_PORT']}"
    try:
        # What a script waits on: the "ready" line; from then on /readyz answers 200.
        deadline = time.monotonic() + READY_S
        while b"xpando is ready" not in log_path.read_bytes()[start:]:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "xpando dev did not become ready"
            time.sleep(0.2)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        nodes = httpx.get(f"{base}/v1/nodes", headers=_auth(data_dir), timeout=5).json()["nodes"]
        assert len(nodes) == int(env["XPANDO_DEV_NODES"]) and all(n["live"] for n in nodes)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _wait_task(
    base: str, task_id: str, auth: dict[str, str], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stages: list[Any] = []
    while time.monotonic() < deadline:
        try:
            view: dict[str, Any] = httpx.get(
                f"{base}/v1/tasks/{task_id}", headers=auth, timeout=5
            ).json()
        except httpx.TimeoutException:  # a busy machine, or the core worker restarting
            stages.append("(no answer in 5 s)")
            continue
        stages.append(view.get("stage"))
        if view["status"] != "running":
            return view
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} did not finish; stages seen: {stages}")


def test_make_run_network_end_to_end(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "XPANDO_DATA_DIR": str(data_dir),
        "XPANDO_API_PORT": str(free_port()),
        "XPANDO_TEMPORAL_PORT": str(free_port()),
        "XPANDO_TEMPORAL_UI_PORT": str(free_port()),
        "XPANDO_DEV_NODES": "4",
        "XPANDO_LOG_FORMAT": "json",
    }
    env.pop("XPANDO_DATABASE_URL", None)
    env.pop("XPANDO_TEMPORAL_ADDRESS", None)
    for name in OFFLINE_ONLY:  # without provider keys: the offline network, as in CI
        env.pop(name, None)

    with dev_network(data_dir, env) as (proc, base):
        spawned = _children(proc.pid)
        # The first start made an admin key, readable by its owner only, and printed it in the
        # banner only (its line and the dashboard's sign-in link), never in a log line.
        key_file = data_dir / "dev-api-key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        output = (data_dir.parent / "dev.log").read_text()
        assert output.count(key) == 2 and f"API key        {key}" in output
        assert f"{base}/signin#key={key}" in output
        auth = _auth(data_dir)
        refused = httpx.get(f"{base}/v1/nodes")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
        nodes = httpx.get(f"{base}/v1/nodes", headers=auth).json()["nodes"]
        assert len(nodes) == 4
        assert len({n["region"] for n in nodes}) >= 2
        assert {d["name"] for n in nodes for d in n["domains"]} == {
            "python",
            "temporal",
            "web-api",
            "solana",
        }

        resp = httpx.post(
            f"{base}/v1/tasks",
            json={"prompt": "How do I set a retry policy with maximum attempts on an activity?"},
            headers=auth,
        )
        assert resp.status_code == 202
        task_id = resp.json()["task_id"]
        view = _wait_task(base, task_id, auth)
        assert view["status"] == "completed", view
        assert view["domain"] == "temporal"
        assert "temporalio" in view["answer"]
        answered = [c for c in view["contributions"] if c["status"] in ("ok", "no_answer")]
        assert len(answered) >= 2
        assert len({c["node_id"] for c in view["contributions"]}) >= 2
        best = max(view["contributions"], key=lambda c: c["quality"])
        assert best["citations"] and best["citations"][0]["source"].startswith("temporalio")

        # Operators script it with the xpando CLI through Temporal.
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                "task",
                "submit",
                "--wait",
                "What does asyncio.gather do with exceptions?",
            ],
            env={**env, "XPANDO_TEMPORAL_ADDRESS": f"127.0.0.1:{env['XPANDO_TEMPORAL_PORT']}"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        printed = cli.stdout.split("\n", 1)
        assert json.loads(printed[0])["task_id"].startswith("task-")
        assert json.loads(printed[1])["domain"] == "python"

    assert proc.returncode == 0
    time.sleep(0.5)
    orphans = [pid for pid in spawned if _alive(pid)]
    assert orphans == [], f"processes left running after SIGTERM: {orphans}"

    # A second start reuses the data folder: the earlier task is still there, and so is the key.
    with dev_network(data_dir, env) as (_, base):
        assert key_file.read_text().strip() == key
        again = httpx.get(f"{base}/v1/tasks/{task_id}", headers=auth).json()
        assert again["status"] == "completed" and again["answer"] == view["answer"]
