"""Typed dependencies: settings, the Temporal client, a database session and the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Protocol, cast

from fastapi import Depends, Request
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from xpando.db import SessionFactory
from xpando.routing.registry import NodeRegistry
from xpando.settings import Settings
from xpando.temporal import NodeLiveness


def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def get_temporal(request: Request) -> Client:
    return cast(Client, request.app.state.temporal)


def get_liveness(request: Request) -> NodeLiveness:
    return cast(NodeLiveness, request.app.state.liveness)


def get_registry(request: Request) -> NodeRegistry:
    return cast(NodeRegistry, request.app.state.registry)


def get_sessions(request: Request) -> SessionFactory:
    return cast(SessionFactory, request.app.state.sessions)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with get_sessions(request)() as session:
        yield session


class Principal(Protocol):
    """Who calls, as the API-key dependency puts it on ``request.state.principal``: the name a
    task is owned by (never the key itself) and whether it sees every task."""

    @property
    def name(self) -> str: ...

    @property
    def is_admin(self) -> bool: ...


def get_principal(request: Request) -> Principal | None:
    """The caller; None when no key was checked (every task is then everyone's)."""
    return cast("Principal | None", getattr(request.state, "principal", None))


def may_see(principal: Principal | None, owner: str | None) -> bool:
    """A task is its owner's, and every admin's (and anyone's while no key is checked)."""
    return principal is None or principal.is_admin or principal.name == owner


def owner_filter(principal: Principal | None) -> str | None:
    """The owner whose tasks the caller may list (None: every task)."""
    return None if principal is None or principal.is_admin else principal.name


SettingsDep = Annotated[Settings, Depends(get_settings)]
TemporalClientDep = Annotated[Client, Depends(get_temporal)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
# For a route that streams: a session of its own, only while it needs one.
SessionFactoryDep = Annotated[SessionFactory, Depends(get_sessions)]
LivenessDep = Annotated[NodeLiveness, Depends(get_liveness)]
RegistryDep = Annotated[NodeRegistry, Depends(get_registry)]
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
