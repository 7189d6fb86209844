"""The dashboard's pages, forms and streams, served by the API's own app (no other server).

Pages are left out of the OpenAPI document (they are not the API) but every one needs a
signed-in key holding its view's scope: without a session it redirects to ``/signin``, without
the scope it answers a 403 page. Data comes through the API's route functions, called in
process, so the dashboard shows exactly what the JSON API answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from markupsafe import Markup
from pydantic import ValidationError
from temporalio.service import RPCError

from api.dashboard import html, parts, session
from api.dashboard.html import badge, join, link, num, pct, table, usd, when, xpd
from api.dashboard.parts import Ctx
from api.dashboard.session import CSRF_FIELD, Forbidden, Refused, SignInRequired, Viewer
from api.deps import TaskLimits
from api.errors import ApiError
from api.routes import knowledge as knowledge_routes
from api.routes import payouts as payout_routes
from api.routes import tasks as task_routes
from api.schemas import ID_PATTERN, NODE_ID_PATTERN, Links, TaskCreate, TaskView
from workflows.task import TaskWorkflow
from xpando.auth.keys import Scope
from xpando.contracts import AggregationStrategy, Contribution, RoutingReport, TaskEvent
from xpando.db import activity, ledger
from xpando.logs import get_logger

log = get_logger(__name__)

TICK_S = 1.0  # how often /live looks whether a part is due
STREAM_MAX_S = 300.0  # a stream ends after this; the browser's EventSource reconnects
REAUTH_S = 10.0  # a stream checks its session again this often (a revoked key stops it)
RETRY_MS = 2000


class PageRoute(APIRoute):
    """A dashboard route: a missing session redirects to the sign-in page; a missing scope, a
    refused form or an API error answers an HTML page with its status."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                if request.method != "GET" or request.url.path.endswith(("/stream", "/live")):
                    return HTMLResponse(html.refusal(401, "sign in first"), status_code=401)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/signin?next={quote(target)}", status_code=303)
            except Forbidden as err:
                body = html.refusal(403, str(err), await _maybe_viewer(request))
                return HTMLResponse(body, status_code=403)
            except Refused as err:
                body = html.refusal(err.status, err.message, await _maybe_viewer(request))
                return HTMLResponse(body, status_code=err.status)
            except ApiError as err:
                body = html.refusal(err.status, err.message, await _maybe_viewer(request))
                return HTMLResponse(body, status_code=err.status, headers=err.headers)

        return page


async def _maybe_viewer(request: Request) -> Viewer | None:
    try:
        return await session.viewer(request)
    except (SignInRequired, Refused):
        return None


router = APIRouter(route_class=PageRoute, include_in_schema=False)


def _page(
    title: str,
    body: Markup,
    viewer: Viewer,
    active: str,
    live: dict[str, str] | None = None,
    *,
    stream: str = "",
) -> HTMLResponse:
    query = urlencode({k: v for k, v in (live or {}).items() if v})
    text = html.page(
        title,
        body,
        viewer=viewer,
        active=active,
        live=f"/live?{query}" if live else "",
        stream=stream,
    )
    return HTMLResponse(text, headers={"Cache-Control": "no-store"})


async def _form(request: Request) -> dict[str, list[str]]:
    return parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)


def _first(form: dict[str, list[str]], name: str) -> str:
    return form.get(name, [""])[0]


def _counters(ctx: Ctx) -> Coroutine[Any, Any, Markup]:
    return parts.render("counters", ctx)


# --- signing in ----------------------------------------------------------------------------------


def _safe_next(target: str) -> str:
    """Only a path of this site (no ``//host``, no scheme)."""
    # Browsers drop tabs and newlines from a URL ("/\t/host" is "//host"): none are allowed.
    plain = all(c > " " and c != "\\" for c in target)
    if target.startswith("/") and not target.startswith("//") and plain:
        return target
    return "/"


def _signin_page(request: Request, next_path: str, error: str = "", status: int = 200) -> Response:
    token = session.signin_token(request)
    message = Markup('<p class="error">{}</p>').format(error) if error else Markup("")
    body = Markup(
        '<section class="signin"><h1>Sign in</h1>{}'
        '<form id="signin" method="post" action="/signin">'
        '<input type="hidden" name="{}" value="{}"><input type="hidden" name="next" value="{}">'
        '<label>API key <input type="password" name="key" autocomplete="current-password" '
        'required placeholder="xpd_…"></label><button class="primary">Sign in</button></form>'
        '<p class="dim">An API key with the scopes of the views you want: <code>xpando keys '
        "create</code>. <code>xpando dev</code> prints a link that signs its operator in.</p>"
        "</section>"
    ).format(message, CSRF_FIELD, token, next_path)
    response = HTMLResponse(
        html.page("Sign in", body, viewer=None),
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )
    session.keep_signin_token(request, response, token)
    return response


@router.get("/signin")
async def signin_form(
    request: Request, next: Annotated[str, Query(max_length=500)] = "/"
) -> Response:
    return _signin_page(request, _safe_next(next))


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await _form(request)
    session.check_signin_token(request, _first(form, CSRF_FIELD))
    key, next_path = _first(form, "key").strip(), _safe_next(_first(form, "next") or "/")
    principal = await session.principal_of(request, key) if key else None
    if principal is None:
        return _signin_page(
            request, next_path, "That key is not valid (unknown, revoked or expired).", 401
        )
    log.info("dashboard sign-in", key_id=principal.key_id, principal=principal.name)
    response = RedirectResponse(next_path, status_code=303)
    session.set_session(request, response, key)
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    form = await _form(request)
    await session.form_viewer(request, None, _first(form, CSRF_FIELD))
    response = RedirectResponse("/signin", status_code=303)
    session.clear_session(response)
    return response


# --- network -------------------------------------------------------------------------------------


@router.get("/")
async def network_page(request: Request) -> Response:
    viewer = await session.viewer(request)
    if not viewer.allows(Scope.NODES_READ):  # the first view the key may see, if any
        href = next((href for _, href, _, scope in html.NAV if viewer.allows(scope)), None)
        if href is None:
            raise Forbidden(viewer.principal, Scope.NODES_READ)
        return RedirectResponse(href, status_code=303)
    ctx = Ctx(request=request, viewer=viewer)
    shown = ["counters", "network"]
    charts = Markup("")
    if viewer.allows(Scope.TASKS_READ):
        shown.append("charts")
        charts = Markup('<section class="charts">{}</section>').format(
            await parts.render("charts", ctx)
        )
    body = Markup("{}{}<h1>Network</h1>{}").format(
        await _counters(ctx), charts, await parts.render("network", ctx)
    )
    return _page("Network", body, viewer, "network", {"parts": ",".join(shown)})


@router.get("/nodes/{node_id}")
async def node_page(
    request: Request,
    node_id: Annotated[str, Path(min_length=1, max_length=64, pattern=NODE_ID_PATTERN)],
) -> Response:
    viewer = await session.viewer(request, Scope.NODES_READ)
    ctx = Ctx(request=request, viewer=viewer, node=node_id)
    node = next(
        (n for n in await parts.list_nodes(ctx, status="all") if n.node_id == node_id), None
    )
    if node is None:
        raise Refused(404, f"no node {node_id!r}")
    facts = [
        ("region", node.region),
        ("status", node.status),
        ("live", badge("live", "ok") if node.live else badge("not live", "bad")),
        ("provider / model", f"{node.provider} / {node.model}"),
        ("breakers", parts.breakers(node)),
        ("reputation", f"{num(node.reputation)} over {node.contributions} contributions"),
        ("capacity", str(node.capacity)),
        (
            "price",
            f"${node.price_input_per_mtok:g} in / ${node.price_output_per_mtok:g} out"
            " per 1M tokens",
        ),
        ("wallet", Markup("<code>{}</code>").format(node.wallet or "—")),
        ("task queue", Markup("<code>{}</code>").format(node.task_queue)),
        ("registered", when(node.registered_at)),
    ]
    domains = join(
        Markup("<li><b>{}</b> <span class=dim>{}</span></li>").format(
            d.name, ", ".join(d.keywords[:12])
        )
        for d in node.domains
    )
    payouts = Markup('<p class="dim">Payouts need a key with payouts:read.</p>')
    if viewer.allows(Scope.PAYOUTS_READ):
        async with ctx.sessions() as db:
            earned = await ledger.earnings(session=db, node_id=node_id, limit=20)
        if earned is not None:
            payouts = Markup(
                "<p>Earned {} · paid {} · carried over {} · in flight {} · "
                "{} accruals pending</p>{}"
            ).format(
                xpd(earned.earned),
                xpd(earned.paid),
                xpd(earned.carried_over),
                xpd(earned.in_flight),
                earned.pending_accruals,
                table(
                    ["epoch", "amount", "status", "signature", "confirmed"],
                    [
                        [
                            str(p.epoch),
                            xpd(p.amount),
                            parts.status_badge(p.status),
                            Markup('<code class="sig">{}</code>').format(p.signature or "—"),
                            when(p.confirmed_at),
                        ]
                        for p in earned.payouts
                    ],
                    "No payout yet.",
                ),
            )
    body = Markup(
        '{}<h1>Node {}</h1><dl class="facts">{}</dl><h2>Domains</h2><ul>{}</ul>'
        "<h2>Recent contributions</h2>{}<h2>Payouts</h2>{}"
    ).format(
        await _counters(ctx),
        node_id,
        join(Markup("<dt>{}</dt><dd>{}</dd>").format(k, v) for k, v in facts),
        domains,
        await parts.render("node", ctx),
        payouts,
    )
    return _page(
        f"Node {node_id}", body, viewer, "network", {"parts": "counters,node", "node": node_id}
    )


# --- tasks ---------------------------------------------------------------------------------------


def _task_form(viewer: Viewer) -> Markup:
    if not viewer.allows(Scope.TASKS_WRITE):
        return Markup('<p class="dim">Asking a question needs a key with tasks:write.</p>')
    strategies = join(
        Markup('<option value="{}">{}</option>').format(s.value, s.value)
        for s in AggregationStrategy
    )
    return Markup(
        '<form class="ask" method="post" action="/tasks">{}'
        '<label class="wide">Question <textarea name="prompt" rows="3" required maxlength="8000" '
        'placeholder="How do I set a retry policy on an activity?"></textarea></label>'
        '<label>Experts (k) <input type="number" name="k" min="1" max="9" '
        'placeholder="default" class="k"></label><label>Strategy <select name="strategy">'
        '<option value="">default</option>{}</select></label>'
        '<label>Regions <input name="regions" placeholder="any, or eu-west, us-east"></label>'
        '<label>Domain <input name="domain" placeholder="any"></label>'
        '<button class="primary">Ask</button></form>'
    ).format(html.csrf_input(viewer), strategies)


@router.get("/tasks")
async def tasks_page(
    request: Request,
    status: Annotated[str, Query(max_length=16)] = "",
    domain: Annotated[str, Query(max_length=64, pattern=r"^[a-z0-9-]*$")] = "",
) -> Response:
    viewer = await session.viewer(request, Scope.TASKS_READ)
    status = status if status in parts.TASK_STATUSES else ""
    ctx = Ctx(request=request, viewer=viewer, status=status or None, domain=domain or None)
    options = join(
        Markup('<option value="{}"{}>{}</option>').format(
            s, Markup(" selected") if s == status else "", s or "any status"
        )
        for s in ["", *parts.TASK_STATUSES]
    )
    filters = Markup(
        '<form class="filters" method="get" action="/tasks"><select name="status">{}</select>'
        '<input name="domain" value="{}" placeholder="any domain" pattern="[a-z0-9-]*">'
        "<button>Filter</button></form>"
    ).format(options, domain)
    body = Markup("{}<h1>Tasks</h1>{}<h2>Recent tasks</h2>{}{}").format(
        await _counters(ctx), _task_form(viewer), filters, await parts.render("tasks", ctx)
    )
    live = {"parts": "counters,tasks", "status": status, "domain": domain}
    return _page("Tasks", body, viewer, "tasks", live)


@router.post("/tasks")
async def submit_task(request: Request) -> Response:
    form = await _form(request)
    viewer = await session.form_viewer(request, Scope.TASKS_WRITE, _first(form, CSRF_FIELD))
    fields: dict[str, Any] = {"prompt": _first(form, "prompt")}
    if _first(form, "k").strip():
        fields["k"] = int(_first(form, "k")) if _first(form, "k").strip().isdigit() else -1
    if _first(form, "strategy"):
        fields["strategy"] = _first(form, "strategy")
    if _first(form, "domain").strip():
        fields["domain"] = _first(form, "domain").strip()
    regions = [r.strip() for r in _first(form, "regions").split(",") if r.strip()]
    if regions:
        fields["regions"] = regions
    try:
        body = TaskCreate.model_validate(fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise Refused(422, f"the question was not sent: {problems}") from None
    limits = TaskLimits(request, viewer.principal)
    try:
        accepted = await task_routes.submit_task(
            body=body,
            response=Response(),
            client=request.app.state.temporal,
            settings=request.app.state.settings,
            principal=viewer.principal,
            limits=limits,
            idempotency_key=None,
        )
    except Exception:
        await limits.undo()
        raise
    # follow: the page fills in from the task's event stream even if the task is quick to end
    return RedirectResponse(f"/tasks/{accepted.task_id}?follow=1", status_code=303)


def _contribution(c: Contribution) -> Markup:
    answer = c.answer if len(c.answer) < 1200 else c.answer[:1200] + " …"
    citations = join(Markup("<li>{}</li>").format(x.source) for x in c.citations[:5])
    return Markup(
        '<article class="expert" data-node="{}"><header>{} {} '
        '<span class="dim">{} · {} / {}</span></header>'
        '<p class="figures">quality <meter min="0" max="1" value="{}"></meter> {} · relevance {} · '
        "{} ms · {} · {}+{} tokens</p>{}{}{}</article>"
    ).format(
        c.node_id,
        link(f"/nodes/{c.node_id}", c.node_id),
        parts.status_badge(c.status.value),
        c.region,
        c.provider,
        c.model,
        c.quality,
        num(c.quality),
        num(c.relevance),
        c.latency_ms,
        usd(c.cost_usd),
        c.input_tokens,
        c.output_tokens,
        Markup('<p class="answer">{}</p>').format(answer) if answer else "",
        Markup('<p class="error">{}: {}</p>').format(c.error_type or "error", c.error)
        if c.error
        else "",
        Markup('<ul class="cites">{}</ul>').format(citations) if citations else "",
    )


def _routing(report: RoutingReport | None) -> Markup:
    if report is None:
        return Markup(
            '<p class="dim">No routing decision (answered from knowledge, or not routed yet).</p>'
        )
    rows = [
        [
            link(f"/nodes/{t.node_id}", t.node_id),
            badge(t.outcome.value, "ok" if t.outcome.value == "chosen" else "info"),
            f"{t.region} / {t.provider}",
            t.domain or "—",
            num(t.declared_fit),
            num(t.learned_fit),
            num(t.evidence, 1),
            num(t.fit),
            num(t.reputation),
            num(t.health),
            num(t.price),
            num(t.diversity),
            num(t.score, 3),
            t.reason,
        ]
        for t in report.candidates
    ]
    return Markup('<p class="dim"><code>{}</code> · {} nodes considered</p>{}').format(
        report.formula,
        report.considered,
        table(
            [
                "node",
                "outcome",
                "where",
                "domain",
                "declared",
                "learned",
                "evidence",
                "fit",
                "rep.",
                "health",
                "price",
                "div.",
                "score",
                "why",
            ],
            rows,
            "No candidate.",
        ),
    )


def _answer(view: TaskView) -> Markup:
    reused = Markup("")
    if view.reused is not None:
        reused = Markup("<p>Answered from stored knowledge: {} (similarity {})</p>").format(
            link(f"/knowledge/{view.reused.knowledge_id}", view.reused.knowledge_id),
            num(view.reused.similarity),
        )
    if view.error:
        return Markup('<p class="error" id="task-error">{}</p>').format(view.error)
    if view.answer is None:
        return Markup('<p class="dim">Waiting for the experts…</p>')
    return Markup(
        '<div class="answer-box"><p class="figures">confidence <b>{}</b> · cost <b>{}</b> · '
        "strategy {}</p>"
        '{}<div class="answer" id="task-answer">{}</div></div>'
    ).format(
        pct(view.confidence),
        usd(sum(c.cost_usd for c in view.contributions)),
        view.strategy.value if view.strategy else "—",
        reused,
        view.answer,
    )


def _op(target: str, content: Markup, mode: str = "replace") -> dict[str, str]:
    return {"target": target, "mode": mode, "html": str(content)}


def _ops_of(event: TaskEvent, task_id: str, ui: str) -> list[dict[str, str]]:
    if event.stage is not None and event.type.value == "stage":
        stage = Markup("<li>{} {}</li>").format(event.stage.value.replace("_", " "), when(event.at))
        ops = [_op("stages", stage, "append")]
        if event.routing is not None:  # the experts were chosen: why, with every score term
            ops.append(_op("routing", _routing(event.routing)))
        return ops
    if event.contribution is not None:
        return [_op("contributions", _contribution(event.contribution), "append")]
    if event.result is not None:
        r = event.result
        view = TaskView(
            task_id=task_id,
            status="completed",
            answer=r.answer,
            confidence=r.confidence,
            contributions=r.contributions,
            strategy=r.strategy,
            reused=r.reused,
            links=Links(self=f"/v1/tasks/{task_id}", ui=ui),
        )
        return [
            _op("task-status", parts.status_badge("completed")),
            _op("result", _answer(view)),
            _op("routing", _routing(r.routing)),
            _op("contributions", join(_contribution(c) for c in r.contributions)),
        ]
    if event.error is not None:
        status = "cancelled" if event.error.type == "Cancelled" else "failed"
        return [
            _op("task-status", parts.status_badge(status)),
            _op(
                "result",
                Markup('<p class="error" id="task-error">{}: {}</p>').format(
                    event.error.type, event.error.message
                ),
            ),
        ]
    return []


@router.get("/tasks/{task_id}")
async def task_page(
    request: Request,
    task_id: Annotated[str, Path(pattern=ID_PATTERN)],
    follow: Annotated[bool, Query()] = False,
) -> Response:
    """A task: while it runs (or with ``follow``, while Temporal keeps its history) the page
    fills in from its events as they come; an ended one is shown from its record."""
    viewer = await session.viewer(request, Scope.TASKS_READ)
    ctx = Ctx(request=request, viewer=viewer)
    async with ctx.sessions() as db:
        view = await task_routes.get_task(
            task_id=task_id,
            client=ctx.client,
            session=db,
            settings=ctx.settings,
            principal=viewer.principal,
        )
    running = view.status in ("running", "waiting") or follow
    body = Markup(
        '{}<h1>Task <code>{}</code> <span id="task-status">{}</span></h1>'
        '<p>{} · {}</p><blockquote class="prompt">{}</blockquote>'
        '<div class="cols"><section><h2>Progress</h2><ol id="stages">{}</ol>'
        '<h2>Answer</h2><div id="result">{}</div></section>'
        '<section><h2>Experts</h2><div id="contributions">{}</div></section></div>'
        '<h2>Routing</h2><div id="routing">{}</div>'
    ).format(
        await _counters(ctx),
        task_id,
        parts.status_badge(view.status),
        html.external(view.links.ui, "Run in the Temporal Web UI"),
        f"domain {view.domain or 'general'}",
        view.prompt or "",
        "" if running else Markup("<li>{}</li>").format(view.stage or view.status),
        Markup('<p class="dim">Waiting for the experts…</p>') if running else _answer(view),
        "" if running else join(_contribution(c) for c in view.contributions),
        Markup('<p class="dim">Shown once the experts are chosen.</p>')
        if running
        else _routing(view.routing),
    )
    stream = f"/tasks/{task_id}/stream" if running else ""
    return _page(f"Task {task_id}", body, viewer, "tasks", {"parts": "counters"}, stream=stream)


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get("/tasks/{task_id}/stream")
async def task_stream(
    request: Request, task_id: Annotated[str, Path(pattern=ID_PATTERN)]
) -> Response:
    """The task's events as HTML to put in its page (Server-Sent Events, resumable with
    Last-Event-ID), until its result or error; then ``end``."""
    viewer = await session.viewer(request, Scope.TASKS_READ)
    client = request.app.state.temporal
    settings = request.app.state.settings
    async with request.app.state.sessions() as db:  # a task the viewer may not see is a 404
        view = await task_routes.get_task(
            task_id=task_id,
            client=client,
            session=db,
            settings=settings,
            principal=viewer.principal,
        )
    after = request.headers.get("last-event-id", "0")
    handle = client.get_workflow_handle_for(TaskWorkflow.run, task_id)

    async def events() -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        try:
            async for event in task_routes.follow_events(
                handle, after=int(after) if after.isdigit() else 0
            ):
                yield _sse("ops", _ops_of(event, task_id, view.links.ui), event.id)
        except RPCError:  # Temporal no longer has its history: the page without follow has
            gone = Markup('<p class="error">Its events are gone; {}.</p>').format(
                link(f"/tasks/{task_id}", "see its record")
            )
            yield _sse("ops", [_op("result", gone)])
        yield _sse("end", {})

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


# --- Mother Core ---------------------------------------------------------------------------------


@router.get("/knowledge")
async def knowledge_page(
    request: Request,
    q: Annotated[str, Query(max_length=2000)] = "",
    domain: Annotated[str, Query(max_length=64, pattern=r"^[a-z0-9-]*$")] = "",
) -> Response:
    viewer = await session.viewer(request, Scope.KNOWLEDGE_READ)
    ctx = Ctx(request=request, viewer=viewer)
    results = Markup("")
    if q.strip():
        async with ctx.sessions() as db:
            found = await knowledge_routes.search_knowledge(
                request=request, session=db, q=q.strip(), domain=domain or None, limit=10
            )
        results = Markup("<h2>Results for “{}”</h2>{}").format(
            q,
            join(
                Markup(
                    '<article class="hit"><h3>{}</h3><p class="dim">{} · confidence {} · '
                    "similarity {} · support {} · used {} times</p><p>{}</p></article>"
                ).format(
                    link(f"/knowledge/{k.knowledge_id}", k.question),
                    k.domain or "general",
                    pct(k.confidence),
                    num(k.similarity),
                    k.support,
                    k.uses,
                    k.answer if len(k.answer) < 400 else k.answer[:400] + " …",
                )
                for k in found.items
            )
            or Markup('<p class="dim">Nothing similar is stored.</p>'),
        )
    elif domain:
        async with ctx.sessions() as db:
            items = await activity.recent_knowledge(session=db, domain=domain)
        results = Markup("<h2>Latest in {}</h2>{}").format(
            domain,
            table(
                ["question", "confidence", "support", "uses", "updated"],
                [
                    [
                        link(f"/knowledge/{k.knowledge_id}", k.question),
                        pct(k.confidence),
                        str(k.support),
                        str(k.uses),
                        when(k.updated_at),
                    ]
                    for k in items
                ],
                "No active item in this domain.",
            ),
        )
    search = Markup(
        '<form class="filters" method="get" action="/knowledge">'
        '<input type="search" name="q" value="{}" placeholder="Search the Mother Core">'
        '<input name="domain" value="{}" placeholder="any domain" pattern="[a-z0-9-]*">'
        "<button>Search</button></form>"
    ).format(q, domain)
    body = Markup("{}<h1>Mother Core</h1>{}{}<h2>Knowledge per domain</h2>{}").format(
        await _counters(ctx), search, results, await parts.render("knowledge", ctx)
    )
    return _page("Mother Core", body, viewer, "knowledge", {"parts": "counters,knowledge"})


@router.get("/knowledge/{knowledge_id}")
async def knowledge_item(
    request: Request, knowledge_id: Annotated[str, Path(pattern=ID_PATTERN)]
) -> Response:
    viewer = await session.viewer(request, Scope.KNOWLEDGE_READ)
    ctx = Ctx(request=request, viewer=viewer)
    async with ctx.sessions() as db:
        item = await knowledge_routes.get_knowledge(
            request=request, session=db, knowledge_id=knowledge_id
        )
    provenance = table(
        ["task", "confidence", "experts (quality)", "at"],
        [
            [
                link(f"/tasks/{p.task_id}", p.task_id.removeprefix("task-")[:12]),
                pct(p.confidence),
                join(
                    join([link(f"/nodes/{n.node_id}", n.node_id), f" ({num(n.quality)}) "])
                    for n in p.nodes
                ),
                when(p.at),
            ]
            for p in item.provenance
        ],
        "No provenance recorded.",
    )
    merged = (
        Markup(" · merged into {}").format(link(f"/knowledge/{item.merged_into}", item.merged_into))
        if item.merged_into
        else ""
    )
    body = Markup(
        '{}<h1>{}</h1><p class="dim">{} · {} · confidence {} · support {} · used {} times · '
        'updated {}{}</p><div class="answer">{}</div><h2>Provenance</h2>{}'
    ).format(
        await _counters(ctx),
        item.question,
        item.domain or "general",
        item.status,
        pct(item.confidence),
        item.support,
        item.uses,
        when(item.updated_at),
        merged,
        item.answer,
        provenance,
    )
    return _page("Knowledge item", body, viewer, "knowledge", {"parts": "counters"})


# --- economy -------------------------------------------------------------------------------------


@router.get("/economy")
async def economy_page(
    request: Request, approved: Annotated[int | None, Query(ge=0)] = None
) -> Response:
    viewer = await session.viewer(request, Scope.PAYOUTS_READ)
    ctx = Ctx(request=request, viewer=viewer)
    flash = Markup("")
    if approved is not None:
        flash = Markup(
            '<p class="flash">Epoch {} approved: its payouts are being paid.</p>'
        ).format(approved)
    body = Markup("{}<h1>Economy</h1>{}{}").format(
        await _counters(ctx), flash, await parts.render("epochs", ctx)
    )
    return _page("Economy", body, viewer, "economy", {"parts": "counters,epochs"})


@router.post("/economy/epochs/{epoch}/approve")
async def approve_epoch(
    request: Request, epoch: Annotated[int, Path(ge=0, le=payout_routes.MAX_EPOCH)]
) -> Response:
    form = await _form(request)
    viewer = await session.form_viewer(request, Scope.PAYOUTS_APPROVE, _first(form, CSRF_FIELD))
    await payout_routes.approve_epoch(
        epoch=epoch,
        principal=viewer.principal,
        client=request.app.state.temporal,
        settings=request.app.state.settings,
        body=None,
    )
    return RedirectResponse(f"/economy?approved={epoch}", status_code=303)


# --- live ----------------------------------------------------------------------------------------


@router.get("/live")
async def live(
    request: Request,
    parts_: Annotated[str, Query(alias="parts", max_length=200)] = "counters",
    status: Annotated[str, Query(max_length=16)] = "",
    domain: Annotated[str, Query(max_length=64, pattern=r"^[a-z0-9-]*$")] = "",
    node: Annotated[str, Query(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = "",
) -> Response:
    """The page's parts, rendered again as they fall due and sent when they changed."""
    viewer = await session.viewer(request)
    wanted = [
        name
        for name in dict.fromkeys(parts_.split(","))
        if name in parts.PARTS and parts.PARTS[name].shown_to(viewer) and (name != "node" or node)
    ]
    ctx = Ctx(
        request=request,
        viewer=viewer,
        status=status if status in parts.TASK_STATUSES else None,
        domain=domain or None,
        node=node or None,
    )
    key = request.cookies.get(session.SESSION_COOKIE, "")

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        started = checked = time.monotonic()
        due = dict.fromkeys(wanted, started + parts.PARTS_FIRST_DELAY_S)
        sent: dict[str, str] = {}
        while time.monotonic() - started < STREAM_MAX_S:
            now = time.monotonic()
            if now - checked > REAUTH_S:
                checked = now
                if await session.principal_of(request, key) is None:
                    yield _sse("end", {})
                    return
            ops = []
            for name in wanted:
                if now < due[name]:
                    continue
                due[name] = now + parts.PARTS[name].every_s
                try:
                    fragment = str(await parts.PARTS[name].render(ctx))
                except Exception as err:  # one part failing leaves the others live
                    log.warning("dashboard part failed", part=name, error=repr(err))
                    continue
                if sent.get(name) != fragment:
                    sent[name] = fragment
                    ops.append({"target": f"part-{name}", "mode": "replace", "html": fragment})
            if ops:
                yield _sse("ops", ops)
            await asyncio.sleep(TICK_S)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )
