"""Text a database or a provider cannot take: refused at the edge (API, CLI, Temporal payloads,
signed node profiles) with the stable code ``invalid_text``, scrubbed where a provider wrote it,
and, when it gets past the edge anyway, a write the database refuses fails fast instead of
retrying for ever, while the domain's knowledge goes on growing (real dev server, SQLite and
PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from solders.keypair import Keypair
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.recording import RecordingActivities
from tests.conftest import api_client, offline_network, wait_for
from workers.core import build_core_worker
from workers.node import submit
from workers.wiring import build_knowledge_index
from workflows.knowledge import KnowledgeWorkflow
from workflows.task import TaskWorkflow
from xpando.breakers import BreakerBook
from xpando.contracts import (
    ConsolidateInput,
    Contribution,
    ContributionStatus,
    KnowledgeItemInput,
    NodeAction,
    NodeDomain,
    NodeProfile,
    ProvenanceNode,
    RecordInput,
    TaskInput,
    TaskStage,
)
from xpando.db import create_engine, queries, session_factory
from xpando.db.models import Knowledge
from xpando.db.nodes import ReputationParams
from xpando.identity import sign_request
from xpando.mother.knowledge import Consolidator, knowledge_workflow_id
from xpando.settings import Settings

NUL_PROMPT = "what is\x00this"
SURROGATE = "\ud800"


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as http:
        yield http


def _error(resp: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = resp.json()["error"]
    return error


def _refused_text(resp: httpx.Response, field: str) -> None:
    assert resp.status_code == 422, resp.text
    error = _error(resp)
    assert error["code"] == "invalid_text"
    assert [(d["field"], d["code"]) for d in error["details"]] == [(field, "invalid_text")]


def _profile(node_id: str, *, description: str) -> NodeProfile:
    """A profile as a modified node would send it: built without the contract's checks."""
    return NodeProfile.model_construct(
        node_id=node_id,
        region="eu-west",
        provider="offline",
        model="bm25-retrieval",
        domains=[NodeDomain.model_construct(name="cooking", description=description, keywords=[])],
    )


def _recording(sessions: Any) -> RecordingActivities:
    return RecordingActivities(
        sessions=sessions, breaker_book=BreakerBook(sessions), reputation=ReputationParams()
    )


# --- the API -------------------------------------------------------------------------------------


async def test_the_api_refuses_control_characters_and_lone_surrogates_with_invalid_text(
    api: httpx.AsyncClient, settings: Settings, client: Client
) -> None:
    _refused_text(await api.post("/v1/tasks", json={"prompt": NUL_PROMPT}), "prompt")
    _refused_text(await api.post("/v1/tasks", json={"prompt": "ok", "domain": "web\x01"}), "domain")
    _refused_text(
        await api.post("/v1/tasks", json={"prompt": "ok", "regions": ["eu-west", "us\x1b"]}),
        "regions.1",
    )
    # A lone surrogate is valid JSON ("\ud800") but has no UTF-8 encoding: refused, not a 500.
    body = b'{"prompt": "half a pair \\ud800 here"}'
    resp = await api.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    _refused_text(resp, "prompt")
    assert "U+D800 at position 12" in _error(resp)["details"][0]["message"]
    # ... and as the name of a field nobody asked for, a 422 all the same.
    body = b'{"prompt": "ok", "\\ud800": 1}'
    resp = await api.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422 and _error(resp)["code"] == "validation_error"

    # Other refusals keep their own code; tab, newline and carriage return are text.
    resp = await api.post("/v1/tasks", json={"prompt": "ok", "domain": "Web API"})
    assert resp.status_code == 422 and _error(resp)["code"] == "validation_error"
    resp = await api.post("/v1/tasks", json={"prompt": "line one\r\n\tline two"})
    assert resp.status_code == 202, resp.text
    await client.get_workflow_handle(resp.json()["task_id"]).terminate("no worker in this test")

    # Searching knowledge and approving an epoch take the same check.
    _refused_text(await api.get("/v1/knowledge", params={"q": "eggs\x00"}), "query.q")
    resp = await api.post("/v1/payouts/epochs/1/approve", json={"note": "ok\x00"})
    _refused_text(resp, "note")
    resp = await api.post("/v1/payouts/epochs/1/approve", json={"note": "\x07"})
    _refused_text(resp, "note")


async def test_a_signed_profile_with_a_control_character_is_refused_over_http(
    api: httpx.AsyncClient,
) -> None:
    node_id = f"n-{uuid.uuid4().hex[:8]}"
    request = sign_request(
        Keypair(),
        action=NodeAction.REGISTER,
        node_id=node_id,
        profile=_profile(node_id, description="bread\x00and pasta"),
    )
    resp = await api.post("/v1/nodes", json=request.model_dump(mode="json"))
    _refused_text(resp, "profile.domains.0.description")
    assert (await api.get("/v1/nodes")).json()["count"] == 0  # nothing was written


# --- the CLI -------------------------------------------------------------------------------------


def _xpando(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XPANDO_DATA_DIR": str(tmp_path), "XPANDO_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("task", "submit", "what\x1b[31m is red"), "prompt: text contains U+001B at position 4"),
        (("task", "submit", "fine", "--region", "eu\x02"), "regions.0: text contains U+0002"),
    ],
)
def test_the_cli_refuses_a_control_character_in_one_line(
    args: tuple[str, ...], named: str, tmp_path: Path
) -> None:
    # Refused before Temporal is asked (its address here is unreachable).
    out = _xpando(*args, tmp_path=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and named in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


# --- Temporal payloads: workflows started without the API ----------------------------------------


async def test_workflows_given_unsafe_text_fail_at_once_with_invalid_text(
    client: Client, settings: Settings, any_engine: AsyncEngine
) -> None:
    """A node's registration and a task started straight through Temporal (a modified node,
    ``temporal workflow start``): each fails with a non-retryable InvalidText, on either
    database, instead of its workflow task failing and retrying for ever."""
    sessions = session_factory(any_engine)
    async with build_core_worker(client, sessions=sessions, settings=settings):
        node_id = f"n-{uuid.uuid4().hex[:8]}"
        request = sign_request(
            Keypair(),
            action=NodeAction.REGISTER,
            node_id=node_id,
            profile=_profile(node_id, description="bread and\x00pasta"),
        )
        with pytest.raises(WorkflowFailureError) as refused:
            await submit(client, request, core_task_queue=settings.core_task_queue)
        cause = refused.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.type == "InvalidText" and cause.non_retryable
        assert "profile.domains.0.description" in cause.message
        async with sessions() as s:
            assert await queries.list_nodes(session=s, status=None) == []

        task_id = f"task-{uuid.uuid4().hex[:10]}"
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput.model_construct(task_id=task_id, prompt=NUL_PROMPT, k=1),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        cause = failed.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "InvalidText"
        assert "prompt: text contains U+0000 at position 7" in cause.message

        # A task started by hand with JSON its contract refuses (a misspelt field, k out of
        # range): the run fails at once naming the fields, instead of retrying its first
        # workflow task for ever.
        task_id = f"task-{uuid.uuid4().hex[:10]}"
        handle = await client.start_workflow(
            "TaskWorkflow",
            {"task_id": task_id, "promt": "why does bread rise", "k": 0},
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        cause = failed.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "InvalidInput"
        assert cause.non_retryable and "prompt" in cause.message and "k" in cause.message


# --- the record step: a refused write fails fast, a lost connection retries ---------------------


async def test_a_write_the_database_refuses_fails_the_record_step_without_retry(
    any_engine: AsyncEngine,
) -> None:
    """RecordInput has no text check of its own (a task's prompt reaches it from the workflow):
    a prompt that got past the edge is refused by the database, and the step says so, typed
    and not retryable. PostgreSQL refuses NUL too; SQLite stores it."""
    sessions = session_factory(any_engine)
    recording = _recording(sessions)
    bad = [f"half a pair {SURROGATE}"]
    if any_engine.dialect.name == "postgresql":
        bad.append(NUL_PROMPT)
    for prompt in bad:
        task_id = f"task-{uuid.uuid4().hex[:10]}"
        record = RecordInput.model_construct(
            task_id=task_id,
            prompt=prompt,
            domain=None,
            status=TaskStage.FAILED,
            error="no experts",
            contributions=[],
            outcomes=[],
            publish=None,
        )
        with pytest.raises(ApplicationError) as refused:
            await recording.record(record)
        assert refused.value.type == "InvalidText" and refused.value.non_retryable
        assert refused.value.message.startswith(f"record {task_id}: ")
        async with sessions() as s:
            assert await queries.get_task(session=s, task_id=task_id) is None


async def test_a_task_whose_record_postgresql_refuses_fails_instead_of_waiting_for_ever(
    client: Client, settings: Settings, any_engine: AsyncEngine, corpus_dir: Path
) -> None:
    """On the dev server: a value that passes the contracts but not PostgreSQL's columns (a
    domain named longer than ``tasks.domain``'s 64 characters, which TaskInput does not limit)
    fails the task's record step without a retry, so the task ends failed; its knowledge item
    is skipped by the domain's KnowledgeWorkflow, which is left waiting for the next one."""
    if any_engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no column lengths to refuse the value")
    sessions = session_factory(any_engine)
    domain = "c" * 100
    async with offline_network(client, settings, sessions, corpus_dir, [("cooking", "eu-west")]):
        task_id = f"task-{uuid.uuid4().hex[:10]}"
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt="How long to boil a soft egg?", k=1, domain=domain),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        reasons = []
        cause: BaseException | None = failed.value
        while cause is not None:
            reasons.append(str(cause))
            cause = getattr(cause, "cause", None)
        assert any("value too long for type character varying(64)" in r for r in reasons)
        async with sessions() as s:
            assert await queries.get_task(session=s, task_id=task_id) is None

        knowledge = client.get_workflow_handle_for(
            KnowledgeWorkflow.run, knowledge_workflow_id(domain, settings.core_task_queue)
        )

        async def consolidated() -> bool:
            stats = await knowledge.query(KnowledgeWorkflow.stats)
            return stats.consolidations >= 1 and stats.pending == 0

        await wait_for(consolidated)
        stats = await knowledge.query(KnowledgeWorkflow.stats)
        assert (stats.received, stats.added, stats.items) == (1, 0, 0)


async def test_a_lost_database_connection_stays_retryable() -> None:
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    try:
        recording = _recording(session_factory(engine))
        record = RecordInput(
            task_id="task-unreachable", prompt="ok", domain=None, status=TaskStage.FAILED
        )
        with pytest.raises(Exception) as raised:
            await recording.record(record)
        # Not an ApplicationError: the activity's retry policy retries it.
        assert not isinstance(raised.value, ApplicationError)
        assert isinstance(raised.value, OSError)
    finally:
        await engine.dispose()


async def test_a_provider_answer_with_control_characters_is_scrubbed_and_recorded(
    any_engine: AsyncEngine,
) -> None:
    sessions = session_factory(any_engine)
    answer = Contribution(
        node_id="n1",
        region="eu-west",
        provider="fake",
        model="fake-1",
        status=ContributionStatus.OK,
        answer=f"boil\x00 it {SURROGATE}six minutes\x1b",
        error=None,
    )
    assert answer.answer == "boil it \ufffdsix minutes"
    task_id = f"task-{uuid.uuid4().hex[:10]}"
    await _recording(sessions).record(
        RecordInput(
            task_id=task_id,
            prompt="How long for a soft egg?",
            domain=None,
            status=TaskStage.COMPLETED,
            answer="boil\x00 it",
            confidence=0.7,
            contributions=[answer],
        )
    )
    async with sessions() as s:
        found = await queries.get_task(session=s, task_id=task_id)
    assert found is not None
    task, rows = found
    assert task.answer == "boil it" and [r.answer for r in rows] == [answer.answer]


# --- knowledge: a refused item is skipped, the domain keeps growing ------------------------------


async def test_the_consolidator_skips_an_item_the_database_refuses_and_stores_the_rest(
    any_engine: AsyncEngine,
) -> None:
    sessions = session_factory(any_engine)
    settings = Settings(_env_file=None)
    index = build_knowledge_index(sessions, settings)
    consolidator = Consolidator(sessions=sessions, index=index)
    now = datetime.now(UTC)

    def item(task_id: str, question: str, answer: str) -> KnowledgeItemInput:
        # model_construct: an item as a workflow may carry it (KnowledgeItemInput checks no
        # text), e.g. from a task recorded before the edge refused such prompts.
        return KnowledgeItemInput.model_construct(
            task_id=task_id,
            question=question,
            answer=answer,
            domain="garden",
            confidence=0.6,
            nodes=[ProvenanceNode(node_id="n1", quality=0.6)],
            completed_at=now,
        )

    bad = [item("bad-surrogate", "Why do leaves curl?", f"Heat {SURROGATE} stress.")]
    if any_engine.dialect.name == "postgresql":
        bad.append(item("bad-nul", "Why do\x00 tomatoes split?", "Uneven watering."))
    result = await consolidator.consolidate(
        ConsolidateInput(
            domain="garden",
            items=[
                item("t1", "How do I prune roses in winter?", "Cut above an outward bud."),
                *bad,
                item("t2", "Which soil pH suits vegetables?", "Slightly acidic, about 6.5."),
            ],
        )
    )
    assert (result.added, result.merged, result.skipped, result.items) == (2, 0, len(bad), 2)
    async with sessions() as s:
        stored = {
            k.knowledge_id
            for k in await queries.active_knowledge_page(
                session=s, domain="garden", after=None, limit=100
            )
        }
        for refused in bad:
            assert await s.get(Knowledge, f"kn-{refused.task_id}") is None
    assert stored == {"kn-t1", "kn-t2"}
    # The index serves what was stored, and the next batch is stored as usual.
    hits = await index.search("pruning roses in winter", domain="garden", k=3)
    assert hits[0].knowledge_id == "kn-t1"
    later = await consolidator.consolidate(
        ConsolidateInput(
            domain="garden",
            items=[item("t3", "When should I water the garden?", "Early in the morning.")],
        )
    )
    assert (later.added, later.skipped, later.items) == (1, 0, 3)
