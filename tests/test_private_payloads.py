"""Private payloads (``XPANDO_PAYLOAD_KEY``) on the real dev server: a task run by workers built
the normal way leaves no prompt or answer readable in Temporal's history (read straight from the
server by a client without the key) while its search attributes stay findable; the API's
``/codec`` endpoint decodes those payloads for a key with ``codec:decode`` only, and answers the
Web UI's CORS; a rotated key still reads what the old one wrote; a payload without its key fails
typed and at once, naming the key id."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message
from pydantic import SecretStr, ValidationError
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

from api.main import create_app
from tests.conftest import bearer, issue_key, offline_network, wait_for
from workers.core import WORKFLOWS, build_core_worker
from workflows.task import TaskWorkflow
from xpando import temporal
from xpando.auth.keys import Scope
from xpando.contracts import TaskInput, TaskResult
from xpando.db import SessionFactory
from xpando.mother.knowledge import knowledge_workflow_id
from xpando.payload_codec import (
    ENCODING,
    KEY_ID_METADATA,
    PAYLOAD_KEY_MISSING,
    PAYLOAD_KEY_UNKNOWN,
    PAYLOAD_UNDECRYPTABLE,
    PayloadCipher,
    PayloadKeyError,
    PayloadKeys,
)
from xpando.settings import Settings

PROMPT = "How many minutes to boil a soft egg?"
ANSWER_WORDS = "six minutes"  # in the cooking node's answer (tests/conftest.py CORPORA)
NODES = [("cooking", "us-east"), ("astronomy", "eu-west")]
UI_ORIGIN = "http://localhost:8233"
PAYLOAD_TYPE = Payload.DESCRIPTOR.full_name
# Clear payloads that are not xpando's: search attributes (the visibility store indexes them),
# and what the SDK's core writes itself in a marker beside a local activity's (encrypted)
# result: the activity's type, id, attempt and times, or a patch id.
CORE_BOOKKEEPING = (
    ".marker_recorded_event_attributes.details[data].payloads[0]",
    ".marker_recorded_event_attributes.details[patch_data].payloads[0]",
)


def new_key(key_id: str) -> str:
    return f"{key_id}:{base64.b64encode(os.urandom(32)).decode()}"


def keyed(settings: Settings, *keys: str) -> Settings:
    return settings.model_copy(update={"payload_key": SecretStr(",".join(keys))})


def payloads_in(message: Message, path: str = "") -> Iterator[tuple[str, Payload]]:
    """Every ``Payload`` anywhere in ``message``, with the field path that leads to it."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        where = f"{path}.{field.name}"
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
            items = [(f"{where}[{k}]", v) for k, v in value.items()]
        elif field.is_repeated:
            items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(where, value)]
        for item_path, item in items:
            if item.DESCRIPTOR.full_name == PAYLOAD_TYPE:
                yield item_path, item
            else:
                yield from payloads_in(item, item_path)


async def histories(plain: Client, query: str, expected: set[str]) -> list[WorkflowHistory]:
    """The histories of the runs ``query`` lists (waiting until it lists ``expected``), read by
    ``plain`` straight from the server."""

    async def listed() -> bool:
        return expected <= {w.id async for w in plain.list_workflows(query)}

    await wait_for(listed, timeout=20)
    return [
        await plain.get_workflow_handle(w.id, run_id=w.run_id).fetch_history()
        async for w in plain.list_workflows(query)
    ]


def key_ids(history: WorkflowHistory) -> set[str]:
    """Key ids of the encrypted payloads of ``history``; fails on a clear one but for
    :data:`CORE_BOOKKEEPING` and search attributes."""
    found = set()
    for event in history.events:
        for where, payload in payloads_in(event):
            if ".search_attributes." in where or where.endswith(CORE_BOOKKEEPING):
                continue
            assert payload.metadata["encoding"] == ENCODING, (history.workflow_id, where)
            found.add(payload.metadata[KEY_ID_METADATA].decode())
    return found


@asynccontextmanager
async def codec_api(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """The API in process with ``settings`` and a client without a key, with the headers of a
    ``codec:decode`` key and of a ``tasks:read`` key (``codec``, ``reader``)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        sessions = app.state.sessions
        keys = {
            "codec": await issue_key(sessions, Scope.CODEC_DECODE, name="web-ui"),
            "reader": await issue_key(sessions, Scope.TASKS_READ, name="reader"),
        }
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://xpando.test") as http:
            yield http, keys


def wire(payloads: list[Payload]) -> dict[str, Any]:
    """``Payloads`` in protobuf JSON: what the Web UI and the CLI send a codec server."""
    return MessageToDict(Payloads(payloads=payloads))


def unwire(body: dict[str, Any]) -> list[Payload]:
    return list(ParseDict(body, Payloads()).payloads)


async def run_task(client: Client, settings: Settings, prompt: str = PROMPT) -> TaskResult:
    task_id = f"task-{uuid.uuid4().hex[:8]}"
    return await client.execute_workflow(
        TaskWorkflow.run,
        TaskInput(task_id=task_id, prompt=prompt, k=2, fresh=True),
        id=task_id,
        task_queue=settings.core_task_queue,
        search_attributes=temporal.initial_task_attributes(None),
    )


# --- on the real server ---------------------------------------------------------------------------


async def test_history_holds_no_prompt_and_the_codec_endpoint_decodes_it(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    s = keyed(settings, new_key("k2025"))
    sealed = await temporal.connect(s)
    async with offline_network(sealed, s, sessions, corpus_dir, NODES):
        result = await run_task(sealed, s)
    assert ANSWER_WORDS in result.answer  # the client with the key reads it

    # `client` (the session's dev-server client) has no payload codec: it reads what the
    # cluster's operator reads.
    assert client.data_converter.payload_codec is None
    runs = await histories(
        client,
        f'TaskQueue="{s.core_task_queue}"',
        {result.task_id, knowledge_workflow_id("cooking", s.core_task_queue)},
    )
    for history in runs:
        raw = history.to_json()  # every field of every event (failure messages, summaries...)
        payloads = [p for event in history.events for _, p in payloads_in(event)]
        for secret in (PROMPT, ANSWER_WORDS):
            assert secret not in raw, (history.workflow_id, secret)
            assert not [p for p in payloads if secret.encode() in p.SerializeToString()]
        assert key_ids(history) == {"k2025"}, history.workflow_id

    # Search attributes stay clear text: the operator still finds the task by its domain.
    found = f'WorkflowId="{result.task_id}" AND XpandoDomain="cooking"'
    assert [w.id async for w in client.list_workflows(found)] == [result.task_id]
    # ...but cannot read its result without the key: typed, naming the key id.
    with pytest.raises(PayloadKeyError) as missing:
        await client.get_workflow_handle_for(TaskWorkflow.run, result.task_id).result()
    assert missing.value.type == PAYLOAD_KEY_MISSING and "'k2025'" in missing.value.message

    task = next(h for h in runs if h.workflow_id == result.task_id)
    started = task.events[0].workflow_execution_started_event_attributes.input.payloads
    completed = task.events[-1].workflow_execution_completed_event_attributes.result.payloads
    async with codec_api(s) as (http, keys):
        # The Web UI's call, as its browser sends it.
        decoded = await http.post(
            "/codec/decode",
            json=wire([*started, *completed]),
            headers={
                "X-Namespace": s.temporal_namespace,
                "Origin": UI_ORIGIN,
                **bearer(keys["codec"]),
            },
        )
        assert decoded.status_code == 200, decoded.text
        assert decoded.headers["access-control-allow-origin"] == UI_ORIGIN
        plain_input, plain_result = unwire(decoded.json())
        assert plain_input.metadata["encoding"] == b"json/plain"
        assert json.loads(plain_input.data)["prompt"] == PROMPT
        assert json.loads(plain_result.data)["answer"] == result.answer

        # Encoding goes through the same keys (the CLI's `workflow start --codec-endpoint`).
        clear = Payload(metadata={"encoding": b"json/plain"}, data=b'{"prompt": "hi"}')
        encoded = await http.post(
            "/codec/encode", json=wire([clear]), headers=bearer(keys["codec"])
        )
        assert encoded.status_code == 200, encoded.text
        [sealed_payload] = unwire(encoded.json())
        assert sealed_payload.metadata[KEY_ID_METADATA] == b"k2025"
        assert await sealed.data_converter.decode([sealed_payload]) == [{"prompt": "hi"}]

        # No key, a malformed one, or a key without the scope: refused before anything is read.
        for headers, status, says in [
            ({}, 401, "needs an API key"),
            ({"Authorization": "Bearer not-a-key"}, 401, "malformed"),
            (bearer(keys["reader"]), 403, "scope 'codec:decode'"),
        ]:
            refused = await http.post("/codec/decode", json=wire(list(started)), headers=headers)
            assert refused.status_code == status, refused.text
            assert says in refused.json()["error"]["message"]
            assert PROMPT not in refused.text
        other_namespace = await http.post(
            "/codec/decode",
            json=wire(list(started)),
            headers={"X-Namespace": "someone-else", **bearer(keys["codec"])},
        )
        assert other_namespace.status_code == 404
        assert other_namespace.json()["error"]["code"] == "namespace_not_served"

        # CORS: the Web UI's preflight is answered for /codec, for its origin only.
        preflight = {
            "Origin": UI_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
        }
        allowed = await http.options("/codec/decode", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == UI_ORIGIN
        assert "x-namespace" in allowed.headers["access-control-allow-headers"].lower()
        stranger = await http.options(
            "/codec/decode", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in stranger.headers
        elsewhere = await http.options("/v1/tasks", headers=preflight)
        assert "access-control-allow-origin" not in elsewhere.headers


async def test_a_rotated_key_reads_what_the_old_key_wrote(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    old, new = new_key("k2024"), new_key("k2025")
    before = await temporal.connect(keyed(settings, old))
    # Started before the rotation; no worker runs yet, so it waits with its input under k2024.
    waiting_id = f"task-{uuid.uuid4().hex[:8]}"
    await before.start_workflow(
        TaskWorkflow.run,
        TaskInput(task_id=waiting_id, prompt=PROMPT, k=2, fresh=True),
        id=waiting_id,
        task_queue=settings.core_task_queue,
    )

    # Rotated: the new key encrypts, the old one is kept to decrypt.
    rotated = keyed(settings, new, old)
    after = await temporal.connect(rotated)
    async with offline_network(after, rotated, sessions, corpus_dir, NODES):
        old_result = await after.get_workflow_handle_for(TaskWorkflow.run, waiting_id).result()
        new_result = await run_task(after, rotated, "How long do I cook pasta?")
    assert ANSWER_WORDS in old_result.answer and new_result.answer

    old_history = await client.get_workflow_handle(waiting_id).fetch_history()
    new_history = await client.get_workflow_handle(new_result.task_id).fetch_history()
    assert key_ids(old_history) == {"k2024", "k2025"}  # its input before, the rest after
    assert key_ids(new_history) == {"k2025"}

    # Replaying the old history (what a worker does after a restart) needs the old key too.
    replayer = Replayer(workflows=WORKFLOWS, data_converter=temporal.data_converter_for(rotated))
    replayed = await replayer.replay_workflow(old_history, raise_on_replay_failure=False)
    assert replayed.replay_failure is None, replayed.replay_failure

    async with codec_api(rotated) as (http, keys):
        started = old_history.events[0].workflow_execution_started_event_attributes.input
        decoded = await http.post(
            "/codec/decode", json=wire(list(started.payloads)), headers=bearer(keys["codec"])
        )
        assert decoded.status_code == 200, decoded.text
        assert json.loads(unwire(decoded.json())[0].data)["prompt"] == PROMPT

    # Once the old key is dropped, what it wrote no longer opens: typed, naming its id.
    new_only = keyed(settings, new)
    with pytest.raises(PayloadKeyError) as unknown:
        await temporal.data_converter_for(new_only).decode(list(started.payloads))
    assert unknown.value.type == PAYLOAD_KEY_UNKNOWN and "'k2024'" in unknown.value.message
    async with codec_api(new_only) as (http, keys):
        refused = await http.post(
            "/codec/decode", json=wire(list(started.payloads)), headers=bearer(keys["codec"])
        )
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "payload_key_unknown"
        assert "k2024" in refused.json()["error"]["message"]
    # The new run, written under the new key alone, reads with it.
    assert (
        await (await temporal.connect(new_only))
        .get_workflow_handle_for(TaskWorkflow.run, new_result.task_id)
        .result()
        == new_result
    )


@pytest.mark.parametrize("worker_key", ["a stranger's key", "no key"])
async def test_a_workflow_whose_input_it_cannot_decrypt_fails_at_once_naming_the_key(
    worker_key: str, client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    """The core worker holds another key than the client that started the task, or none at all:
    the run fails with a non-retryable, typed error instead of retrying its first workflow task
    for ever."""
    worker_client = (
        client
        if worker_key == "no key"
        else await temporal.connect(keyed(settings, new_key("k-stranger")))
    )
    starter = await temporal.connect(keyed(settings, new_key("k2025")))
    task_id = f"task-{uuid.uuid4().hex[:8]}"
    async with build_core_worker(worker_client, sessions=sessions, settings=settings):
        handle = await starter.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt=PROMPT, k=1),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.non_retryable
    expected = PAYLOAD_KEY_MISSING if worker_key == "no key" else PAYLOAD_KEY_UNKNOWN
    assert cause.type == expected and "'k2025'" in cause.message
    assert PROMPT not in cause.message
    history = await client.get_workflow_handle(task_id).fetch_history()
    task_failures = [
        e for e in history.events if e.HasField("workflow_task_failed_event_attributes")
    ]
    assert task_failures == []  # failed the run on its first workflow task, no retry loop


# --- the codec and its key format ---------------------------------------------------------------


async def test_the_cipher_round_trips_passes_clear_payloads_and_refuses_a_wrong_key() -> None:
    keys = PayloadKeys.parse(f"{new_key('a')}, {new_key('b')}")
    assert keys is not None and keys.current == "a" and "b" in keys.keys
    cipher = PayloadCipher(keys)
    clear = Payload(metadata={"encoding": b"json/plain"}, data=b'"secret prompt"')
    [sealed] = await cipher.encode([clear])
    [again] = await cipher.encode([clear])
    assert sealed.data != again.data  # a fresh nonce every time
    assert b"secret" not in sealed.SerializeToString()
    assert await cipher.decode([sealed]) == [clear]
    assert await cipher.decode([clear]) == [clear]  # clear text (the CLI's --input) passes

    # The same key id with another key, or altered data: undecryptable.
    impostor = PayloadCipher(PayloadKeys(current="a", keys={"a": os.urandom(32)}))
    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    for reader, payload in [(impostor, sealed), (cipher, tampered)]:
        with pytest.raises(PayloadKeyError) as refused:
            await reader.decode([payload])
        assert refused.value.type == PAYLOAD_UNDECRYPTABLE and refused.value.non_retryable
    # A key id swapped in the metadata does not open it either (the id is authenticated).
    relabelled = Payload()
    relabelled.CopyFrom(sealed)
    relabelled.metadata[KEY_ID_METADATA] = b"b"
    with pytest.raises(PayloadKeyError, match="key id 'b'"):
        await cipher.decode([relabelled])


def test_a_malformed_key_setting_is_refused_without_showing_the_key() -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    for value, says in [
        (f"k1:{secret[:-8]}", "32 bytes"),
        (f"k1:{secret},k1:{secret}", "given twice"),
        (secret, "expected <key id>:<base64 key>"),
        (f"bad id:{secret}", "expected <key id>:<base64 key>"),
        (f"k1:{secret}!", "not base64"),
    ]:
        with pytest.raises(ValidationError) as refused:
            Settings(_env_file=None, payload_key=value)
        assert says in str(refused.value)
        assert secret[:8] not in str(refused.value)
    assert Settings(_env_file=None, payload_key="").payload_keys is None
    assert temporal.data_converter_for(Settings(_env_file=None)) is temporal.data_converter
    urlsafe = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    assert Settings(_env_file=None, payload_key=f" k1:{urlsafe} ").payload_keys is not None
