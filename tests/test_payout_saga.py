"""PayoutSagaWorkflow on the real dev server with a real core worker and the embedded chain
(LiteSVM with the real SPL Token, Associated Token and Memo programs), over the HTTP API."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    freeze_account,
    mint_to_checked,
    transfer_checked,
)
from spl.token.models import FreezeAccountParams, MintToCheckedParams, TransferCheckedParams
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError
from temporalio.worker import Worker

from tests.conftest import api_client, bearer, issue_key, wait_for
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
from xpando.auth.keys import KEY_RE, Scope
from xpando.chain import (
    ChainHandle,
    LiteSvmChain,
    SvmLedger,
    init_embedded_chain,
    ledger_path,
    token_account,
)
from xpando.contracts_payouts import (
    PayoutStage,
    epoch_workflow_id,
)
from xpando.db import SessionFactory, ledger
from xpando.economy import rewards
from xpando.economy.payments import PayoutHooks
from xpando.keys import load_keypair, treasury_key_path
from xpando.settings import Settings

HISTORY_DIR = Path(__file__).parent / "histories"


async def record_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """``XPANDO_RECORD_HISTORIES=1`` saves the run for tests/test_replay.py."""
    if os.environ.get("XPANDO_RECORD_HISTORIES"):
        history = await handle.fetch_history()
        (HISTORY_DIR / f"{name}.json").write_text(history.to_json())


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


ApiFactory = Callable[[Settings], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def api_factory() -> ApiFactory:
    """The API with an admin key (named ``test-admin``) for settings of the test's own."""
    return api_client


@pytest.fixture
async def api(psettings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(psettings) as http:
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


async def _wait_stage(client: Client, epoch: int, stage: PayoutStage) -> None:
    handle = client.get_workflow_handle_for(PayoutSagaWorkflow.run, epoch_workflow_id(epoch))

    async def reached() -> bool:
        try:
            return (await handle.query(PayoutSagaWorkflow.progress)).stage == stage
        except RPCError:
            return False

    await wait_for(reached, timeout=30)


async def test_above_the_threshold_an_epoch_waits_for_an_approval_through_the_api(
    client: Client, settings: Settings, sessions: SessionFactory, api_factory: ApiFactory
) -> None:
    s = payout_settings(settings, payout_approval_threshold=0)
    init_embedded_chain(s)
    nodes = await register_nodes(sessions, 3)
    epoch = fresh_epoch()
    await accrue(sessions, epoch, {n.node_id: 0.5 for n in nodes})
    # The API's own key (test-admin) settles; alice and bob may approve; an auditor may read.
    alice = bearer(await issue_key(sessions, Scope.PAYOUTS_APPROVE, name="alice"))
    bob = bearer(await issue_key(sessions, Scope.PAYOUTS_APPROVE, name="bob"))
    auditor = bearer(await issue_key(sessions, Scope.PAYOUTS_READ, name="auditor"))
    approve = f"/v1/payouts/epochs/{epoch}/approve"
    async with api_factory(s) as api, core_worker(client, s, sessions):
        early = await api.post(approve, headers=alice)
        assert early.status_code == 404 and early.json()["error"]["code"] == "epoch_not_settling"
        assert (await api.post(f"/v1/payouts/epochs/{epoch}/settle")).status_code == 202
        await _wait_stage(client, epoch, PayoutStage.AWAITING_APPROVAL)
        waiting = (await api.get(f"/v1/payouts/epochs/{epoch}", headers=auditor)).json()
        assert waiting["status"] == "awaiting_approval" and waiting["approval_required"]
        assert waiting["stage"] == "awaiting_approval" and waiting["paid"] == 0
        # A reader cannot approve; the key that settled the epoch may not approve it.
        read_only = await api.post(approve, headers=auditor)
        assert read_only.status_code == 403 and read_only.json()["error"]["code"] == "forbidden"
        assert "'payouts:approve'" in read_only.json()["error"]["message"]
        own = await api.post(approve)
        assert own.status_code == 403
        assert own.json()["error"]["code"] == "separate_approver_required"
        # No one names the approver: the body has no such field.
        named = await api.post(approve, json={"approver": "mallory"}, headers=alice)
        assert named.status_code == 422
        assert named.json()["error"]["details"][0]["code"] == "extra_forbidden"
        ok = await api.post(approve, json={"note": " totals checked "}, headers=alice)
        assert ok.status_code == 200 and ok.json()["approver"] == "alice"
        twice = await api.post(approve, headers=bob)
        assert twice.status_code == 409
        assert twice.json()["error"]["code"] == "not_awaiting_approval"
        handle = client.get_workflow_handle_for(PayoutSagaWorkflow.run, epoch_workflow_id(epoch))
        result = await handle.result()
        await record_history(handle, "payout_saga_workflow")  # approval update, batches
        view = (await api.get(f"/v1/payouts/epochs/{epoch}")).json()
        late = await api.post(approve, headers=bob)
        settler = api.headers["Authorization"]
        # Every event as Temporal stores it: payloads, memo and search attributes, raw.
        history = b"".join(e.SerializeToString() for e in (await handle.fetch_history()).events)
    assert result.stage == PayoutStage.SETTLED and result.approver == "alice"
    assert result.paid == 3 and result.paid_amount == s.payout_emission
    assert view["status"] == "settled" and view["approver"] == "alice" and view["reconciled"]
    assert view["paid"] == s.payout_emission and view["reserved"] == s.payout_emission
    assert late.status_code == 409
    # The saga's history names the principal, never a key.
    assert b'"approver":"alice"' in history
    for authorization in (*(h["Authorization"] for h in (alice, bob, auditor)), settler):
        found = KEY_RE.match(authorization.removeprefix("Bearer "))
        assert found is not None and found["secret"].encode() not in history


async def test_an_unapproved_epoch_is_compensated_and_carried_into_the_next(
    client: Client, settings: Settings, sessions: SessionFactory, api_factory: ApiFactory
) -> None:
    s = payout_settings(settings, payout_approval_threshold=0, payout_approval_timeout_s=1.0)
    init_embedded_chain(s)
    nodes = await register_nodes(sessions, 2)
    epoch = fresh_epoch()
    await accrue(sessions, epoch, {n.node_id: 0.5 for n in nodes})
    async with core_worker(client, s, sessions):
        expired = await settle(client, s, epoch)
    assert expired.stage == PayoutStage.EXPIRED
    assert (expired.paid, expired.carried_over) == (0, 2)
    async with api_factory(s) as api:
        view = (await api.get(f"/v1/payouts/epochs/{epoch}")).json()
        rows = (await api.get("/v1/payouts", params={"epoch": epoch})).json()["payouts"]
    assert view["status"] == "expired" and view["reserved"] == view["released"] > 0
    assert {(p["status"], p["reason"], p["signature"]) for p in rows} == {
        ("carried_over", "approval_timeout", None)
    }

    relaxed = payout_settings(settings)  # the next epoch is small enough to pay at once
    await accrue(sessions, epoch + 1, {nodes[0].node_id: 1.0})
    async with core_worker(client, relaxed, sessions):
        paid = await settle(client, relaxed, epoch + 1)
    assert paid.stage == PayoutStage.SETTLED and paid.paid == 2
    assert paid.paid_amount == 2 * s.payout_emission  # this epoch's plus the carried one
    t = await totals(sessions)
    assert t["earned"] == t["paid"] == 2 * s.payout_emission and t["carried_over"] == 0


class DrainTreasury(PayoutHooks):
    """Another spender empties the treasury just before the second batch (mid-epoch)."""

    def __init__(self, chain: LiteSvmChain) -> None:
        self.chain = chain
        self.batches = 0

    async def at(self, boundary: str, payout_ids: Sequence[str]) -> None:
        if boundary != "start":
            return
        self.batches += 1
        if self.batches == 2:
            await _move_treasury(self.chain, -await self.chain.treasury_balance())


async def _move_treasury(chain: LiteSvmChain, amount: int) -> None:
    """Drain (amount < 0: a real transfer out) or refill (amount > 0: MintTo) the treasury."""
    owner = chain.treasury.pubkey()
    if amount < 0:
        ix = transfer_checked(
            TransferCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                source=chain.treasury_token_account,
                mint=chain.mint,
                dest=_sink(chain),
                owner=owner,
                amount=-amount,
                decimals=chain.decimals,
            )
        )
        ixs = [create_idempotent_associated_token_account(owner, SINK.pubkey(), chain.mint), ix]
    else:
        ixs = [
            mint_to_checked(
                MintToCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    mint=chain.mint,
                    dest=chain.treasury_token_account,
                    mint_authority=owner,
                    amount=amount,
                    decimals=chain.decimals,
                )
            )
        ]
    bh = await chain.latest_blockhash()
    msg = MessageV0.try_compile(owner, ixs, [], Hash.from_string(bh.blockhash))
    await chain.send(bytes(VersionedTransaction(msg, [chain.treasury])))


SINK = Keypair()


def _sink(chain: LiteSvmChain) -> Pubkey:
    return token_account(SINK.pubkey(), chain.mint)


async def test_a_treasury_that_runs_dry_mid_epoch_is_compensated_and_nothing_is_lost(
    client: Client,
    psettings: Settings,
    sessions: SessionFactory,
    chain: LiteSvmChain,
) -> None:
    nodes = await register_nodes(sessions, 6)
    epoch = fresh_epoch()
    await accrue(sessions, epoch, {n.node_id: 0.1 * (i + 1) for i, n in enumerate(nodes)})
    s = psettings.model_copy(update={"payout_batch_size": 2, "payout_concurrency": 1})
    async with core_worker(client, s, sessions, hooks=DrainTreasury(chain)):
        dry = await settle(client, s, epoch)
        await record_history(  # compensation after failed transfers
            client.get_workflow_handle(epoch_workflow_id(epoch)), "payout_saga_compensation"
        )
    assert dry.stage == PayoutStage.SETTLED and dry.reconciled
    assert (dry.paid, dry.carried_over) == (2, 4)
    async with sessions() as session:
        rows, _ = await ledger.list_payouts(session=session, epoch=epoch)
    carried = [p for p in rows if p.status == "carried_over"]
    assert {p.reason for p in carried} == {"insufficient_treasury"}
    assert all(p.signature for p in carried)  # they were tried: the chain refused them
    for p in rows:
        balance = await wallet_balance(chain, next(n for n in nodes if n.node_id == p.node_id))
        assert balance == (p.amount if p.status == "finalized" else 0)

    await _move_treasury(chain, 10**9)  # the treasury is refilled
    await accrue(sessions, epoch + 1, {nodes[0].node_id: 1.0})
    async with core_worker(client, s, sessions):
        refilled = await settle(client, s, epoch + 1)
    assert refilled.stage == PayoutStage.SETTLED and refilled.carried_over == 0
    t = await totals(sessions)
    assert t["earned"] == 2 * s.payout_emission == t["paid"] and t["carried_over"] == 0
    transfers = memo_transfers(chain.ledger, chain)
    assert sum(a for _, a, _ in transfers) == t["paid"]
    assert len({m for m, _, _ in transfers}) == len(transfers)  # each payout id landed once


async def test_a_frozen_recipient_is_carried_over_with_the_reason_and_others_are_paid(
    client: Client, psettings: Settings, sessions: SessionFactory, chain: LiteSvmChain
) -> None:
    nodes = await register_nodes(sessions, 3)
    frozen = nodes[1]
    assert frozen.wallet is not None
    owner = chain.treasury.pubkey()
    ata = token_account(frozen.wallet, chain.mint)
    ixs = [
        create_idempotent_associated_token_account(owner, frozen.wallet, chain.mint),
        freeze_account(
            FreezeAccountParams(
                program_id=TOKEN_PROGRAM_ID, account=ata, mint=chain.mint, authority=owner
            )
        ),
    ]
    bh = await chain.latest_blockhash()
    msg = MessageV0.try_compile(owner, ixs, [], Hash.from_string(bh.blockhash))
    await chain.send(bytes(VersionedTransaction(msg, [chain.treasury])))
    epoch = fresh_epoch()
    await accrue(sessions, epoch, {n.node_id: 0.5 for n in nodes})
    async with core_worker(client, psettings, sessions):
        result = await settle(client, psettings, epoch)
    assert (result.paid, result.carried_over) == (2, 1)
    async with sessions() as session:
        rows, _ = await ledger.list_payouts(session=session, node_id=frozen.node_id)
    assert (rows[0].status, rows[0].reason) == ("carried_over", "recipient_frozen")
    assert await wallet_balance(chain, frozen) == 0


async def test_payout_requests_that_cannot_be_served_get_clear_errors(
    api: httpx.AsyncClient, psettings: Settings
) -> None:
    current = rewards.epoch_of(time.time(), psettings.payout_epoch_s)
    not_ended = await api.post(f"/v1/payouts/epochs/{current}/settle")
    assert not_ended.status_code == 409
    assert not_ended.json()["error"]["code"] == "epoch_not_ended"
    assert (await api.post("/v1/payouts/epochs/-1/settle")).status_code == 422
    bad_status = await api.get("/v1/payouts", params={"status": "paid-ish"})
    assert bad_status.status_code == 422
    assert bad_status.json()["error"]["details"][0]["field"] == "query.status"
    unknown = await api.get("/v1/nodes/nobody-here/earnings")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "node_not_found"
    never = await api.get("/v1/payouts/epochs/12345")
    assert never.status_code == 404 and never.json()["error"]["code"] == "epoch_not_found"
    extra = await api.post("/v1/payouts/epochs/5/approve", json={"note": "a", "x": 1})
    assert extra.status_code == 422
