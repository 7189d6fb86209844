"""Routing: which experts answer a task. An in-memory index over every registered node.

**Score** of node *i* for a prompt *e* (settings in brackets, defaults after ``=``)::

    declared_i  = clip(max over the node's domains d of cos(e, e(d)), 0, 1)
                  (1.0 for nodes serving the domain a task names)
    s_r         = clip((cos(e, topic_r) - 0.4) / (0.7 - 0.4), 0, 1)
                  for the 8 topic regions r nearest the prompt (0 for all others)
    evidence_i  = sum_r s_r * n_ir            n_ir: node i's scored contributions in region r
    learned_i   = sum_r s_r * qsum_ir / evidence_i    qsum_ir: the sum of their qualities
    w_i         = evidence_i / (evidence_i + kappa)   [XPANDO_ROUTING_PRIOR_WEIGHT = kappa = 2]
    fit_i       = declared_i + w_i * (learned_i - declared_i)
    prior_i     = max(reputation_i, XPANDO_REPUTATION_PRIOR = 0.5)
    topic_rep_i = prior_i + w_i * (learned_i - prior_i)
    price_i     = (1 + (price_in_i + price_out_i) / 2 / price_ref) ** price_weight
                  [XPANDO_ROUTING_PRICE_REF = 10 USD per 1M tokens, _PRICE_WEIGHT = 0.5]
    health_i    = 0.5 ** recent_failures_i * (1 - load_i / 2)
    score_i     = fit_i ** fit_power * max(topic_rep_i, floor) * health_i / price_i
                  [XPANDO_ROUTING_FIT_POWER = 4, XPANDO_ROUTING_REPUTATION_FLOOR = 0.05]

With no evidence near the prompt (a new node, a new topic) the score is the declared one; with
much, it is ``learned ** (fit_power + 1)``: what the node has shown near this prompt. ``kappa`` is
how many scored answers near the prompt weigh as much as the declaration.

**Learned fit** (:mod:`xpando.routing.learned`, tables ``routing_topics`` and ``node_topics``).
The record step counts each scored contribution (answered, or "no relevant passage"; once per
task + node, with its reputation event) in the *topic region* of the task's prompt: the nearest
region when its cosine is at least 0.8, else a new region whose vector is this prompt (at most
4,096 regions; then always the nearest). Regions are therefore fine-grained (a question and its
rewordings), and ``s_r`` falls to 0 at cosine 0.4, so a node's record informs prompts worded like
the ones it answered, not a whole domain — on the sentence embedder's scale two unrelated
prompts of one domain are around 0.15-0.3, a rewording 0.6-0.9. What this buys:

* a node scored low on a topic loses that topic and only that one: its per-topic reputation
  falls there; elsewhere it keeps its declared fit and ``prior_i``, which a low global
  reputation never lowers below the prior of a new node;
* a few lucky answers do not outweigh many: ``learned`` is a mean, ``w`` grows with the count;
* a new node still has its declared fit and its exploration share (below).

The constants 0.4, 0.7, 8, 0.8 and 4,096 are ``RoutingConfig`` fields (``learned_low``,
``learned_high``, ``topics_near``, ``topic_join``, ``topics_max``), chosen on the committed learning
set (``tests/data/routing_learning.jsonl``, ``python -m bench.learning``).

``recent_failures_i``: consecutive failures counted by the node's circuit breaker and by its
provider's in its region, while still closed and within one breaker cool-down of the last one
(an open breaker, or a node whose worker is not polling, is skipped altogether; a half-open
node is not penalised, so that its breaker's one probe can win). ``load_i``: the share of the
node's activity slots in use at its last worker heartbeat. ``e`` is the sentence embedder
(``XPANDO_EMBEDDER``, all-MiniLM-L6-v2 run locally by default); a domain is embedded as
``"<name>: <description>. Topics: <up to 40 keywords>"``, once per distinct text for the whole
network (``domain_vectors``, at registration), never per decision. ``fit_power`` makes fit
dominate: a node that fits half as well needs 16 times the reputation-and-price advantage to win.
A score is also multiplied by the diversity factor of the selection step below.

**Selection**: greedily, ``k`` times, the candidate with the highest
``score * diversity ** (chosen of its provider + chosen of its region)``
[XPANDO_ROUTING_DIVERSITY = 0.8], so the experts are not all of one provider or one region when
comparable alternatives exist. Equals share the work: when several candidates are within
``XPANDO_ROUTING_EQUAL_BAND = 0.15`` of that best value, two of them are drawn (seeded by the
task id) and the one with more free capacity is taken — free slots at its last worker heartbeat,
less the asks this process gave it since (power of two choices); a clearly better node is alone
in its band. Then the standbys (``STANDBYS`` in ``workflows/task.py``): the next best, each
preferring a provider not used yet, for failover and hedging.

**Exploration**: in a share of tasks with ``k ≥ 2`` [XPANDO_ROUTING_EXPLORATION = 0.1], decided by
the task id (so a retried route decides the same), the weakest chosen slot goes to the best *new*
node — fewer than ``XPANDO_REPUTATION_NEW_BELOW = 5`` scored contributions — whose declared fit
is at least ``XPANDO_ROUTING_EXPLORATION_MIN_FIT = 0.8`` of the best chosen declared fit. A new
node therefore gets at most that share of tasks beyond what its score earns, and only next to
established experts.

**Global reputation** (``xpando/db/nodes.py``): each scored contribution moves it toward the
aggregation's quality: ``r ← r + a·(q - r)``, ``a = max(XPANDO_REPUTATION_ALPHA = 0.1, 1/(n + 2))``
from ``XPANDO_REPUTATION_PRIOR = 0.5`` — the mean of the first few, then a moving average. It
enters the score only through ``prior_i`` (and the payouts' reward formula).

**Index**: node rows, their domains' vectors, the numeric terms, the topic regions and the
node-topic stats live in NumPy arrays refreshed incrementally from the database (rows whose
``changed_at`` / ``updated_at`` moved, with a short overlap for writers' clocks), like the
knowledge index; every core worker reads the same rows, and a restarted one rebuilds them. A
decision is one matrix-vector product over the distinct domain texts and one over the topic
regions, a gather + max per node, a ``bincount`` over the node-topic entries of the few nearest
regions, a vector score, ``argpartition`` for the top candidates, and then per-candidate checks
(liveness, breakers) on those few only (``python -m bench.routing`` measures it at 10,000 and
100,000 nodes, with learned state for every node).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.db import SessionFactory
from xpando.db import nodes as node_queries
from xpando.db import topics as topic_queries
from xpando.db.models import Node
from xpando.db.queries import as_utc
from xpando.embedding import Embedder
from xpando.logs import get_logger
from xpando.routing.learned import LearnedFit, topic_id_for
from xpando.settings import Settings

log = get_logger(__name__)

FORMULA = (
    "score = fit ** {fit_power:g} * max(reputation, {floor:g}) * health * diversity / price; "
    "fit = declared + w * (learned - declared), reputation = max(global, {prior:g}) + "
    "w * (learned - max(global, {prior:g})), w = evidence / (evidence + {kappa:g}); "
    "declared = max cosine(prompt, domain); learned = mean quality of the node's answers near "
    "the prompt; price = (1 + USD/Mtok / {price_ref:g}) ** {price_weight:g}"
)
DOMAIN_KEYWORDS = 40
REFRESH_PAGE = 5000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
IDLE_REFRESHES = 4  # refresh periods without a refresh after which a decision refreshes in line


@dataclass(frozen=True)
class RoutingConfig:
    fit_power: float = 4.0
    price_ref: float = 10.0
    price_weight: float = 0.5
    reputation_floor: float = 0.05
    diversity: float = 0.8
    exploration: float = 0.1
    exploration_min_fit: float = 0.8
    explain: int = 10
    reputation_prior: float = 0.5
    new_below: int = 5
    prior_weight: float = 2.0
    equal_band: float = 0.15
    learned_low: float = 0.4
    learned_high: float = 0.7
    topics_near: int = 8
    topic_join: float = 0.8
    topics_max: int = 4096

    @classmethod
    def from_settings(cls, settings: Settings) -> RoutingConfig:
        return cls(
            fit_power=settings.routing_fit_power,
            price_ref=settings.routing_price_ref,
            price_weight=settings.routing_price_weight,
            reputation_floor=settings.routing_reputation_floor,
            diversity=settings.routing_diversity,
            exploration=settings.routing_exploration,
            exploration_min_fit=settings.routing_exploration_min_fit,
            explain=settings.routing_explain,
            reputation_prior=settings.reputation_prior,
            new_below=settings.reputation_new_below,
            prior_weight=settings.routing_prior_weight,
            equal_band=settings.routing_equal_band,
        )

    @property
    def formula(self) -> str:
        return FORMULA.format(
            fit_power=self.fit_power,
            floor=self.reputation_floor,
            price_ref=self.price_ref,
            price_weight=self.price_weight,
            prior=self.reputation_prior,
            kappa=self.prior_weight,
        )

    def price_term(self, price_in: float | None, price_out: float | None) -> float:
        usd = ((price_in or 0.0) + (price_out or 0.0)) / 2
        return float((1.0 + usd / self.price_ref) ** self.price_weight)


# --- domain texts and their embeddings -----------------------------------------------------------


def domain_text(domain: Mapping[str, Any]) -> str:
    """What is embedded for one of a node's domains."""
    name = str(domain.get("name", "")).strip()
    description = str(domain.get("description", "") or "").strip()
    keywords = domain.get("keywords") or []
    text = f"{name}: {description.rstrip('. ')}" if description else name
    if isinstance(keywords, list) and keywords:
        text += ". Topics: " + ", ".join(str(k) for k in keywords[:DOMAIN_KEYWORDS])
    return text


def vector_key(embedder: str, text: str) -> str:
    return hashlib.sha256(f"{embedder}\n{text}".encode()).hexdigest()


# Prompts embedded together at most (one forward pass); a batch of 8 costs a local MiniLM about
# 4.7 ms a prompt against 16 ms one at a time.
EMBED_BATCH = 16


class CachedEmbedder:
    """An embedder that remembers the last texts it embedded (thread-safe), so the prompt that
    ``plan`` embedded for knowledge reuse is not embedded again by ``route``.

    :meth:`embed_one` batches: while one forward pass runs (in a thread), the prompts of other
    tasks wait and go together into the next one. One task alone waits for nothing; fifty in
    flight share passes, and the model does far more per prompt in a batch."""

    def __init__(self, inner: Embedder, *, size: int = 4096) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self._size = size
        self._cache: OrderedDict[str, NDArray[np.float32]] = OrderedDict()
        self._lock = threading.Lock()
        # per event loop: texts waiting for the next pass, and whether a pass is running
        self._waiting: dict[
            asyncio.AbstractEventLoop, list[tuple[str, asyncio.Future[NDArray[np.float32]]]]
        ] = {}
        self._passing: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}

    async def embed_one(self, text: str) -> NDArray[np.float32]:
        """One text's vector, embedded in a batch with whatever other tasks ask meanwhile."""
        vec = self.cached(text)
        if vec is not None:
            return vec
        loop = asyncio.get_running_loop()
        future: asyncio.Future[NDArray[np.float32]] = loop.create_future()
        self._waiting.setdefault(loop, []).append((text, future))
        if loop not in self._passing:
            self._passing[loop] = loop.create_task(self._passes(loop))
        return await future

    async def _passes(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while waiting := self._waiting.get(loop):
                batch, self._waiting[loop] = waiting[:EMBED_BATCH], waiting[EMBED_BATCH:]
                texts = list(dict.fromkeys(text for text, _ in batch))
                try:
                    vectors = await asyncio.to_thread(self.embed, texts)
                except Exception as err:  # every waiter of this pass gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                rows = {text: vectors[i] for i, text in enumerate(texts)}
                for text, future in batch:
                    if not future.done():
                        future.set_result(rows[text])
        finally:
            self._passing.pop(loop, None)
            if not self._waiting.get(loop):
                self._waiting.pop(loop, None)

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.inner!r})"

    def cached(self, text: str) -> NDArray[np.float32] | None:
        with self._lock:
            vec = self._cache.get(text)
            if vec is not None:
                self._cache.move_to_end(text)
            return vec

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        out = np.zeros((len(texts), self.dim), np.float32)
        missing: list[int] = []
        for i, text in enumerate(texts):
            vec = self.cached(text)
            if vec is None:
                missing.append(i)
            else:
                out[i] = vec
        if missing:
            fresh = self.inner.embed([texts[i] for i in missing])
            with self._lock:
                for row, i in enumerate(missing):
                    out[i] = fresh[row]
                    self._cache[texts[i]] = fresh[row].copy()
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
        return out


_CACHED: dict[int, CachedEmbedder] = {}
_CACHED_LOCK = threading.Lock()


def cached_embedder(inner: Embedder) -> CachedEmbedder:
    """The process-wide :class:`CachedEmbedder` around ``inner`` (itself process-wide), so the
    knowledge index, the routing index and the registry of one process share one cache."""
    if isinstance(inner, CachedEmbedder):
        return inner
    with _CACHED_LOCK:
        cached = _CACHED.get(id(inner))
        if cached is None or cached.inner is not inner:
            cached = _CACHED[id(inner)] = CachedEmbedder(inner)
        return cached


async def ensure_domain_vectors(
    sessions: SessionFactory,
    embedder: Embedder,
    texts: Iterable[str],
    *,
    known: Mapping[str, Any] | None = None,
) -> dict[str, NDArray[np.float32]]:
    """Vectors of ``texts`` by their keys: from ``known``, else the database, else embedded now
    (in a thread) and stored for every other process."""
    wanted = {vector_key(embedder.name, t): t for t in texts}
    out: dict[str, NDArray[np.float32]] = {}
    todo = [k for k in wanted if known is None or k not in known]
    if not todo:
        return out
    async with sessions() as session:
        stored = await node_queries.domain_vectors(session=session, keys=todo)
    for key, raw in stored.items():
        vec = np.frombuffer(raw, dtype=np.float32)
        if vec.shape == (embedder.dim,):
            out[key] = vec
    missing = [k for k in todo if k not in out]
    if missing:
        embedded = await asyncio.to_thread(embedder.embed, [wanted[k] for k in missing])
        fresh = {k: embedded[i] for i, k in enumerate(missing)}
        out.update(fresh)
        async with sessions() as session:
            await node_queries.store_domain_vectors(
                session=session,
                embedder=embedder.name,
                vectors={k: v.astype(np.float32).tobytes() for k, v in fresh.items()},
                now=datetime.now(UTC),
            )
    return out


# --- what routing works with ---------------------------------------------------------------------


@dataclass(frozen=True)
class Terms:
    """Score terms for one prompt: dense over node slots for the declared side and the score,
    sparse (``slots``) for the nodes with evidence near the prompt."""

    declared: NDArray[Any]
    prior: NDArray[Any]
    score: NDArray[np.float64]
    slots: NDArray[np.int64]
    evidence: NDArray[np.float64]
    learned: NDArray[np.float64]
    prior_weight: float

    def of(self, slot: int) -> tuple[float, float | None, float, float, float]:
        """(declared, learned or None, evidence, fit, reputation) of one node slot."""
        declared, prior = float(self.declared[slot]), float(self.prior[slot])
        at = np.searchsorted(self.slots, slot)
        if at < len(self.slots) and self.slots[at] == slot:
            evidence, learned = float(self.evidence[at]), float(self.learned[at])
            w = evidence / (evidence + self.prior_weight)
            return (
                declared,
                learned,
                evidence,
                declared + w * (learned - declared),
                prior + w * (learned - prior),
            )
        return declared, None, 0.0, declared, prior


@dataclass(frozen=True)
class NodeCard:
    node_id: str
    region: str
    provider: str
    model: str
    task_queue: str
    domains: tuple[str, ...]
    capacity: int = 4


@dataclass(frozen=True)
class Scored:
    """A candidate and its score terms (``score`` includes health and diversity once known)."""

    node: NodeCard
    fit: float
    score: float
    reputation: float = 0.5
    contributions: int = 0
    health: float = 1.0
    price: float = 1.0
    domain: str | None = None
    diversity: float = 1.0
    explore: bool = False
    reason: str = ""
    base: float = 0.0  # the score before health (what ranking sorted by)
    declared: float = 0.0  # fit from the node's own domains (the prior)
    learned: float | None = None  # mean quality of its scored answers near the prompt
    evidence: float = 0.0  # similarity-weighted count of those answers

    def with_health(self, health: float) -> Scored:
        """The candidate once its health is known (ranking assumed 1)."""
        return replace(self, health=health, score=self.score * health)


def select(
    ranked: Sequence[Scored],
    *,
    k: int,
    standbys: int,
    diversity: float = 0.8,
    band: float = 0.0,
    rng: random.Random | None = None,
    free: Callable[[Scored], float] | None = None,
) -> tuple[list[Scored], list[Scored]]:
    """Pick ``k`` experts, greedily, each time the best ``score * diversity ** repeats`` (repeats:
    chosen experts of the same provider plus those of the same region); then ``standbys``.

    Equals share the work: when several candidates are within ``band`` of the best (adjusted
    score at least ``(1 - band) * best``), two of them are drawn with ``rng`` and the one with
    more ``free`` capacity is taken (equal capacity: the higher score, then the first drawn).
    A clearly better candidate is alone in its band and is always taken."""
    remaining = list(ranked)
    chosen: list[Scored] = []
    providers: dict[str, int] = {}
    regions: dict[str, int] = {}

    def repeats(s: Scored) -> int:
        return providers.get(s.node.provider, 0) + regions.get(s.node.region, 0)

    def adjusted(i: int) -> tuple[float, int, int]:
        return (
            remaining[i].score * diversity ** repeats(remaining[i]),
            -repeats(remaining[i]),  # equal scores: the new provider/region first
            -i,
        )

    while remaining and len(chosen) < k:
        best = max(range(len(remaining)), key=adjusted)
        top = adjusted(best)[0]
        if band > 0 and rng is not None and top > 0:
            equals = [i for i in range(len(remaining)) if adjusted(i)[0] >= (1 - band) * top]
            if len(equals) > 1:
                a, b = rng.sample(equals, 2)
                room = free or (lambda s: 0.0)
                best = max((a, b), key=lambda i: (room(remaining[i]), adjusted(i)[0], i == a))
        pick = remaining.pop(best)
        factor = diversity ** repeats(pick)
        providers[pick.node.provider] = providers.get(pick.node.provider, 0) + 1
        regions[pick.node.region] = regions.get(pick.node.region, 0) + 1
        chosen.append(replace(pick, diversity=factor))
    return chosen, pick_standbys(remaining, chosen, standbys)


def pick_standbys(remaining: Sequence[Scored], chosen: Sequence[Scored], n: int) -> list[Scored]:
    """The ``n`` best of ``remaining`` in score order, each preferring a provider not yet used
    by ``chosen`` or an earlier standby (when every provider is used, simply the next best)."""
    pool = sorted(remaining, key=lambda s: (-s.score, s.node.node_id))
    used = {s.node.provider for s in chosen}
    out: list[Scored] = []
    while pool and len(out) < n:
        index = next((i for i, s in enumerate(pool) if s.node.provider not in used), 0)
        pick = pool.pop(index)
        used.add(pick.node.provider)
        out.append(pick)
    return out


def explores(task_id: str, share: float) -> bool:
    """Whether this task gives a slot to exploration (stable for a task id)."""
    if share <= 0:
        return False
    seed = int.from_bytes(hashlib.sha256(f"explore:{task_id}".encode()).digest()[:8], "big")
    return random.Random(seed).random() < share


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background refresh that failed (the database is away): the next decision tries again."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("routing index refresh failed", error=repr(task.exception()))


# --- the index -----------------------------------------------------------------------------------


class RoutingIndex:
    """Every registered node's routing terms in NumPy arrays, refreshed from the database."""

    def __init__(
        self,
        sessions: SessionFactory,
        embedder: Embedder,
        *,
        config: RoutingConfig | None = None,
        refresh_every_s: float = 0.5,
        overlap_s: float = 2.0,
    ) -> None:
        self._sessions = sessions
        self._embedder: Embedder = embedder
        self._prompt_cache = embedder if isinstance(embedder, CachedEmbedder) else None
        self.config = config or RoutingConfig()
        self._refresh_every_s = refresh_every_s
        self._overlap = timedelta(seconds=overlap_s)
        self._lock = asyncio.Lock()
        self._last_refresh = -math.inf
        self._watermark: datetime | None = None  # (changed_at, node_id) of the last row seen
        self._mark_id = ""
        self._refreshed_at: datetime | None = None  # wall clock when the last refresh began
        self._background: asyncio.Task[None] | None = None
        self._loaded = False
        cap = 1024
        self._ids: list[str] = []
        self._slot: dict[str, int] = {}
        self._cards: list[NodeCard | None] = []
        self._active = np.zeros(cap, bool)
        self._region = np.zeros(cap, np.int32)
        self._provider = np.zeros(cap, np.int32)
        self._rep = np.zeros(cap, np.float32)
        self._rep_n = np.zeros(cap, np.int32)
        self._price = np.ones(cap, np.float32)
        self._doms = np.full((cap, 1), -1, np.int32)
        self._codes: dict[str, dict[str, int]] = {"region": {}, "provider": {}, "domain": {}}
        # distinct domain texts
        self._keys: dict[tuple[str, str, tuple[str, ...]], str] = {}
        self._ukey: dict[str, int] = {}
        self._uvec = np.zeros((256, embedder.dim), np.float32)
        self._uname: list[str] = []
        self._uname_code = np.zeros(256, np.int32)
        cfg = self.config
        self.learned = LearnedFit(
            embedder.dim,
            low=cfg.learned_low,
            high=cfg.learned_high,
            near=cfg.topics_near,
            join=cfg.topic_join,
            topics_max=cfg.topics_max,
        )
        # (created_at, topic_id) and (updated_at, (node_id, topic_id)) of the last rows seen
        self._topic_mark: tuple[datetime, str] = (EPOCH, "")
        self._stats_mark: tuple[datetime, tuple[str, str]] = (EPOCH, ("", ""))

    # --- size and memory ---------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._active[: len(self._ids)].sum())

    @property
    def distinct_domains(self) -> int:
        return len(self._uname)

    def nbytes(self) -> int:
        """Bytes held by the arrays (the Python objects per node come on top)."""
        arrays = (
            self._active,
            self._region,
            self._provider,
            self._rep,
            self._rep_n,
            self._price,
            self._doms,
            self._uvec,
            self._uname_code,
        )
        return int(sum(a.nbytes for a in arrays)) + self.learned.nbytes()

    # --- prompt embeddings ---------------------------------------------------------------------

    async def embed_prompt(self, prompt: str) -> NDArray[np.float32]:
        if self._prompt_cache is not None:
            hit = self._prompt_cache.cached(prompt)
            if hit is not None:
                return hit
        vecs = await asyncio.to_thread(self._embedder.embed, [prompt])
        vec: NDArray[np.float32] = vecs[0]
        return vec

    # --- refresh -------------------------------------------------------------------------------

    async def maybe_refresh(self) -> None:
        """What a routing decision calls: the first load in line, later refreshes in the
        background (the decision goes on with what the index holds, at most one refresh
        period old), so no decision of a busy core worker waits for the database. After an
        idle spell (no refresh for ``IDLE_REFRESHES`` periods) the decision refreshes in line:
        what it holds could be that old, and the nodes' learned state moved meanwhile."""
        if not self._loaded:
            await self.refresh()
            return
        age = time.monotonic() - self._last_refresh
        if age < self._refresh_every_s:
            return
        if age > IDLE_REFRESHES * self._refresh_every_s:
            await self.refresh()
            return
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self.refresh())
            self._background.add_done_callback(_log_failure)

    async def refresh(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_refresh < self._refresh_every_s:
            return
        async with self._lock:
            if not force and time.monotonic() - self._last_refresh < self._refresh_every_s:
                return
            started = datetime.now(UTC)
            if not self._loaded:
                after = ""
                while True:
                    async with self._sessions() as session:
                        rows = await node_queries.nodes_page(
                            session=session, after_id=after, limit=REFRESH_PAGE
                        )
                    await self._load(rows)
                    if len(rows) < REFRESH_PAGE:
                        break
                    after = rows[-1].node_id
                await self._refresh_learned(started)
                self._loaded = True
            else:
                # Rows changed after the last one seen; and, again, rows stamped shortly before
                # the previous refresh began: a writer whose transaction committed late (or
                # whose clock lags a little) may have stamped a time before the watermark.
                since, after = self._watermark or datetime(1970, 1, 1, tzinfo=UTC), self._mark_id
                lower = (self._refreshed_at or started) - self._overlap
                if lower < since:
                    since, after = lower, ""
                while True:
                    async with self._sessions() as session:
                        rows = await node_queries.nodes_changed_since(
                            session=session, since=since, after_id=after, limit=REFRESH_PAGE
                        )
                    await self._load(rows)
                    if len(rows) < REFRESH_PAGE:
                        break
                    since, after = as_utc(rows[-1].changed_at) or since, rows[-1].node_id
            await self._refresh_learned(started)
            self._refreshed_at = started
            self._last_refresh = time.monotonic()

    async def _refresh_learned(self, started: datetime) -> None:
        """Topics and node-topic stats written since the last look (again those stamped shortly
        before the previous refresh began, as for node rows). Rows hold absolute values, so
        reading one twice changes nothing."""
        lower = (self._refreshed_at or started) - self._overlap if self._loaded else EPOCH
        since, after = self._topic_mark
        if lower < since:
            since, after = lower, ""
        while True:
            async with self._sessions() as session:
                topics = await topic_queries.topics_since(
                    session=session, since=since, after_id=after, limit=REFRESH_PAGE
                )
            for t in topics:
                if t.embedder == self._embedder.name:
                    self.learned.add_topic(t.topic_id, np.frombuffer(t.vector, dtype=np.float32))
                since, after = as_utc(t.created_at) or since, t.topic_id
            if topics:
                self._topic_mark = max(self._topic_mark, (since, after))
            if len(topics) < REFRESH_PAGE:
                break
        stamp, key = self._stats_mark
        if lower < stamp:
            stamp, key = lower, ("", "")
        while True:
            async with self._sessions() as session:
                stats = await topic_queries.node_topics_since(
                    session=session, since=stamp, after=key, limit=REFRESH_PAGE
                )
            for node_id, topic_id, n, quality_sum, updated_at in stats:
                self.learned.put(self._slot_of(node_id), topic_id, n, quality_sum)
                stamp, key = as_utc(updated_at) or stamp, (node_id, topic_id)
            if stats:
                self._stats_mark = max(self._stats_mark, (stamp, key))
            if len(stats) < REFRESH_PAGE:
                break

    # --- the record step's side: learning from scored contributions ----------------------------

    async def learn(
        self,
        session: AsyncSession,
        *,
        task_id: str,
        vector: NDArray[np.float32],
        qualities: Sequence[tuple[str, float]],
        now: datetime,
    ) -> str | None:
        """Count scored contributions (node id, quality) in the topic region of the task's prompt
        (opening the region if none is near), in the caller's transaction. Call it once per
        task + node (the record step does: with the reputation events that are new). Returns the
        region's id."""
        if not qualities:
            return None
        topic_id, opens = self.learned.assign(vector, task_id)
        # A retried record finds the region its first attempt opened in memory: insert it again
        # (nothing when it is there), in case that attempt's transaction rolled back.
        if opens or topic_id == topic_id_for(task_id):
            await topic_queries.add_topic(
                session=session,
                topic_id=topic_id,
                embedder=self._embedder.name,
                vector=vector.astype(np.float32).tobytes(),
                now=now,
            )
            # this process's next assignments join it at once (others at their next refresh)
            self.learned.add_topic(topic_id, vector.astype(np.float32))
        await topic_queries.credit_topic(
            session=session, topic_id=topic_id, qualities=qualities, now=now
        )
        return topic_id

    async def _load(self, rows: list[Node]) -> None:
        if not rows:
            return
        names = {domain_text(d): str(d.get("name", "")) for r in rows for d in (r.domains or [])}
        vectors = await ensure_domain_vectors(
            self._sessions, self._embedder, names, known=self._ukey
        )
        for text, name in names.items():
            key = vector_key(self._embedder.name, text)
            if key not in self._ukey:
                self._add_domain(key, name, vectors[key])
        for r in rows:
            self._put(r)
            stamp = as_utc(r.changed_at)
            if stamp is not None and (
                self._watermark is None or (stamp, r.node_id) > (self._watermark, self._mark_id)
            ):
                self._watermark, self._mark_id = stamp, r.node_id

    def _key_of(self, domain: Mapping[str, Any]) -> str:
        """The vector key of a domain (memoised: most nodes share a few domain texts)."""
        keywords = domain.get("keywords") or []
        memo = (
            str(domain.get("name", "")),
            str(domain.get("description", "") or ""),
            tuple(str(k) for k in keywords[:DOMAIN_KEYWORDS]) if isinstance(keywords, list) else (),
        )
        key = self._keys.get(memo)
        if key is None:
            key = self._keys[memo] = vector_key(self._embedder.name, domain_text(domain))
        return key

    def _code(self, kind: str, value: str) -> int:
        codes = self._codes[kind]
        if value not in codes:
            codes[value] = len(codes)
        return codes[value]

    def _add_domain(self, key: str, name: str, vector: NDArray[np.float32]) -> None:
        uid = len(self._uname)
        if uid >= len(self._uvec):
            grow = len(self._uvec) * 2
            self._uvec = np.resize(self._uvec, (grow, self._uvec.shape[1]))
            self._uname_code = np.resize(self._uname_code, grow)
        self._uvec[uid] = vector
        self._uname.append(name)
        self._uname_code[uid] = self._code("domain", name)
        self._ukey[key] = uid

    def _slot_of(self, node_id: str) -> int:
        slot = self._slot.get(node_id)
        if slot is not None:
            return slot
        slot = len(self._ids)
        if slot >= len(self._active):
            grow = len(self._active) * 2
            self._active = np.resize(self._active, grow)
            self._active[slot:] = False
            self._region = np.resize(self._region, grow)
            self._provider = np.resize(self._provider, grow)
            self._rep = np.resize(self._rep, grow)
            self._rep_n = np.resize(self._rep_n, grow)
            self._price = np.resize(self._price, grow)
            doms = np.full((grow, self._doms.shape[1]), -1, np.int32)
            doms[: len(self._doms)] = self._doms
            self._doms = doms
        self._ids.append(node_id)
        self._cards.append(None)
        self._slot[node_id] = slot
        return slot

    def _put(self, row: Node) -> None:
        slot = self._slot_of(row.node_id)
        domains = list(row.domains or [])
        self._cards[slot] = NodeCard(
            node_id=row.node_id,
            region=row.region,
            provider=row.provider,
            model=row.model,
            task_queue=row.task_queue,
            domains=tuple(str(d.get("name", "")) for d in domains),
            capacity=row.capacity,
        )
        self._active[slot] = (row.status or "active") == "active"
        self._region[slot] = self._code("region", row.region)
        self._provider[slot] = self._code("provider", row.provider)
        self._rep[slot] = (
            row.reputation if row.reputation is not None else self.config.reputation_prior
        )
        self._rep_n[slot] = row.reputation_n or 0
        self._price[slot] = self.config.price_term(
            row.price_input_per_mtok, row.price_output_per_mtok
        )
        uids = [self._ukey[self._key_of(d)] for d in domains]
        if len(uids) > self._doms.shape[1]:
            wider = np.full((len(self._doms), len(uids)), -1, np.int32)
            wider[:, : self._doms.shape[1]] = self._doms
            self._doms = wider
        self._doms[slot] = -1
        self._doms[slot, : len(uids)] = uids

    # --- ranking -------------------------------------------------------------------------------

    def card(self, node_id: str) -> NodeCard | None:
        slot = self._slot.get(node_id)
        return self._cards[slot] if slot is not None else None

    def eligible(self, *, regions: Sequence[str] = (), exclude: Iterable[str] = ()) -> NDArray[Any]:
        n = len(self._ids)
        mask = self._active[:n].copy()
        if regions:
            codes = [self._codes["region"][r] for r in regions if r in self._codes["region"]]
            mask &= np.isin(self._region[:n], codes)
        for node_id in exclude:
            slot = self._slot.get(node_id)
            if slot is not None:
                mask[slot] = False
        return mask

    def fits(self, vector: NDArray[np.float32], *, domain: str | None = None) -> NDArray[Any]:
        """Each node's fit: the best cosine between the prompt and one of its domains."""
        n, u = len(self._ids), len(self._uname)
        sims = np.zeros(u + 1, np.float32)  # the last entry answers the -1 padding
        if u:
            sims[:u] = self._uvec[:u] @ vector.astype(np.float32, copy=False)
        fit = sims[self._doms[:n]].max(axis=1) if n else np.zeros(0, np.float32)
        np.clip(fit, 0.0, 1.0, out=fit)
        if domain is not None and domain in self._codes["domain"]:
            code = self._codes["domain"][domain]
            named = np.zeros(u + 1, bool)
            named[:u] = self._uname_code[:u] == code
            fit[named[self._doms[:n]].any(axis=1)] = 1.0
        return fit

    def terms(self, vector: NDArray[np.float32], *, domain: str | None = None) -> Terms:
        """Every node's score for the prompt: the declared score for all, then the blend with
        the learned fit for the few nodes with evidence near the prompt (formula at the top of
        this module)."""
        cfg = self.config
        declared = self.fits(vector, domain=domain)
        n = len(declared)
        prior = np.maximum(self._rep[:n], cfg.reputation_prior)
        score = np.asarray(
            declared**cfg.fit_power * np.maximum(prior, cfg.reputation_floor) / self._price[:n],
            dtype=np.float64,
        )
        evidence = self.learned.evidence(vector)
        slots = evidence.slots
        learned = evidence.quality / evidence.n
        weight = evidence.n / (evidence.n + cfg.prior_weight)
        fit = declared[slots] + weight * (learned - declared[slots])
        reputation = prior[slots] + weight * (learned - prior[slots])
        score[slots] = (
            fit**cfg.fit_power * np.maximum(reputation, cfg.reputation_floor) / self._price[slots]
        )
        return Terms(
            declared=declared,
            prior=prior,
            score=score,
            slots=slots,
            evidence=evidence.n,
            learned=learned,
            prior_weight=cfg.prior_weight,
        )

    def rank(
        self,
        vector: NDArray[np.float32],
        *,
        regions: Sequence[str] = (),
        exclude: Iterable[str] = (),
        domain: str | None = None,
        limit: int = 32,
        offset: int = 0,
        new_only: bool = False,
    ) -> tuple[list[Scored], int]:
        """The best ``limit`` eligible nodes after the first ``offset``, by score before health,
        and how many nodes were eligible."""
        mask = self.eligible(regions=regions, exclude=exclude)
        if new_only:
            mask &= self._rep_n[: len(mask)] < self.config.new_below
        considered = int(mask.sum())
        if considered == 0 or offset >= considered:
            return [], considered
        terms = self.terms(vector, domain=domain)
        score = np.where(mask, terms.score, -np.inf)
        want = min(offset + limit, considered)
        if want < len(score):
            top = np.argpartition(-score, want - 1)[:want]
        else:
            top = np.arange(len(score))
        top = top[np.lexsort((top, -score[top]))][offset:want]
        return [self._scored(int(i), terms, score, vector) for i in top], considered

    def _scored(
        self, slot: int, terms: Terms, score: NDArray[Any], vector: NDArray[np.float32]
    ) -> Scored:
        card = self._cards[slot]
        assert card is not None
        uids = [int(u) for u in self._doms[slot] if u >= 0]
        best = None
        if uids:
            sims = self._uvec[uids] @ vector
            best = self._uname[uids[int(np.argmax(sims))]]
        declared, learned, evidence, fit, reputation = terms.of(slot)
        return Scored(
            node=card,
            fit=round(fit, 6),
            score=float(score[slot]),
            base=float(score[slot]),
            reputation=round(reputation, 6),
            contributions=int(self._rep_n[slot]),
            price=round(float(self._price[slot]), 6),
            domain=best,
            declared=round(declared, 6),
            learned=round(learned, 6) if learned is not None else None,
            evidence=round(evidence, 6),
        )
