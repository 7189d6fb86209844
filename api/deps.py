"""Typed dependencies: settings, the Temporal client and a database session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, cast

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


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessions = cast(SessionFactory, request.app.state.sessions)
    async with sessions() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
TemporalClientDep = Annotated[Client, Depends(get_temporal)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
LivenessDep = Annotated[NodeLiveness, Depends(get_liveness)]
RegistryDep = Annotated[NodeRegistry, Depends(get_registry)]
