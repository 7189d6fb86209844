"""Alembic's environment: xpando's tables (``SQLModel.metadata``) on the connection that
``xpando.db.migrate`` passes in, or, under the ``alembic`` command, on XPANDO_DATABASE_URL."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from xpando.db import ledger_models, models  # noqa: F401  (registers the tables)

config = context.config


def render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """SQLModel's ``str`` columns as the plain ``sa.String`` they are, so a generated migration
    does not import sqlmodel."""
    if kind == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        # SQLite alters a table by copying it: migrations that change columns work on both.
        render_as_batch=True,
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_on_configured_database() -> None:
    from xpando.db.engine import create_engine
    from xpando.settings import Settings

    engine = create_engine(Settings().database_dsn)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("xpando's migrations run against a database: drop --sql")
connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    asyncio.run(run_on_configured_database())
