"""Mother Core knowledge on the real dev server: reuse, consolidation, continue-as-new, decay."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from tests.conftest import api_client, offline_network, wait_for, wait_live
from workers.core import build_core_worker
from workers.wiring import build_knowledge_index
from workflows.knowledge import KnowledgeWorkflow
from workflows.task import TaskWorkflow
from xpando.contracts import (
    AnswerInput,
    ConsolidateInput,
    Contribution,
    ContributionStatus,
    KnowledgeItemInput,
    KnowledgeStats,
    KnowledgeWorkflowInput,
    NodeDomain,
    NodeProfile,
    ProvenanceNode,
    TaskInput,
    TaskResult,
    node_task_queue,
)
from xpando.db import SessionFactory, queries, session_factory
from xpando.db.models import Knowledge
from xpando.mother.knowledge import Consolidator, knowledge_workflow_id
from xpando.settings import Settings

HISTORY_DIR = Path(__file__).parent / "histories"
RECORD = bool(os.environ.get("XPANDO_RECORD_HISTORIES"))

ORIGINAL = "How many minutes to boil a soft egg?"
PARAPHRASE = "How long should I boil an egg so it stays soft?"


@asynccontextmanager
async def network(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> AsyncIterator[list[str]]:
    nodes = [("cooking", "eu-west"), ("astronomy", "us-east")]
    async with offline_network(client, settings, sessions, corpus_dir, nodes) as profiles:
        yield [p.node_id for p in profiles]


async def _task(
    client: Client, settings: Settings, prompt: str, **kw: object
) -> tuple[WorkflowHandle[TaskWorkflow, TaskResult], TaskResult]:
    task_id = f"task-{uuid.uuid4().hex[:10]}"
    handle = await client.start_workflow(
        TaskWorkflow.run,
        TaskInput(task_id=task_id, prompt=prompt, k=2, **kw),
        id=task_id,
        task_queue=settings.core_task_queue,
    )
    return handle, await handle.result()


async def _activities_scheduled(handle: WorkflowHandle[TaskWorkflow, TaskResult]) -> int:
    history = await handle.fetch_history()
    return sum(
        1 for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    )


async def _wait_items(sessions: SessionFactory, domain: str, count: int) -> None:
    async def stored() -> bool:
        async with sessions() as s:
            return await queries.count_knowledge(session=s, domain=domain) >= count

    await wait_for(stored, timeout=30)


async def test_paraphrase_is_answered_from_knowledge_and_different_questions_are_not(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    async with network(client, settings, sessions, corpus_dir) as (cooking, astronomy):
        first_handle, first = await _task(client, settings, ORIGINAL)
        assert first.reused is None and first.domain == "cooking"
        assert await _activities_scheduled(first_handle) == 2  # both experts were asked
        await _wait_items(sessions, "cooking", 1)

        handle, reused = await _task(client, settings, PARAPHRASE)
        # Answered from knowledge: no expert asked, provenance names the source task and node.
        assert reused.reused is not None
        assert reused.reused.knowledge_id == f"kn-{first.task_id}"
        assert reused.answer == first.answer and reused.contributions == []
        assert await _activities_scheduled(handle) == 0
        provenance = reused.reused.provenance
        assert [p.task_id for p in provenance] == [first.task_id]
        assert cooking in [n.node_id for n in provenance[0].nodes]
        if RECORD:
            history = await handle.fetch_history()
            (HISTORY_DIR / "task_workflow_reused.json").write_text(history.to_json())

        # A near-identical but different question, an unrelated one, and an opt-out all ask
        # the experts.
        _, hard = await _task(client, settings, "How many minutes to boil a hard egg?")
        _, planet = await _task(
            client, settings, "Which planet is the largest in the solar system?"
        )
        _, fresh = await _task(client, settings, PARAPHRASE, fresh=True)
        for result in (hard, planet, fresh):
            assert result.reused is None
        # The hard-egg question is close to a known item: one expert confirms instead of two.
        assert [c.node_id for c in hard.contributions] == [cooking]
        assert hard.contributions[0].status.value == "ok"
        for result in (planet, fresh):
            assert {c.node_id for c in result.contributions} == {cooking, astronomy}
        assert planet.domain == "astronomy"

        # The API finds the item and shows its provenance and use.
        # An operator's key: the tasks were started through Temporal, so no API caller owns them.
        async with api_client(settings) as http:
            found = (await http.get("/v1/knowledge", params={"q": PARAPHRASE})).json()
            item = (await http.get(f"/v1/knowledge/kn-{first.task_id}")).json()
            missing = await http.get("/v1/knowledge/kn-nope")
            view = (await http.get(f"/v1/tasks/{reused.task_id}")).json()
    hits = {i["knowledge_id"]: i for i in found["items"]}
    assert hits[f"kn-{first.task_id}"]["similarity"] > 0.8
    assert hits[f"kn-{first.task_id}"]["question"] == ORIGINAL
    assert item["provenance"][0]["task_id"] == first.task_id and item["uses"] == 1
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "knowledge_not_found"
    assert view["reused"]["knowledge_id"] == f"kn-{first.task_id}"


async def test_consolidation_merges_duplicates_and_keeps_both_provenances(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    async with network(client, settings, sessions, corpus_dir):
        _, first = await _task(client, settings, ORIGINAL)
        await _wait_items(sessions, "cooking", 1)
        _, second = await _task(client, settings, ORIGINAL, fresh=True)  # experts asked again

        handle = client.get_workflow_handle_for(
            KnowledgeWorkflow.run, knowledge_workflow_id("cooking", settings.core_task_queue)
        )

        async def merged() -> bool:
            return (await handle.query(KnowledgeWorkflow.stats)).merges >= 1

        await wait_for(merged, timeout=30)
        stats = await handle.query(KnowledgeWorkflow.stats)
    async with sessions() as s:
        kept = await queries.get_knowledge(session=s, knowledge_id=f"kn-{first.task_id}")
        dup = await queries.get_knowledge(session=s, knowledge_id=f"kn-{second.task_id}")
        active = await queries.count_knowledge(session=s, domain="cooking")
    assert kept is not None and dup is not None
    assert [p["task_id"] for p in kept.provenance] == [first.task_id, second.task_id]
    assert kept.support == 2 and kept.status == "active"
    assert kept.confidence > first.confidence  # independent agreement raised it
    assert dup.status == "merged" and dup.merged_into == kept.knowledge_id
    assert active == 1
    assert stats.merges == 1 and stats.items == 1 and stats.received == 2
    assert stats.last_consolidation is not None


def _item(n: int, domain: str) -> KnowledgeItemInput:
    questions = [
        "How do I prune roses in winter?",
        "Which soil pH suits vegetables?",
        "How do I keep a compost pile healthy?",
    ]
    return KnowledgeItemInput(
        task_id=f"task-can-{uuid.uuid4().hex[:6]}-{n}",
        question=questions[n],
        answer=f"answer {n}: see the gardening notes",
        domain=domain,
        confidence=0.7,
        nodes=[ProvenanceNode(node_id="garden-1", quality=0.7)],
        completed_at=datetime.now(UTC),
    )


async def test_knowledge_workflow_continues_as_new_and_keeps_its_state(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    domain = f"garden-{uuid.uuid4().hex[:6]}"
    workflow_id = knowledge_workflow_id(domain, settings.core_task_queue)
    async with build_core_worker(client, sessions=sessions, settings=settings):
        handle = await client.start_workflow(
            KnowledgeWorkflow.run,
            KnowledgeWorkflowInput(domain=domain, batch_size=1, max_consolidations_per_run=2),
            id=workflow_id,
            task_queue=settings.core_task_queue,
        )
        first_run = handle.first_execution_run_id
        for n in range(3):
            await handle.signal(KnowledgeWorkflow.add, _item(n, domain))
        latest = client.get_workflow_handle_for(KnowledgeWorkflow.run, workflow_id)

        async def consolidated() -> bool:
            return (await latest.query(KnowledgeWorkflow.stats)).consolidations >= 3

        await wait_for(consolidated, timeout=30)
        stats: KnowledgeStats = await latest.query(KnowledgeWorkflow.stats)
        desc = await latest.describe()
        if RECORD:
            history = await client.get_workflow_handle(
                workflow_id, run_id=first_run
            ).fetch_history()
            (HISTORY_DIR / "knowledge_workflow.json").write_text(history.to_json())
        await latest.terminate("test over")
    assert desc.run_id != first_run  # it continued as new
    assert stats.runs >= 2
    assert (stats.received, stats.added, stats.items) == (3, 3, 3)
    async with sessions() as s:
        assert await queries.count_knowledge(session=s, domain=domain) == 3


async def test_decayed_items_go_stale_and_are_no_longer_found(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    index = build_knowledge_index(sessions, settings)
    long_ago = datetime.now(UTC) - timedelta(days=365)
    async with sessions() as s:
        for kid, confirmed in (("kn-old", long_ago), ("kn-new", datetime.now(UTC))):
            s.add(
                Knowledge(
                    knowledge_id=kid,
                    task_id=f"task-{kid}",
                    question=f"how to sow {kid} seeds",
                    answer="sow in spring",
                    domain="garden",
                    confidence=0.9,
                    confirmed_at=confirmed,
                    created_at=confirmed,
                    updated_at=confirmed,
                )
            )
        await s.commit()
    acts = Consolidator(sessions=sessions, index=index)
    assert {h.knowledge_id for h in await index.search("sow seeds", k=5)} == {"kn-old", "kn-new"}
    result = await acts.consolidate(ConsolidateInput(domain="garden", sweep=True))
    assert result.stale == 1 and result.items == 1
    assert {h.knowledge_id for h in await index.search("sow seeds", k=5)} == {"kn-new"}
    async with sessions() as s:
        old = await queries.get_knowledge(session=s, knowledge_id="kn-old")
    assert old is not None and old.status == "stale"


async def test_consolidation_on_sqlite_and_postgresql(
    any_engine: AsyncEngine, client: Client
) -> None:
    """The store-merge-decay path against both databases (embeddings as bytes, JSON provenance)."""
    sessions = session_factory(any_engine)
    settings = Settings(_env_file=None)
    index = build_knowledge_index(sessions, settings)
    acts = Consolidator(sessions=sessions, index=index)
    now = datetime.now(UTC)

    def item(task_id: str, question: str, answer: str) -> KnowledgeItemInput:
        return KnowledgeItemInput(
            task_id=task_id,
            question=question,
            answer=answer,
            domain="garden",
            confidence=0.6,
            nodes=[ProvenanceNode(node_id=f"n-{task_id}", quality=0.6)],
            completed_at=now,
        )

    first = await acts.consolidate(
        ConsolidateInput(
            domain="garden",
            items=[
                item("t1", "How do I prune roses in winter?", "Cut above an outward bud."),
                item("t2", "How do I prune roses in winter?", "Cut above an outward facing bud."),
                item("t3", "Which soil pH suits vegetables?", "Slightly acidic, about 6.5."),
            ],
        )
    )
    again = await acts.consolidate(  # a retried batch changes nothing, and reports the same
        ConsolidateInput(
            domain="garden", items=[item("t1", "How do I prune roses in winter?", "x")]
        )
    )
    async with sessions() as s:
        kept = await queries.get_knowledge(session=s, knowledge_id="kn-t1")
        dup = await queries.get_knowledge(session=s, knowledge_id="kn-t2")
    assert (first.added, first.merged, first.items) == (2, 1, 2)
    assert (again.added, again.merged, again.items) == (1, 0, 2)
    assert kept is not None and dup is not None
    assert [p["task_id"] for p in kept.provenance] == ["t1", "t2"]
    assert kept.nodes == ["n-t1", "n-t2"] and kept.support == 2
    assert kept.confidence == round(1 - (1 - 0.6) * (1 - 0.3), 4)
    assert (dup.status, dup.merged_into) == ("merged", "kn-t1")
    # A fresh index in another process sees the same items from the database.
    other = build_knowledge_index(sessions, settings)
    hits = await other.search("pruning roses in winter", k=3)
    assert hits[0].knowledge_id == "kn-t1" and "kn-t2" not in {h.knowledge_id for h in hits}


def _scripted_answer(no_answer: set[str]) -> Callable[[AnswerInput], Awaitable[Contribution]]:
    @activity.defn(name="answer")
    async def answer(input: AnswerInput) -> Contribution:
        found = input.node_id not in no_answer
        return Contribution(
            node_id=input.node_id,
            region="eu-west",
            provider="fake",
            model="fake-1",
            status=ContributionStatus.OK if found else ContributionStatus.NO_ANSWER,
            answer=f"yeast makes the dough rise ({input.node_id})" if found else "nothing",
            relevance=0.9 if found else 0.1,
        )

    return answer


async def _confirm_run(
    client: Client, settings: Settings, sessions: SessionFactory, *, first_has_answer: bool
) -> TaskResult:
    """A known item about bread; a related prompt about pizza dough (not reusable)."""
    now = datetime.now(UTC)
    best, other = f"baker-{uuid.uuid4().hex[:6]}", f"cook-{uuid.uuid4().hex[:6]}"
    async with sessions() as s:
        s.add(
            Knowledge(
                knowledge_id="kn-bread",
                task_id="task-bread",
                question="Why does bread need yeast?",
                answer="Yeast ferments sugar into carbon dioxide, which makes bread rise.",
                domain="baking",
                confidence=0.9,
                confirmed_at=now,
                created_at=now,
                updated_at=now,
            )
        )
        for node_id, keywords in ((best, ["pizza", "dough", "yeast"]), (other, ["yeast"])):
            await queries.upsert_node(
                session=s,
                profile=NodeProfile(
                    node_id=node_id,
                    region="eu-west",
                    provider="fake",
                    model="fake-1",
                    domains=[NodeDomain(name="baking", keywords=keywords)],
                ),
                now=now,
            )
        await s.commit()
    answer = _scripted_answer(set() if first_has_answer else {best})
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            build_core_worker(client, sessions=sessions, settings=settings)
        )
        for node_id in (best, other):
            await stack.enter_async_context(
                Worker(client, task_queue=node_task_queue(node_id), activities=[answer])
            )
        await wait_live(client, node_task_queue(best), node_task_queue(other))
        _, result = await _task(client, settings, "Why does pizza dough need yeast?")
    return result


async def test_a_related_known_item_means_one_expert_confirms_instead_of_the_panel(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    result = await _confirm_run(client, settings, sessions, first_has_answer=True)
    assert result.reused is None  # not close enough to reuse
    assert len(result.contributions) == 1  # one expert, not k=2
    assert result.contributions[0].node_id.startswith("baker-")
    assert "kn-bread" in result.knowledge_used  # the item went to that expert as context


async def test_the_panel_is_asked_when_the_confirming_expert_has_no_answer(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    result = await _confirm_run(client, settings, sessions, first_has_answer=False)
    statuses = {c.node_id.split("-")[0]: c.status.value for c in result.contributions}
    assert statuses == {"baker": "no_answer", "cook": "ok"}
    assert result.answer.startswith("yeast makes the dough rise (cook-")
