"""Async engine and session factory: SQLite (aiosqlite) by default, PostgreSQL via asyncpg."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel.ext.asyncio.session import AsyncSession

SessionFactory = async_sessionmaker[AsyncSession]
SQLITE_CONNECTIONS = 1
# How long a connection to a new SQLite file retries turning on WAL while another process does.
WAL_SWITCH_SECONDS = 30.0


def create_engine(dsn: str, *, echo: bool = False) -> AsyncEngine:
    """Create the engine; for SQLite, make the file's folder and turn on WAL + a busy timeout
    so the API (reader) and the core worker (writer) can share the file."""
    kwargs: dict[str, Any] = {"echo": echo}
    if dsn.startswith("sqlite"):
        path = dsn.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
        if path and path != ":memory:":
            # SQLite has one writer at a time: sessions of one process queue for one connection
            # (an asyncio wait) instead of contending for the file lock (SQLite's busy handler
            # sleeps up to 100 ms a try, and a read that turns into a write can fail at once).
            # Other processes (the API, other workers) still read in parallel through WAL.
            kwargs.update(pool_size=SQLITE_CONNECTIONS, max_overflow=0, pool_timeout=120)
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=10)
    engine = create_async_engine(dsn, **kwargs)
    if dsn.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: ConnectionPoolEntry) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            _journal_mode_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def _journal_mode_wal(cursor: Any) -> None:
    """Turn on WAL (it stays on in the file). Switching a new file needs its exclusive lock, and
    when several processes start on it at once SQLite refuses the losers at once ("database is
    locked", without waiting: two of them holding a read lock would otherwise wait on each other
    forever), so the switch is retried until the winner has made it."""
    deadline = time.monotonic() + WAL_SWITCH_SECONDS
    pause = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
        time.sleep(pause)  # only while connecting to a file another process is switching
        pause = min(pause * 2, 0.2)


def session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def init_db(engine: AsyncEngine) -> None:
    """Bring the database to the newest migration (``xpando.db.migrate.upgrade``): what every
    process does at start; cheap when it is there already, safe when several start at once."""
    from xpando.db.migrate import upgrade  # alembic is imported by the processes that migrate

    await upgrade(engine)


async def ping(engine: AsyncEngine) -> None:
    from sqlalchemy import text

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
