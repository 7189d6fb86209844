"""``xpando dev``: the whole network on one machine, in the foreground.

Starts (in order) the Temporal dev server, the core worker, the expert node workers and the API,
each its own process, and prints the URLs once the network is ready. From then on it supervises:
a child that exits is started again after a backoff (0.5 s doubling to 10 s; afresh once it has
run a while), and the restart is logged. The network stops on Ctrl-C / SIGTERM, or when one child
keeps crashing (5 exits within 60 s): every child is stopped in reverse order (SIGTERM, then
SIGKILL after a grace period). A child that dies before the network is ready stops the start at
once, with its own last lines of output. Children also get ``PR_SET_PDEATHSIG`` so that even a
``kill -9`` of this supervisor leaves no orphans.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from temporalio.client import Client

from cli.devserver import dev_server_env, dev_server_tracing_env, start_dev_command
from xpando import temporal
from xpando.auth.keys import dev_key_path
from xpando.auth.store import ensure_dev_key
from xpando.corpus import DEV_DOMAINS, ensure_domain_corpus
from xpando.db import create_engine, init_db, session_factory
from xpando.logs import get_logger
from xpando.settings import Settings

log = get_logger("cli.dev")

STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 120.0
POLL_S = 0.2
# Restarts: the first after RESTART_FIRST_S, each next one twice as late, at most RESTART_MAX_S;
# a child that ran STABLE_AFTER_S before it exited starts that sequence afresh.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
STABLE_AFTER_S = 30.0
# This many exits of one child within CRASH_WINDOW_S is a crash loop: a restart will not fix it.
CRASH_LIMIT = 5
CRASH_WINDOW_S = 60.0
TAIL_LINES = 30  # a child's recent output kept to show why it died
SHOWN_LINES = 15

# Several children write to our stderr at once: one whole line at a time.
_output_lock = threading.Lock()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def restart_delay(attempt: int) -> float:
    """Seconds before restart number ``attempt`` (1, 2, …) of a child in a row."""
    return float(min(RESTART_FIRST_S * 2 ** (attempt - 1), RESTART_MAX_S))


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


@dataclass
class Child:
    """One supervised process. Its output (stdout and stderr) goes through a pipe to our stderr,
    or to ``log_file``, and its last ``TAIL_LINES`` lines are kept in ``tail``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    attempt: int = 0  # restarts in a row, reset once it has run STABLE_AFTER_S
    restart_at: float | None = None  # when an exited child is due to start again
    exits: collections.deque[float] = field(default_factory=collections.deque)
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES)
    )
    _log: IO[bytes] | None = field(default=None, repr=False)
    _pump: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        sink: IO[bytes] = sys.stderr.buffer
        if self.log_file is not None:
            if self._log is None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                self._log = self.log_file.open("ab")
            sink = self._log
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.started_at = time.monotonic()
        self.restart_at = None
        self.tail.clear()  # what explains an exit is what this run wrote
        assert self.proc.stdout is not None
        self._pump = threading.Thread(
            target=self._copy,
            args=(self.proc.stdout, sink),
            name=f"output-{self.name}",
            daemon=True,
        )
        self._pump.start()

    def _copy(self, source: IO[bytes], sink: IO[bytes]) -> None:
        with source:
            for line in iter(source.readline, b""):
                self.tail.append(line.decode(errors="replace").rstrip())
                try:
                    with _output_lock:
                        sink.write(line)
                        sink.flush()
                except (OSError, ValueError):  # our stderr is gone: keep draining the pipe
                    pass

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def exit(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        return "not started" if code is None else describe_exit(code)

    def last_lines(self, n: int = SHOWN_LINES) -> list[str]:
        """Its last lines of output, once all it wrote before it exited has been read."""
        if self._pump is not None:
            self._pump.join(timeout=2.0)
        written = list(self.tail)  # one step: the copying thread may still append
        return [line for line in written if line][-n:]

    @property
    def command(self) -> str:
        """How to run it alone (the ``xpando`` command for our own processes)."""
        if self.argv[1:3] == ["-m", "cli"]:
            return " ".join(["xpando", *self.argv[3:]])
        return " ".join(self.argv)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._pump is not None:
            self._pump.join(timeout=2.0)
        if self._log is not None:
            self._log.close()
            self._log = None


class ChildDied(Exception):
    """A child exited before the network was ready."""

    def __init__(self, child: Child) -> None:
        super().__init__(f"{child.name} exited ({child.exit}) before the network was ready")
        self.child = child


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def dev_node_specs(settings: Settings) -> list[tuple[str, str, str]]:
    """(node_id, region, domain) of each dev node: domains and regions round-robin."""
    domains = list(DEV_DOMAINS)
    regions = settings.dev_regions or ["local"]
    return [
        (f"node-{i + 1}", regions[i % len(regions)], domains[i % len(domains)])
        for i in range(settings.dev_nodes)
    ]


# Providers `xpando dev` gives a node of their own when their key is in the environment.
DEV_PROVIDERS = ("openai", "anthropic", "gemini")


def dev_provider_nodes(settings: Settings) -> list[tuple[str, str, str]]:
    """(node_id, region, provider) of a node per provider whose key is set (OPENAI_API_KEY,
    ANTHROPIC_API_KEY, GEMINI_API_KEY or GOOGLE_API_KEY): none without keys, so the network is
    the offline one. The key reaches the node through its environment only."""
    keys = {
        "openai": settings.openai_api_key,
        "anthropic": settings.anthropic_api_key,
        "gemini": settings.gemini_api_key,
    }
    regions = settings.dev_regions or ["local"]
    chosen = [p for p in DEV_PROVIDERS if (key := keys[p]) is not None and key.get_secret_value()]
    return [(f"{p}-1", regions[i % len(regions)], p) for i, p in enumerate(chosen)]


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self._stopping = False
        self.watching = False
        self._not_ready = ""  # what /readyz last said was missing
        self.api_key = ""  # the admin key at <data_dir>/dev-api-key, set by _prepare

    def _env(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(
            {
                "XPANDO_DATA_DIR": str(s.data_dir.resolve()),
                "XPANDO_TEMPORAL_ADDRESS": s.temporal_target,
                "XPANDO_TEMPORAL_NAMESPACE": s.temporal_namespace,
                "XPANDO_TEMPORAL_UI_URL": s.temporal_ui_base,
                "XPANDO_DATABASE_URL": s.database_dsn,
                "XPANDO_API_HOST": s.api_host,
                "XPANDO_API_PORT": str(s.api_port),
                "XPANDO_CORE_TASK_QUEUE": s.core_task_queue,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if s.log_format == "auto" and sys.stderr.isatty():
            # Their output reaches the terminal through a pipe: keep the terminal's format.
            env["XPANDO_LOG_FORMAT"] = "console"
        return env

    def _metrics_env(self, offset: int) -> dict[str, str]:
        """Workers share one machine: with XPANDO_METRICS_PORT set, the core worker serves
        its metrics there and node ``i`` on the ``i``-th port after it."""
        env = self._env()
        if self.settings.metrics_port:
            env["XPANDO_METRICS_PORT"] = str(self.settings.metrics_port + offset)
        return env

    def _spawn(self, child: Child) -> Child:
        child.start()
        self.children.append(child)
        log.info("started", process=child.name, pid=child.pid)
        return child

    def _check_ports(self) -> None:
        s = self.settings
        wanted = [("API", s.api_host, s.api_port, "XPANDO_API_PORT")]
        if s.dev_start_temporal:
            wanted += [
                ("Temporal", s.temporal_host, s.temporal_port, "XPANDO_TEMPORAL_PORT"),
                ("Temporal Web UI", s.temporal_host, s.temporal_ui_port, "XPANDO_TEMPORAL_UI_PORT"),
            ]
        busy = [w for w in wanted if port_in_use(w[1], w[2])]
        if busy:
            lines = ", ".join(f"{n} port {h}:{p} (set {var})" for n, h, p, var in busy)
            raise SystemExit(f"xpando dev: already in use: {lines}")

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_ports()
        python = sys.executable
        env = self._env()
        if s.dev_start_temporal:
            server_env, dropped = dev_server_env(env)
            if dropped:
                log.warning(
                    "the Temporal dev server takes only the otlp OpenTelemetry exporter; "
                    "starting it without these settings (the other processes keep them)",
                    dropped=dropped,
                )
            self._spawn(
                Child(
                    "temporal",
                    start_dev_command(
                        ip=s.temporal_host,
                        port=s.temporal_port,
                        ui_port=s.temporal_ui_port,
                        namespace=s.temporal_namespace,
                        db_file=(s.data_dir / "temporal.db").resolve(),
                    ),
                    dev_server_tracing_env(server_env, s),
                    log_file=s.data_dir / "logs" / "temporal.log",
                )
            )
        asyncio.run(self._prepare())
        self._spawn(
            Child("core-worker", [python, "-m", "cli", "worker", "core"], self._metrics_env(0))
        )
        for i, (node_id, region, domain) in enumerate(dev_node_specs(s)):
            self._spawn(
                Child(
                    node_id,
                    [
                        python,
                        "-m",
                        "cli",
                        "worker",
                        "node",
                        "--node-id",
                        node_id,
                        "--region",
                        region,
                        "--domain",
                        domain,
                    ],
                    self._metrics_env(1 + i),
                )
            )
        first = 1 + len(dev_node_specs(s))
        for i, (node_id, region, provider) in enumerate(dev_provider_nodes(s)):
            argv = [python, "-m", "cli", "worker", "node", "--node-id", node_id]
            argv += ["--region", region, "--provider", provider]
            self._spawn(Child(node_id, argv, self._metrics_env(first + i)))
        self._spawn(Child("api", [python, "-m", "cli", "api"], env))

    def _check_alive(self) -> None:
        """Before the network is ready, a dead child ends the start (the first one started:
        the others may have died of it)."""
        for child in self.children:
            if not child.running():
                raise ChildDied(child)

    async def _connect(self) -> Client:
        """Temporal, while the dev server starts: as long as it runs, up to the ready timeout."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            self._check_alive()
            try:
                return await temporal.connect(self.settings)
            except temporal.TemporalUnreachable:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.25)

    async def _prepare(self) -> None:
        s = self.settings
        client = await self._connect()
        added = await temporal.ensure_search_attributes(client)
        if added:
            log.info("search attributes registered", names=added)
        engine = create_engine(s.database_dsn)
        await init_db(engine)
        # First start (or the file's key revoked): an admin key, kept 0600 in the data folder.
        self.api_key, created = await ensure_dev_key(
            sessions=session_factory(engine), data_dir=s.data_dir
        )
        await engine.dispose()
        if created:
            log.info("dev API key created", path=str(dev_key_path(s.data_dir).resolve()))
        if s.chain == "embedded":  # first start: the XPD mint, the treasury, its funds
            from xpando.chain import init_chain

            chain = await init_chain(s)
            log.info(
                "chain ready" if not chain.created else "chain created",
                mint=chain.mint,
                treasury=chain.treasury,
                balance=chain.balance,
            )
        # Build the dev nodes' corpora once, here, rather than in N node processes at once.
        for domain in sorted({d for _, _, d in dev_node_specs(s)}):
            started = time.monotonic()
            path = await asyncio.to_thread(ensure_domain_corpus, domain, s.data_dir / "corpora")
            log.info(
                "corpus ready",
                domain=domain,
                path=str(path),
                seconds=round(time.monotonic() - started, 2),
            )

    def wait_ready(self) -> bool:
        """Until the API says it is ready (Temporal, the database and a live expert: /readyz)
        and every dev node is live, so the banner's node list is true when it is printed.
        Raises :class:`ChildDied` as soon as a child exits."""
        url = f"http://{self.settings.api_host}:{self.settings.api_port}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not self._stopping:
            self._check_alive()
            try:
                ready = httpx.get(url, timeout=2.0)
                self._not_ready = ready.text[:300]
                if ready.status_code == 200 and self._nodes_ready():
                    return True
            except httpx.HTTPError as err:
                self._not_ready = f"{url}: {err}"
            time.sleep(0.3)
        return False

    def _nodes_ready(self) -> bool:
        """Every dev node registered and polling its queue (so the first task has experts)."""
        base = f"http://{self.settings.api_host}:{self.settings.api_port}"
        auth = {"Authorization": f"Bearer {self.api_key}"}
        nodes = httpx.get(f"{base}/v1/nodes", headers=auth, timeout=5.0).json().get("nodes", [])
        wanted = {node_id for node_id, _, _ in dev_node_specs(self.settings)}
        wanted |= {node_id for node_id, _, _ in dev_provider_nodes(self.settings)}
        live = {n["node_id"] for n in nodes if n.get("live")}
        self._not_ready = f"nodes not live yet: {', '.join(sorted(wanted - live))}"
        return wanted <= live

    def banner(self) -> str:
        s = self.settings
        nodes = ", ".join(
            f"{n} ({r}, {d})" for n, r, d in dev_node_specs(s) + dev_provider_nodes(s)
        )
        key_file = dev_key_path(s.data_dir).resolve()
        return "\n".join(
            [
                "",
                "xpando is ready",
                f"  API            http://{s.api_host}:{s.api_port}   (docs: /docs)",
                f"  API key        {self.api_key}   (admin; also in {key_file})",
                # The key rides in the fragment, which the browser keeps to itself: no server
                # or proxy log sees it.
                f"  Dashboard      http://{s.api_host}:{s.api_port}/signin#key={self.api_key}"
                "   (signs you in)",
                f"  Temporal UI    {s.temporal_ui_base}",
                f"  Temporal gRPC  {s.temporal_target}  namespace {s.temporal_namespace}",
                f"  nodes          {nodes}",
                f"  data           {s.data_dir.resolve()}",
                f"  try:  curl -s -X POST localhost:{s.api_port}/v1/tasks "
                f'-H "Authorization: Bearer $(cat {key_file})" '
                "-H 'content-type: application/json' "
                '-d \'{"prompt": "How do I set a retry policy on an activity?"}\'',
                "A process that exits is started again; Ctrl-C stops everything.",
                "",
            ]
        )

    def stop(self) -> None:
        self._stopping = True
        for child in reversed(self.children):
            if child.running():
                log.info("stopping", process=child.name)
            child.stop()

    def watch(self) -> int:
        """Supervise until Ctrl-C / SIGTERM (0) or a crash loop (1)."""
        self.watching = True
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at and not self._stopping:
                        child.start()
                        log.info(
                            "restarted", process=child.name, pid=child.pid, attempt=child.attempt
                        )
                elif (
                    not child.running()
                    and not self._stopping
                    and not self._schedule_restart(child, now)
                ):
                    return 1
            time.sleep(POLL_S)
        return 0

    def _schedule_restart(self, child: Child, now: float) -> bool:
        """Plan the restart of a child that exited; False when it is crash-looping."""
        child.exits.append(now)
        while child.exits and child.exits[0] < now - CRASH_WINDOW_S:
            child.exits.popleft()
        if len(child.exits) >= CRASH_LIMIT:
            log.error(
                "process keeps crashing; stopping the network",
                process=child.name,
                exit=child.exit,
                exits=len(child.exits),
                within_s=CRASH_WINDOW_S,
            )
            _report(
                f"xpando dev: {child.name} exited {len(child.exits)} times within "
                f"{CRASH_WINDOW_S:g} s (last: {child.exit}); stopping the network.",
                child,
            )
            return False
        if now - child.started_at >= STABLE_AFTER_S:
            child.attempt = 0
        child.attempt += 1
        delay = restart_delay(child.attempt)
        child.restart_at = now + delay
        last = child.last_lines(1)
        log.warning(
            "process exited; restarting",
            process=child.name,
            exit=child.exit,
            attempt=child.attempt,
            in_s=delay,
            last_line=last[0] if last else None,
        )
        return True


def _advice(child: Child) -> str:
    """What to change, from what the child said."""
    said = "\n".join(child.last_lines(TAIL_LINES)).lower()
    if "address already in use" in said:
        return (
            "a port it needs is taken: stop what holds it, or choose other ports "
            "(XPANDO_API_PORT, XPANDO_TEMPORAL_PORT, XPANDO_TEMPORAL_UI_PORT)"
        )
    if child.name == "temporal":
        return (
            f"fix what the dev server says above (its whole log: {child.log_file}), or run "
            "Temporal yourself: XPANDO_DEV_START_TEMPORAL=false with XPANDO_TEMPORAL_ADDRESS"
        )
    return (
        "fix what it says above (settings are XPANDO_* variables or .env); "
        f"'{child.command}' runs it alone to try"
    )


def _report(headline: str, child: Child) -> None:
    """A dead child's own words on stderr: its last lines and what to change."""
    lines = child.last_lines()
    body = [f"  | {line}" for line in lines] or ["  (it wrote nothing)"]
    text = "\n".join(
        [
            "",
            headline,
            f"Last output of {child.name}:",
            *body,
            f"What to change: {_advice(child)}.",
            "",
        ]
    )
    with _output_lock:
        print(text, file=sys.stderr, flush=True)


def run_dev(settings: Settings) -> int:
    sup = Supervisor(settings)

    def _on_signal(signum: int, _frame: object) -> None:
        sup._stopping = True
        if not sup.watching:  # still starting: unwind now, the finally below cleans up
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    code = 0
    try:
        sup.start()
        if sup.wait_ready():
            print(sup.banner(), flush=True)
            code = sup.watch()
        elif not sup._stopping:
            log.error(
                "the network did not become ready",
                timeout_s=READY_TIMEOUT_S,
                missing=sup._not_ready,
            )
            code = 1
    except ChildDied as died:
        log.error("process exited before the network was ready", process=died.child.name)
        _report(f"xpando dev: {died}.", died.child)
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        sup.stop()
        log.info("stopped")
    return code
