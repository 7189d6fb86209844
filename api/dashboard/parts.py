"""The dashboard's live parts: each reads its data through the API's own route functions and
query helpers and renders a fragment of HTML. A page shows them; ``/live`` renders them again
every few seconds and sends the ones that changed (Server-Sent Events).

A part is rendered only for a viewer whose key holds its scope (the page checked it; the stream
checks it again, since it outlives the page)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

from fastapi import Request
from markupsafe import Markup
from temporalio.client import Client
from temporalio.service import RPCError

from api.dashboard import html
from api.dashboard.html import badge, chart, join, link, num, pct, table, usd, when, xpd
from api.dashboard.session import Viewer
from api.errors import ApiError
from api.routes import knowledge as knowledge_routes
from api.routes import nodes as node_routes
from api.routes import tasks as task_routes
from api.schemas import NodeView, TaskStatus, TaskSummary
from xpando.auth.keys import Scope
from xpando.chain import ChainError, ChainHandle
from xpando.contracts import KnowledgeStats
from xpando.db import SessionFactory, activity
from xpando.settings import Settings
from xpando.temporal import NodeLiveness

TASK_STATUSES = [s.value for s in TaskStatus]
EPOCH_TONES = {
    "closed": "warn",
    "awaiting_approval": "warn",
    "paying": "info",
    "reconciling": "info",
    "settled": "ok",
    "reconciled": "ok",
    "expired": "bad",
    "failed": "bad",
    "reconcile_failed": "bad",
}


@dataclass(frozen=True)
class Ctx:
    """What a part needs: the app's clients, the viewer and the page's filters."""

    request: Request
    viewer: Viewer
    status: str | None = None
    domain: str | None = None
    node: str | None = None

    @property
    def settings(self) -> Settings:
        return cast(Settings, self.request.app.state.settings)

    @property
    def client(self) -> Client:
        return cast(Client, self.request.app.state.temporal)

    @property
    def sessions(self) -> SessionFactory:
        return cast(SessionFactory, self.request.app.state.sessions)

    @property
    def liveness(self) -> NodeLiveness:
        return cast(NodeLiveness, self.request.app.state.liveness)


async def list_nodes(ctx: Ctx, status: Literal["active", "all"] = "active") -> list[NodeView]:
    async with ctx.sessions() as session:
        found = await node_routes.list_nodes(
            session=session,
            liveness=ctx.liveness,
            settings=ctx.settings,
            region=None,
            limit=1000,
            status=status,
        )
    return found.nodes


async def running_tasks(ctx: Ctx, *, owner_only: bool) -> list[TaskSummary]:
    """Running tasks (the viewer's own, or every one: only counted then, never shown)."""
    async with ctx.sessions() as session:
        found = await task_routes.list_tasks(
            client=ctx.client,
            session=session,
            settings=ctx.settings,
            principal=ctx.viewer.principal if owner_only else None,
            status=TaskStatus.RUNNING,
            domain=None,
            node=None,
            since=None,
            cursor=None,
            limit=100,
        )
    return found.tasks


# --- counters (every page's header) --------------------------------------------------------------


async def counters(ctx: Ctx) -> Markup:
    items: list[tuple[str, str, str]] = []
    v = ctx.viewer
    async with ctx.sessions() as session:
        figures = await activity.counters(session=session, now=datetime.now(UTC))
    if v.allows(Scope.NODES_READ):
        nodes = await list_nodes(ctx)
        items.append(("nodes-live", f"{sum(n.live for n in nodes)}/{len(nodes)}", "nodes live"))
    if v.allows(Scope.TASKS_READ):
        running = await running_tasks(ctx, owner_only=True)
        items.append(("tasks-running", str(len(running)), "tasks running"))
        items.append(("tasks-hour", str(figures.tasks_last_hour), "tasks in the last hour"))
    if v.allows(Scope.KNOWLEDGE_READ):
        items.append(("knowledge-items", str(figures.knowledge_items), "knowledge items"))
    return join(
        Markup('<div class="counter" id="count-{}"><b>{}</b><span>{}</span></div>').format(*i)
        for i in items
    )


# --- network -------------------------------------------------------------------------------------


def breakers(node: NodeView) -> Markup:
    """The node's own breaker and its provider's in its region, named when not closed."""
    shown = []
    for who, view in (("node", node.breaker), ("provider", node.provider_breaker)):
        if view is not None and view.state.value != "closed":
            tone = "bad" if view.state.value == "open" else "warn"
            text = f"{who} {view.state.value.replace('_', '-')}"
            shown.append(
                Markup('<span title="{}">{}</span>').format(
                    view.last_error or "", badge(text, tone)
                )
            )
    return join(shown) if shown else badge("closed", "ok")


async def network(ctx: Ctx) -> Markup:
    nodes = await list_nodes(ctx)
    in_use = Counter(n for t in await running_tasks(ctx, owner_only=False) for n in t.nodes)
    earnings: dict[str, activity.NodeEarnings] = {}
    if ctx.viewer.allows(Scope.PAYOUTS_READ):
        async with ctx.sessions() as session:
            earnings = await activity.earnings_by_node(session=session)
    regions: dict[str, list[NodeView]] = {}
    for n in sorted(nodes, key=lambda n: (n.region, n.node_id)):
        regions.setdefault(n.region, []).append(n)
    head = [
        "node",
        "live",
        "breaker",
        "provider / model",
        "domains",
        "reputation",
        "in use",
        "price in/out",
        "earned",
    ]
    groups = []
    for region, members in regions.items():
        rows = [
            [
                link(f"/nodes/{n.node_id}", n.node_id),
                Markup('<span class="live" data-node="{}" data-live="{}">{}</span>').format(
                    n.node_id,
                    "yes" if n.live else "no",
                    badge("live", "ok") if n.live else badge("not live", "bad"),
                ),
                breakers(n),
                f"{n.provider} / {n.model}",
                ", ".join(d.name for d in n.domains),
                Markup("{} <span class=dim>({})</span>").format(num(n.reputation), n.contributions),
                f"{in_use.get(n.node_id, 0)}/{n.capacity}",
                f"${n.price_input_per_mtok:g} / ${n.price_output_per_mtok:g}",
                (
                    f"{xpd(earnings[n.node_id].paid)} (+{earnings[n.node_id].pending} pending)"
                    if n.node_id in earnings
                    else ("—" if ctx.viewer.allows(Scope.PAYOUTS_READ) else "hidden")
                ),
            ]
            for n in members
        ]
        live = sum(n.live for n in members)
        groups.append(
            Markup(
                '<section class="region"><h2>{} <span class="dim">{}/{} live</span></h2>'
                "{}</section>"
            ).format(region, live, len(members), table(head, rows, "no nodes"))
        )
    if not groups:
        return Markup('<p class="dim">No node has registered yet.</p>')
    return join(groups)


async def charts(ctx: Ctx) -> Markup:
    async with ctx.sessions() as session:
        seen = await activity.activity(session=session, now=datetime.now(UTC))
    per_minute = [float(m.tasks) for m in seen.minutes]
    latency = [m.p50_ms for m in seen.minutes]
    cost = [h.cost_usd for h in seen.hours]
    reuse = [h.reuse_rate for h in seen.hours]
    return join(
        [
            chart("Tasks per minute", per_minute, axis=("60 min ago", "now")),
            chart("p50 latency (ms)", latency, kind="line", axis=("60 min ago", "now")),
            chart("Provider cost per hour", cost, fmt="${:.4f}", axis=("24 h ago", "now")),
            chart(
                "Knowledge reuse rate",
                [None if r is None else r * 100 for r in reuse],
                kind="line",
                fmt="{:.0f}%",
                top=100,
                axis=("24 h ago", "now"),
            ),
        ]
    )


# --- tasks ---------------------------------------------------------------------------------------


def status_badge(status: str) -> Markup:
    tone = {
        "completed": "ok",
        "ok": "ok",
        "confirmed": "ok",
        "finalized": "ok",
        "failed": "bad",
        "cancelled": "bad",
        "carried_over": "warn",
        "running": "info",
    }
    return badge(status, tone.get(status, "warn"))


async def tasks(ctx: Ctx) -> Markup:
    async with ctx.sessions() as session:
        found = await task_routes.list_tasks(
            client=ctx.client,
            session=session,
            settings=ctx.settings,
            principal=ctx.viewer.principal,
            status=TaskStatus(ctx.status) if ctx.status in TASK_STATUSES else None,
            domain=ctx.domain,
            node=None,
            since=None,
            cursor=None,
            limit=25,
        )
    rows = [
        [
            link(f"/tasks/{t.task_id}", t.task_id.removeprefix("task-")[:12]),
            status_badge(t.status.value),
            t.domain or "general",
            ", ".join(t.nodes),
            when(t.submitted_at),
            html.external(t.links.ui, "Temporal"),
        ]
        for t in found.tasks
    ]
    head = ["task", "status", "domain", "experts", "submitted", "run"]
    return table(head, rows, "No task matches.")


# --- Mother Core ---------------------------------------------------------------------------------


async def _stats(ctx: Ctx, domain: str) -> KnowledgeStats | None:
    try:
        return await asyncio.wait_for(
            knowledge_routes.knowledge_stats(
                domain=domain, client=ctx.client, settings=ctx.settings
            ),
            timeout=3,
        )
    except (ApiError, RPCError, TimeoutError):  # no KnowledgeWorkflow yet, or no core worker
        return None


async def knowledge(ctx: Ctx) -> Markup:
    async with ctx.sessions() as session:
        domains = await activity.knowledge_by_domain(session=session)
    stats = await asyncio.gather(*(_stats(ctx, d.domain) for d in domains))
    rows = [
        [
            link(f"/knowledge?domain={d.domain}", d.domain),
            str(d.items),
            str(s.merges) if s is not None else "—",
            str(d.uses),
            pct(d.reuse_rate),
            f"{d.calls_saved:.0f}",
            when(s.last_consolidation if s is not None else None),
        ]
        for d, s in zip(domains, stats, strict=True)
    ]
    head = ["domain", "items", "merges", "uses", "reuse rate", "calls saved", "consolidated"]
    return table(head, rows, "No knowledge yet: it grows as tasks complete.")


# --- economy -------------------------------------------------------------------------------------


async def close_chain(state: Any) -> None:
    handle = getattr(state, "dashboard_chain", None)
    if isinstance(handle, ChainHandle):
        await handle.close()


async def treasury(ctx: Ctx) -> str:
    handle = getattr(ctx.request.app.state, "dashboard_chain", None)
    if handle is None:
        handle = ctx.request.app.state.dashboard_chain = ChainHandle(ctx.settings)
    try:
        chain = await handle.get()
        return xpd(await chain.treasury_balance(), chain.decimals)
    except (ChainError, OSError) as err:
        return f"unavailable ({err})"


async def epochs(ctx: Ctx) -> Markup:
    async with ctx.sessions() as session:
        rows = await activity.list_epochs(session=session)
    approver = ctx.viewer.allows(Scope.PAYOUTS_APPROVE)

    def action(status: str, epoch: int) -> Markup:
        if status != "awaiting_approval":
            return Markup("")
        if not approver:
            return Markup('<span class="dim">needs payouts:approve</span>')
        return Markup(
            '<form method="post" action="/economy/epochs/{}/approve">{}'
            '<button class="primary" name="approve" value="{}">Approve</button></form>'
        ).format(epoch, html.csrf_input(ctx.viewer), epoch)

    table_rows = [
        [
            str(e.epoch),
            Markup('<span data-epoch="{}" data-status="{}">{}</span>').format(
                e.epoch,
                e.status,
                badge(e.status.replace("_", " "), EPOCH_TONES.get(e.status, "info")),
            ),
            when(e.ends_at),
            xpd(e.emission),
            f"{e.payouts} ({xpd(e.total)})",
            xpd(e.paid),
            xpd(e.carried_over),
            e.approver or "—",
            html.external(ctx.settings.workflow_ui_url(e.workflow_id), "Temporal"),
            action(e.status, e.epoch),
        ]
        for e in rows
    ]
    head = [
        "epoch",
        "status",
        "ended",
        "emission",
        "payouts",
        "paid",
        "carried over",
        "approver",
        "saga",
        "",
    ]
    balance = await treasury(ctx)
    return Markup('<p class="treasury">Treasury balance: <b>{}</b></p>{}').format(
        balance, table(head, table_rows, "No epoch has been closed yet.")
    )


# --- a node --------------------------------------------------------------------------------------


async def node_contributions(ctx: Ctx) -> Markup:
    assert ctx.node is not None
    async with ctx.sessions() as session:
        rows = await activity.node_contributions(session=session, node_id=ctx.node)
    return table(
        ["task", "status", "quality", "relevance", "latency", "cost", "recorded"],
        [
            [
                link(f"/tasks/{c.task_id}", c.task_id.removeprefix("task-")[:12]),
                status_badge(c.status),
                Markup('<meter min="0" max="1" value="{}"></meter> {}').format(
                    c.quality, num(c.quality)
                ),
                num(c.relevance),
                f"{c.latency_ms} ms",
                usd(c.cost_usd),
                when(c.created_at),
            ]
            for c in rows
        ],
        "No contribution recorded yet.",
    )


@dataclass(frozen=True)
class Part:
    render: Callable[[Ctx], Awaitable[Markup]]
    scope: Scope | None  # what the viewer's key must hold to see it
    every_s: float  # how often a stream renders it again

    def shown_to(self, viewer: Viewer) -> bool:
        return self.scope is None or viewer.allows(self.scope)


# A stream renders a part first this long after the page did (the page shows it fresh).
PARTS_FIRST_DELAY_S = 1.0
PARTS = {
    "counters": Part(counters, None, 2),
    "network": Part(network, Scope.NODES_READ, 2),
    "charts": Part(charts, Scope.TASKS_READ, 10),
    "tasks": Part(tasks, Scope.TASKS_READ, 2),
    "knowledge": Part(knowledge, Scope.KNOWLEDGE_READ, 10),
    "epochs": Part(epochs, Scope.PAYOUTS_READ, 2),
    "node": Part(node_contributions, Scope.NODES_READ, 5),
}


async def render(name: str, ctx: Ctx) -> Markup:
    """A part as a page shows it: its fragment inside the element ``/live`` updates."""
    fragment = await PARTS[name].render(ctx)
    return Markup('<div id="part-{}" data-part="{}">{}</div>').format(name, name, fragment)
