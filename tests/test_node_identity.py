"""Signed node identities: registration, updates and deregistration over HTTP and through
NodeRegistrationWorkflow, and every way a request is refused (real API, dev server, databases)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from solders.keypair import Keypair
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from tests.conftest import api_client
from workers.core import build_core_worker
from workers.node import deregister, register, registration_id, submit
from workflows.node_registration import NodeRegistrationWorkflow
from xpando.auth.keys import Scope
from xpando.contracts import NodeAction, NodeDomain, NodeProfile, RegisterNodeInput
from xpando.db import SessionFactory, queries, session_factory
from xpando.embedding import HashingEmbedder
from xpando.identity import RegistrationRejected, sign_request, signing_message
from xpando.routing.registry import NodeRegistry
from xpando.settings import Settings

HISTORY_DIR = Path(__file__).parent / "histories"


def _profile(
    node_id: str, region: str = "eu-west", description: str = "bread and pasta"
) -> NodeProfile:
    return NodeProfile(
        node_id=node_id,
        region=region,
        provider="offline",
        model="bm25-retrieval",
        domains=[NodeDomain(name="cooking", description=description)],
        capacity=2,
        price_input_per_mtok=0.5,
    )


def _body(request: Any) -> dict[str, Any]:
    body: dict[str, Any] = request.model_dump(mode="json")
    return body


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    # Registration needs no key (the node signs it); the key is for reading the node list.
    async with api_client(settings, Scope.NODES_READ) as http:
        yield http


def _code(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["code"])


async def test_register_update_list_and_deregister_over_http(api: httpx.AsyncClient) -> None:
    key = Keypair()
    node_id = f"n-{uuid.uuid4().hex[:8]}"
    first = sign_request(
        key, action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id)
    )
    resp = await api.post("/v1/nodes", json=_body(first))
    assert resp.status_code == 201, resp.text
    assert resp.json()["created"] is True and resp.json()["public_key"] == str(key.pubkey())

    update = sign_request(
        key, action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id, "us-east")
    )
    resp = await api.post("/v1/nodes", json=_body(update))
    assert resp.status_code == 200 and resp.json()["created"] is False

    listed = {n["node_id"]: n for n in (await api.get("/v1/nodes")).json()["nodes"]}
    node = listed[node_id]
    assert node["region"] == "us-east" and node["status"] == "active"
    assert node["public_key"] == node["wallet"] == str(key.pubkey())  # paid at its identity
    assert node["reputation"] == 0.5 and node["contributions"] == 0
    assert node["capacity"] == 2 and node["price_input_per_mtok"] == 0.5

    bye = sign_request(key, action=NodeAction.DEREGISTER, node_id=node_id)
    resp = await api.request("DELETE", f"/v1/nodes/{node_id}", json=_body(bye))
    assert resp.status_code == 200 and resp.json()["status"] == "deregistered"
    active = (await api.get("/v1/nodes")).json()["nodes"]
    assert node_id not in {n["node_id"] for n in active}
    gone = (await api.get("/v1/nodes", params={"status": "deregistered"})).json()["nodes"]
    assert [n["node_id"] for n in gone] == [node_id]

    # The same key brings it back.
    back = sign_request(key, action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id))
    resp = await api.post("/v1/nodes", json=_body(back))
    assert resp.status_code == 200
    assert node_id in {n["node_id"] for n in (await api.get("/v1/nodes")).json()["nodes"]}


async def test_bad_signature_replay_stale_timestamp_and_key_theft_are_refused(
    api: httpx.AsyncClient,
) -> None:
    key, thief = Keypair(), Keypair()
    node_id = f"n-{uuid.uuid4().hex[:8]}"
    good = sign_request(key, action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id))

    # A profile changed after signing: the signature no longer covers what is sent.
    tampered = _body(good)
    tampered["profile"]["region"] = "ap-south"
    resp = await api.post("/v1/nodes", json=tampered)
    assert resp.status_code == 401 and _code(resp) == "invalid_signature"
    # Signed by another key than the one it names.
    forged = good.model_copy(update={"public_key": str(thief.pubkey())})
    resp = await api.post("/v1/nodes", json=_body(forged))
    assert resp.status_code == 401 and _code(resp) == "invalid_signature"
    # A timestamp outside the allowed skew (300 s), in the past or in the future.
    for offset in (-1000, 1000):
        stale = sign_request(
            key,
            action=NodeAction.REGISTER,
            node_id=node_id,
            profile=_profile(node_id),
            timestamp=int(time.time()) + offset,
        )
        resp = await api.post("/v1/nodes", json=_body(stale))
        assert resp.status_code == 401 and _code(resp) == "stale_timestamp"
    assert (await api.get("/v1/nodes")).json()["count"] == 0  # nothing was written

    assert (await api.post("/v1/nodes", json=_body(good))).status_code == 201
    # The same request again (a replay), and a new request reusing its nonce.
    resp = await api.post("/v1/nodes", json=_body(good))
    assert resp.status_code == 409 and _code(resp) == "nonce_reused"
    again = sign_request(
        key,
        action=NodeAction.REGISTER,
        node_id=node_id,
        profile=_profile(node_id, "us-east"),
        nonce=good.nonce,
    )
    resp = await api.post("/v1/nodes", json=_body(again))
    assert resp.status_code == 409 and _code(resp) == "nonce_reused"

    # Another key cannot take over, update or deregister the node id.
    takeover = sign_request(
        thief, action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id, "us-east")
    )
    resp = await api.post("/v1/nodes", json=_body(takeover))
    assert resp.status_code == 403 and _code(resp) == "node_key_mismatch"
    kill = sign_request(thief, action=NodeAction.DEREGISTER, node_id=node_id)
    resp = await api.request("DELETE", f"/v1/nodes/{node_id}", json=_body(kill))
    assert resp.status_code == 403 and _code(resp) == "node_key_mismatch"
    node = (await api.get("/v1/nodes")).json()["nodes"][0]
    assert node["region"] == "eu-west" and node["public_key"] == str(key.pubkey())

    # A payout wallet that is not the signing key; a profile for another node id.
    other_wallet = _profile(node_id).model_copy(update={"wallet": str(thief.pubkey())})
    wallet = sign_request(key, action=NodeAction.REGISTER, node_id=node_id, profile=other_wallet)
    resp = await api.post("/v1/nodes", json=_body(wallet))
    assert resp.status_code == 422 and _code(resp) == "wallet_mismatch"
    mixed = sign_request(key, action=NodeAction.REGISTER, node_id=node_id, profile=_profile("x"))
    resp = await api.post("/v1/nodes", json=_body(mixed))
    assert resp.status_code == 422 and _code(resp) == "invalid_registration"
    # Deregistering a node that was never registered.
    ghost = sign_request(key, action=NodeAction.DEREGISTER, node_id="never-seen")
    resp = await api.request("DELETE", "/v1/nodes/never-seen", json=_body(ghost))
    assert resp.status_code == 404 and _code(resp) == "node_not_found"
    # Malformed: no signature at all.
    unsigned = {k: v for k, v in _body(good).items() if k != "signature"}
    resp = await api.post("/v1/nodes", json=unsigned)
    assert resp.status_code == 422 and _code(resp) == "validation_error"


def test_the_signed_message_is_domain_separated_and_canonical() -> None:
    key = Keypair()
    request = sign_request(
        key, action=NodeAction.REGISTER, node_id="n1", profile=_profile("n1"), nonce="a" * 32
    )
    message = signing_message(request)
    assert message.startswith(b"xpando/node-registration/v1\n")
    body = message.split(b"\n", 1)[1]
    assert b" " not in body.replace(b"bread and pasta", b"")  # no whitespace between tokens
    assert body.index(b'"action"') < body.index(b'"node_id"') < body.index(b'"timestamp"')
    assert b'"signature"' not in body and b'"keywords"' not in body  # defaults are left out
    # Re-parsing the JSON a client sent gives the same message (what the server verifies).
    again = type(request).model_validate_json(request.model_dump_json())
    assert signing_message(again) == message


async def test_node_worker_registration_goes_through_the_same_checks(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    async with build_core_worker(client, sessions=sessions, settings=settings):
        key = Keypair()
        node_id = f"n-{uuid.uuid4().hex[:8]}"
        request = sign_request(
            key, action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id)
        )
        done = await submit(client, request, core_task_queue=settings.core_task_queue)
        assert done.created and done.public_key == str(key.pubkey())
        if os.environ.get("XPANDO_RECORD_HISTORIES"):
            handle = client.get_workflow_handle(registration_id(request))
            history = await handle.fetch_history()
            (HISTORY_DIR / "node_registration_signed.json").write_text(history.to_json())

        async def refused(input: RegisterNodeInput) -> ApplicationError:
            with pytest.raises(WorkflowFailureError) as info:
                await client.execute_workflow(
                    NodeRegistrationWorkflow.run,
                    input,
                    id=f"reg-{uuid.uuid4().hex[:8]}",
                    task_queue=settings.core_task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                )
            cause = info.value.cause
            assert isinstance(cause, ApplicationError)
            return cause

        # The old, unsigned input is refused outright.
        unsigned = await refused(RegisterNodeInput(profile=_profile(node_id)))
        assert unsigned.type == "UnsignedRegistration"
        # The very request again, as a new workflow: a replay.
        assert (await refused(RegisterNodeInput(signed=request))).type == "NonceReused"
        tampered = request.model_copy(update={"profile": _profile(node_id, "ap-south")})
        assert (await refused(RegisterNodeInput(signed=tampered))).type == "InvalidSignature"
        thief = sign_request(
            Keypair(), action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id)
        )
        assert (await refused(RegisterNodeInput(signed=thief))).type == "NodeKeyMismatch"

        # Submitting the same signed request twice is one workflow: no replay error.
        update = sign_request(
            key, action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id, "us-east")
        )
        results = [
            await submit(client, update, core_task_queue=settings.core_task_queue) for _ in (1, 2)
        ]
        assert results[0] == results[1] and not results[0].created

        gone = await deregister(
            client, node_id, keypair=key, core_task_queue=settings.core_task_queue
        )
        assert gone.action == NodeAction.DEREGISTER
        # A throwaway identity (tests and scripts) works too.
        other = f"n-{uuid.uuid4().hex[:8]}"
        assert (
            await register(client, _profile(other), core_task_queue=settings.core_task_queue)
        ).created
    async with sessions() as s:
        row = await queries.get_node(session=s, node_id=node_id)
    assert row is not None and row.status == "deregistered" and row.region == "us-east"


async def test_key_binding_and_nonces_on_sqlite_and_postgresql(any_engine: AsyncEngine) -> None:
    registry = NodeRegistry(
        sessions=session_factory(any_engine), embedder=HashingEmbedder(), max_skew_s=300
    )
    key = Keypair()
    first = sign_request(key, action=NodeAction.REGISTER, node_id="n1", profile=_profile("n1"))
    assert (await registry.apply(first)).created
    with pytest.raises(RegistrationRejected) as info:
        await registry.apply(first)
    assert info.value.code == "nonce_reused" and info.value.same_request
    # A retried activity (same workflow run) is no error; the same request from elsewhere is.
    retried = sign_request(key, action=NodeAction.REGISTER, node_id="n1", profile=_profile("n1"))
    assert not (await registry.apply_idempotent(retried, origin="wf/run-1")).replayed
    assert (await registry.apply_idempotent(retried, origin="wf/run-1")).replayed
    with pytest.raises(RegistrationRejected) as info:
        await registry.apply_idempotent(retried, origin="wf/run-2")
    assert info.value.code == "nonce_reused" and not info.value.same_request
    thief = sign_request(
        Keypair(), action=NodeAction.REGISTER, node_id="n1", profile=_profile("n1", "us-east")
    )
    with pytest.raises(RegistrationRejected) as info:
        await registry.apply(thief)
    assert info.value.code == "node_key_mismatch"
    # A register request whose timestamp was fine when Temporal accepted it (received_at) is
    # checked against that time, not against when the core got round to it.
    late = sign_request(
        key,
        action=NodeAction.REGISTER,
        node_id="n1",
        profile=_profile("n1", "us-east"),
        timestamp=int(time.time()) - 3600,
    )
    with pytest.raises(RegistrationRejected) as info:
        await registry.apply(late)
    assert info.value.code == "stale_timestamp"
    from datetime import UTC, datetime

    accepted = datetime.fromtimestamp(late.timestamp + 5, UTC)
    assert not (await registry.apply(late, received_at=accepted)).created
    async with session_factory(any_engine)() as s:
        row = await queries.get_node(session=s, node_id="n1")
    assert row is not None and row.region == "us-east" and row.public_key == str(key.pubkey())


async def test_registrations_from_one_address_are_rate_limited(settings: Settings) -> None:
    """Registration is open to anyone holding a node key: one address gets its registrations
    per minute, and the one over them is refused before it registers anything."""
    limited = settings.model_copy(update={"limit_registrations_per_minute": 3})
    async with api_client(limited, Scope.NODES_READ) as http:
        node_ids = [f"rl-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
        answers = []
        for node_id in node_ids:
            request = sign_request(
                Keypair(), action=NodeAction.REGISTER, node_id=node_id, profile=_profile(node_id)
            )
            answers.append(await http.post("/v1/nodes", json=_body(request)))
        assert [a.status_code for a in answers] == [201, 201, 201, 429]
        assert _code(answers[3]) == "registration_rate_limited"
        assert 1 <= int(answers[3].headers["Retry-After"]) <= 60
        listed = (await http.get("/v1/nodes")).json()["nodes"]
        assert {n["node_id"] for n in listed} == set(node_ids[:3])
