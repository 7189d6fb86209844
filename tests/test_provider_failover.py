"""Provider nodes failing under real Temporal: retries, standbys, hedging, breakers, cancellation.

Everything real except the provider: the Temporal dev server, in-process core and node workers,
SQLite, the official openai / anthropic / google-genai SDKs — pointed at the loopback server in
``bench/loopback_providers.py``, which injects each fault and counts the HTTP calls it receives.
Retry backoffs are kept short through ``TaskInput.answer_policy`` (the workflow's constants are
unchanged).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from bench.loopback_providers import DEFAULT_ANSWER, FakeProviders, Fault
from tests.conftest import api_client, wait_for
from tests.fakes.networks import LoopbackNode, loopback_network
from workflows.task import TaskWorkflow
from xpando.auth.keys import Scope
from xpando.breakers import node_key, provider_key
from xpando.contracts import (
    AnswerPolicy,
    BreakerState,
    ContributionStatus,
    TaskInput,
    TaskResult,
)
from xpando.db import SessionFactory, queries
from xpando.settings import Settings

HISTORY_DIR = Path(__file__).parent / "histories"
PROMPT = "Why does bread dough rise?"
# Short backoffs so three attempts take a fraction of a second; hedge late unless a test says.
FAST = AnswerPolicy(
    initial_interval_ms=50, maximum_interval_ms=100, maximum_attempts=3, hedge_after_ms=20_000
)


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with FakeProviders(seed=7) as server:
        yield server


def _breaker_settings(settings: Settings, **kw: object) -> Settings:
    values: dict[str, object] = {
        "breaker_failures": 1,
        "breaker_provider_failures": 2,
        "breaker_cooldown_s": 60.0,
    }
    values.update(kw)
    return settings.model_copy(update=values)


async def _run(
    client: Client, settings: Settings, *, k: int = 1, policy: AnswerPolicy = FAST
) -> TaskResult:
    task_id = f"task-{uuid.uuid4().hex[:10]}"
    return await client.execute_workflow(
        TaskWorkflow.run,
        TaskInput(task_id=task_id, prompt=PROMPT, k=k, answer_policy=policy, fresh=True),
        id=task_id,
        task_queue=settings.core_task_queue,
    )


async def _breaker(sessions: SessionFactory, key: str) -> tuple[str, int]:
    async with sessions() as s:
        rows = await queries.get_breakers(session=s, keys=[key])
    row = rows.get(key)
    return (row.state, row.consecutive_failures) if row else ("closed", 0)


# The primary fits the prompt best (it is chosen, k=1); "alt" is the first standby (another
# provider), "spare" the second.
def _trio(primary: str) -> list[LoopbackNode]:
    others = [p for p in ("openai", "anthropic", "gemini") if p != primary]
    return [
        LoopbackNode("primary", primary, ("bread", "dough", "rise", "yeast"), timeout_s=0.4),
        LoopbackNode("alt", others[0], ("bread", "dough")),
        LoopbackNode("spare", others[1], ("bread",)),
    ]


# fault on the primary, its provider, HTTP calls it gets, the failed contribution's type (None:
# the primary answered after a retry), and its breakers afterwards (node state, provider failures)
CASES = [
    ("rate_limit_once", "openai", 2, None, ("closed", 0), 0),
    ("rate_limit", "anthropic", 3, "ProviderRateLimited", ("open", 1), 0),
    ("server_error", "gemini", 3, "ProviderServerError", ("open", 1), 1),
    ("overloaded", "anthropic", 3, "ProviderOverloaded", ("open", 1), 1),
    ("hang", "openai", 3, "ProviderTimeout", ("open", 1), 1),
    ("malformed", "gemini", 1, "ProviderMalformedResponse", ("open", 1), 0),
    ("refusal", "anthropic", 1, "ProviderRefusal", ("closed", 0), 0),
    ("auth", "openai", 1, "ProviderAuthError", ("open", 1), 0),
    ("insufficient_quota", "gemini", 1, "InsufficientQuota", ("open", 1), 0),
    ("context_length", "openai", 1, "ContextLengthExceeded", ("closed", 0), 0),
    ("truncated", "anthropic", 1, "ProviderTruncated", ("open", 1), 0),
    ("empty", "gemini", 1, "ProviderEmptyAnswer", ("open", 1), 0),
]


@pytest.mark.parametrize(
    ("case", "provider", "calls", "error_type", "node_breaker", "provider_failures"),
    CASES,
    ids=[c[0] for c in CASES],
)
async def test_each_fault_outcome_calls_standby_and_breaker(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    fake: FakeProviders,
    case: str,
    provider: str,
    calls: int,
    error_type: str | None,
    node_breaker: tuple[str, int],
    provider_failures: int,
) -> None:
    settings = _breaker_settings(settings)
    async with loopback_network(client, settings, sessions, fake, _trio(provider)) as nodes:
        primary, alt = nodes["primary"], nodes["alt"]
        fault = Fault.RATE_LIMIT if case == "rate_limit_once" else Fault(case)
        fake.fail(
            primary.node_id,
            fault,
            times=1 if case == "rate_limit_once" else None,
            # the retry policy would retry after 50 ms; the provider asks for 1.2 s once
            retry_after_ms=1200 if case == "rate_limit_once" else 50,
            hang_s=5,
        )
        result = await _run(client, settings)

    by_node = {c.node_id: c for c in result.contributions}
    assert len(fake.calls(node=primary.node_id)) == calls
    first = by_node[primary.node_id]
    if error_type is None:  # retried on the same node after the retry-after, and answered
        assert first.status == ContributionStatus.OK and first.attempts == 2
        assert result.answer == DEFAULT_ANSWER and alt.node_id not in by_node
        limited, answered = fake.calls(node=primary.node_id)
        assert answered.started - (limited.ended or 0) >= 1.2  # the provider's delay was kept
    else:  # failed, stored no answer, and the first standby (another provider) answered
        assert first.status == ContributionStatus.FAILED and first.error_type == error_type
        assert first.answer == "" and first.quality == 0.0
        assert by_node[alt.node_id].status == ContributionStatus.OK
        assert by_node[alt.node_id].provider != provider
        assert result.answer == DEFAULT_ANSWER
        assert len(fake.calls(node=alt.node_id)) == 1
    assert len(fake.calls(node=nodes["spare"].node_id)) == 0
    assert await _breaker(sessions, node_key(primary.node_id)) == node_breaker
    assert (await _breaker(sessions, provider_key(provider, "eu-west")))[1] == provider_failures
    if case == "truncated":  # a cut-off answer earns nothing, but its cost is accounted
        assert first.finish_reason == "max_tokens" and first.cost_usd > 0
        assert first.output_tokens == 4


async def test_answers_record_tokens_cost_request_id_and_show_in_the_api(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders
) -> None:
    async with loopback_network(client, settings, sessions, fake, _trio("gemini")) as nodes:
        result = await _run(client, settings, k=3)
        # An operator's key: the task was started through Temporal, so no API caller owns it.
        async with api_client(settings) as http:
            view = (await http.get(f"/v1/tasks/{result.task_id}")).json()
    assert {c.status for c in result.contributions} == {ContributionStatus.OK}
    for c in result.contributions:
        assert c.input_tokens == len(PROMPT.split()) + 20
        assert c.output_tokens == len(DEFAULT_ANSWER.split())
        expected = (c.input_tokens * 3.0 + c.output_tokens * 15.0) / 1_000_000
        assert c.cost_usd == pytest.approx(expected)
        assert c.request_id and c.request_id.startswith("req_") and c.finish_reason
    api = {c["node_id"]: c for c in view["contributions"]}
    assert set(api) == {p.node_id for p in nodes.values()}
    assert all(c["cost_usd"] > 0 and c["request_id"].startswith("req_") for c in api.values())
    assert view["cost_usd"] == pytest.approx(sum(c.cost_usd for c in result.contributions))
    async with sessions() as s:
        found = await queries.get_task(session=s, task_id=result.task_id)
    assert found is not None
    rows = {r.node_id: r for r in found[1]}
    assert rows[nodes["alt"].node_id].cost_usd == pytest.approx(
        api[nodes["alt"].node_id]["cost_usd"]
    )
    assert rows[nodes["alt"].node_id].request_id == api[nodes["alt"].node_id]["request_id"]


async def test_a_slow_expert_is_hedged_and_its_provider_call_cancelled(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders
) -> None:
    settings = _breaker_settings(settings)
    trio = _trio("openai")
    trio[0] = LoopbackNode("primary", "openai", trio[0].keywords, timeout_s=30)  # slow, not failing
    hedge = FAST.model_copy(update={"hedge_after_ms": 800})
    async with loopback_network(client, settings, sessions, fake, trio) as nodes:
        primary, alt = nodes["primary"], nodes["alt"]
        fake.fail(primary.node_id, Fault.HANG, hang_s=60)
        task_id = f"task-{uuid.uuid4().hex[:10]}"
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt=PROMPT, k=1, answer_policy=hedge, fresh=True),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        result = await handle.result()
        hung = fake.calls(node=primary.node_id)

        async def call_cancelled() -> bool:
            return hung[0].disconnected

        await wait_for(call_cancelled, timeout=15)  # reached by the heartbeat's cancel
        if os.environ.get("XPANDO_RECORD_HISTORIES"):
            history = await handle.fetch_history()
            (HISTORY_DIR / "task_workflow_failover.json").write_text(history.to_json())
    by_node = {c.node_id: c for c in result.contributions}
    assert len(hung) == 1  # one slow call, not retried: a standby was asked alongside it
    assert by_node[alt.node_id].status == ContributionStatus.OK
    assert result.answer == DEFAULT_ANSWER
    slow = by_node[primary.node_id]
    assert slow.status == ContributionStatus.FAILED and slow.error_type == "DeadlineExceeded"
    assert await _breaker(sessions, node_key(primary.node_id)) == ("open", 1)


async def test_cancelling_a_task_cancels_the_provider_call(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders
) -> None:
    trio = _trio("anthropic")
    trio[0] = LoopbackNode("primary", "anthropic", trio[0].keywords, timeout_s=30)
    async with loopback_network(client, settings, sessions, fake, trio) as nodes:
        primary = nodes["primary"]
        fake.fail(primary.node_id, Fault.HANG, hang_s=60)
        task_id = f"task-{uuid.uuid4().hex[:10]}"
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt=PROMPT, k=1, answer_policy=FAST, fresh=True),
            id=task_id,
            task_queue=settings.core_task_queue,
        )

        async def calling() -> bool:
            return bool(fake.calls(node=primary.node_id))

        await wait_for(calling, timeout=15)
        await handle.cancel()

        async def disconnected() -> bool:
            return fake.calls(node=primary.node_id)[0].disconnected

        await wait_for(disconnected, timeout=15)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert len(fake.calls(node=primary.node_id)) == 1
    assert fake.calls(node=nodes["alt"].node_id) == []  # nobody else was asked


async def test_one_provider_down_for_the_whole_run_every_task_completes(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders
) -> None:
    """OpenAI answers 500 to every call, all test long. Every task still completes through the
    Anthropic and Gemini nodes, and once its breakers open OpenAI is not called any more."""
    settings = _breaker_settings(settings, breaker_failures=2, breaker_provider_failures=2)
    # The OpenAI nodes fit the prompt best, so routing prefers them until their breakers open.
    defs = [
        LoopbackNode(f"{p}-{i}", p, keywords, region=region)
        for p, keywords in (
            ("openai", ("bread", "dough", "rise", "yeast")),
            ("anthropic", ("bread", "dough")),
            ("gemini", ("bread", "dough")),
        )
        for i, region in ((1, "eu-west"), (2, "us-east"))
    ]
    async with loopback_network(client, settings, sessions, fake, defs) as nodes:
        fake.fail("openai", Fault.SERVER_ERROR)
        results: list[TaskResult] = []
        openai_calls: list[int] = []
        for _ in range(3):  # three rounds of two concurrent tasks
            results += await asyncio.gather(*(_run(client, settings, k=3) for _ in range(2)))
            openai_calls.append(len(fake.calls(provider="openai")))
        state = {
            region: await _breaker(sessions, provider_key("openai", region))
            for region in ("eu-west", "us-east")
        }
    assert len(results) == 6
    for result in results:
        answered = [c for c in result.contributions if c.status == ContributionStatus.OK]
        assert len(answered) == 3 and result.answer == DEFAULT_ANSWER
        assert {c.provider for c in answered} <= {"anthropic", "gemini"}
    assert openai_calls[0] == 2 * 2 * 3  # 2 tasks asked both OpenAI nodes, 3 attempts each
    assert openai_calls[-1] == openai_calls[0], "OpenAI was called after its breakers opened"
    assert all(s[0] == "open" for s in state.values()), state
    for name in ("openai-1", "openai-2"):
        assert (await _breaker(sessions, node_key(nodes[name].node_id)))[0] == "open"


async def test_when_every_provider_fails_the_error_names_what_was_tried(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders
) -> None:
    async with loopback_network(client, settings, sessions, fake, _trio("openai")) as nodes:
        for p in nodes.values():
            fake.fail(p.node_id, Fault.AUTH)
        with pytest.raises(WorkflowFailureError) as info:
            await _run(client, settings)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "AllExpertsFailed"
    for p in nodes.values():
        assert p.node_id in cause.message and f"[{p.provider}]" in cause.message
        assert len(fake.calls(node=p.node_id)) == 1
    assert "ProviderAuthError" in cause.message


async def test_an_open_breaker_is_skipped_then_probed_once_and_closed(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders
) -> None:
    settings = _breaker_settings(settings, breaker_cooldown_s=1.5)
    async with loopback_network(client, settings, sessions, fake, _trio("gemini")) as nodes:
        primary = nodes["primary"]
        async with api_client(settings, Scope.NODES_READ) as http:

            async def breaker_state() -> str:
                listed = (await http.get("/v1/nodes")).json()["nodes"]
                row = next(n for n in listed if n["node_id"] == primary.node_id)
                assert row["provider_breaker"]["key"] == "provider:gemini@eu-west"
                return str(row["breaker"]["state"])

            fake.fail(primary.node_id, Fault.AUTH)
            await _run(client, settings)
            assert await breaker_state() == BreakerState.OPEN
            fake.heal(primary.node_id)
            skipped = await _run(client, settings)  # still open: not asked at all
            assert primary.node_id not in {c.node_id for c in skipped.contributions}
            assert len(fake.calls(node=primary.node_id)) == 1
            await asyncio.sleep(1.6)
            assert await breaker_state() == BreakerState.HALF_OPEN
            probed = await _run(client, settings)  # the probe: asked, answers, closes
            assert await breaker_state() == BreakerState.CLOSED
    assert {c.node_id for c in probed.contributions} == {primary.node_id}
    assert len(fake.calls(node=primary.node_id)) == 2


async def test_when_the_hedge_fails_too_the_next_standby_is_asked(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders
) -> None:
    trio = _trio("gemini")
    trio[0] = LoopbackNode("primary", "gemini", trio[0].keywords, timeout_s=30)  # slow, not failing
    hedge = FAST.model_copy(update={"hedge_after_ms": 800})
    async with loopback_network(client, settings, sessions, fake, trio) as nodes:
        primary, alt, spare = nodes["primary"], nodes["alt"], nodes["spare"]
        fake.fail(primary.node_id, Fault.HANG, hang_s=60)
        fake.fail(alt.node_id, Fault.AUTH)
        result = await _run(client, settings, policy=hedge)
    by_node = {c.node_id: c for c in result.contributions}
    assert by_node[primary.node_id].error_type == "DeadlineExceeded"
    assert by_node[alt.node_id].error_type == "ProviderAuthError"
    assert by_node[spare.node_id].status == ContributionStatus.OK
    assert result.answer == DEFAULT_ANSWER
    assert [len(fake.calls(node=p.node_id)) for p in (primary, alt, spare)] == [1, 1, 1]
