"""The xpando command speaks like the API: every expected failure is one line on stderr naming the
reason and what to do, with its own exit status, and no traceback unless ``--debug``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
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
from tests.conftest import api_client, bearer, offline_network, running
from workers.core import build_core_worker
from workers.node import NodeSpec, build_node, register
from workflows.task import TaskWorkflow
from xpando.auth.keys import KEY_RE, Scope
from xpando.contracts import TaskEvent, TaskEventsInput, TaskEventType, TaskInput
from xpando.db import SessionFactory, migrate
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
        # API keys: an unknown scope, an expiry that is neither a duration nor a date, no key.
        (
            ("keys", "create", "--name", "ci", "--scope", "tasks:read,everything"),
            {},
            EXIT_USAGE,
            ["unknown scope 'everything'", "tasks:write"],
        ),
        (
            ("keys", "create", "--name", "ci", "--scope", "admin", "--expires", "soon"),
            {},
            EXIT_USAGE,
            ["--expires 'soon': give a duration (90d"],
        ),
        (
            ("keys", "create", "--name", "no spaces", "--scope", "admin"),
            {},
            EXIT_USAGE,
            ["invalid name 'no spaces'"],
        ),
        (
            ("keys", "revoke", "0123456789ab"),
            {},
            EXIT_NOT_FOUND,
            ["no API key '0123456789ab'", "xpando keys list"],
        ),
        # A worker whose metrics port cannot be bound says which and what to do.
        (
            ("worker", "core"),
            {"XPANDO_METRICS_PORT": "1", "XPANDO_METRICS_HOST": "192.0.2.1"},
            EXIT_USAGE,
            ["cannot serve metrics on 192.0.2.1:1", "XPANDO_METRICS_PORT"],
        ),
        # A setting read under its standard name too is named by both.
        (
            ("db", "init"),
            {"OTEL_TRACES_EXPORTER": "jaeger"},
            EXIT_USAGE,
            ["XPANDO_OTEL_TRACES_EXPORTER / OTEL_TRACES_EXPORTER", "unknown traces exporter"],
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
            ("db", "upgrade"),
            {"XPANDO_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none"},
            EXIT_UNREACHABLE,
            ["cannot reach the database at postgresql+asyncpg://", "XPANDO_DATABASE_URL"],
        ),
        (
            ("db", "current"),
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


def test_db_upgrade_and_current_say_where_the_database_stands(tmp_path: Path) -> None:
    env = _env(tmp_path)
    head = migrate.head()
    steps = [
        (("db", "current"), f"none: no tables yet (xpando db upgrade creates them at {head})"),
        (("db", "upgrade"), f"database created at {head} (head)"),
        (("db", "init"), f"database at {head} (head), nothing to do"),  # the older name
        (("db", "current"), f"{head} (head)"),
    ]
    for args, says in steps:
        out = _xpando(*args, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"{says}: {env['XPANDO_DATABASE_URL']}"


def test_a_database_from_a_newer_xpando_is_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _xpando("db", "upgrade", env=env).returncode == 0
    db = sqlite3.connect(tmp_path / "cli.db")
    with db:  # commits
        db.execute("UPDATE alembic_version SET version_num = 'f00d'")
    db.close()
    for args in (("db", "upgrade"), ("db", "current"), ("keys", "list")):
        out = _xpando(*args, env=env)
        assert out.returncode == EXIT_USAGE, out.stderr
        line = _one_line(out.stderr)
        assert "schema revision 'f00d', which this xpando does not know" in line
        assert "a newer xpando upgraded it" in line


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


async def test_keys_are_created_listed_and_revoked_from_the_command_line(
    tmp_path: Path, settings: Settings
) -> None:
    env = _env(tmp_path, XPANDO_DATABASE_URL=settings.database_dsn)
    args = "keys create --name ci --scope tasks:read --scope nodes:read,tasks:write --expires 30d"
    created = await _xpando_async(*args.split(), env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    found = KEY_RE.match(key)
    assert found is not None  # stdout is the key alone, for KEY=$(xpando keys create ...)
    note = _one_line(created.stderr)
    assert f"created API key {found['key_id']} for 'ci'" in note and "shown once" in note
    assert "tasks:write, tasks:read, nodes:read" in note

    # A running API trusts a key it has checked for XPANDO_KEY_CACHE_S: a revocation made
    # elsewhere (here, the CLI) is refused once that has run out.
    cached = settings.model_copy(update={"key_cache_s": 0.5})
    async with api_client(cached, Scope.ADMIN) as http:
        assert (await http.get("/v1/nodes", headers=bearer(key))).status_code == 200
        listed = await _xpando_async("keys", "list", env=env)
        assert listed.returncode == 0 and found["secret"] not in listed.stdout
        row = next(line for line in listed.stdout.splitlines() if found["key_id"] in line)
        assert row.split()[1:3] == ["ci", "active"] and "tasks:write,tasks:read,nodes:read" in row

        revoked = await _xpando_async("keys", "revoke", found["key_id"], env=env)
        assert (
            revoked.returncode == 0 and f"revoked API key {found['key_id']} (ci)" in revoked.stdout
        )
        deadline = time.monotonic() + 10  # the 0.5 s, with room for a slow machine
        while (refused := await http.get("/v1/nodes", headers=bearer(key))).status_code == 200:
            assert time.monotonic() < deadline, "a key revoked from the CLI is still accepted"
            await asyncio.sleep(0.1)
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


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
