"""Routing decisions: score the registered nodes for a prompt, skip the ones behind open
circuit breakers or with no polling worker, choose ``k`` diverse experts plus standbys, and
explain the decision. The score (formula, index) is :mod:`xpando.routing.index`; the breakers
are :mod:`xpando.breakers`; liveness comes from Temporal's worker heartbeats
(:class:`xpando.temporal.NodeLiveness`).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
from numpy.typing import NDArray
from temporalio.exceptions import ApplicationError

from xpando import breakers, metrics
from xpando.contracts import (
    RouteCandidate,
    RouteInput,
    RouteOutcome,
    RouteResult,
    RouteTerms,
    RoutingReport,
)
from xpando.db import SessionFactory, queries
from xpando.db.models import Breaker
from xpando.logs import get_logger
from xpando.routing.index import (
    RoutingConfig,
    RoutingIndex,
    Scored,
    explores,
    pick_standbys,
    select,
)
from xpando.temporal import NodeLiveness, WorkerBeat

log = get_logger(__name__)

HEALTHY = breakers.Gate(allowed=True)


class Router:
    """One process's routing decisions over its :class:`~xpando.routing.index.RoutingIndex`."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        index: RoutingIndex,
        breaker_book: breakers.BreakerBook,
        liveness: NodeLiveness,
    ) -> None:
        self._sessions = sessions
        self.index = index
        self._breakers = breaker_book
        self._liveness = liveness
        # asks this process gave each node since its last worker heartbeat: (beat time, count)
        self._given: dict[str, tuple[float, int]] = {}

    def _free(self, s: Scored) -> float:
        """A node's free activity slots: free at its last heartbeat, less the asks this router
        gave it since (heartbeats come every ``XPANDO_NODE_HEARTBEAT_S``)."""
        beat = self._liveness.beat(s.node.task_queue)
        at = _beat_time(beat)
        given_at, given = self._given.get(s.node.node_id, (at, 0))
        if given_at != at:
            given = 0
        if beat is not None and beat.used_slots + beat.free_slots > 0:
            free = float(beat.free_slots)
        else:
            free = float(s.node.capacity) * (1.0 - self._liveness.load(s.node.task_queue))
        return free - given

    def _asked(self, s: Scored) -> None:
        at = _beat_time(self._liveness.beat(s.node.task_queue))
        given_at, given = self._given.get(s.node.node_id, (at, 0))
        self._given[s.node.node_id] = (at, (given if given_at == at else 0) + 1)

    async def route(self, input: RouteInput) -> RouteResult:
        """Choose ``k`` live experts for the prompt, plus standbys (score, selection and
        exploration: ``xpando/routing/index.py``). Nodes behind an open circuit breaker and nodes
        whose worker is not polling are skipped (a half-open breaker's node may be chosen as its
        one probe); every chosen, standby and top skipped candidate is explained. Each decision
        is timed (``xpando_routing_decision_seconds``)."""
        with metrics.timed(metrics.ROUTING_DURATION) as timing:
            try:
                result = await self._decide(input)
            except ApplicationError as err:
                if err.type == "NoExpertsAvailable":
                    timing.outcome = "no_experts"
                raise
            timing.outcome = "routed"
            return result

    async def _decide(self, input: RouteInput) -> RouteResult:
        index = self.index
        cfg = index.config
        vector = await index.embed_prompt(input.prompt)
        await index.maybe_refresh()
        troubled = await self._breakers.troubled()
        now = datetime.now(UTC)
        want = input.k + input.standbys
        window = max(2 * want, 16)
        offset, considered = 0, 0
        usable: list[Scored] = []
        skipped: list[Scored] = []
        gates: dict[str, breakers.Gate] = {}
        while True:
            batch, considered = index.rank(
                vector,
                regions=input.regions,
                exclude=input.exclude,
                domain=input.domain,
                limit=window,
                offset=offset,
            )
            offset += len(batch)
            ok, bad = await self._check(batch, troubled, gates, now)
            usable.extend(ok)
            skipped.extend(bad)
            usable.sort(key=lambda s: (-s.score, s.node.node_id))
            # Health only lowers a score: once the want-th usable score beats the last ranked
            # one, nothing further down can overtake it.
            if not batch or offset >= considered:
                break
            if len(usable) >= want and usable[want - 1].score >= batch[-1].score:
                break
            window *= 2
        if not usable:
            blocked = [s.node.node_id for s in skipped if s.reason.startswith("circuit")]
            raise ApplicationError(
                f"no live expert node among {considered} that could serve the task"
                + (f" in regions {input.regions}" if input.regions else "")
                + (f" (excluding {len(input.exclude)} already tried)" if input.exclude else "")
                + (f"; circuit breakers are open for {', '.join(blocked[:10])}" if blocked else ""),
                type="NoExpertsAvailable",
                non_retryable=True,
            )
        chosen, standbys = await self._select(input, usable, gates, now)
        chosen, standbys = await self._explore(
            input, vector, chosen, standbys, troubled, gates, now
        )
        domain = input.domain
        if domain is None and chosen and chosen[0].fit > 0:
            domain = chosen[0].domain or (chosen[0].node.domains or (None,))[0]
        report = _report(cfg, considered, chosen, standbys, usable, skipped)
        log.info(
            "routed",
            task_id=input.task_id,
            chosen=[c.node.node_id for c in chosen],
            standbys=[c.node.node_id for c in standbys],
            considered=considered,
            breaker_blocked=[s.node.node_id for s in skipped if s.reason.startswith("circuit")][
                :20
            ],
        )
        return RouteResult(
            chosen=[_candidate(s, probe=bool(gates[s.node.node_id].probes)) for s in chosen],
            standbys=[_candidate(s) for s in standbys],
            considered=considered,
            domain=domain,
            report=report,
        )

    async def _check(
        self,
        batch: list[Scored],
        troubled: dict[str, Breaker],
        gates: dict[str, breakers.Gate],
        now: datetime,
    ) -> tuple[list[Scored], list[Scored]]:
        """Split ranked candidates into usable ones (with their health) and skipped ones (with
        the reason): breakers first (no I/O), then liveness of the rest, concurrently."""
        allowed: list[Scored] = []
        skipped: list[Scored] = []
        keys: dict[str, tuple[str, str]] = {}
        for s in batch:
            node_id = s.node.node_id
            keys[node_id] = (
                breakers.node_key(node_id),
                breakers.provider_key(s.node.provider, s.node.region),
            )
            if keys[node_id][0] not in troubled and keys[node_id][1] not in troubled:
                gates[node_id] = HEALTHY
                allowed.append(s)
                continue
            gate = breakers.gate(
                node_id=node_id,
                provider=s.node.provider,
                region=s.node.region,
                open_rows=troubled,
                now=now,
            )
            gates[node_id] = gate
            if gate.allowed:
                allowed.append(s)
            else:
                skipped.append(replace(s.with_health(0.0), reason="circuit breaker open"))
        live = await self._liveness.are_live([s.node.task_queue for s in allowed])
        usable: list[Scored] = []
        recent = now - self._breakers.policy.cooldown
        for s in allowed:
            if not live[s.node.task_queue]:
                reason = f"not live: no worker polls {s.node.task_queue}"
                skipped.append(replace(s.with_health(0.0), reason=reason))
                continue
            # Recent failures (closed breakers still counting, within one cool-down) halve the
            # health each; a half-open node is not penalised: its one probe must be able to win.
            failures = sum(
                row.consecutive_failures
                for key in keys[s.node.node_id]
                if (row := troubled.get(key)) is not None
                and row.state != "open"
                and (queries.as_utc(row.updated_at) or now) >= recent
            )
            health = 0.5**failures * (1.0 - self._liveness.load(s.node.task_queue) / 2)
            usable.append(s if health == 1.0 else s.with_health(round(health, 6)))
        return usable, skipped

    async def _select(
        self,
        input: RouteInput,
        live: list[Scored],
        gates: dict[str, breakers.Gate],
        now: datetime,
    ) -> tuple[list[Scored], list[Scored]]:
        """Select as usual; a chosen half-open node must win its breaker's probe (an atomic
        claim shared by every router) or be replaced. Standbys are healthy nodes only."""
        pool = list(live)
        lease = self._breakers.policy.probe_lease.total_seconds()
        claimed: dict[str, list[str]] = {}
        cfg = self.index.config
        while True:
            chosen, _ = select(
                pool,
                k=input.k,
                standbys=0,
                diversity=cfg.diversity,
                band=cfg.equal_band,
                rng=random.Random(f"equals:{input.task_id}:{len(input.exclude)}"),
                free=self._free,
            )
            lost: list[str] = []
            if not any(gates[s.node.node_id].probes for s in chosen):
                break
            async with self._sessions() as session:
                for s in chosen:
                    node_id = s.node.node_id
                    for key in gates[node_id].probes:
                        if key in claimed.get(node_id, []):
                            continue
                        won = await queries.claim_probe(
                            session=session, key=key, task_id=input.task_id, now=now, lease_s=lease
                        )
                        if not won:
                            lost.append(node_id)
                            break
                        claimed.setdefault(node_id, []).append(key)
            if not lost:
                break
            pool = [s for s in pool if s.node.node_id not in lost]
        final = {s.node.node_id for s in chosen}
        for s in chosen:
            self._asked(s)
        unused = [(n, k) for n, keys in claimed.items() if n not in final for k in keys]
        if unused:
            async with self._sessions() as session:
                for _, key in unused:
                    await queries.release_probe(session=session, key=key, task_id=input.task_id)
        healthy = [
            s for s in pool if s.node.node_id not in final and not gates[s.node.node_id].probes
        ]
        return chosen, pick_standbys(healthy, chosen, input.standbys)

    async def _explore(
        self,
        input: RouteInput,
        vector: NDArray[np.float32],
        chosen: list[Scored],
        standbys: list[Scored],
        troubled: dict[str, Breaker],
        gates: dict[str, breakers.Gate],
        now: datetime,
    ) -> tuple[list[Scored], list[Scored]]:
        """In a bounded share of tasks (k ≥ 2), give the weakest chosen slot to the best-fitting
        new node, so new nodes can earn a reputation next to established experts."""
        cfg = self.index.config
        if input.k < 2 or len(chosen) < 2 or not explores(input.task_id, cfg.exploration):
            return chosen, standbys
        weakest = min(range(len(chosen)), key=lambda i: chosen[i].score)
        if (
            chosen[weakest].contributions < cfg.new_below
            or gates[chosen[weakest].node.node_id].probes
        ):
            return chosen, standbys  # already a new node (or a probe) in that slot
        best_fit = max(c.declared for c in chosen)  # new nodes are judged by what they declare
        taken = [*input.exclude, *(c.node.node_id for c in chosen)]
        fresh, _ = self.index.rank(
            vector,
            regions=input.regions,
            exclude=taken,
            domain=input.domain,
            limit=8,
            new_only=True,
        )
        fitting = [s for s in fresh if s.declared >= cfg.exploration_min_fit * best_fit]
        ok, _ = await self._check(fitting, troubled, gates, now)
        ok = [s for s in ok if not gates[s.node.node_id].probes]
        if not ok:
            return chosen, standbys
        explorer = replace(ok[0], explore=True, reason="exploration")
        out = list(chosen)
        replaced = out[weakest]
        out[weakest] = explorer
        rest = [s for s in standbys if s.node.node_id != explorer.node.node_id]
        return out, [replaced, *rest][: max(len(standbys), 1)]


def _beat_time(beat: WorkerBeat | None) -> float:
    """When the node's load was last heard of; without heartbeats, 10-second windows (so the
    asks given are forgotten as a heartbeat would have them forgotten)."""
    return beat.at if beat is not None else float(int(time.time() // 10) * 10)


def _candidate(s: Scored, *, probe: bool = False) -> RouteCandidate:
    # model_construct: the values are the index's own (typed, in range); a decision builds
    # a few dozen of these and validating each would be a good share of its time.
    return RouteCandidate.model_construct(
        node_id=s.node.node_id,
        region=s.node.region,
        provider=s.node.provider,
        model=s.node.model,
        task_queue=s.node.task_queue,
        score=round(s.score, 9),
        fit=s.fit,
        domains=list(s.node.domains),
        probe=probe,
        reputation=s.reputation,
        health=s.health,
        explore=s.explore,
    )


def _terms(s: Scored, outcome: RouteOutcome, reason: str = "") -> RouteTerms:
    return RouteTerms.model_construct(
        node_id=s.node.node_id,
        region=s.node.region,
        provider=s.node.provider,
        domain=s.domain,
        fit=s.fit,
        declared_fit=s.declared,
        learned_fit=s.learned,
        evidence=s.evidence,
        reputation=s.reputation,
        contributions=s.contributions,
        health=s.health,
        price=s.price,
        diversity=round(s.diversity, 6),
        score=round(s.score * s.diversity, 9),
        outcome=outcome,
        reason=reason or s.reason,
    )


def _report(
    cfg: RoutingConfig,
    considered: int,
    chosen: list[Scored],
    standbys: list[Scored],
    usable: list[Scored],
    skipped: list[Scored],
) -> RoutingReport:
    """Chosen and standby experts, then the best skipped candidates (up to ``cfg.explain``)."""
    picked = {s.node.node_id for s in [*chosen, *standbys]}
    passed = [
        replace(s, reason="lower score after diversity")
        for s in usable
        if s.node.node_id not in picked
    ]
    others = sorted([*passed, *skipped], key=lambda s: (-s.base, s.node.node_id))
    return RoutingReport(
        formula=cfg.formula,
        considered=considered,
        candidates=[
            *(_terms(s, RouteOutcome.CHOSEN) for s in chosen),
            *(_terms(s, RouteOutcome.STANDBY) for s in standbys),
            *(_terms(s, RouteOutcome.SKIPPED) for s in others[: cfg.explain]),
        ],
    )
