"""``xpando dev``: the whole network on one machine, in the foreground.

Starts (in order) the Temporal dev server, the core worker, the expert node workers and the API,
each its own process; prints the URLs; on Ctrl-C / SIGTERM, or when any of them dies, stops
them all in reverse order (SIGTERM, then SIGKILL after a grace period). Children also get
``PR_SET_PDEATHSIG`` so that even a ``kill -9`` of this supervisor leaves no orphans.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from cli.devserver import dev_server_env, start_dev_command
from xpando import temporal
from xpando.corpus import DEV_DOMAINS, ensure_domain_corpus
from xpando.db import create_engine, init_db
from xpando.logs import get_logger
from xpando.settings import Settings

log = get_logger("cli.dev")

STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 120.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        stdout: IO[bytes] | None = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
            stdout = self._log
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


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


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self._stopping = False
        self.watching = False

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
        return env

    def _metrics_env(self, offset: int) -> dict[str, str]:
        """Workers share one machine: with XPANDO_METRICS_PORT set, the core worker serves
        its metrics there and node ``i`` on the ``i``-th port after it."""
        env = self._env()
        if self.settings.metrics_port:
            env["XPANDO_METRICS_PORT"] = str(self.settings.metrics_port + offset)
        return env

    def _spawn(self, child: Child, env: dict[str, str] | None = None) -> Child:
        child.start(env if env is not None else self._env())
        self.children.append(child)
        log.info("started", process=child.name, pid=child.proc.pid if child.proc else None)
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
        if s.dev_start_temporal:
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
                    log_file=s.data_dir / "logs" / "temporal.log",
                ),
                env=dev_server_env(self._env(), s),
            )
        asyncio.run(self._prepare())
        self._spawn(
            Child("core-worker", [python, "-m", "cli", "worker", "core"]),
            env=self._metrics_env(0),
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
                ),
                env=self._metrics_env(1 + i),
            )
        self._spawn(Child("api", [python, "-m", "cli", "api"]))

    async def _prepare(self) -> None:
        s = self.settings
        client = await temporal.connect(s, attempts=int(READY_TIMEOUT_S / 0.5))
        added = await temporal.ensure_search_attributes(client)
        if added:
            log.info("search attributes registered", names=added)
        engine = create_engine(s.database_dsn)
        await init_db(engine)
        await engine.dispose()
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
        and every dev node is live, so the banner's node list is true when it is printed."""
        url = f"http://{self.settings.api_host}:{self.settings.api_port}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not self._stopping:
            dead = [c for c in self.children if not c.running()]
            if dead:
                return False
            try:
                if httpx.get(url, timeout=2.0).status_code == 200 and self._nodes_ready():
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return False

    def _nodes_ready(self) -> bool:
        """Every dev node registered and polling its queue (so the first task has experts)."""
        base = f"http://{self.settings.api_host}:{self.settings.api_port}"
        nodes = httpx.get(f"{base}/v1/nodes", timeout=5.0).json().get("nodes", [])
        wanted = {node_id for node_id, _, _ in dev_node_specs(self.settings)}
        return wanted <= {n["node_id"] for n in nodes if n.get("live")}

    def banner(self) -> str:
        s = self.settings
        nodes = ", ".join(f"{n} ({r}, {d})" for n, r, d in dev_node_specs(s))
        return "\n".join(
            [
                "",
                "xpando is ready",
                f"  API            http://{s.api_host}:{s.api_port}   (docs: /docs)",
                f"  Temporal UI    {s.temporal_ui_base}",
                f"  Temporal gRPC  {s.temporal_target}  namespace {s.temporal_namespace}",
                f"  nodes          {nodes}",
                f"  data           {s.data_dir.resolve()}",
                f"  try:  curl -s -X POST localhost:{s.api_port}/v1/tasks "
                "-H 'content-type: application/json' "
                '-d \'{"prompt": "How do I set a retry policy on an activity?"}\'',
                "Ctrl-C stops everything.",
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
        self.watching = True
        while not self._stopping:
            for child in self.children:
                if not child.running():
                    code = child.proc.returncode if child.proc else None
                    log.error("process exited; stopping the network", process=child.name, code=code)
                    return 1
            time.sleep(0.5)
        return 0


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
            log.error("the network did not become ready", timeout_s=READY_TIMEOUT_S)
            code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        sup.stop()
        log.info("stopped")
    return code
