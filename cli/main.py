"""The ``xpando`` command: run the network, its processes, and script it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pydantic import AliasChoices, ValidationError

from xpando.logs import configure_logging
from xpando.settings import Settings
from xpando.telemetry import configure_tracing, shutdown_tracing

if TYPE_CHECKING:
    from pydantic import ValidationError
    from temporalio.client import Client

    from xpando.auth.keys import KeyLimits

# Exit statuses: one per kind of failure, so a script can tell them apart.
EXIT_OK = 0
EXIT_TASK_FAILED = 1  # the task ran and failed (task get, task submit --wait/--follow)
EXIT_USAGE = 2  # bad arguments, settings or configuration
EXIT_NOT_FOUND = 3  # no such task
EXIT_UNREACHABLE = 4  # Temporal, the database or a core worker did not answer
EXIT_REFUSED = 5  # the network refused the request (a node's registration)
EXIT_INTERNAL = 70  # a bug: the message names it; --debug shows the traceback
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_STATUSES = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_TASK_FAILED}    the task failed or was cancelled (task get, task submit --wait/--follow)
  {EXIT_USAGE}    bad arguments, settings or configuration
  {EXIT_NOT_FOUND}    not found (no such task, no such API key)
  {EXIT_UNREACHABLE}    unreachable: Temporal, the database or a core worker did not answer
  {EXIT_REFUSED}    refused: the network refused the node's registration
  {EXIT_INTERNAL}   internal error (a bug; run with --debug for the traceback)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

Every failure is one line on stderr naming the reason and what to do; --debug adds the
traceback."""

# A running task's progress is a query its core worker answers.
QUERY_TIMEOUT = timedelta(seconds=5)
PROGRESS_EVERY_S = 1.0


class CliError(Exception):
    """An expected failure: printed as one line, ended with its exit status."""

    def __init__(self, message: str, *, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line too (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


API_STOP_GRACE_S = 5  # seconds a stopping API gives open streams before closing them


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="xpando",
        description=__doc__,
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("dev", help="run the whole network locally (Temporal, workers, API)")

    worker = sub.add_parser("worker", help="run a worker process")
    wsub = worker.add_subparsers(dest="kind", required=True)
    wsub.add_parser("core", help="the core worker (xpando-core: workflows, Mother Core)")
    node = wsub.add_parser("node", help="one expert node (task queue node.<id>)")
    node.add_argument("--node-id", help="node id (default XPANDO_NODE_ID)")
    node.add_argument("--region", help="region (default XPANDO_NODE_REGION)")
    node.add_argument("--domain", help="built-in corpus domain (python, temporal, web-api, solana)")
    node.add_argument("--corpus", type=Path, help="JSONL corpus file for an offline node")
    node.add_argument("--provider", help="provider (default XPANDO_NODE_PROVIDER, 'offline')")
    node.add_argument("--model", help="model name (default XPANDO_NODE_MODEL)")
    node.add_argument("--simulated-latency-ms", type=int, help="extra latency per answer")
    node.add_argument(
        "--base-url", help="provider API base URL (XPANDO_NODE_BASE_URL; openai-compatible)"
    )
    node.add_argument("--timeout-s", type=float, help="one provider call (XPANDO_NODE_TIMEOUT_S)")
    node.add_argument(
        "--max-output-tokens", type=int, help="answer length limit (XPANDO_NODE_MAX_OUTPUT_TOKENS)"
    )
    node.add_argument(
        "--price-input",
        type=float,
        help="USD per 1M input tokens (XPANDO_NODE_PRICE_INPUT_PER_MTOK)",
    )
    node.add_argument(
        "--price-output",
        type=float,
        help="USD per 1M output tokens (XPANDO_NODE_PRICE_OUTPUT_PER_MTOK)",
    )
    node.add_argument("--capacity", type=int, help="tasks answered at once (XPANDO_NODE_CAPACITY)")
    node.add_argument(
        "--domain-description",
        help="what the node's domain covers, for routing (XPANDO_NODE_DOMAIN_DESCRIPTION)",
    )
    nodes = wsub.add_parser(
        "nodes", help="many simulated expert nodes in one process (load tests, benchmarks)"
    )
    nodes.add_argument("--count", type=int, required=True, help="how many nodes to host")
    nodes.add_argument("--prefix", default="sim", help="node ids are <prefix>-1 … <prefix>-N")
    nodes.add_argument(
        "--regions", help="comma-separated regions, round-robin (default XPANDO_NODE_REGION)"
    )
    nodes.add_argument(
        "--provider",
        choices=["instant", "offline"],
        default="instant",
        help="instant: a fixed answer at once; offline: the built-in corpora",
    )
    nodes.add_argument(
        "--domains",
        help="comma-separated domains, round-robin (default: python,temporal,web-api,solana)",
    )
    nodes.add_argument("--capacity", type=int, help="tasks each node answers at once")
    nodes.add_argument("--simulated-latency-ms", type=int, default=0, help="latency per answer")

    sub.add_parser("api", help="run the HTTP API (uvicorn)")

    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="action", required=True)
    dbsub.add_parser(
        "upgrade",
        aliases=["init"],
        help="bring the database to the newest migration: create it, adopt tables made before "
        "migrations, upgrade it (what every process does at start; init is the same)",
    )
    dbsub.add_parser("current", help="the database's migration, and whether it is the newest")

    sub.add_parser("search-attributes", help="register xpando's search attributes (idempotent)")

    chain = sub.add_parser("chain", help="the chain XPD is paid on")
    csub = chain.add_subparsers(dest="action", required=True)
    csub.add_parser(
        "init",
        help="embedded: create the XPD mint, the treasury and its token account, fund it "
        "(idempotent); rpc: check the configured mint and treasury",
    )

    keys = sub.add_parser(
        "keys", help="API keys: create, list and revoke them (in the database, like db upgrade)"
    )
    ksub = keys.add_subparsers(dest="action", required=True)
    create = ksub.add_parser("create", help="issue a key and print it, this once")
    create.add_argument(
        "--name", required=True, help="who uses it: the principal its approvals record"
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        dest="scopes",
        help="tasks:write, tasks:read, knowledge:read, nodes:read, payouts:read, "
        "payouts:approve or admin (repeat it, or separate with commas)",
    )
    create.add_argument(
        "--expires",
        help="when it stops working: after a duration (90d, 12h, 30m) or at an ISO 8601 "
        "date or time (UTC unless it says otherwise)",
    )
    create.add_argument(
        "--rpm",
        type=_non_negative(int),
        help="requests a minute (default XPANDO_LIMIT_REQUESTS_PER_MINUTE; 0: no limit)",
    )
    create.add_argument(
        "--tasks-per-minute",
        type=_non_negative(int),
        help="tasks submitted a minute (default XPANDO_LIMIT_TASKS_PER_MINUTE; 0: no limit)",
    )
    create.add_argument(
        "--concurrent",
        type=_non_negative(int),
        help="tasks running at once (default XPANDO_LIMIT_CONCURRENT_TASKS; 0: no limit)",
    )
    create.add_argument(
        "--budget-usd",
        type=_non_negative(float),
        help="provider spend a UTC day, in USD (default XPANDO_LIMIT_BUDGET_USD_PER_DAY; "
        "0: no limit)",
    )
    ksub.add_parser(
        "list", help="every key: id, name, status, expiry, limits, scopes (never a secret)"
    )
    revoke = ksub.add_parser("revoke", help="revoke a key by its id (refused from then on)")
    revoke.add_argument("key_id")

    task = sub.add_parser("task", help="submit and read tasks through Temporal")
    tsub = task.add_subparsers(dest="action", required=True)
    submit = tsub.add_parser("submit", help="start a TaskWorkflow")
    submit.add_argument("prompt")
    submit.add_argument("--k", type=int, help="how many experts to ask")
    submit.add_argument("--domain")
    submit.add_argument("--region", action="append", default=[], dest="regions")
    submit.add_argument("--quorum", type=int, help="go on once this many experts answered")
    submit.add_argument("--deadline-s", type=float, help="go on after this with what answered")
    submit.add_argument("--id", help="task id (default task-<uuid>)")
    until = submit.add_mutually_exclusive_group()
    until.add_argument("--wait", action="store_true", help="wait for and print the result")
    until.add_argument(
        "--follow",
        action="store_true",
        help="print the task's events as they happen, one JSON line each (as GET "
        "/v1/tasks/{id}/events streams them), until its result or error",
    )
    get = tsub.add_parser("get", help="print a task's progress or result")
    get.add_argument("task_id")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code = _run(args)
    if args.command in _SHORT_TEMPORAL_COMMANDS and argv is None:
        # The Temporal client's Rust runtime threads can touch the interpreter while it
        # finalizes and abort the process (seen intermittently after a failed connect:
        # "PyGILState_Release: thread state … must be current"). A one-shot command has
        # nothing left to clean up, so it leaves without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


_SHORT_TEMPORAL_COMMANDS = frozenset({"task", "search-attributes", "chain", "db", "keys"})


def _run(args: argparse.Namespace) -> int:
    settings: Settings | None = None
    try:
        settings = _settings()
        component = args.command if args.command != "worker" else f"worker-{args.kind}"
        configure_logging(settings, component=component)
        configure_tracing(settings, component=component)
        try:
            return _dispatch(args, settings)
        finally:
            shutdown_tracing()  # the spans still queued are sent before the process ends
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        failure = _expected(err, settings)
        if args.debug:
            traceback.print_exc()
        # One line, whatever the underlying message holds (the Rust client's errors span several).
        print("xpando: error: " + " ".join(str(failure).split()), file=sys.stderr, flush=True)
        return failure.status


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        # A field read under aliases (OPENAI_API_KEY, OTEL_TRACES_EXPORTER) is named by its
        # variables; any other by XPANDO_<FIELD>.
        aliases = [
            [str(c) for c in info.validation_alias.choices]
            for info in Settings.model_fields.values()
            if isinstance(info.validation_alias, AliasChoices)
            and field in info.validation_alias.choices
        ]
        if aliases:
            name = " / ".join(aliases[0])
        elif field:
            name = field if field.startswith("XPANDO_") else f"XPANDO_{field.upper()}"
        else:
            name = "a setting"
        raise CliError(
            f"invalid setting {name}: {first['msg']}; fix it in the environment or .env"
        ) from err


def _expected(err: Exception, settings: Settings | None) -> CliError:
    """The failure as the one line to print and its exit status; an unexpected one is a bug."""
    from sqlalchemy.exc import InterfaceError, OperationalError
    from temporalio.service import RPCError, RPCStatusCode

    from workers.node import RegistrationRefused
    from xpando.db.migrate import SchemaError
    from xpando.telemetry import MetricsPortUnavailable
    from xpando.temporal import TemporalUnreachable

    if isinstance(err, CliError):
        return err
    if isinstance(err, TemporalUnreachable):
        return CliError(
            f"{err}; start it (make run, or xpando dev) or set XPANDO_TEMPORAL_ADDRESS",
            status=EXIT_UNREACHABLE,
        )
    if isinstance(err, RPCError) and err.status in (
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
    ):
        where = f" at {settings.temporal_target}" if settings else ""
        return CliError(
            f"Temporal{where} did not answer ({err.message}); check that it is up and retry",
            status=EXIT_UNREACHABLE,
        )
    # asyncpg raises the socket's own error when the database refuses the connection.
    if isinstance(err, OperationalError | InterfaceError | ConnectionError):
        where = f" at {_redact(settings.database_dsn)}" if settings else ""
        return CliError(
            f"cannot reach the database{where}: {err}; check XPANDO_DATABASE_URL and that the "
            "database is up",
            status=EXIT_UNREACHABLE,
        )
    if isinstance(err, SchemaError):
        return CliError(str(err), status=EXIT_USAGE)
    if isinstance(err, MetricsPortUnavailable):
        return CliError(str(err), status=EXIT_USAGE)
    if isinstance(err, RegistrationRefused):
        return CliError(
            f"{err} (the core worker refused it: start the node with its own key, "
            "XPANDO_NODE_KEY or <data_dir>/keys/<node_id>.json, or under another --node-id)",
            status=EXIT_REFUSED,
        )
    return CliError(
        f"internal error: {type(err).__name__}: {err} (run with --debug for the traceback)",
        status=EXIT_INTERNAL,
    )


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "dev":
        from cli.dev import run_dev

        return run_dev(settings)
    if args.command == "worker" and args.kind == "core":
        from workers.core import run_core_worker
        from xpando.providers.registry import ProviderConfigError

        try:
            asyncio.run(run_core_worker(settings))
        except ProviderConfigError as err:
            raise CliError(f"aggregator: {err}") from err
        return 0
    if args.command == "worker" and args.kind == "node":
        return _run_node(args, settings)
    if args.command == "worker" and args.kind == "nodes":
        return _run_nodes(args, settings)
    if args.command == "api":
        import uvicorn

        from api.main import create_app

        # Inside uvicorn a failed start is a logged traceback; checked here it is one line.
        asyncio.run(_preflight(settings))

        uvicorn.run(
            create_app(settings),
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=True,
            # Open event streams (a dashboard tab's /live, a task's /events) would otherwise
            # hold a stop until the browser lets go; EventSource reconnects to the next process.
            timeout_graceful_shutdown=API_STOP_GRACE_S,
        )
        return 0
    if args.command == "db":
        return asyncio.run(_db(args, settings))
    if args.command == "search-attributes":
        added = asyncio.run(_search_attributes(settings))
        print("registered:", ", ".join(added) if added else "nothing (all present)")
        return 0
    if args.command == "keys":
        return asyncio.run(_keys(args, settings))
    if args.command == "task":
        return asyncio.run(_task(args, settings))
    if args.command == "chain":
        return _chain_init(settings)
    raise CliError(f"unknown command {args.command}")


async def _preflight(settings: Settings) -> None:
    from xpando import temporal

    await temporal.connect(settings, attempts=60)  # as the API's own start waits for it
    await _db_init(settings)


def _run_node(args: argparse.Namespace, settings: Settings) -> int:
    from workers.node import NodeConfigError, NodeSpec, RegistrationRefused, run_node_worker

    node_id = args.node_id or settings.node_id
    if not node_id:
        raise CliError("a node needs an id: --node-id ID or XPANDO_NODE_ID")
    latency = args.simulated_latency_ms
    if latency is None:
        latency = settings.node_simulated_latency_ms
    if latency < 0:
        raise CliError("--simulated-latency-ms must be >= 0")

    def _pick(flag: float | int | None, setting: float | int, name: str, low: float) -> float:
        value = setting if flag is None else flag
        if value < low:
            raise CliError(f"{name} must be >= {low:g}")
        return value

    provider = args.provider or settings.node_provider
    spec = NodeSpec(
        node_id=node_id,
        region=args.region or settings.node_region,
        provider=provider,
        model=args.model or settings.node_model,
        domain=args.domain or settings.node_domain,
        corpus=args.corpus or settings.node_corpus,
        simulated_latency_ms=latency,
        base_url=args.base_url or settings.node_base_url,
        api_key=settings.provider_key(provider),  # keys only from the environment, never argv
        timeout_s=_pick(args.timeout_s, settings.node_timeout_s, "--timeout-s", 0.001),
        connect_timeout_s=settings.node_connect_timeout_s,
        max_output_tokens=int(
            _pick(
                args.max_output_tokens,
                settings.node_max_output_tokens,
                "--max-output-tokens",
                1,
            )
        ),
        price_input_per_mtok=_pick(
            args.price_input, settings.node_price_input_per_mtok, "--price-input", 0
        ),
        price_output_per_mtok=_pick(
            args.price_output, settings.node_price_output_per_mtok, "--price-output", 0
        ),
        capacity=int(_pick(args.capacity, settings.node_capacity, "--capacity", 1)),
        domain_description=args.domain_description or settings.node_domain_description,
    )
    try:
        asyncio.run(run_node_worker(settings, spec))
    except RegistrationRefused:
        raise
    except (NodeConfigError, ValueError) as err:
        raise CliError(str(err)) from err
    return 0


def _run_nodes(args: argparse.Namespace, settings: Settings) -> int:
    from workers.nodes import DEFAULT_DOMAINS, FleetSpec, run_fleet

    if not 1 <= args.count <= 100_000:
        raise CliError("--count must be between 1 and 100000")
    if args.simulated_latency_ms < 0:
        raise CliError("--simulated-latency-ms must be >= 0")
    capacity = args.capacity if args.capacity is not None else settings.node_capacity
    if capacity < 1:
        raise CliError("--capacity must be >= 1")
    regions = _csv(args.regions) or [settings.node_region]
    domains = tuple(_csv(args.domains)) or DEFAULT_DOMAINS
    spec = FleetSpec(
        count=args.count,
        prefix=args.prefix,
        regions=tuple(regions),
        provider=args.provider,
        domains=domains,
        capacity=capacity,
        simulated_latency_ms=args.simulated_latency_ms,
    )
    try:
        asyncio.run(run_fleet(settings, spec, progress=_counter("registered nodes")))
    except ValueError as err:
        raise CliError(str(err)) from err
    return 0


def _counter(label: str) -> Callable[[int, int], None]:
    """A progress line on stderr at most every PROGRESS_EVERY_S, and one at the end."""
    shown = -float("inf")

    def show(done: int, total: int) -> None:
        nonlocal shown
        now = time.monotonic()
        if done == total or now - shown >= PROGRESS_EVERY_S:
            shown = now
            print(f"xpando: {label}: {done}/{total}", file=sys.stderr, flush=True)

    return show


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


async def _db_init(settings: Settings) -> None:
    from xpando.db import create_engine, init_db

    engine = create_engine(settings.database_dsn)
    try:
        await init_db(engine)
    finally:
        await engine.dispose()


async def _db(args: argparse.Namespace, settings: Settings) -> int:
    from xpando.db import create_engine, migrate

    where = _redact(settings.database_dsn)
    engine = create_engine(settings.database_dsn)
    try:
        if args.action == "current":
            print(f"{(await migrate.current(engine)).describe()}: {where}")
            return 0
        found = await migrate.upgrade(engine)
    finally:
        await engine.dispose()
    if found.at_head:
        print(f"database at {found.head} (head), nothing to do: {where}")
    elif found.legacy:
        baseline = migrate.BASELINE_REVISION
        then = "" if found.head == baseline else f", then upgraded to {found.head}"
        print(f"database made before migrations adopted at {baseline}{then} (head): {where}")
    elif found.revision is None:
        print(f"database created at {found.head} (head): {where}")
    else:
        print(f"database upgraded from {found.revision} to {found.head} (head): {where}")
    return 0


def _chain_init(settings: Settings) -> int:
    from xpando.chain import ChainError, init_chain
    from xpando.keys import KeyFileError

    if settings.chain == "embedded":
        step = (
            f"opening the embedded chain in {(settings.data_dir / 'chain').resolve()} "
            "(the first run creates the XPD mint and funds the treasury)"
        )
    else:
        step = f"checking the XPD mint and the treasury on {settings.chain_rpc_url}"
    print(f"xpando: chain init: {step} …", file=sys.stderr, flush=True)
    try:
        info = asyncio.run(init_chain(settings))
    except (ChainError, KeyFileError) as err:
        raise CliError(str(err)) from err
    whole, frac = divmod(info.balance, 10**info.decimals)
    balance = f"{whole}.{frac:0{info.decimals}d}" if info.decimals else str(whole)
    state = "created" if info.created else "ready"
    print(f"{info.kind} chain {state}")
    print(f"  mint                    {info.mint} ({info.decimals} decimals)")
    print(f"  treasury                {info.treasury}")
    print(f"  treasury token account  {info.treasury_token_account}")
    print(f"  treasury balance        {balance} XPD ({info.balance} base units)")
    if info.kind == "embedded":
        print(f"  state                   {(settings.data_dir / 'chain').resolve()}")
    return 0


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from xpando.auth import store
    from xpando.auth.keys import KeyLimits
    from xpando.auth.limits import default_limits
    from xpando.db import create_engine, init_db, session_factory

    now = datetime.now(UTC)
    defaults = default_limits(settings)
    if args.action == "create":  # arguments first: a typo needs no database
        scopes = [s for value in args.scopes for s in _csv(value)]
        try:
            store.check_scopes(scopes)
        except ValueError as err:
            raise CliError(str(err)) from err
        expires_at = _expiry(args.expires, now) if args.expires else None
    engine = create_engine(settings.database_dsn)
    try:
        await init_db(engine)
        async with session_factory(engine)() as session:
            if args.action == "create":
                try:
                    issued = await store.create_key(
                        session=session,
                        name=args.name,
                        scopes=scopes,
                        expires_at=expires_at,
                        created_by="xpando keys create",
                        now=now,
                        limits=KeyLimits(
                            requests_per_minute=args.rpm,
                            tasks_per_minute=args.tasks_per_minute,
                            concurrent_tasks=args.concurrent,
                            budget_usd_per_day=args.budget_usd,
                        ),
                    )
                except ValueError as err:
                    raise CliError(str(err)) from err
                made = issued.row
                until = f"until {_iso(made.expires_at)}" if made.expires_at else "no expiry"
                limits = _limits(store.limits_of(made).over(defaults))
                print(
                    f"xpando: created API key {made.key_id} for {made.name!r} "
                    f"({', '.join(made.scopes)}; {until}; {limits}); it is shown once, below",
                    file=sys.stderr,
                )
                print(issued.key)
                return 0
            if args.action == "list":
                rows = await store.list_keys(session=session)
                print(
                    f"{'KEY ID':<12}  {'NAME':<20}  {'STATUS':<7}  {'EXPIRES':<25}  "
                    f"{'LIMITS':<44}  SCOPES"
                )
                for row in rows:
                    expires = _iso(row.expires_at) or "never"
                    limits = _limits(store.limits_of(row).over(defaults))
                    print(
                        f"{row.key_id:<12}  {row.name:<20}  {store.status(row, now):<7}  "
                        f"{expires:<25}  {limits:<44}  {','.join(row.scopes)}"
                    )
                return 0
            revoked = await store.revoke_key(session=session, key_id=args.key_id, now=now)
            if revoked is None:
                raise CliError(
                    f"no API key {args.key_id!r}; list them with: xpando keys list",
                    status=EXIT_NOT_FOUND,
                )
            print(
                f"revoked API key {revoked.key_id} ({revoked.name}) at {_iso(revoked.revoked_at)}"
            )
            return 0
    finally:
        await engine.dispose()


def _limits(limits: KeyLimits) -> str:
    """A key's limits in one column: ``rpm=1200 tpm=120 running=32 budget=$10/day``."""

    def shown(value: float | None) -> str:
        return "-" if not value else f"{value:g}"

    return (
        f"rpm={shown(limits.requests_per_minute)} tpm={shown(limits.tasks_per_minute)} "
        f"running={shown(limits.concurrent_tasks)} "
        f"budget={'-' if not limits.budget_usd_per_day else f'${limits.budget_usd_per_day:g}/day'}"
    )


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a number of ``kind``, 0 or more."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < 0 or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} is not 0 (no limit) or more")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def _expiry(text: str, now: datetime) -> datetime:
    """``--expires``: a duration from now (``90d``, ``12h``, ``30m``, ``45s``) or an ISO 8601
    date or time, UTC unless it names a zone."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    try:
        if text[:-1].isdigit() and text[-1:] in units:
            return now + timedelta(seconds=int(text[:-1]) * units[text[-1]])
        when = datetime.fromisoformat(text)
    except (ValueError, OverflowError) as err:
        raise CliError(
            f"--expires {text!r}: give a duration (90d, 12h, 30m) or an ISO 8601 date or time "
            "(2030-01-31, 2030-01-31T12:00:00Z), before the year 10000"
        ) from err
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat(timespec="seconds")


async def _search_attributes(settings: Settings) -> list[str]:
    from xpando import temporal

    client = await _connect(settings)
    return await temporal.ensure_search_attributes(client)


async def _task(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError
    from temporalio.client import WorkflowFailureError
    from temporalio.common import WorkflowIDConflictPolicy
    from temporalio.service import RPCError, RPCStatusCode

    from workflows.task import TaskWorkflow
    from xpando import temporal
    from xpando.contracts import TaskInput

    if args.action == "submit":
        prompt = args.prompt.strip()
        if not prompt:
            raise CliError("the prompt is empty")
        k = args.k or settings.default_k
        if not 1 <= k <= 9:
            raise CliError("--k must be between 1 and 9")
        if args.quorum is not None and not 1 <= args.quorum <= k:
            raise CliError("--quorum must be between 1 and --k")
        if args.deadline_s is not None and args.deadline_s <= 0:
            raise CliError("--deadline-s must be > 0")
        task_id = args.id or f"task-{uuid.uuid4().hex}"
        try:  # checked here, before Temporal is asked: the API's checks on the same contract
            task = TaskInput(
                task_id=task_id,
                prompt=prompt,
                k=k,
                domain=args.domain,
                regions=args.regions,
                quorum=args.quorum,
                deadline_ms=max(1, round(args.deadline_s * 1000)) if args.deadline_s else None,
                wait_for_experts_s=settings.task_wait_for_experts_s,
            )
        except ValidationError as err:
            raise CliError(_invalid(err)) from err
    client = await _connect(settings)
    if args.action == "get":
        handle = client.get_workflow_handle_for(TaskWorkflow.run, args.task_id)
        try:
            desc = await handle.describe()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            desc = None
        if desc is None or desc.workflow_type != "TaskWorkflow":
            raise CliError(
                f"no task {args.task_id!r} in Temporal namespace {settings.temporal_namespace!r}; "
                "list the tasks with: temporal workflow list --query "
                "'WorkflowType=\"TaskWorkflow\"'",
                status=EXIT_NOT_FOUND,
            )
        if desc.status is not None and desc.status.name == "RUNNING":
            try:
                progress = await handle.query(TaskWorkflow.progress, rpc_timeout=QUERY_TIMEOUT)
            except RPCError as err:
                raise CliError(
                    f"task {args.task_id!r} is running, but no core worker answered its progress "
                    f"query within {QUERY_TIMEOUT.total_seconds():g}s ({err.message}); "
                    "is a core worker (xpando worker core) running?",
                    status=EXIT_UNREACHABLE,
                ) from err
            print(progress.model_dump_json(indent=2))
            return 0
        try:
            print((await handle.result()).model_dump_json(indent=2))
        except WorkflowFailureError as err:
            print(f"xpando: task {args.task_id!r} failed: {err.cause}", file=sys.stderr)
            return EXIT_TASK_FAILED
        return 0

    handle = await client.start_workflow(
        TaskWorkflow.run,
        task,
        id=task_id,
        task_queue=settings.core_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=temporal.initial_task_attributes(args.domain),
    )
    print(json.dumps({"task_id": task_id, "ui": settings.workflow_ui_url(task_id)}), flush=True)
    if args.follow:
        from api.routes.tasks import follow_events
        from xpando.contracts import TaskEventType

        last = None
        async for event in follow_events(handle):
            print(event.model_dump_json(), flush=True)
            last = event
        return EXIT_TASK_FAILED if last is None or last.type == TaskEventType.ERROR else EXIT_OK
    if args.wait:
        try:
            result = await handle.result()
        except WorkflowFailureError as err:
            print(f"xpando: task {task_id!r} failed: {err.cause}", file=sys.stderr)
            return EXIT_TASK_FAILED
        print(result.model_dump_json(indent=2))
    return 0


def _invalid(err: ValidationError) -> str:
    """A refused argument on one line: ``prompt: text contains U+0001 at position 3: …``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'argument'}: {e['msg']}" for e in err.errors()
    )


async def _connect(settings: Settings) -> Client:
    from xpando import temporal

    return await temporal.connect(settings)  # TemporalUnreachable: one line, EXIT_UNREACHABLE


def _redact(dsn: str) -> str:
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else dsn
    return dsn


if __name__ == "__main__":
    raise SystemExit(main())
