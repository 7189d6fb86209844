"""Tasks as a resource: listing, following and cancelling tasks over HTTP.

The API is served by uvicorn on loopback (Server-Sent Events need a real connection: httpx's
ASGI transport hands back a response only once it is complete), against the real dev server
and workers. Each caller is a real API key: the test names the caller in an ``X-Test-Principal``
header, which the client turns into the ``Authorization`` of a key issued under that name
(``admin-…`` names hold ``admin``, the others ``tasks:read`` and ``tasks:write``).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.client import Client

from api.main import create_app
from api.schemas import (
    CURSOR_PATTERN,
    EXAMPLE_TASK_EVENTS,
    EXAMPLE_TASK_LIST,
    ErrorBody,
    TaskAccepted,
    TaskCancelled,
    TaskList,
    TaskView,
)
from tests.conftest import free_port, issue_key, offline_network, wait_for
from tests.fakes.experts import HangingPanel
from tests.fakes.networks import answered, fake_network, register_fake_nodes
from xpando.auth.keys import Scope
from xpando.contracts import (
    AnswerInput,
    Contribution,
    ContributionStatus,
    NodeDomain,
    RecordInput,
    TaskEvent,
    TaskEventType,
    TaskStage,
)
from xpando.db import SessionFactory, queries, session_factory
from xpando.settings import Settings

PRINCIPAL_HEADER = "X-Test-Principal"


class KeysByName(httpx.Auth):
    """Sends each request with the API key of the caller its ``X-Test-Principal`` header names
    (an admin when none), issuing the key the first time the name is used."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._keys: dict[str, str] = {}

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        who = request.headers.pop(PRINCIPAL_HEADER, None) or "admin-tests"
        if who not in self._keys:
            scopes = (
                [Scope.ADMIN] if who.startswith("admin") else [Scope.TASKS_READ, Scope.TASKS_WRITE]
            )
            self._keys[who] = await issue_key(self._app.state.sessions, *scopes, name=who)
        request.headers["Authorization"] = f"Bearer {self._keys[who]}"
        yield request


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API on a free loopback port (in this event loop); an HTTP client for it."""
    app: FastAPI = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for(_started(server, serving), timeout=30, every=0.02)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, auth=KeysByName(app)
        ) as http:
            yield http
    finally:
        server.should_exit = True
        await serving


def _started(server: uvicorn.Server, serving: asyncio.Task[None]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        if serving.done():
            serving.result()  # the server failed to start: say why
        return server.started

    return check


@dataclass
class Event:
    id: int
    type: str
    data: TaskEvent


async def read_events(
    http: httpx.AsyncClient,
    task_id: str,
    *,
    last_event_id: int | None = None,
    until: Callable[[Event], bool] | None = None,
    as_: str | None = None,
) -> list[Event]:
    """The SSE stream of a task, parsed, until it ends (or ``until`` an event, then the
    connection is dropped, as a client going away)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    if as_ is not None:
        headers[PRINCIPAL_HEADER] = as_
    events: list[Event] = []
    fields: dict[str, str] = {}
    async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith(":"):  # a keep-alive comment
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if not fields:
                continue
            event = Event(
                id=int(fields["id"]),
                type=fields["event"],
                data=TaskEvent.model_validate_json(fields["data"]),
            )
            fields = {}
            events.append(event)
            if until is not None and until(event):
                break
    return events


def _told(event: TaskEvent) -> dict[str, Any]:
    """What an event says, without when: a workflow task that is retried (e.g. by Temporal
    after a worker deployment is promoted) logs its events again at its new time."""
    return event.model_dump(exclude={"at": True, "result": {"completed_at"}})


def _story(events: list[Event]) -> list[str]:
    """``stage:planning``, ``contribution``, …, ``result``."""
    return [f"stage:{e.data.stage}" if e.type == "stage" else e.type for e in events]


# --- events --------------------------------------------------------------------------------------


async def test_the_events_of_a_three_expert_task_tell_it_in_order(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    nodes = [("cooking", "us-east"), ("astronomy", "eu-west"), ("gardening", "eu-west")]
    async with (
        offline_network(client, settings, sessions, corpus_dir, nodes) as profiles,
        serve(settings) as http,
    ):
        accepted = await http.post(
            "/v1/tasks", json={"prompt": "How many minutes to boil a soft egg?", "k": 3}
        )
        assert accepted.status_code == 202, accepted.json()
        task_id = accepted.json()["task_id"]
        events = await read_events(http, task_id)
        view = (await http.get(f"/v1/tasks/{task_id}")).json()

    assert _story(events) == [
        "stage:planning",
        "stage:answering",
        "contribution",
        "contribution",
        "contribution",
        "stage:aggregating",
        "stage:completed",
        "result",
    ]
    assert [e.id for e in events] == list(range(1, 9))  # each event's id: its place in the log
    assert all(e.data.id == e.id and e.data.type.value == e.type for e in events)
    contributions = [e.data.contribution for e in events if e.data.contribution is not None]
    assert sorted(c.node_id for c in contributions) == sorted(p.node_id for p in profiles)
    for c in contributions:  # node, status, latency and cost as each arrived
        assert c.status in (ContributionStatus.OK, ContributionStatus.NO_ANSWER)
        assert c.latency_ms >= 0 and c.cost_usd >= 0 and c.provider == "offline"
    result = events[-1].data.result
    assert result is not None and "six minutes" in result.answer
    assert view["status"] == "completed" and view["answer"] == result.answer


class Gates:
    """A fake expert that answers a task only once the test opens that task's gate (working,
    heartbeating, until then)."""

    def __init__(self) -> None:
        self.open: set[str] = set()

        @activity.defn(name="answer")
        async def answer(input: AnswerInput) -> Contribution:
            while input.task_id not in self.open:
                activity.heartbeat()
                await asyncio.sleep(0.05)
            return answered(input.node_id, f"knead it ({input.node_id})")

        self.answer = answer


KNEADING = NodeDomain(name="baking", keywords=["bread", "dough"])


@asynccontextmanager
async def gated_network(
    client: Client, settings: Settings, sessions: SessionFactory, count: int = 1
) -> AsyncIterator[tuple[Gates, list[str]]]:
    """A core worker and ``count`` fake experts behind gates."""
    gates = Gates()
    nodes = [f"gated-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    await register_fake_nodes(sessions, nodes, KNEADING)
    async with fake_network(client, settings, sessions, nodes, gates.answer):
        yield gates, nodes


async def test_a_reconnect_with_last_event_id_resumes_without_repeats_or_gaps(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    async with (
        gated_network(client, settings, sessions, count=2) as (gates, _),
        serve(settings) as http,
    ):
        accepted = await http.post(
            "/v1/tasks", json={"prompt": "how long to knead bread dough", "k": 2, "fresh": True}
        )
        task_id = accepted.json()["task_id"]
        # The client goes away while the experts work ...
        first = await read_events(
            http, task_id, until=lambda e: e.data.stage == TaskStage.ANSWERING
        )
        # ... the experts answer while nobody listens ...
        gates.open.add(task_id)

        async def answered() -> bool:
            view = TaskView.model_validate((await http.get(f"/v1/tasks/{task_id}")).json())
            return view.status == "completed"

        await wait_for(answered, timeout=30)
        # ... and it comes back, as an EventSource does, with the last id it saw.
        rest = await read_events(http, task_id, last_event_id=first[-1].id)
        whole = await read_events(http, task_id)

    told = (_story(first), _story(rest), _story(whole))
    assert _story(first) == ["stage:planning", "stage:answering"], told
    assert [e.id for e in first + rest] == list(range(1, len(whole) + 1)), told
    assert [_told(e.data) for e in first + rest] == [_told(e.data) for e in whole], told
    assert _story(rest)[:2] == ["contribution", "contribution"], told
    assert rest[-1].type == "result", told


async def test_the_events_of_a_missing_task_are_a_404_and_a_bad_last_event_id_a_422(
    settings: Settings,
) -> None:
    async with serve(settings) as http:
        missing = await http.get("/v1/tasks/task-nope/events")
        bad = await http.get("/v1/tasks/task-nope/events", headers={"Last-Event-ID": "three"})
    assert missing.status_code == 404
    assert ErrorBody.model_validate(missing.json()).error.code == "task_not_found"
    assert bad.status_code == 422
    assert ErrorBody.model_validate(bad.json()).error.code == "validation_error"


# --- listing -------------------------------------------------------------------------------------


async def _page(http: httpx.AsyncClient, who: str | None, **params: Any) -> TaskList:
    headers = {PRINCIPAL_HEADER: who} if who is not None else {}
    resp = await http.get("/v1/tasks", params=params, headers=headers)
    assert resp.status_code == 200, resp.json()
    return TaskList.model_validate(resp.json())


async def _submit(http: httpx.AsyncClient, who: str, n: int) -> str:
    resp = await http.post(
        "/v1/tasks",
        json={"prompt": f"how long to knead bread dough, take {n}", "k": 1, "fresh": True},
        headers={PRINCIPAL_HEADER: who},
    )
    assert resp.status_code == 202, resp.json()
    return TaskAccepted.model_validate(resp.json()).task_id


async def test_listing_pages_without_gaps_or_repeats_while_tasks_come_and_end(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    """Six tasks of one caller, two ended (in the database) and four running (in Temporal
    only), paged two at a time. Between pages a new task is submitted and a running one ends,
    moving from Temporal's side of the listing to the database's: one further down (it must
    come once, later), then the one the last page ended with (the cursor). Pages end on
    running tasks too (a cursor from visibility)."""
    owner = f"alice-{uuid.uuid4().hex[:6]}"
    async with gated_network(client, settings, sessions) as (gates, nodes), serve(settings) as http:
        tasks = [await _submit(http, owner, n) for n in range(6)]
        gates.open.update([tasks[0], tasks[3]])
        endings = [tasks[1], tasks[2]]

        async def settled() -> bool:  # visibility is eventually consistent
            listed = await _page(http, owner, limit=100)
            newest_first = ["running", "running", "completed", "running", "running", "completed"]
            return [t.status for t in listed.tasks] == newest_first

        await wait_for(settled, timeout=30, every=0.2)

        seen: list[str] = []
        added: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await _page(http, owner, limit=2, **({"cursor": cursor} if cursor else {}))
            pages += 1
            seen += [t.task_id for t in page.tasks]
            keys = [(t.submitted_at, t.task_id) for t in page.tasks]
            assert keys == sorted(keys, reverse=True)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            added.append(await _submit(http, owner, 10 + pages))
            ending = endings.pop(0)
            gates.open.add(ending)

            async def recorded(task_id: str = ending) -> bool:
                async with sessions() as s:
                    return await queries.get_task(session=s, task_id=task_id) is not None

            await wait_for(recorded, timeout=30)

        # Every task there was when paging began, once, newest first; none added since.
        assert pages == 3 and not endings
        assert seen == tasks[::-1]
        assert not set(added) & set(seen)

        # A caller sees its own tasks only; an admin (and, with auth off, anyone) sees them all.
        assert (await _page(http, f"bob-{uuid.uuid4().hex[:6]}", limit=100)).tasks == []
        for who in (f"admin-{uuid.uuid4().hex[:6]}", None):
            everyone = await _page(http, who, limit=100, node=nodes[0])
            assert set(tasks) <= {t.task_id for t in everyone.tasks}
        gates.open.update(tasks + added)

        # Filters: by status (the database's), by node (a search attribute, or a contribution).
        async def all_ended() -> bool:
            listed = await _page(http, owner, limit=100)
            return all(t.status == "completed" for t in listed.tasks)

        await wait_for(all_ended, timeout=30, every=0.2)
        completed = await _page(http, owner, status="completed", limit=100)
        assert [t.task_id for t in completed.tasks] == (tasks + added)[::-1]
        assert all(t.nodes == nodes and t.owner == owner for t in completed.tasks)
        assert (await _page(http, owner, status="running")).tasks == []
        assert (await _page(http, owner, node="no-such-node")).tasks == []
        since = completed.tasks[0].submitted_at
        assert [t.task_id for t in (await _page(http, owner, since=since.isoformat())).tasks] == [
            completed.tasks[0].task_id
        ]
        bad = await http.get("/v1/tasks", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"

        # Another caller (a name with '.' and '@') lists its own (running) tasks only.
        odd = f"o.brien@{uuid.uuid4().hex[:6]}"
        theirs = await _submit(http, odd, 99)

        async def listed_as_theirs() -> bool:
            return [t.task_id for t in (await _page(http, odd)).tasks] == [theirs]

        await wait_for(listed_as_theirs, timeout=30, every=0.2)
        assert theirs not in {t.task_id for t in (await _page(http, owner, limit=100)).tasks}


async def test_recorded_tasks_page_by_submission_time_and_id(any_engine: AsyncEngine) -> None:
    """The database's side of the listing, on SQLite and PostgreSQL: a keyset that holds when
    several tasks share a submission time, and each filter."""
    sessions = session_factory(any_engine)
    base = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
    # Seven tasks: three share one microsecond; none of "carol" has a domain.
    rows = [
        ("t-a", base, "alice", "cooking", TaskStage.COMPLETED),
        ("t-b", base, "alice", "cooking", TaskStage.FAILED),
        ("t-c", base, "alice", "gardening", TaskStage.CANCELLED),
        ("t-d", base + timedelta(microseconds=1), "alice", "cooking", TaskStage.COMPLETED),
        ("t-e", base - timedelta(seconds=1), "alice", "cooking", TaskStage.COMPLETED),
        ("t-f", base + timedelta(hours=1), "carol", None, TaskStage.COMPLETED),
        ("t-g", base - timedelta(days=1), "carol", None, TaskStage.COMPLETED),
    ]
    async with sessions() as s:
        for task_id, at, owner, domain, status in rows:
            await queries.record_task(
                session=s,
                record=RecordInput(
                    task_id=task_id,
                    prompt="p",
                    domain=domain,
                    status=status,
                    owner=owner,
                    submitted_at=at,
                    contributions=[
                        Contribution(
                            node_id=f"n-{domain or 'none'}",
                            region="eu-west",
                            provider="fake",
                            model="m",
                            status=ContributionStatus.OK,
                        )
                    ],
                ),
                now=datetime.now(UTC),
            )

    async def listed(**filters: Any) -> list[str]:
        """Every page of two, following the keyset."""
        seen: list[str] = []
        before: tuple[datetime, str] | None = None
        while True:
            async with sessions() as s:
                page = await queries.list_tasks(session=s, limit=2, before=before, **filters)
            seen += [t.task_id for t in page]
            if len(page) < 2:
                return seen
            last = page[-1]
            assert last.submitted_at is not None
            at = last.submitted_at
            before = (at if at.tzinfo else at.replace(tzinfo=UTC), last.task_id)

    assert await listed() == ["t-f", "t-d", "t-c", "t-b", "t-a", "t-e", "t-g"]
    assert await listed(owner="alice") == ["t-d", "t-c", "t-b", "t-a", "t-e"]
    assert await listed(statuses=["failed", "cancelled"]) == ["t-c", "t-b"]
    assert await listed(domain="general") == ["t-f", "t-g"]  # recorded without one
    assert await listed(domain="gardening") == ["t-c"]
    assert await listed(node="n-cooking") == ["t-d", "t-b", "t-a", "t-e"]
    assert await listed(since=base) == ["t-f", "t-d", "t-c", "t-b", "t-a"]


# --- cancel --------------------------------------------------------------------------------------


async def test_cancel_stops_a_task_whose_experts_hang_and_says_who_had_answered(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    quick = f"quick-{uuid.uuid4().hex[:6]}"
    hung = [f"hung-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    panel = HangingPanel({quick})
    await register_fake_nodes(sessions, [quick, *hung], KNEADING)
    owner = f"carol-{uuid.uuid4().hex[:6]}"
    as_owner = {PRINCIPAL_HEADER: owner}
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            fake_network(client, settings, sessions, [quick, *hung], panel.answer)
        )
        http = await stack.enter_async_context(serve(settings))

        accepted = await http.post(
            "/v1/tasks",
            json={"prompt": "how long to knead bread dough", "k": 3, "fresh": True},
            headers=as_owner,
        )
        task_id = accepted.json()["task_id"]
        # Until the quick expert has answered (the others hang).
        await read_events(http, task_id, as_=owner, until=lambda e: e.type == "contribution")

        other = await http.post(
            f"/v1/tasks/{task_id}/cancel", headers={PRINCIPAL_HEADER: "mallory"}
        )
        resp = await http.post(f"/v1/tasks/{task_id}/cancel", headers=as_owner)
        again = await http.post(f"/v1/tasks/{task_id}/cancel", headers=as_owner)

        async def hung_calls_stopped() -> bool:  # at their next heartbeat
            return sorted(panel.cancelled) == sorted(hung)

        await wait_for(hung_calls_stopped, timeout=20)
        view = TaskView.model_validate((await http.get(f"/v1/tasks/{task_id}")).json())
        events = await read_events(http, task_id)
        missing = await http.post("/v1/tasks/task-nope/cancel")

    # Someone else's task is not theirs to cancel (nor to know of).
    assert other.status_code == 404 and other.json()["error"]["code"] == "task_not_found"
    assert resp.status_code == 200, resp.json()
    cancelled = TaskCancelled.model_validate(resp.json())
    assert cancelled.status == "cancelled"
    assert cancelled.answered == [quick] and sorted(cancelled.unanswered) == sorted(hung)
    by_node = {c.node_id: c for c in cancelled.contributions}
    assert by_node[quick].status == ContributionStatus.OK
    assert all(by_node[n].error_type == "Cancelled" for n in hung)
    assert again.status_code == 200 and TaskCancelled.model_validate(again.json()) == cancelled
    assert view.status == "cancelled" and view.stage == "cancelled"
    assert view.error is not None and quick in view.error
    assert _story(events)[-2:] == ["stage:cancelled", "error"]
    assert events[-1].data.error is not None and events[-1].data.error.type == "Cancelled"
    assert missing.status_code == 404


async def test_a_task_that_ended_cannot_be_cancelled(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    async with gated_network(client, settings, sessions) as (gates, _), serve(settings) as http:
        task_id = await _submit(http, "dave", 1)
        gates.open.add(task_id)
        events = await read_events(http, task_id, as_="dave")
        resp = await http.post(f"/v1/tasks/{task_id}/cancel", headers={PRINCIPAL_HEADER: "dave"})
    assert events[-1].type == "result"
    assert resp.status_code == 409
    error = ErrorBody.model_validate(resp.json()).error
    assert error.code == "task_ended" and "completed" in error.message


async def test_a_terminated_task_stream_ends_with_an_error_saying_so(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    """An operator's ``temporal workflow terminate`` leaves the log without its last event."""
    async with gated_network(client, settings, sessions) as (_, _), serve(settings) as http:
        task_id = await _submit(http, "erin", 1)
        first = await read_events(
            http, task_id, as_="erin", until=lambda e: e.data.stage == TaskStage.ANSWERING
        )
        await client.get_workflow_handle(task_id).terminate(reason="operator")
        rest = await read_events(http, task_id, as_="erin", last_event_id=first[-1].id)
    assert [e.type for e in rest] == ["error"] and rest[0].id == first[-1].id + 1
    assert rest[0].data.error is not None and rest[0].data.error.type == "Terminated"


# --- the OpenAPI document ------------------------------------------------------------------------


def test_every_task_response_has_an_example_of_its_own_schema(settings: Settings) -> None:
    document = create_app(settings).openapi()
    models: dict[tuple[str, str, str], type[BaseModel]] = {
        ("post", "/v1/tasks", "202"): TaskAccepted,
        ("get", "/v1/tasks", "200"): TaskList,
        ("get", "/v1/tasks/{task_id}", "200"): TaskView,
        ("post", "/v1/tasks/{task_id}/cancel", "200"): TaskCancelled,
        ("post", "/v1/tasks/{task_id}/cancel", "202"): TaskCancelled,
    }
    checked = 0
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/tasks"):
            continue
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert response.get("content"), (method, path, status)
                for media, content in response["content"].items():
                    assert "example" in content, (method, path, status, media)
                    checked += 1
                    if media == "text/event-stream":
                        assert "id: 1\nevent: stage\ndata: " in content["example"]
                    elif status.startswith("2"):
                        models[(method, path, status)].model_validate(content["example"])
                    else:  # the one error shape
                        ErrorBody.model_validate(content["example"])
    assert checked >= 20
    assert "Last-Event-ID" in json.dumps(document["paths"]["/v1/tasks/{task_id}/events"])
    assert EXAMPLE_TASK_EVENTS[-1].type == TaskEventType.RESULT
    assert re.fullmatch(CURSOR_PATTERN, EXAMPLE_TASK_LIST.next_cursor or "")
