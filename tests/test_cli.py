"""The xpando command speaks like the API: every expected failure is one line on stderr naming the
reason and what to do, with its own exit status, and no traceback unless ``--debug``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

from cli.main import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from tests.conftest import offline_network, running
from workers.core import build_core_worker
from workers.node import NodeSpec, build_node, register
from workflows.task import TaskWorkflow
from xpando.contracts import TaskEvent, TaskEventsInput, TaskEventType, TaskInput
from xpando.db import SessionFactory
from xpando.settings import Settings

UNREACHABLE = "127.0.0.1:1"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "XPANDO_DATA_DIR": str(tmp_path),
        "XPANDO_TEMPORAL_ADDRESS": UNREACHABLE,
        "XPANDO_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        "XPANDO_LOG_LEVEL": "ERROR",
        **extra,
    }
    env.pop("XPANDO_NODE_ID", None)
    env.pop("XPANDO_NODE_KEY", None)
    return env


def _xpando(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(stderr: str) -> str:
    """The failure's line; the whole of stderr is that one line, without a traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "settings", "status", "says"),
    [
        # Bad arguments (argparse's own and the command's checks) and a bad setting.
        (("fly",), {}, EXIT_USAGE, ["invalid choice: 'fly'", "see 'xpando --help'"]),
        (("task", "get"), {}, EXIT_USAGE, ["required: task_id", "'xpando task get --help'"]),
        (("task", "submit", "hi", "--k", "abc"), {}, EXIT_USAGE, ["invalid int value: 'abc'"]),
        (("task", "submit", "hi", "--k", "12"), {}, EXIT_USAGE, ["--k must be between 1 and 9"]),
        (("task", "submit", "   "), {}, EXIT_USAGE, ["the prompt is empty"]),
        (("worker", "node", "--region", "eu-west"), {}, EXIT_USAGE, ["needs an id"]),
        (
            ("worker", "node", "--node-id", "n1", "--domain", "knitting"),
            {},
            EXIT_USAGE,
            ["built-in domains"],
        ),
        (
            ("db", "init"),
            {"XPANDO_API_PORT": "eighty"},
            EXIT_USAGE,
            ["invalid setting XPANDO_API_PORT", "environment or .env"],
        ),
        # Temporal unreachable, for a one-shot command and for a worker.
        (
            ("task", "get", "task-1"),
            {},
            EXIT_UNREACHABLE,
            ["cannot reach Temporal at 127.0.0.1:1", "set XPANDO_TEMPORAL_ADDRESS"],
        ),
        (
            ("search-attributes",),
            {},
            EXIT_UNREACHABLE,
            ["cannot reach Temporal at 127.0.0.1:1"],
        ),
        # The database unreachable.
        (
            ("db", "init"),
            {"XPANDO_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none"},
            EXIT_UNREACHABLE,
            ["cannot reach the database at postgresql+asyncpg://", "XPANDO_DATABASE_URL"],
        ),
    ],
)
def test_each_failure_is_one_line_with_its_exit_status(
    tmp_path: Path, args: tuple[str, ...], settings: dict[str, str], status: int, says: list[str]
) -> None:
    out = _xpando(*args, env=_env(tmp_path, **settings))
    assert out.returncode == status, out.stderr
    line = _one_line(out.stderr)
    for phrase in says:
        assert phrase in line


def test_node_with_missing_corpus_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    out = _xpando("worker", "node", "--node-id", "n1", "--corpus", str(missing), env=_env(tmp_path))
    assert out.returncode == EXIT_USAGE and str(missing) in _one_line(out.stderr)


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    out = _xpando("--debug", "task", "get", "task-1", env=_env(tmp_path))
    assert out.returncode == EXIT_UNREACHABLE
    assert "Traceback" in out.stderr and "TemporalUnreachable" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("xpando: error: cannot reach Temporal")


def test_no_such_task_is_not_found(tmp_path: Path, temporal_target: str) -> None:
    env = _env(tmp_path, XPANDO_TEMPORAL_ADDRESS=temporal_target)
    out = _xpando("task", "get", "task-nope", env=env)
    assert out.returncode == EXIT_NOT_FOUND
    line = _one_line(out.stderr)
    assert "no task 'task-nope'" in line and "temporal workflow list" in line


async def test_a_running_task_without_a_core_worker_is_unreachable(
    tmp_path: Path, client: Client, temporal_target: str
) -> None:
    queue = f"nobody-{uuid.uuid4().hex[:8]}"  # no worker polls it: the task waits there
    task_id = f"task-{uuid.uuid4().hex[:8]}"
    await client.start_workflow(
        TaskWorkflow.run,
        TaskInput(task_id=task_id, prompt="anyone there?", k=1),
        id=task_id,
        task_queue=queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    env = _env(tmp_path, XPANDO_TEMPORAL_ADDRESS=temporal_target)
    out = await _xpando_async("task", "get", task_id, env=env)
    assert out.returncode == EXIT_UNREACHABLE
    line = _one_line(out.stderr)
    assert f"task {task_id!r} is running" in line and "xpando worker core" in line


async def _xpando_async(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``_xpando`` without blocking the event loop (a core worker in this process serves it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, stdout.decode(), stderr.decode())


async def test_a_refused_registration_is_refused(
    tmp_path: Path,
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    corpus_dir: Path,
    temporal_target: str,
) -> None:
    node_id = f"taken-{uuid.uuid4().hex[:8]}"
    corpus = corpus_dir / "cooking.jsonl"
    async with running(build_core_worker(client, sessions=sessions, settings=settings)):
        # The node id is bound to the key that registered it first ...
        profile, _ = build_node(
            NodeSpec(node_id=node_id, region="eu-west", domain="cooking", corpus=corpus),
            data_dir=settings.data_dir,
        )
        await register(client, profile, core_task_queue=settings.core_task_queue, keypair=Keypair())
        # ... so the same id started with another key is refused.
        env = _env(
            tmp_path,
            XPANDO_TEMPORAL_ADDRESS=temporal_target,
            XPANDO_CORE_TASK_QUEUE=settings.core_task_queue,
            XPANDO_NODE_KEY=str(Keypair()),
        )
        args = ("worker", "node", "--node-id", node_id, "--region", "eu-west")
        out = await _xpando_async(*args, "--corpus", str(corpus), env=env)
    assert out.returncode == EXIT_REFUSED, out.stderr
    line = _one_line(out.stderr)
    assert "registration refused" in line and "registered under another key" in line
    assert "--node-id" in line


async def test_registering_many_nodes_shows_a_counter(
    tmp_path: Path,
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    temporal_target: str,
) -> None:
    env = _env(
        tmp_path,
        XPANDO_TEMPORAL_ADDRESS=temporal_target,
        XPANDO_CORE_TASK_QUEUE=settings.core_task_queue,
    )
    prefix = f"sim{uuid.uuid4().hex[:6]}"
    async with running(build_core_worker(client, sessions=sessions, settings=settings)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            *("worker", "nodes", "--count", "3", "--prefix", prefix),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        seen: list[str] = []
        try:
            while "xpando: registered nodes: 3/3" not in seen:
                line = await asyncio.wait_for(proc.stderr.readline(), 60)
                assert line, f"exited before registering: {seen}"
                seen.append(line.decode().strip())
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
    counts = [s for s in seen if s.startswith("xpando: registered nodes: ")]
    assert counts[-1] == "xpando: registered nodes: 3/3"


def test_chain_init_says_what_it_does(tmp_path: Path) -> None:
    out = _xpando("chain", "init", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("xpando: chain init: opening the embedded chain in")
    assert "embedded chain created" in out.stdout


async def test_submit_follow_prints_the_task_events_one_line_each(
    tmp_path: Path,
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    corpus_dir: Path,
    temporal_target: str,
) -> None:
    nodes = [("cooking", "us-east"), ("gardening", "eu-west")]
    env = _env(
        tmp_path,
        XPANDO_TEMPORAL_ADDRESS=temporal_target,
        XPANDO_CORE_TASK_QUEUE=settings.core_task_queue,
    )
    async with offline_network(client, settings, sessions, corpus_dir, nodes):
        out = await _xpando_async(
            "task", "submit", "How do I water tomato plants?", "--k", "2", "--follow", env=env
        )
        assert out.returncode == EXIT_OK, out.stderr
        lines = out.stdout.strip().splitlines()
        task_id = json.loads(lines[0])["task_id"]
        log = await client.get_workflow_handle_for(TaskWorkflow.run, task_id).query(
            TaskWorkflow.events, TaskEventsInput()
        )
    printed = [TaskEvent.model_validate_json(line) for line in lines[1:]]

    # The stream the API serves, as the workflow keeps it (when is left out: a workflow task
    # that is retried logs its events again at its own time).
    def told(event: TaskEvent) -> dict[str, Any]:
        return event.model_dump(exclude={"at": True, "result": {"completed_at"}})

    assert [told(e) for e in printed] == [told(e) for e in log.events]
    assert [e.type for e in printed][-1] == TaskEventType.RESULT
    assert sum(e.type == TaskEventType.CONTRIBUTION for e in printed) == 2
