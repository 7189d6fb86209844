"""The dashboard's HTML: the page layout, small formatting helpers and inline SVG charts.

Every piece of text from outside (prompts, answers, node ids, errors) goes in through
:class:`markupsafe.Markup`'s ``format`` or :func:`markupsafe.escape`, which escape it; a
:class:`Markup` is trusted HTML. Nothing here reads data: :mod:`api.dashboard.parts` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from markupsafe import Markup, escape

from api.dashboard.session import CSRF_FIELD, Viewer
from xpando.auth.keys import Scope

ASSET_VERSION = "2"  # bump when dash.js or dash.css change: browsers cache them
NAV = (
    ("network", "/", "Network", Scope.NODES_READ),
    ("tasks", "/tasks", "Tasks", Scope.TASKS_READ),
    ("knowledge", "/knowledge", "Mother Core", Scope.KNOWLEDGE_READ),
    ("economy", "/economy", "Economy", Scope.PAYOUTS_READ),
)


def join(parts: Iterable[Markup | str]) -> Markup:
    return Markup("").join(escape(p) for p in parts)


def page(
    title: str,
    body: Markup,
    *,
    viewer: Viewer | None,
    active: str = "",
    live: str = "",
    stream: str = "",
) -> str:
    """A whole page. ``live``: the URL of the page's ``/live`` stream (its parts update without
    a reload; empty: none); ``stream``: another event stream the page follows (a task's)."""
    nav = join(
        Markup('<a href="{}"{}>{}</a>').format(
            href, Markup(' aria-current="page"') if name == active else "", label
        )
        for name, href, label, scope in NAV
        if viewer is None or viewer.allows(scope)
    )
    who = Markup("")
    if viewer is not None:
        who = Markup(
            '<form class="who" method="post" action="/signout">'
            '<span title="key {}">{}</span>{}<button class="link">Sign out</button></form>'
        ).format(viewer.principal.key_id, viewer.principal.name, csrf_input(viewer))
    return str(
        Markup(
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            "<title>{} · xpando</title>"
            '<link rel="stylesheet" href="/static/dash.css?v={}">'
            '<script src="/static/dash.js?v={}" defer></script></head>'
            '<body data-live="{}" data-stream="{}"><header><a class="brand" href="/">xpando</a>'
            "<nav>{}</nav>{}</header><main>{}</main></body></html>"
        ).format(title, ASSET_VERSION, ASSET_VERSION, live, stream, nav, who, body)
    )


def csrf_input(viewer: Viewer) -> Markup:
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, viewer.csrf)


def refusal(status: int, message: str, viewer: Viewer | None = None) -> str:
    titles = {403: "Forbidden", 404: "Not found", 409: "Conflict", 429: "Too many requests"}
    title = titles.get(status, "Refused" if status < 500 else "Unavailable")
    held = Markup("")
    if viewer is not None:
        held = Markup("<p>Your key <code>{}</code> ({}) holds: {}.</p>").format(
            viewer.principal.key_id,
            viewer.principal.name,
            ", ".join(sorted(viewer.principal.scopes)) or "no scope",
        )
    body = Markup('<section class="refusal"><h1>{} {}</h1><p>{}</p>{}</section>').format(
        status, title, message, held
    )
    return page(f"{status} {title}", body, viewer=viewer)


# --- formatting ----------------------------------------------------------------------------------


def when(at: datetime | None) -> Markup:
    """A time as UTC text, with the ISO form for the browser's tooltip."""
    if at is None:
        return Markup('<span class="dim">—</span>')
    at = at.astimezone(UTC)
    return Markup('<time datetime="{}">{}</time>').format(
        at.isoformat(), at.strftime("%Y-%m-%d %H:%M:%S")
    )


def xpd(amount: int | None, decimals: int = 6) -> str:
    if amount is None:
        return "—"
    whole, frac = divmod(int(amount), 10**decimals)
    return f"{whole:,}.{frac:0{decimals}d}".rstrip("0").rstrip(".") + " XPD"


def usd(value: float | None) -> str:
    return "—" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def badge(text: str, tone: str) -> Markup:
    return Markup('<span class="badge {}">{}</span>').format(tone, text)


def table(head: Sequence[str], rows: Iterable[Sequence[Markup | str]], empty: str) -> Markup:
    body = join(
        Markup("<tr>{}</tr>").format(
            join(
                Markup('<td data-h="{}">{}</td>').format(h, c) for h, c in zip(head, r, strict=True)
            )
        )
        for r in rows
    )
    if not body:
        return Markup('<p class="dim">{}</p>').format(empty)
    return Markup(
        '<div class="scroll"><table><thead><tr>{}</tr></thead><tbody>{}</tbody></table></div>'
    ).format(join(Markup("<th>{}</th>").format(h) for h in head), body)


def link(href: str, text: str) -> Markup:
    return Markup('<a href="{}">{}</a>').format(href, text)


def external(href: str, text: str) -> Markup:
    return Markup('<a href="{}" target="_blank" rel="noopener">{}</a>').format(href, text)


# --- charts --------------------------------------------------------------------------------------

W, H = 300, 80


def chart(
    title: str,
    values: Sequence[float | None],
    *,
    kind: str = "bars",
    fmt: str = "{:.0f}",
    axis: tuple[str, str] = ("", "now"),
    top: float | None = None,
) -> Markup:
    """A small inline SVG chart of ``values`` (oldest first; None: no value): bars or a line,
    scaled to the largest value (or ``top``), with the latest and largest values in words."""
    known = [v for v in values if v is not None]
    peak = top if top is not None else max(known, default=0.0)
    scale = (H - 4) / peak if peak > 0 else 0.0
    n = max(len(values), 1)
    step = W / n
    shapes: list[Markup] = []
    if kind == "bars":
        for i, v in enumerate(values):
            if v:
                h = max(v * scale, 1.0)
                shapes.append(
                    Markup('<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}"/>').format(
                        i * step + 0.5, H - h, max(step - 1, 0.5), h
                    )
                )
    else:
        points = [
            f"{i * step + step / 2:.1f},{H - 2 - v * scale:.1f}"
            for i, v in enumerate(values)
            if v is not None
        ]
        if points:
            shapes.append(Markup('<polyline points="{}"/>').format(" ".join(points)))
            for p in points:
                x, y = p.split(",")
                shapes.append(Markup('<circle cx="{}" cy="{}" r="1.6"/>').format(x, y))
    latest = next((v for v in reversed(values) if v is not None), None)
    summary = (
        f"latest {fmt.format(latest)}, max {fmt.format(max(known))}" if known else "no data yet"
    )
    return Markup(
        '<figure class="chart {}"><figcaption>{} <small class="dim">{}</small></figcaption>'
        '<svg viewBox="0 0 {} {}" preserveAspectRatio="none" role="img" aria-label="{}: {}">'
        '<line class="base" x1="0" y1="{}" x2="{}" y2="{}"/>{}</svg>'
        '<div class="axis"><span>{}</span><span>{}</span></div></figure>'
    ).format(kind, title, summary, W, H, title, summary, H - 0.5, W, H - 0.5, join(shapes), *axis)
