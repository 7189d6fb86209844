"""PayoutSagaWorkflow on the real dev server with a real core worker and the embedded chain
(LiteSVM with the real SPL Token, Associated Token and Memo programs), over the HTTP API."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from solders.keypair import Keypair
from temporalio.client import Client
from temporalio.worker import Worker

from activities.chain import (
    ChainHandle,
    LiteSvmChain,
    SvmLedger,
    init_embedded_chain,
    ledger_path,
)
from activities.payouts import PayoutHooks
from api.main import create_app
from tests.payout_support import (
    PayNode,
    accrue,
    fresh_epoch,
    memo_transfers,
    payout_settings,
    register_nodes,
    settle,
    totals,
    wallet_balance,
)
from workers.core import build_core_worker
from workers.payouts import build_payout_activities
from workflows.payout import PayoutSagaWorkflow
from xpando.contracts_payouts import (
    PayoutStage,
    epoch_workflow_id,
)
from xpando.db import SessionFactory
from xpando.keys import load_keypair, treasury_key_path
from xpando.settings import Settings

HISTORY_DIR = Path(__file__).parent / "histories"


@pytest.fixture
def psettings(settings: Settings) -> Settings:
    s = payout_settings(settings)
    init_embedded_chain(s)
    return s


@pytest.fixture
async def chain(psettings: Settings) -> AsyncIterator[LiteSvmChain]:
    """The test's own view of the embedded chain (the worker opens its own, like a process)."""
    ledger_ = SvmLedger(ledger_path(psettings.data_dir))
    c = LiteSvmChain(ledger_, treasury=load_keypair(treasury_key_path(psettings.data_dir)))
    yield c
    await c.close()


def core_worker(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    hooks: PayoutHooks | None = None,
) -> Worker:
    payouts = build_payout_activities(
        sessions=sessions, settings=settings, chain=ChainHandle(settings), hooks=hooks
    )
    return build_core_worker(client, sessions=sessions, settings=settings, payouts=payouts)


@pytest.fixture
async def api(psettings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(psettings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://xpando.test") as http:
            yield http


async def test_an_epoch_pays_every_node_once_and_carries_over_the_one_without_a_wallet(
    client: Client,
    psettings: Settings,
    sessions: SessionFactory,
    chain: LiteSvmChain,
    api: httpx.AsyncClient,
) -> None:
    nodes = await register_nodes(sessions, 5, without_wallet=1)
    epoch = fresh_epoch()
    qualities = [0.9, 0.8, 0.55, 0.3, 0.7]
    scores = {n.node_id: q for n, q in zip(nodes, qualities, strict=True)}
    task = await accrue(sessions, epoch, scores)
    await accrue(sessions, epoch, {nodes[1].node_id: 0.4})
    await accrue(sessions, epoch, {nodes[1].node_id: 0.4}, task_id=task)  # a repeated record

    async with core_worker(client, psettings, sessions):
        resp = await api.post(f"/v1/payouts/epochs/{epoch}/settle")
        assert resp.status_code == 202, resp.text
        handle = client.get_workflow_handle_for(PayoutSagaWorkflow.run, epoch_workflow_id(epoch))
        result = await handle.result()
        if os.environ.get("XPANDO_RECORD_HISTORIES"):
            history = await handle.fetch_history()
            (HISTORY_DIR / "payout_saga_workflow.json").write_text(history.to_json())
        again = await api.post(f"/v1/payouts/epochs/{epoch}/settle")

    assert result.stage == PayoutStage.SETTLED and result.reconciled is True
    assert (result.paid, result.carried_over) == (4, 1)
    assert again.status_code == 200 and again.json()["status"] == "completed"

    body = (await api.get("/v1/payouts", params={"epoch": epoch})).json()
    rows = {p["node_id"]: p for p in body["payouts"]}
    assert body["total"] == 5
    # Exact integer split: the shares sum to the emission; quality decides the order.
    assert sum(p["earned"] for p in rows.values()) == psettings.payout_emission
    assert rows[nodes[1].node_id]["earned"] > rows[nodes[0].node_id]["earned"]  # 0.8 + 0.4
    no_wallet = rows[nodes[0].node_id]
    assert (no_wallet["status"], no_wallet["reason"]) == ("carried_over", "no_wallet")
    transfers = memo_transfers(chain.ledger, chain)
    assert sorted(m for m, _, _ in transfers) == sorted(
        p["payout_id"] for p in rows.values() if p["status"] == "finalized"
    )
    for node in nodes[1:]:
        row = rows[node.node_id]
        assert row["status"] == "finalized" and row["signatures"] == [row["signature"]]
        assert await wallet_balance(chain, node) == row["amount"]
        assert (row["payout_id"], row["amount"], row["signature"]) in transfers

    # The node gets a wallet; its carried-over share is paid with its next epoch's earnings.
    kp = Keypair()
    await _give_wallet(sessions, nodes[0], kp)
    await accrue(sessions, epoch + 1, {nodes[0].node_id: 0.5, nodes[2].node_id: 0.5})
    async with core_worker(client, psettings, sessions):
        nxt = await settle(client, psettings, epoch + 1)
    assert nxt.stage == PayoutStage.SETTLED and nxt.carried_over == 0
    earnings = (await api.get(f"/v1/nodes/{nodes[0].node_id}/earnings")).json()
    latest = earnings["payouts"][0]
    assert latest["carried_in"] == no_wallet["amount"]
    assert latest["amount"] == latest["earned"] + no_wallet["amount"]
    assert earnings["paid"] == latest["amount"] and earnings["carried_over"] == 0
    assert earnings["earned"] == no_wallet["earned"] + latest["earned"]
    assert earnings["wallet"] == str(kp.pubkey())
    assert await wallet_balance(chain, PayNode(nodes[0].node_id, kp)) == latest["amount"]
    older = (await api.get("/v1/payouts", params={"node": nodes[0].node_id})).json()["payouts"]
    assert older[1]["carried_into"] == latest["payout_id"]
    t = await totals(sessions)
    assert t["earned"] == 2 * psettings.payout_emission == t["paid"] + t["carried_over"]


async def _give_wallet(sessions: SessionFactory, node: PayNode, kp: Keypair) -> None:
    from datetime import UTC, datetime

    from xpando.contracts import NodeProfile
    from xpando.db import queries

    async with sessions() as session:
        await queries.upsert_node(
            session=session,
            profile=NodeProfile(
                node_id=node.node_id,
                region="eu-west",
                provider="offline",
                model="bm25",
                wallet=str(kp.pubkey()),
            ),
            now=datetime.now(UTC),
        )
    node.keypair = kp
