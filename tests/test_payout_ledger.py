"""The reward formula and the ledger's accruals and epoch close, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from fractions import Fraction

import pytest
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from tests.payout_support import EPOCH_S, accrue, register_nodes
from xpando.contracts import Contribution, ContributionStatus, RecordInput, TaskStage
from xpando.db import ledger, queries, session_factory
from xpando.db.ledger_models import Accrual
from xpando.economy import rewards

PARAMS = ledger.CloseParams(
    epoch_s=EPOCH_S,
    emission=1_000_003,
    approval_threshold=10**12,
    weights=rewards.RewardWeights(reputation_weight=0.5, price_weight=0.0),
)


def test_the_split_is_exact_integers_that_sum_to_the_emission() -> None:
    rng = random.Random(7)
    for _ in range(200):
        points = {f"n{i}": rng.randint(0, 10**9) for i in range(rng.randint(1, 40))}
        emission = rng.randint(0, 10**15)
        shares = rewards.split(emission, points)
        if sum(points.values()) == 0:
            assert set(shares.values()) == {0}
            continue
        assert sum(shares.values()) == emission
        for node, p in points.items():  # each share is its exact quota rounded down or up
            quota = Fraction(emission * p, sum(points.values()))
            assert int(quota) <= shares[node] <= int(quota) + 1


def test_largest_remainders_get_the_leftover_units_and_ties_go_by_node_id() -> None:
    assert rewards.split(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert rewards.split(100, {"a": 2, "b": 1}) == {"a": 67, "b": 33}
    assert rewards.split(5, {"a": 0, "b": 3}) == {"a": 0, "b": 5}
    with pytest.raises(ValueError):
        rewards.split(-1, {"a": 1})


def test_reputation_and_price_scale_points_as_documented() -> None:
    w = rewards.RewardWeights(reputation_weight=0.5, price_weight=1.0)
    assert rewards.multiplier(w, reputation=1.0, price=0.0) == 1
    assert rewards.multiplier(w, reputation=0.0, price=0.0) == Fraction(1, 2)
    assert rewards.multiplier(w, reputation=1.0, price=1.0) == Fraction(1, 2)
    assert rewards.node_points(1_000_001, Fraction(1, 2)) == 500_000  # floor
    assert rewards.quality_ppm(0.8) == 800_000 and rewards.quality_ppm(1.7) == 1_000_000


async def test_accruals_are_idempotent_and_only_scored_contributions_accrue(
    any_engine: AsyncEngine,
) -> None:
    sessions = session_factory(any_engine)
    now = datetime(2021, 1, 1, tzinfo=UTC)

    def contribution(node: str, status: ContributionStatus, quality: float) -> Contribution:
        return Contribution(
            node_id=node, region="r", provider="p", model="m", status=status, quality=quality
        )

    record = RecordInput(
        task_id="task-acc",
        prompt="q",
        domain=None,
        status=TaskStage.COMPLETED,
        answer="a",
        contributions=[
            contribution("good", ContributionStatus.OK, 0.9),
            contribution("zero", ContributionStatus.OK, 0.0),
            contribution("none", ContributionStatus.NO_ANSWER, 0.4),
            contribution("down", ContributionStatus.FAILED, 0.0),
        ],
    )
    for _ in range(2):  # a retried record activity
        async with sessions() as session:
            await queries.record_task(session=session, record=record, now=now)
    async with sessions() as session:
        rows = (await session.exec(select(Accrual.node_id, Accrual.quality_ppm))).all()
    assert [tuple(r) for r in rows] == [("good", 900_000)]


async def test_closing_an_epoch_splits_it_claims_its_accruals_and_waits_for_late_epochs(
    any_engine: AsyncEngine,
) -> None:
    sessions = session_factory(any_engine)
    nodes = await register_nodes(sessions, 3)
    a, b, c = (n.node_id for n in nodes)
    epoch = 1000
    await accrue(sessions, epoch, {a: 0.6, b: 0.3})
    await accrue(sessions, epoch, {a: 0.1})
    await accrue(sessions, epoch - 1, {c: 0.5})  # an earlier epoch that is not closed yet
    await accrue(sessions, epoch + 1, {c: 0.5})  # a later one
    now = datetime.now(UTC)
    async with sessions() as session:
        row = await ledger.close_epoch(
            session=session, epoch=epoch, workflow_id="w", params=PARAMS, now=now
        )
        again = await ledger.close_epoch(
            session=session, epoch=epoch, workflow_id="w2", params=PARAMS, now=now
        )
        payouts, total = await ledger.list_payouts(session=session, epoch=epoch)
        due = await ledger.due_epochs(session=session, current_epoch=epoch + 5, epoch_s=EPOCH_S)
    assert again.workflow_id == "w"  # closed once; the second close reads it back
    assert (row.accruals, row.payouts, total) == (3, 2, 2)
    shares = {p.node_id: p.earned for p in payouts}
    assert shares == {a: 700_002, b: 300_001}  # 7:3 of 1,000,003, leftover unit to a
    assert row.total == row.payable == PARAMS.emission
    assert due == [epoch - 1, epoch + 1]

    # A straggler of the closed epoch (recorded after its close) goes to the next close.
    await accrue(sessions, epoch, {b: 0.2})
    async with sessions() as session:
        nxt = await ledger.close_epoch(
            session=session, epoch=epoch + 1, workflow_id="w", params=PARAMS, now=now
        )
        rows, _ = await ledger.list_payouts(session=session, epoch=epoch + 1)
        pending = (
            await session.exec(
                select(func.count())
                .select_from(Accrual)
                .where(col(Accrual.settled_epoch).is_(None))
            )
        ).one()
    assert nxt.accruals == 2 and {p.node_id for p in rows} == {b, c}
    assert pending == 1  # epoch - 1's accrual waits for epoch - 1's own close
