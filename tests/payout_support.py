"""Helpers shared by the payout tests: nodes with wallets, accruals in past epochs, chains."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from temporalio.client import Client

from workflows.payout import PayoutSagaWorkflow
from xpando.chain import Chain, SvmLedger, token_account
from xpando.contracts import (
    Contribution,
    ContributionStatus,
    NodeProfile,
    RecordInput,
    TaskStage,
)
from xpando.contracts_payouts import PayoutSagaInput, PayoutSagaResult, epoch_workflow_id
from xpando.db import SessionFactory, ledger, queries
from xpando.economy import rewards
from xpando.settings import Settings

EPOCH_S = 60


def payout_settings(settings: Settings, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "payout_epoch_s": EPOCH_S,
        "payout_emission": 1_000_000,
        "payout_approval_threshold": 10**15,
        "payout_batch_size": 4,
        "payout_concurrency": 2,
        "chain_initial_supply": 10**12,
    }
    values.update(overrides)
    return settings.model_copy(update=values)


def fresh_epoch() -> int:
    """A random epoch long past (workflow ids ``payout-epoch-<n>`` are shared by the tests
    on one Temporal server, so each test settles its own epochs)."""
    return random.randint(10_000, 20_000_000)


@dataclass
class PayNode:
    node_id: str
    keypair: Keypair | None

    @property
    def wallet(self) -> Pubkey | None:
        return self.keypair.pubkey() if self.keypair else None


async def register_nodes(
    sessions: SessionFactory, count: int, *, without_wallet: int = 0, prefix: str = "n"
) -> list[PayNode]:
    nodes: list[PayNode] = []
    tag = uuid.uuid4().hex[:6]
    async with sessions() as session:
        for i in range(count):
            kp = Keypair() if i >= without_wallet else None
            node = PayNode(f"{prefix}{i:04d}-{tag}", kp)
            await queries.upsert_node(
                session=session,
                profile=NodeProfile(
                    node_id=node.node_id,
                    region="eu-west",
                    provider="offline",
                    model="bm25",
                    wallet=str(kp.pubkey()) if kp else None,
                ),
                now=datetime.now(UTC),
            )
            nodes.append(node)
    return nodes


async def accrue(
    sessions: SessionFactory,
    epoch: int,
    qualities: Mapping[str, float],
    *,
    epoch_s: int = EPOCH_S,
    task_id: str | None = None,
) -> str:
    """Record one completed task inside ``epoch`` with one scored contribution per node."""
    task_id = task_id or f"task-{uuid.uuid4().hex[:10]}"
    start, _ = rewards.epoch_bounds(epoch, epoch_s)
    contributions = [
        Contribution(
            node_id=node,
            region="eu-west",
            provider="offline",
            model="bm25",
            status=ContributionStatus.OK,
            answer="an answer",
            quality=q,
        )
        for node, q in qualities.items()
    ]
    async with sessions() as session:
        await queries.record_task(
            session=session,
            record=RecordInput(
                task_id=task_id,
                prompt="a question",
                domain=None,
                status=TaskStage.COMPLETED,
                answer="an answer",
                confidence=0.9,
                contributions=contributions,
            ),
            now=datetime.fromtimestamp(start + epoch_s / 2, UTC),
        )
    return task_id


async def settle(client: Client, settings: Settings, epoch: int) -> PayoutSagaResult:
    return await client.execute_workflow(
        PayoutSagaWorkflow.run,
        PayoutSagaInput(epoch=epoch),
        id=epoch_workflow_id(epoch),
        task_queue=settings.core_task_queue,
    )


async def wallet_balance(chain: Chain, node: PayNode) -> int:
    assert node.wallet is not None
    return await chain.token_balance(token_account(node.wallet, chain.mint)) or 0


def memo_transfers(ledger_: SvmLedger, chain: Chain) -> list[tuple[str, int, str]]:
    """(memo, amount, signature) of every successful memo'd transfer out of the treasury."""
    from xpando.chain import parse_transfer

    out = []
    for landed in ledger_.signatures_for(str(chain.treasury_token_account), limit=10**9):
        info = parse_transfer(landed.tx)
        if landed.err is None and info.memo and info.memo.startswith("xpd-"):
            out.append((info.memo, info.amount or 0, landed.signature))
    return out


async def totals(sessions: SessionFactory) -> dict[str, int]:
    async with sessions() as session:
        return await ledger.ledger_totals(session=session)
