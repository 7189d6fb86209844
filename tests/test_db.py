"""Database code on SQLite and PostgreSQL: idempotent writes, reads back what was written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from xpando.contracts import (
    Citation,
    Contribution,
    ContributionStatus,
    NodeDomain,
    NodeProfile,
    RecordInput,
    TaskStage,
)
from xpando.db import queries, session_factory
from xpando.db.models import Knowledge

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _profile(node_id: str, region: str = "eu-west", model: str = "bm25-retrieval") -> NodeProfile:
    return NodeProfile(
        node_id=node_id,
        region=region,
        provider="offline",
        model=model,
        domains=[NodeDomain(name="cooking", description="food", keywords=["bread", "pasta"])],
    )


def _contribution(node_id: str, status: ContributionStatus = ContributionStatus.OK) -> Contribution:
    return Contribution(
        node_id=node_id,
        region="eu-west",
        provider="offline",
        model="bm25-retrieval",
        status=status,
        answer=f"answer from {node_id}",
        citations=[Citation(source="cook/bread", text="knead the dough", score=2.5)],
        relevance=0.8,
        quality=0.7,
        latency_ms=12,
        input_tokens=5,
        output_tokens=9,
        finish_reason="stop",
    )


async def test_node_registration_is_idempotent_and_updates_profile(any_engine: AsyncEngine) -> None:
    sessions = session_factory(any_engine)
    async with sessions() as s:
        created, first_at = await queries.upsert_node(session=s, profile=_profile("n1"), now=NOW)
    later = NOW + timedelta(minutes=5)
    async with sessions() as s:
        created_again, registered_at = await queries.upsert_node(
            session=s, profile=_profile("n1", region="us-east", model="v2"), now=later
        )
    async with sessions() as s:
        nodes = await queries.list_nodes(session=s)
        east = await queries.list_nodes(session=s, regions=["us-east"])
        west = await queries.list_nodes(session=s, regions=["eu-west"])
    assert (created, created_again) == (True, False)
    assert registered_at == first_at == NOW  # first registration time is kept
    assert [n.node_id for n in nodes] == ["n1"]
    assert nodes[0].region == "us-east" and nodes[0].model == "v2"
    assert nodes[0].domains[0]["keywords"] == ["bread", "pasta"]
    assert [n.node_id for n in east] == ["n1"] and west == []


async def test_record_task_twice_writes_each_row_once(any_engine: AsyncEngine) -> None:
    sessions = session_factory(any_engine)
    record = RecordInput(
        task_id="task-db-1",
        prompt="How long to boil an egg?",
        domain="cooking",
        status=TaskStage.COMPLETED,
        answer="About six minutes for soft.",
        confidence=0.72,
        contributions=[
            _contribution("n1"),
            _contribution("n2", ContributionStatus.NO_ANSWER),
        ],
    )
    for _ in range(3):  # a retried record activity
        async with sessions() as s:
            result = await queries.record_task(session=s, record=record, now=NOW)
    async with sessions() as s:
        found = await queries.get_task(session=s, task_id="task-db-1")
        count = await queries.count_contributions(session=s, task_id="task-db-1")
    assert found is not None
    task, rows = found
    assert count == 2
    assert task.status == "completed" and task.confidence == 0.72
    assert queries.as_utc(task.completed_at) == NOW
    assert [(r.node_id, r.status) for r in rows] == [("n1", "ok"), ("n2", "no_answer")]
    assert rows[0].citations == [{"source": "cook/bread", "text": "knead the dough", "score": 2.5}]
    assert result.contributions_written == 2


async def test_a_reused_item_counts_one_use_per_task_despite_retries(
    any_engine: AsyncEngine,
) -> None:
    sessions = session_factory(any_engine)
    async with sessions() as s:
        s.add(
            Knowledge(
                knowledge_id="kn-src",
                task_id="task-src",
                question="q",
                answer="a",
                domain="cooking",
                confidence=0.8,
                created_at=NOW,
                updated_at=NOW,
            )
        )
        await s.commit()
    for task_id in ("task-r1", "task-r1", "task-r1", "task-r2"):  # r1 retried twice
        async with sessions() as s:
            await queries.record_task(
                session=s,
                record=RecordInput(
                    task_id=task_id,
                    prompt="q?",
                    domain="cooking",
                    status=TaskStage.COMPLETED,
                    answer="a",
                    confidence=0.8,
                    reused_knowledge_id="kn-src",
                ),
                now=NOW,
            )
    async with sessions() as s:
        item = await queries.get_knowledge(session=s, knowledge_id="kn-src")
    assert item is not None and item.uses == 2


async def test_failed_task_keeps_error_and_stores_no_knowledge(any_engine: AsyncEngine) -> None:
    sessions = session_factory(any_engine)
    async with sessions() as s:
        result = await queries.record_task(
            session=s,
            record=RecordInput(
                task_id="task-db-2",
                prompt="q",
                domain=None,
                status=TaskStage.FAILED,
                error="every expert failed",
                contributions=[_contribution("n1", ContributionStatus.FAILED)],
            ),
            now=NOW,
        )
    async with sessions() as s:
        found = await queries.get_task(session=s, task_id="task-db-2")
    assert found is not None and found[0].error == "every expert failed"
    assert result.knowledge_id is None


async def test_missing_task_is_none(any_engine: AsyncEngine) -> None:
    async with session_factory(any_engine)() as s:
        assert await queries.get_task(session=s, task_id="nope") is None
