"""The `temporal` CLI cookbook is tested: every block of ``temporal-config/queries.md`` and
``setup.sh`` runs with the stock ``temporal`` binary against the dev server, in a namespace of its
own (so the deployment it rolls and the ids it uses are this test's alone) holding real xpando
runs — a core worker of two builds, offline expert nodes, a finished task, a payout epoch."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from pydantic import SecretStr
from temporalio.api.workflowservice.v1 import DescribeWorkerDeploymentRequest
from temporalio.client import Client

from cli.devserver import temporal_cli
from tests.conftest import IN_CI, free_port, issue_key, served_api, wait_for, wait_live
from tests.cookbook import Block, Command, CommandFailed, CookbookError, parse, run_block
from tests.payout_support import accrue, payout_settings
from workers.core import build_core_worker
from workers.node import NodeSpec, build_node, build_node_worker, register
from workers.payouts import build_payout_activities, ensure_payout_schedule, schedule_id
from workflows.payout import PayoutSagaWorkflow
from workflows.task import TaskWorkflow
from xpando import temporal
from xpando.auth.keys import Scope
from xpando.chain import init_embedded_chain
from xpando.contracts import TaskInput, TaskStage
from xpando.contracts_payouts import PayoutStage, epoch_workflow_id
from xpando.db import SessionFactory
from xpando.settings import Settings

REPO = Path(__file__).parent.parent
QUERIES = REPO / "temporal-config" / "queries.md"

OLD_BUILD, NEW_BUILD = "0.1.0", "0.2.0"
EPOCH = 1000  # long ended with the payout tests' 60 s epochs
CORPORA = {
    "temporal": [
        "Temporal retries a failed activity by its retry policy: initial interval, backoff "
        "coefficient, maximum interval and maximum attempts.",
        "Continue-as-new closes a workflow run and starts a fresh one with new input, so the "
        "event history stays small.",
        "Cancelling a workflow asks it to stop; the workflow can clean up before it closes.",
        "Signals send data into a running workflow; queries read its state without changing it.",
    ],
    "python": [
        "asyncio.gather runs awaitables concurrently and returns their results in order.",
        "pathlib.Path joins paths with the slash operator and reads a file with read_text.",
    ],
}
NODES = [
    ("eu-1", "temporal", "eu-west"),
    ("us-1", "temporal", "us-east"),
    ("eu-2", "python", "eu-west"),
]


def test_the_parser_splits_commands_and_reads_directives() -> None:
    blocks = parse(
        "# Title\n\n## Look\n\n"
        "<!-- cookbook: needs waiting-task -->\n"
        "```sh\n"
        "# a comment line\n"
        "temporal workflow list --query \"X='$NODE_ID'\"   # expect: $TASK_ID\n"
        'temporal workflow start --input \'{"prompt":"what does # do?"}\' \\\n'
        "  --type T   # expect: started\n"
        "until temporal workflow query -w x \\\n"
        "    | jq -e '.a' >/dev/null; do\n"
        "  sleep 1\n"
        "done\n"
        "```\n\n"
        "<!-- cookbook: skip no server here -->\n"
        "```bash\nexport TEMPORAL_ADDRESS=x\n```\n"
    )
    assert [(b.section, b.needs, b.skip) for b in blocks] == [
        ("Look", ["waiting-task"], None),
        ("Look", [], "no server here"),
    ]
    assert blocks[0].commands == [
        Command(
            8, "temporal workflow list --query \"X='$NODE_ID'\"   # expect: $TASK_ID", ("$TASK_ID",)
        ),
        Command(
            9,
            'temporal workflow start --input \'{"prompt":"what does # do?"}\' \\\n'
            "  --type T   # expect: started",
            ("started",),
        ),
        Command(
            11,
            "until temporal workflow query -w x \\\n    | jq -e '.a' >/dev/null; do\n"
            "  sleep 1\ndone",
        ),
    ]
    with pytest.raises(CookbookError, match="unknown directive"):
        parse("<!-- cookbook: run-twice please -->\n```sh\ntrue\n```\n")
    with pytest.raises(CookbookError, match="each one is run"):
        parse("```python\nprint()\n```\n")


async def test_a_failed_command_or_a_missing_expectation_fails_the_block(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "WHO": "alice"}

    def block(*commands: Command) -> Block:
        return Block(line=1, section="s", commands=list(commands))

    ran = await run_block(
        block(Command(2, "NAME=$WHO", ()), Command(3, 'echo "hello $NAME"', ("hello $WHO",))),
        env=env,
        cwd=tmp_path,
    )
    assert [r.output.strip() for r in ran] == ["", "hello alice"]
    with pytest.raises(CommandFailed, match="line 3 exited 3"):
        await run_block(
            block(Command(2, "true", ()), Command(3, "exit 3", ())), env=env, cwd=tmp_path
        )
    with pytest.raises(CommandFailed, match="printed no 'bob'"):
        await run_block(block(Command(2, "echo alice", ("bob",))), env=env, cwd=tmp_path)
    with pytest.raises(CommandFailed, match="line 2 exited"):  # a prompt gets no answer
        await run_block(block(Command(2, "read -r answer", ())), env=env, cwd=tmp_path)


async def test_every_cookbook_command_runs_against_real_runs(
    temporal_target: str, settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    if shutil.which("jq") is None:
        if IN_CI:
            pytest.fail("jq is not installed; the cookbook's scripts use it")
        pytest.skip("jq is not installed; the cookbook's scripts use it")
    namespace = f"cookbook-{uuid.uuid4().hex[:8]}"
    cwd = tmp_path / "operator"
    cwd.mkdir()
    (cwd / "temporal-config").symlink_to(REPO / "temporal-config")
    env = {
        # Only what an operator's shell would hold: no TEMPORAL_* or XPANDO_* of the developer's.
        "PATH": f"{Path(temporal_cli()).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),  # no temporal CLI config file of the developer's either
        "LANG": "C.UTF-8",
        "TEMPORAL_ADDRESS": temporal_target,
        "TEMPORAL_NAMESPACE": namespace,
    }
    # setup.sh creates the namespace and its search attributes.
    setup = Block(0, "setup.sh", [Command(0, "bash temporal-config/setup.sh", ("is ready",))])
    await run_block(setup, env=env, cwd=cwd)

    s = payout_settings(settings, payout_approval_threshold=0).model_copy(
        update={
            "temporal_namespace": namespace,
            # The cookbook's own names (its Worker Deployment is this queue's): the namespace
            # keeps them apart from the other tests', which run in `default`.
            "core_task_queue": "xpando-core",
            "build_id": OLD_BUILD,
            "payout_schedule_s": 3600,
        }
    )
    init_embedded_chain(s)
    client = await temporal.connect(s)
    for domain, passages in CORPORA.items():
        (tmp_path / f"{domain}.jsonl").write_text(
            "".join(
                json.dumps({"source": f"{domain}/{i}", "text": t}) + "\n"
                for i, t in enumerate(passages)
            )
        )

    async with AsyncExitStack() as stack:
        await _start_network(stack, client, s, sessions, tmp_path)
        task = await client.execute_workflow(
            TaskWorkflow.run,
            TaskInput(task_id="task-demo-1", prompt="How do I retry an activity?", k=2),
            id="task-demo-1",
            task_queue=s.core_task_queue,
            search_attributes=temporal.initial_task_attributes(None),
        )
        assert task.domain == "temporal" and task.contributions
        await accrue(sessions, EPOCH, {"eu-1": 0.9, "us-1": 0.5})
        await _listed(client, 'WorkflowId="task-demo-1" AND XpandoStatus="completed"')
        await _listed(client, 'WorkflowType="KnowledgeWorkflow"')
        env |= {
            "TASK_ID": task.task_id,
            "NODE_ID": task.contributions[0].node_id,
            "DOMAIN": task.domain,
            "EPOCH": str(EPOCH),
            "BUILD_ID": NEW_BUILD,
        }
        needs = {
            "waiting-task": _waiting_task(client, s),
            "sealed-task": _sealed_task(stack, s, sessions),
        }

        blocks = parse(QUERIES.read_text())
        ran: list[str] = []
        skipped: list[str] = []
        for block in blocks:
            if block.skip:
                skipped.append(f"{block.where()}: {block.skip}")
                continue
            block_env = dict(env)
            for need in block.needs:
                assert need in needs, f"{block.where()}: the test cannot provide {need!r}"
                block_env |= await needs[need]()
            ran += [r.command.text for r in await run_block(block, env=block_env, cwd=cwd)]
        print(
            f"\ncookbook: ran {len(ran)} commands (+ setup.sh), skipped {len(skipped)} blocks:\n  "
            + "\n  ".join(skipped)
        )

        # What the operator did shows: the epoch the cookbook approved is paid, the Schedule
        # it paused ticked once and runs again, every task it started finished (none failed),
        # and the build it rolled out is the current one.
        saga = client.get_workflow_handle_for(PayoutSagaWorkflow.run, epoch_workflow_id(EPOCH))
        paid = await saga.result()
        assert paid.stage == PayoutStage.SETTLED and paid.approver and paid.paid == 2
        schedule = client.get_schedule_handle(schedule_id(s))

        async def ticked() -> bool:
            return bool((await schedule.describe()).info.recent_actions)

        await wait_for(ticked, timeout=15)
        assert not (await schedule.describe()).schedule.state.paused
        assert await _unfinished_tasks(client) == []
        failed = [w.id async for w in client.list_workflows('ExecutionStatus="Failed"')]
        assert failed == []
        current = await client.workflow_service.describe_worker_deployment(
            DescribeWorkerDeploymentRequest(namespace=namespace, deployment_name="xpando-core")
        )
        routing = current.worker_deployment_info.routing_config
        assert routing.current_deployment_version.build_id == NEW_BUILD


async def _start_network(
    stack: AsyncExitStack, client: Client, s: Settings, sessions: SessionFactory, corpora: Path
) -> None:
    """Two builds of the core worker (the old one current, the new one polling: what a rollout
    starts from), offline nodes that send worker heartbeats, and the payout Schedule."""
    payouts = build_payout_activities(sessions=sessions, settings=s)  # one chain for both builds
    await stack.enter_async_context(
        build_core_worker(client, sessions=sessions, settings=s, payouts=payouts)
    )
    new = s.model_copy(update={"build_id": NEW_BUILD, "worker_promote": False})
    await stack.enter_async_context(
        build_core_worker(client, sessions=sessions, settings=new, payouts=payouts)
    )
    node_client = await temporal.connect(s, runtime=temporal.heartbeat_runtime(1))
    for node_id, domain, region in NODES:
        spec = NodeSpec(node_id, region, domain=domain, corpus=corpora / f"{domain}.jsonl")
        profile, provider = build_node(spec, data_dir=s.data_dir)
        await stack.enter_async_context(
            build_node_worker(node_client, profile=profile, provider=provider)
        )
        await register(client, profile, core_task_queue=s.core_task_queue)
    await ensure_payout_schedule(client, s)
    await wait_live(client, *(f"node.{n}" for n, _, _ in NODES))
    liveness = temporal.NodeLiveness(client, max_age_s=90)

    async def heartbeats() -> bool:
        return await liveness.sweep() >= len(NODES)

    async def new_build_known() -> bool:
        described = await client.workflow_service.describe_worker_deployment(
            DescribeWorkerDeploymentRequest(
                namespace=client.namespace, deployment_name="xpando-core"
            )
        )
        versions = described.worker_deployment_info.version_summaries
        return any(v.deployment_version.build_id == NEW_BUILD for v in versions)

    await wait_for(heartbeats, timeout=15)
    await wait_for(new_build_known, timeout=15)


async def _listed(client: Client, query: str) -> None:
    """Wait until the visibility store lists a run for ``query``."""

    async def listed() -> bool:
        return (await client.count_workflows(query)).count > 0

    await wait_for(listed, timeout=20)


async def _unfinished_tasks(client: Client, *, within_s: float = 20.0) -> list[str]:
    """Ids of the tasks still running after ``within_s``, but for those waiting for an expert.
    A start whose ``--input`` is not a TaskInput exits 0; its run then fails, or, when the
    payload cannot be decoded at all, retries its first workflow task for ever."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        running = [
            w.id
            async for w in client.list_workflows(
                'WorkflowType="TaskWorkflow" AND ExecutionStatus="Running"'
            )
            if w.typed_search_attributes.get(temporal.STATUS) != "waiting"
        ]
        if not running or asyncio.get_running_loop().time() > deadline:
            return running
        await asyncio.sleep(0.2)


def _waiting_task(client: Client, s: Settings) -> Callable[[], Awaitable[dict[str, str]]]:
    """A fresh task that waits for an expert in a region no node serves (``XpandoStatus`` =
    ``waiting``): something to cancel or terminate."""
    numbers = itertools.count(1)

    async def start() -> dict[str, str]:
        task_id = f"task-waiting-{next(numbers)}"
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(
                task_id=task_id,
                prompt="How do I retry an activity?",
                regions=["ap-southeast"],
                fresh=True,  # stored knowledge would answer it at once
                wait_for_experts_s=600,
            ),
            id=task_id,
            task_queue=s.core_task_queue,
            search_attributes=temporal.initial_task_attributes(None),
        )

        async def waiting() -> bool:
            return (
                await handle.query(TaskWorkflow.progress)
            ).stage == TaskStage.WAITING_FOR_EXPERTS

        await wait_for(waiting, timeout=15)
        await _listed(client, f'WorkflowId="{task_id}" AND XpandoStatus="waiting"')
        return {"TASK_ID": task_id}

    return start


def _sealed_task(
    stack: AsyncExitStack, s: Settings, sessions: SessionFactory
) -> Callable[[], Awaitable[dict[str, str]]]:
    """A task whose payloads are encrypted, and the API serving ``/codec`` with its key: the
    API (without a worker) on a loopback port, a key with ``codec:decode``, and a task started
    with the payload key on a queue no worker polls, then terminated (the cookbook's workers
    have no key, and would fail it). Sets ``TASK_ID``, ``CODEC_ENDPOINT`` and ``CODEC_KEY``."""
    sealed = s.model_copy(
        update={
            "payload_key": SecretStr(f"ops-1:{base64.b64encode(os.urandom(32)).decode()}"),
            "api_host": "127.0.0.1",
            "api_port": free_port(),
        }
    )
    numbers = itertools.count(1)
    codec: dict[str, str] = {}

    async def start() -> dict[str, str]:
        if not codec:
            url = stack.enter_context(served_api(sealed, core_worker=False))
            codec["CODEC_ENDPOINT"] = f"{url}/codec"
            codec["CODEC_KEY"] = await issue_key(sessions, Scope.CODEC_DECODE, name="ops-codec")
        task_id = f"task-sealed-{next(numbers)}"
        client = await temporal.connect(sealed)
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt="Which supplier do we pay twice a month?"),
            id=task_id,
            task_queue="xpando-sealed",
            search_attributes=temporal.initial_task_attributes(None),
        )
        await handle.terminate(reason="cookbook: a sealed task to read")
        return {"TASK_ID": task_id, **codec}

    return start
