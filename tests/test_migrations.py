"""Alembic owns the schema: an empty database upgraded to head is exactly the models (nothing
left for ``alembic revision --autogenerate`` to write), on SQLite and on PostgreSQL; a database
that code from before migrations made with ``create_all`` is adopted without losing a row; any
number of processes may start on a new database at once."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Index, MetaData, Table, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import SQLModel

from tests.conftest import IN_CI, POSTGRES_URL
from xpando.db import (
    create_engine,
    init_db,
    ledger_models,  # noqa: F401  (registers its tables: every table is compared)
    migrate,
    models,
    session_factory,
)
from xpando.db.migrate import SchemaError

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
NEWER_NODE_COLUMNS = {"wallet", "changed_at"}


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A new, empty database: a SQLite file, or a database of its own on the local PostgreSQL
    (dropped afterwards; skipped when PostgreSQL is unreachable, failed under CI=true)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"xpando_mig_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:
        await admin.dispose()
        if IN_CI:
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unreachable under CI=true: {err!r}")
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable: {err!r}")
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
async def empty(empty_dsn: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(empty_dsn)
    try:
        yield engine
    finally:
        await engine.dispose()


def _differences(conn: Connection) -> list[Any]:
    """What ``alembic check`` would find: the models against the database."""
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


async def _check(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(_differences)


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def test_an_empty_database_upgraded_to_head_is_the_models(empty: AsyncEngine) -> None:
    found = await migrate.upgrade(empty)
    assert found.revision is None and not found.legacy
    assert await _check(empty) == []
    assert (await migrate.current(empty)).describe() == f"{migrate.head()} (head)"
    again = await migrate.upgrade(empty)  # every process does this at start
    assert again.at_head and await _check(empty) == []

    # The comparison sees a difference when there is one: the check above is not vacuous.
    async with empty.begin() as conn:
        await conn.execute(text("DROP INDEX ix_tasks_status"))
    assert [d[0] for d in await _check(empty)] == ["add_index"]


async def test_the_migrations_go_down_to_nothing_and_up_again(empty: AsyncEngine) -> None:
    await migrate.upgrade(empty)

    def downgrade(conn: Connection) -> None:
        command.downgrade(migrate.alembic_config(conn), "base")

    async with empty.begin() as conn:
        await conn.run_sync(downgrade)
    assert await _tables(empty) == {"alembic_version"}
    await migrate.upgrade(empty)
    assert await _check(empty) == []


def _rows(baseline: MetaData) -> dict[str, list[dict[str, Any]]]:
    """Some rows of each kind an earlier xpando wrote: JSON, binary, big integers, times."""
    return {
        "nodes": [
            {
                "node_id": "eu-1",
                "region": "eu-west",
                "provider": "offline",
                "model": "bm25",
                "task_queue": "node.eu-1",
                "capacity": 4,
                "domains": [{"name": "cooking", "keywords": ["bread"]}],
                "wallet": "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin",
                "registered_at": NOW,
                "updated_at": NOW,
                "reputation": 0.75,
            }
        ],
        "tasks": [
            {
                "task_id": f"task-{i}",
                "prompt": f"question {i}",
                "domain": "cooking",
                "status": "completed",
                "answer": f"answer {i}",
                "confidence": 0.9,
                "created_at": NOW,
            }
            for i in range(3)
        ],
        "contributions": [
            {
                "task_id": f"task-{i}",
                "node_id": "eu-1",
                "region": "eu-west",
                "provider": "offline",
                "model": "bm25",
                "status": "ok",
                "answer": f"answer {i}",
                "citations": [{"source": "cooking/bread", "score": 0.5}],
                "relevance": 0.5,
                "quality": 0.8,
                "quality_reason": "agrees",
                "latency_ms": 12,
                "input_tokens": 10,
                "output_tokens": 20,
                "attempts": 1,
                "created_at": NOW,
            }
            for i in range(3)
        ],
        "knowledge": [
            {
                "knowledge_id": "k-1",
                "task_id": "task-0",
                "question": "question 0",
                "answer": "answer 0",
                "confidence": 0.9,
                "nodes": ["eu-1"],
                "provenance": [{"task_id": "task-0", "confidence": 0.9}],
                "support": 1,
                "status": "active",
                "embedding": b"\x00\x01\x02\xff",
                "uses": 2,
                "created_at": NOW,
                "updated_at": NOW,
            }
        ],
        "api_keys": [
            {
                "key_id": "0123456789ab",
                "name": "ci",
                "scopes": ["tasks:read"],
                "digest": "f" * 64,
                "created_at": NOW,
            }
        ],
        "payouts": [
            {
                "payout_id": "xpd-1-eu-1",
                "epoch": 1,
                "node_id": "eu-1",
                "points": 10,
                "earned": 2**40,  # a BIGINT's worth of base units
                "carried_in": 0,
                "amount": 2**40,
                "status": "finalized",
                "attempts": 1,
                "signatures": ["sig-1"],
                "created_at": NOW,
                "updated_at": NOW,
            }
        ],
    }


async def _write(engine: AsyncEngine, baseline: MetaData, rows: dict[str, list[Any]]) -> None:
    async with engine.begin() as conn:
        for table in baseline.sorted_tables:  # parents (tasks) before children (contributions)
            if table.name in rows:
                await conn.execute(insert(table), rows[table.name])


async def _read(engine: AsyncEngine, table: Table) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(select(table).order_by(*table.primary_key.columns))
        return [dict(row._mapping) for row in result]


async def test_a_database_made_before_migrations_keeps_every_row(empty: AsyncEngine) -> None:
    """What earlier code left: ``create_all`` of the baseline's tables, rows, no
    alembic_version. It is adopted at the baseline and upgraded; every row reads back."""
    baseline = migrate.baseline_metadata()
    async with empty.begin() as conn:
        await conn.run_sync(baseline.create_all)
    rows = _rows(baseline)
    await _write(empty, baseline, rows)
    before = {name: await _read(empty, baseline.tables[name]) for name in rows}
    assert "none: tables made before migrations" in (await migrate.current(empty)).describe()

    found = await migrate.upgrade(empty)

    assert found.legacy and found.revision is None
    assert (await migrate.current(empty)).at_head
    assert await _check(empty) == []
    for name, written in before.items():
        assert await _read(empty, baseline.tables[name]) == written, name
    async with session_factory(empty)() as session:  # and the models read them
        node = await session.get(models.Node, "eu-1")
        assert node is not None and node.domains == [{"name": "cooking", "keywords": ["bread"]}]


async def test_an_older_database_gets_the_baselines_missing_tables_columns_and_indexes(
    empty: AsyncEngine,
) -> None:
    """Earlier code added missing nullable columns at start but not their indexes, and created
    tables as they appeared: a database from then is brought to the baseline's shape."""
    baseline = migrate.baseline_metadata()
    older = MetaData()
    for table in baseline.sorted_tables:
        if table.name not in ("nodes", "api_keys"):  # api_keys: not yet a table then
            table.to_metadata(older)
    Table(  # nodes before wallets and the routing index's change stamp
        "nodes",
        older,
        *[c._copy() for c in baseline.tables["nodes"].columns if c.name not in NEWER_NODE_COLUMNS],
        Index("ix_nodes_region", "region"),
    )
    async with empty.begin() as conn:
        await conn.run_sync(older.create_all)
    node = {k: v for k, v in _rows(baseline)["nodes"][0].items() if k not in NEWER_NODE_COLUMNS}
    await _write(empty, older, {"nodes": [node]})
    [written] = await _read(empty, older.tables["nodes"])

    await migrate.upgrade(empty)

    assert await _check(empty) == []
    [row] = await _read(empty, baseline.tables["nodes"])
    assert {k: row[k] for k in written} == written
    assert row["wallet"] is None and row["changed_at"] is None


async def test_a_missing_not_null_column_is_refused_untouched(empty: AsyncEngine) -> None:
    async with empty.begin() as conn:
        await conn.execute(text("CREATE TABLE tasks (task_id VARCHAR(128) PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO tasks VALUES ('task-old')"))
    with pytest.raises(SchemaError, match="'tasks' has no column 'prompt'"):
        await migrate.upgrade(empty)
    assert await _tables(empty) == {"tasks"}  # the failed adoption left nothing behind
    async with empty.connect() as conn:
        assert (await conn.execute(text("SELECT task_id FROM tasks"))).scalars().all() == [
            "task-old"
        ]


async def test_processes_starting_at_once_migrate_once(empty_dsn: str) -> None:
    """Every process calls ``init_db`` at start: on a new database, one migrates and the rest
    wait for it (each with its own engine, as separate processes have)."""
    engines = [create_engine(empty_dsn) for _ in range(6)]
    try:
        async with asyncio.TaskGroup() as starts:  # one failing stops the rest (no stragglers)
            for engine in engines:
                starts.create_task(init_db(engine))
        async with engines[0].connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert [v for (v,) in versions] == [migrate.head()]
        assert await _check(engines[0]) == []
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_database_from_a_newer_xpando_is_refused(empty: AsyncEngine) -> None:
    await migrate.upgrade(empty)
    async with empty.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="revision '9999', which this xpando does not know"):
        await migrate.upgrade(empty)
    async with empty.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(text("tasks")))).scalar()
    assert count == 0  # still there, untouched


REBUILD_TASKS = """
from alembic import op

revision = "9001"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", recreate="always"):
        pass


def downgrade() -> None:
    pass
"""


async def test_a_migration_that_rebuilds_a_table_on_sqlite_keeps_the_rows_referring_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite alters a table by rebuilding it (copy, drop, rename): a later migration that
    alters ``tasks`` must neither fail nor cascade on the contributions that refer to it, and
    the foreign keys hold again afterwards."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'rebuild.db'}")
    baseline = migrate.baseline_metadata()
    try:
        await migrate.upgrade(engine)
        rows = _rows(baseline)
        await _write(
            engine, baseline, {"tasks": rows["tasks"], "contributions": rows["contributions"]}
        )
        before = await _read(engine, baseline.tables["contributions"])

        later = tmp_path / "versions"
        later.mkdir()
        (later / "9001_rebuild_tasks.py").write_text(REBUILD_TASKS.format(down=migrate.head()))
        plain = migrate.alembic_config

        def with_later(connection: Connection | None = None) -> Config:
            config = plain(connection)
            config.set_main_option("path_separator", "os")
            config.set_main_option(
                "version_locations",
                os.pathsep.join([str(migrate.MIGRATIONS / "versions"), str(later)]),
            )
            return config

        monkeypatch.setattr(migrate, "alembic_config", with_later)
        migrate._scripts.cache_clear()
        try:
            found = await migrate.upgrade(engine)
            assert found.head == "9001" and (await migrate.current(engine)).at_head
        finally:
            monkeypatch.undo()
            migrate._scripts.cache_clear()

        assert await _read(engine, baseline.tables["contributions"]) == before
        orphan = {**rows["contributions"][0], "task_id": "task-none"}
        with pytest.raises(IntegrityError, match="FOREIGN KEY"):
            await _write(engine, baseline, {"contributions": [orphan]})
    finally:
        await engine.dispose()
