"""Alembic owns the schema: bring a database to the newest migration (``xpando db upgrade``, and
every process at start), or say where it stands (``xpando db current``).

Any number of processes may start at once: on PostgreSQL the upgrade holds a transaction-level
advisory lock, on SQLite a write transaction (``BEGIN IMMEDIATE``), so one process migrates
while the others wait and then find the database at head. DDL is transactional on both, so an
upgrade that fails leaves the database as it was.

A database that code from before migrations made with ``create_all`` has xpando's tables but
no ``alembic_version``: it is adopted — brought to the baseline's shape (the tables, nullable
columns and indexes that its code had not made yet) and stamped at the baseline — then upgraded
like any other, without touching a row.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Column, Connection, MetaData, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE_REVISION = "0001"
# Key of the PostgreSQL advisory lock the upgrade holds ("xpando" in ASCII): a constant that no
# other code in the database takes.
ADVISORY_LOCK_KEY = 0x78_70_61_6E_64_6F
# Alembic keeps the running migration's context in module globals: two upgrades in one process
# (of different databases: one database's are kept apart by its own lock) take turns.
_IN_PROCESS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _in_process() -> asyncio.Lock:
    """This event loop's turn lock (an asyncio lock serves one loop only)."""
    loop = asyncio.get_running_loop()
    lock = _IN_PROCESS.get(loop)
    if lock is None:
        lock = _IN_PROCESS[loop] = asyncio.Lock()
    return lock


class SchemaError(Exception):
    """A database this xpando cannot bring to head; the message says why and what to do."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: its revision (None: no ``alembic_version``) and this code's head."""

    revision: str | None
    head: str
    legacy: bool  # xpando's tables without alembic_version: made before migrations

    @property
    def at_head(self) -> bool:
        return self.revision == self.head

    def describe(self) -> str:
        if self.at_head:
            return f"{self.revision} (head)"
        if self.revision is not None:
            return f"{self.revision} (head is {self.head}; run: xpando db upgrade)"
        if self.legacy:
            then = "" if self.head == BASELINE_REVISION else f", then upgrades them to {self.head}"
            return (
                "none: tables made before migrations "
                f"(xpando db upgrade adopts them at {BASELINE_REVISION}{then})"
            )
        return f"none: no tables yet (xpando db upgrade creates them at {self.head})"


def alembic_config(connection: Connection | None = None) -> Config:
    """The migrations' configuration, built here so an installed xpando needs no alembic.ini;
    ``env.py`` runs them on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision this code knows."""
    revision = _scripts().get_current_head()
    if revision is None:
        raise SchemaError(f"no migrations in {MIGRATIONS}")
    return revision


def baseline_metadata() -> MetaData:
    """The tables as the baseline migration makes them (frozen there, unlike the models)."""
    script = _scripts().get_revision(BASELINE_REVISION)
    assert script is not None and script.module is not None
    baseline: MetaData = script.module.BASELINE
    return baseline


async def current(engine: AsyncEngine) -> SchemaState:
    async with engine.connect() as conn:
        return await conn.run_sync(_state)


async def upgrade(engine: AsyncEngine) -> SchemaState:
    """Bring the database to head; the state it was found in. Cheap when it is at head already
    (one read of ``alembic_version``)."""
    found = await current(engine)
    if found.at_head:
        return found
    async with _in_process(), engine.connect() as conn:
        try:
            found = await conn.run_sync(_upgrade_locked)
            await conn.commit()
        finally:
            if conn.dialect.name == "sqlite":  # its foreign keys are off (_lock): not reused
                await conn.invalidate()
    if not found.at_head:
        log.info(
            "database schema upgraded",
            revision=found.head,
            previous=found.revision,
            adopted=found.legacy,
        )
    return found


def _state(conn: Connection) -> SchemaState:
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is not None:
        try:
            _scripts().get_revision(revision)
        except CommandError as err:
            raise SchemaError(
                f"the database is at schema revision {revision!r}, which this xpando does not "
                f"know (its newest is {head()!r}): a newer xpando upgraded it; run that version, "
                "or restore a backup taken before the upgrade"
            ) from err
    tables = set(baseline_metadata().tables)
    legacy = revision is None and bool(tables & set(inspect(conn).get_table_names()))
    return SchemaState(revision=revision, head=head(), legacy=legacy)


def _upgrade_locked(conn: Connection) -> SchemaState:
    _lock(conn)
    found = _state(conn)  # again, under the lock: another process may have just upgraded it
    if found.at_head:
        return found
    if found.legacy:
        _adopt(conn)
        command.stamp(alembic_config(conn), BASELINE_REVISION)
    command.upgrade(alembic_config(conn), "head")
    if conn.dialect.name == "sqlite":
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
        if broken:
            raise SchemaError(
                f"after the migration to {found.head}, {len(broken)} rows would have a foreign "
                f"key that points nowhere (table, rowid, parent: {tuple(broken[0])[:3]}); "
                "nothing was changed: fix or delete those rows, then run xpando db upgrade again"
            )
    return found


def _lock(conn: Connection) -> None:
    """Hold the database's migration lock until this transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        # A migration that alters a table rebuilds it (copy, drop, rename): with foreign keys on,
        # dropping a table that others refer to fails or cascades, so they are off for it (the
        # pragma does nothing inside a transaction, hence first) and checked before the commit.
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        # The write lock now, not at the first write: a second process waits here (busy
        # timeout) rather than reading a state the first one is about to change.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _adopt(conn: Connection) -> None:
    """Bring a database made by ``create_all`` before migrations to the baseline's shape: its
    code created missing tables and added missing nullable columns at each start (without
    their indexes), so what is missing is added here; a missing NOT NULL column cannot be."""
    baseline = baseline_metadata()
    inspector = inspect(conn)
    present = set(inspector.get_table_names())
    baseline.create_all(conn, tables=[t for t in baseline.sorted_tables if t.name not in present])
    operations = Operations(MigrationContext.configure(conn))
    for table in baseline.sorted_tables:
        if table.name not in present:
            continue
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in columns:
                continue
            if not column.nullable:
                raise SchemaError(
                    f"the database's table {table.name!r} has no column {column.name!r}, which "
                    "cannot be added to existing rows (NOT NULL); it predates every xpando "
                    "release that migrations can adopt: export what you need and start afresh"
                )
            operations.add_column(table.name, Column(column.name, column.type))
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)
