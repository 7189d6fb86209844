"""``xpando dev`` supervises its children: a killed API, node, Temporal dev server or core
worker is started again and the network heals (tasks in flight complete, each once); a child
that keeps crashing stops the network, naming it; a child that dies before the network is ready
stops the start at once, with its own last lines. The recovery times are printed
(``pytest -s``), not asserted."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.devserver import dev_server_env
from tests.conftest import free_port
from tests.test_dev_e2e import _alive, _auth, _children, _wait_task, dev_network

BURST = 30
PROMPTS = [
    "How do I set a retry policy with maximum attempts on an activity?",
    "What does asyncio.gather do with exceptions?",
    "How should a REST API report a validation error?",
    "How is an SPL token transfer signed on Solana?",
    "How do I heartbeat from a long-running activity?",
    "What is the difference between a list and a tuple in Python?",
]


def _env(data_dir: Path, nodes: int, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "XPANDO_DATA_DIR": str(data_dir),
        "XPANDO_API_PORT": str(free_port()),
        "XPANDO_TEMPORAL_PORT": str(free_port()),
        "XPANDO_TEMPORAL_UI_PORT": str(free_port()),
        "XPANDO_DEV_NODES": str(nodes),
        "XPANDO_LOG_FORMAT": "json",
        **extra,
    }
    env.pop("XPANDO_DATABASE_URL", None)
    env.pop("XPANDO_TEMPORAL_ADDRESS", None)
    return env


def _events(log_path: Path, since: int) -> list[dict[str, Any]]:
    """The JSON log lines (the supervisor's and its children's) written from offset ``since``."""
    events = []
    for line in log_path.read_bytes()[since:].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> float:
    """Seconds until ``check()`` holds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def _pid_of(supervisor: int, *argv: str) -> int:
    """The child of the supervisor whose command line holds ``argv`` in that order."""
    wanted = "\0".join(argv)
    for pid in _children(supervisor):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        except OSError:
            continue
        if wanted in cmdline:
            return pid
    raise AssertionError(f"no child running {' '.join(argv)}")


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _kill_and_recover(
    proc: subprocess.Popen[bytes],
    base: str,
    log_path: Path,
    name: str,
    *argv: str,
    at_kill: Callable[[], object] = lambda: None,
) -> tuple[dict[str, Any], float, object]:
    """SIGKILL one child (then call ``at_kill``); returns the supervisor's restart log line,
    the seconds from the kill until the child is started again and /readyz answers 200, and
    what ``at_kill`` returned."""
    pid = _pid_of(proc.pid, *argv)
    mark = log_path.stat().st_size
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    seen = at_kill()

    def restarted() -> bool:
        return any(
            e.get("event") == "restarted" and e.get("process") == name
            for e in _events(log_path, mark)
        )

    _wait_for(f"{name} restarted", restarted)
    _wait_for("/readyz 200", lambda: _ready(base))
    recovered = time.monotonic() - killed
    exits = [
        e
        for e in _events(log_path, mark)
        if e.get("event") == "process exited; restarting" and e.get("process") == name
    ]
    assert len(exits) == 1, exits
    assert _pid_of(proc.pid, *argv) != pid
    return exits[0], recovered, seen


def _submit(client: httpx.Client, i: int) -> str:
    prompt = f"{PROMPTS[i % len(PROMPTS)]} (case {i})"
    # fresh: every task asks the experts, none is answered from stored knowledge alone
    resp = client.post("/v1/tasks", json={"prompt": prompt, "fresh": True})
    assert resp.status_code == 202, resp.text
    task_id: str = resp.json()["task_id"]
    return task_id


@pytest.mark.timeout(300)
def test_killed_children_are_restarted_and_tasks_complete_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "dev.log"
    # Common in OpenTelemetry shops; the Temporal dev server refuses to start with it, so the
    # supervisor leaves it out of that one child's environment.
    env = _env(data_dir, nodes=3, OTEL_TRACES_EXPORTER="console")
    figures: dict[str, float] = {}

    with dev_network(data_dir, env) as (proc, base):
        dropped = [e for e in _events(log_path, 0) if "dropped" in e]
        assert dropped and dropped[0]["dropped"] == {"OTEL_TRACES_EXPORTER": "console"}

        # The API: /readyz is gone while it is down and comes back with the new process.
        exited, figures["api: kill → /readyz 200"], _ = _kill_and_recover(
            proc, base, log_path, "api", "-m", "cli", "api"
        )
        assert exited["exit"] == "killed by SIGKILL" and exited["attempt"] == 1

        # A node: the new process registers again and is live.
        mark = log_path.stat().st_size
        exited, recovered, _ = _kill_and_recover(
            proc, base, log_path, "node-2", "--node-id", "node-2"
        )
        figures["node-2: kill → /readyz 200"] = recovered
        assert exited["exit"] == "killed by SIGKILL"
        figures["node-2: kill → registered again"] = recovered + _wait_for(
            "node-2 registered again",
            lambda: any(
                e.get("event") == "node registered" and e.get("node_id") == "node-2"
                for e in _events(log_path, mark)
            ),
        )

        def node_2_live() -> bool:
            nodes = httpx.get(f"{base}/v1/nodes", headers=_auth(data_dir), timeout=5).json()[
                "nodes"
            ]
            return any(n["node_id"] == "node-2" and n["live"] for n in nodes)

        _wait_for("node-2 live", node_2_live)

        # The Temporal dev server: its state is in its SQLite file, and the workers reconnect
        # (the burst below runs on them).
        exited, figures["temporal: kill → /readyz 200"], _ = _kill_and_recover(
            proc, base, log_path, "temporal", "server", "start-dev"
        )
        assert exited["exit"] == "killed by SIGKILL"

        # The core worker, with a burst of tasks in flight: all of them complete, each once.
        # Only a core worker records a task, so what is recorded just after the kill is what
        # was done before it.
        def recorded() -> int:
            with sqlite3.connect(data_dir / "xpando.db") as db:
                marks = ",".join("?" * len(task_ids))
                (done,) = db.execute(
                    "SELECT count(*) FROM tasks "
                    f"WHERE status = 'completed' AND task_id IN ({marks})",
                    task_ids,
                ).fetchone()
                return int(done)

        with (
            httpx.Client(base_url=base, headers=_auth(data_dir), timeout=30) as client,
            ThreadPoolExecutor(10) as pool,
        ):
            task_ids = list(pool.map(lambda i: _submit(client, i), range(BURST)))
        killed_at = time.monotonic()
        exited, figures["core-worker: kill → /readyz 200"], done = _kill_and_recover(
            proc, base, log_path, "core-worker", "-m", "cli", "worker", "core", at_kill=recorded
        )
        assert exited["exit"] == "killed by SIGKILL"
        assert isinstance(done, int) and done < BURST, "every task had finished before the kill"
        figures["tasks in flight at the kill"] = BURST - done
        views = [_wait_task(base, t, _auth(data_dir), timeout=120) for t in task_ids]
        figures["core-worker: kill → all tasks completed"] = time.monotonic() - killed_at
        assert [v["status"] for v in views] == ["completed"] * BURST, [
            (v["task_id"], v.get("error")) for v in views if v["status"] != "completed"
        ]

        with sqlite3.connect(data_dir / "xpando.db") as db:
            marks = ",".join("?" * BURST)
            rows = db.execute(
                f"SELECT task_id, status FROM tasks WHERE task_id IN ({marks})", task_ids
            ).fetchall()
            assert sorted(rows) == sorted((t, "completed") for t in task_ids)
            for view in views:
                (stored,) = db.execute(
                    "SELECT count(*) FROM contributions WHERE task_id = ?", (view["task_id"],)
                ).fetchone()
                assert stored == len(view["contributions"]) > 0
            # A record step that ran twice would move a reputation twice for one event.
            (moves,) = db.execute("SELECT coalesce(sum(reputation_n), 0) FROM nodes").fetchone()
            (events,) = db.execute("SELECT count(*) FROM reputation_events").fetchone()
            assert moves == events > 0
            # Each task feeds what it learned to the knowledge once (a merged item's history
            # moves to the item it was merged into).
            provenance = [
                entry["task_id"]
                for (items,) in db.execute(
                    "SELECT provenance FROM knowledge WHERE status = 'active'"
                )
                for entry in json.loads(items)
            ]
            assert len(provenance) == len(set(provenance))

        # A node that crashes on every start (its key file was damaged) is a crash loop: the
        # network stops, naming it and showing its own error.
        spawned = _children(proc.pid)
        (data_dir / "keys" / "node-3.json").write_text("not a key\n")
        os.kill(_pid_of(proc.pid, "--node-id", "node-3"), signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(90)
        figures["node-3 crash loop: kill → network stopped"] = time.monotonic() - killed_at
        assert proc.returncode == 1

    printed = log_path.read_text()
    assert "xpando dev: node-3 exited 5 times within 60 s (last: exit status 2)" in printed
    report = printed.split("Last output of node-3:", 1)[1]
    assert "node-3.json: not a Solana keypair" in report.split("What to change:", 1)[0]
    assert "'xpando worker node --node-id node-3 --region" in report
    restarts = [
        e["attempt"]
        for e in _events(log_path, 0)
        if e.get("event") == "process exited; restarting" and e.get("process") == "node-3"
    ]
    assert restarts == [1, 2, 3, 4]
    time.sleep(0.5)
    assert [pid for pid in spawned if _alive(pid)] == []
    print()
    for what, value in figures.items():
        print(f"{what}: {round(value, 1)}")


def _start_failing(env: dict[str, str], log_path: Path) -> str:
    """Run ``xpando dev`` that is expected to fail before ready; returns what it printed."""
    with log_path.open("wb") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "cli", "dev"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Well under the 120 s ready timeout: the start stops when the child dies.
            timeout=60,
        )
    printed = log_path.read_text()
    assert proc.returncode == 1, printed
    assert "Traceback" not in printed
    assert "xpando is ready" not in printed
    return printed


def test_dev_server_dying_before_ready_shows_its_own_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "temporal.db").mkdir(parents=True)  # where its SQLite file should be
    printed = _start_failing(_env(data_dir, nodes=1), tmp_path / "dev.log")
    assert "xpando dev: temporal exited (exit status 1) before the network was ready" in printed
    shown = printed.split("Last output of temporal:", 1)[1].split("What to change:", 1)[0]
    assert "unable to open database file" in shown
    assert f"its whole log: {data_dir / 'logs' / 'temporal.log'}" in printed


def test_node_dying_before_ready_stops_the_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "keys").mkdir(parents=True)
    (data_dir / "keys" / "node-1.json").write_text("[1, 2, 3]\n")
    printed = _start_failing(_env(data_dir, nodes=1), tmp_path / "dev.log")
    assert "xpando dev: node-1 exited (exit status 2) before the network was ready" in printed
    shown = printed.split("Last output of node-1:", 1)[1].split("What to change:", 1)[0]
    assert "node-1.json: not a Solana keypair" in shown
    assert "'xpando worker node --node-id node-1 --region" in printed
    # Nothing was restarted: a child that never was ready is not one a restart will fix.
    assert '"restarted"' not in printed


@pytest.mark.parametrize(
    ("given", "passed"),
    [
        ({"OTEL_TRACES_EXPORTER": "console"}, {}),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, {"OTEL_TRACES_EXPORTER": "otlp"}),
        ({"OTEL_TRACES_EXPORTER": ""}, {}),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, {"OTEL_TRACES_EXPORTER": "otlp"}),
        ({"OTEL_METRICS_EXPORTER": "prometheus"}, {}),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "PATH": "/bin"},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "PATH": "/bin"},
        ),
    ],
)
def test_dev_server_gets_only_the_otlp_exporter(
    given: dict[str, str], passed: dict[str, str]
) -> None:
    env, dropped = dev_server_env(given)
    assert env == passed
    assert dropped == {k: v for k, v in given.items() if passed.get(k) != v}


def test_provider_keys_add_one_node_per_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` with provider keys starts a node for each; without, the offline network."""
    from pydantic import SecretStr

    from cli.dev import dev_node_specs, dev_provider_nodes
    from tests.test_dev_e2e import OFFLINE_ONLY
    from xpando.settings import Settings

    for name in OFFLINE_ONLY:
        monkeypatch.delenv(name, raising=False)

    offline = Settings(_env_file=None, data_dir=tmp_path, dev_regions=["eu-west", "us-east"])
    assert dev_provider_nodes(offline) == [] and len(dev_node_specs(offline)) == 4
    keyed = Settings(
        _env_file=None,
        data_dir=tmp_path,
        dev_regions=["eu-west", "us-east"],
        openai_api_key=SecretStr("sk-test"),
        gemini_api_key=SecretStr("g-test"),
    )
    assert dev_provider_nodes(keyed) == [
        ("openai-1", "eu-west", "openai"),
        ("gemini-1", "us-east", "gemini"),
    ]
