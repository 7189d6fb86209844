"""The live dashboard at ``/``: server-rendered pages over the API's own data, a little
vendored JavaScript for Server-Sent Events and the sign-in link, no build step."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.dashboard.parts import close_chain
from api.dashboard.routes import router

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="dashboard-static")


async def aclose(app: FastAPI) -> None:
    """Close what the pages opened on first use (the chain the economy view reads)."""
    await close_chain(app.state)
