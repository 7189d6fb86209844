"""Quorum fan-out, reputation and liveness through TaskWorkflow on the real dev server.

The experts are in-process workers on their own ``node.<id>`` queues running a scripted
``answer`` activity (the real activity's name), so each test controls who is fast, hung, good or
bad; everything else — core worker, routing, aggregation, recording, the database — is real.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from tests.conftest import api_client, wait_for
from tests.fakes.networks import answered, fake_network, register_fake_nodes
from workflows.task import TaskWorkflow
from xpando import breakers
from xpando.auth.keys import Scope
from xpando.contracts import (
    AnswerInput,
    AnswerPolicy,
    Contribution,
    ContributionStatus,
    RouteOutcome,
    TaskInput,
    TaskResult,
)
from xpando.db import SessionFactory, queries
from xpando.settings import Settings

HISTORY_DIR = Path(__file__).parent / "histories"
GOOD = "Bread dough rises because yeast ferments its sugars and releases carbon dioxide gas."
BAD = "The capital of France is Paris, and the Eiffel Tower is made of iron."
PROMPT = "Why does bread dough rise?"


class Experts:
    """A scripted ``answer``: per node, answer well, answer badly, or hang (heartbeating) until
    cancelled. Records who was asked and whose activity saw its cancellation."""

    def __init__(
        self,
        *,
        bad: frozenset[str] | set[str] = frozenset(),
        hung: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.bad, self.hung = set(bad), set(hung)
        self.asked: list[str] = []
        self.cancelled: list[str] = []

        @activity.defn(name="answer")
        async def answer(input: AnswerInput) -> Contribution:
            self.asked.append(input.node_id)
            if input.node_id in self.hung:
                try:
                    while True:
                        activity.heartbeat()
                        await asyncio.sleep(0.1)
                except asyncio.CancelledError:
                    self.cancelled.append(input.node_id)
                    raise
            bad = input.node_id in self.bad
            return answered(
                input.node_id,
                BAD if bad else GOOD,
                provider="scripted",
                model="m",
                relevance=0.2 if bad else 0.9,
            )

        self.activity = answer


@asynccontextmanager
async def network(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    experts: Experts,
    node_ids: list[str],
) -> AsyncIterator[dict[str, Worker]]:
    """A core worker, and one running worker per node (all registered, all baking experts)."""
    await register_fake_nodes(sessions, node_ids, provider="scripted", model="m")
    async with fake_network(client, settings, sessions, node_ids, experts.activity) as workers:
        yield workers


def _ids(*names: str) -> list[str]:
    suffix = uuid.uuid4().hex[:6]
    return [f"{n}-{suffix}" for n in names]


async def _run(client: Client, settings: Settings, **kw: object) -> TaskResult:
    task_id = f"task-{uuid.uuid4().hex[:10]}"
    values: dict[str, object] = {"prompt": PROMPT, "k": 3, "fresh": True}
    values.update(kw)
    return await client.execute_workflow(
        TaskWorkflow.run,
        TaskInput(task_id=task_id, **values),
        id=task_id,
        task_queue=settings.core_task_queue,
    )


async def test_quorum_is_reached_with_one_expert_hung_and_the_straggler_is_cancelled(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    fast_a, fast_b, hung = _ids("fast-a", "fast-b", "hung")
    experts = Experts(hung=frozenset({hung}))
    async with network(client, settings, sessions, experts, [fast_a, fast_b, hung]):
        task_id = f"task-{uuid.uuid4().hex[:10]}"
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt=PROMPT, k=3, quorum=2, fresh=True),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        result = await handle.result()
        # The hung expert's activity is told: it sees the cancellation at its next heartbeat.
        await wait_for(lambda: _true(hung in experts.cancelled), timeout=20)
        if os.environ.get("XPANDO_RECORD_HISTORIES"):
            history = await handle.fetch_history()
            (HISTORY_DIR / "task_workflow_quorum.json").write_text(history.to_json())
    by_node = {c.node_id: c for c in result.contributions}
    assert set(experts.asked) == {fast_a, fast_b, hung}
    assert by_node[fast_a].status == by_node[fast_b].status == ContributionStatus.OK
    assert by_node[hung].status == ContributionStatus.FAILED
    assert by_node[hung].error_type == "QuorumReached"
    assert result.answer == GOOD
    # The routing report explains the three chosen experts with every score term.
    assert result.routing is not None
    chosen = [c for c in result.routing.candidates if c.outcome == RouteOutcome.CHOSEN]
    assert {c.node_id for c in chosen} == {fast_a, fast_b, hung}
    assert all(c.fit > 0 and c.reputation == 0.5 and c.health > 0 for c in chosen)
    async with sessions() as s:  # a cancelled straggler is not held against the node
        row = await queries.get_node(session=s, node_id=hung)
    assert row is not None and not row.reputation_n


async def test_a_deadline_lets_the_task_go_on_with_the_answers_it_has(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    fast, hung = _ids("fast", "hung")
    experts = Experts(hung=frozenset({hung}))
    async with network(client, settings, sessions, experts, [fast, hung]):
        result = await _run(client, settings, k=2, deadline_ms=1500)
        await wait_for(lambda: _true(hung in experts.cancelled), timeout=20)
    by_node = {c.node_id: c for c in result.contributions}
    assert by_node[fast].status == ContributionStatus.OK
    assert by_node[hung].error_type == "QuorumReached"
    assert result.answer == GOOD


async def test_reputation_rises_for_good_and_falls_for_bad_contributors(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    good_a, good_b, bad = _ids("good-a", "good-b", "bad")
    experts = Experts(bad=frozenset({bad}))
    seen: dict[str, list[float]] = {good_a: [], good_b: [], bad: []}
    async with (
        network(client, settings, sessions, experts, [good_a, good_b, bad]),
        api_client(settings, Scope.NODES_READ) as http,
    ):
        for _ in range(4):
            result = await _run(client, settings)
            assert result.answer == GOOD
            nodes = {n["node_id"]: n for n in (await http.get("/v1/nodes")).json()["nodes"]}
            for node_id, values in seen.items():
                values.append(nodes[node_id]["reputation"])
    for node_id in (good_a, good_b):
        assert seen[node_id][0] > 0.5
        assert seen[node_id] == sorted(seen[node_id])  # rises with each good contribution
    assert seen[bad][0] < 0.5 and seen[bad] == sorted(seen[bad], reverse=True)
    assert seen[bad][-1] < 0.3 and min(seen[good_a][-1], seen[good_b][-1]) > 0.65
    assert nodes[bad]["contributions"] == 4


async def test_a_stopped_node_stops_receiving_tasks(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    settings = settings.model_copy(update={"node_liveness_sweep_s": 0.3})
    first, second = _ids("first", "second")
    experts = Experts()
    async with (
        network(client, settings, sessions, experts, [first, second]) as workers,
        api_client(settings, Scope.NODES_READ) as http,
    ):
        before = await _run(client, settings, k=2)
        assert {c.node_id for c in before.contributions} == {first, second}

        await workers[first].shutdown()  # a graceful stop: its worker says so in a heartbeat

        async def stopped() -> bool:
            nodes = {n["node_id"]: n for n in (await http.get("/v1/nodes")).json()["nodes"]}
            return nodes[first]["live"] is False and nodes[second]["live"] is True

        await wait_for(stopped, timeout=20)
        # The API saw it; the core worker sees it at its next sweep (at most sweep_s later).
        await asyncio.sleep(2 * settings.node_liveness_sweep_s)
        experts.asked.clear()
        after = [await _run(client, settings, k=2) for _ in range(3)]
    assert first not in experts.asked
    for result in after:
        assert {c.node_id for c in result.contributions} == {second}
        assert result.routing is not None
        skipped = {c.node_id: c for c in result.routing.candidates}
        assert skipped[first].outcome == RouteOutcome.SKIPPED
        assert skipped[first].reason.startswith("not live")


async def test_an_ask_no_worker_takes_goes_to_another_expert_without_waiting_for_the_hedge(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    """A node that stops after routing last saw it live: its ask waits in its queue until the
    schedule-to-start timeout, then fails as NodeUnavailable (not retried, counted against the
    node's breaker); the task goes on with the others without waiting for the 30 s hedge."""
    settings = settings.model_copy(update={"node_liveness_sweep_s": 3600})  # no fresh sweep
    up_a, up_b, gone = _ids("up-a", "up-b", "gone")
    experts = Experts()
    async with network(client, settings, sessions, experts, [up_a, up_b, gone]) as workers:
        before = await _run(client, settings, k=3)
        assert {c.node_id for c in before.contributions} == {up_a, up_b, gone}
        await workers[gone].shutdown()  # the core's liveness view still has it running
        experts.asked.clear()
        after = await _run(
            client, settings, k=3, answer_policy=AnswerPolicy(schedule_to_start_ms=1500)
        )
    by_node = {c.node_id: c for c in after.contributions}
    assert gone not in experts.asked  # nobody took it
    assert by_node[up_a].status == by_node[up_b].status == ContributionStatus.OK
    assert by_node[gone].status == ContributionStatus.FAILED
    assert by_node[gone].error_type == "NodeUnavailable"  # the hedge would say DeadlineExceeded
    assert after.answer == GOOD
    async with sessions() as s:
        rows = await queries.get_breakers(session=s, keys=[breakers.node_key(gone)])
    assert rows[breakers.node_key(gone)].consecutive_failures == 1


async def _true(value: bool) -> bool:
    return value
