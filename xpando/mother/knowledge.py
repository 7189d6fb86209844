"""The Mother Core's knowledge: an in-memory vector index over the database, consolidation, reuse.

* **Storage**: ``knowledge`` rows (SQLite or PostgreSQL), each with its question's embedding.
* **Index**: every process that searches (the core worker's ``plan``, the API) keeps the active
  items' embeddings in one NumPy matrix, refreshed incrementally from the database by
  ``updated_at``. A search is one matrix-vector product: brute force, exact, and fast enough at
  100,000 items (see ``bench/knowledge.py``).
* **Effective confidence** decays from the last confirmation:
  ``confidence * 0.5 ** (age_days / half_life_days)``; items below ``stale_below`` are marked
  stale at the next consolidation and no longer reused.
* **Consolidation** (one ``KnowledgeWorkflow`` per domain, so one writer per domain): a new item
  whose question is within ``merge_similarity`` of an active item *and* whose answer agrees with
  it is merged — the active item keeps both provenances, counts one more independent task in
  ``support`` and its confidence rises: ``c ← 1 - (1 - c) * (1 - c_new / 2)`` (capped at 0.99).
  The merged item's row stays (status ``merged``) for audit.
* **Reuse**: a task whose prompt is within ``reuse_similarity`` of an item with effective
  confidence ≥ ``reuse_min_confidence`` is answered from it, at no provider cost, unless the
  prompt and the question disagree on a contrastive term (see :func:`contrast`).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from numpy.typing import NDArray
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.contracts import (
    ConsolidateInput,
    ConsolidateResult,
    KnowledgeItemInput,
    KnowledgeReuse,
    Provenance,
)
from xpando.db import SessionFactory, queries
from xpando.db.errors import classify
from xpando.db.models import Knowledge
from xpando.embedding import Embedder
from xpando.logs import get_logger
from xpando.mother import aggregate
from xpando.retrieval import GENERIC_TERMS, stem, tokenize

log = get_logger(__name__)

DAY_S = 86400.0
REFRESH_PAGE = 5000


@dataclass(frozen=True)
class KnowledgeConfig:
    reuse_similarity: float = 0.8
    reuse_similarity_strong: float = 0.9
    reuse_unexplained_terms: int = 0
    confirm_similarity: float = 0.5  # 0 disables single-expert confirmation
    confirm_k: int = 1
    reuse_min_confidence: float = 0.5
    context_similarity: float = 0.6
    merge_similarity: float = 0.93
    merge_answer_agreement: float = 0.5
    half_life_days: float = 30.0
    stale_below: float = 0.15


def effective_confidence(
    confidence: float, confirmed_at: datetime | None, now: datetime, half_life_days: float
) -> float:
    if confirmed_at is None:
        return confidence
    age_days = max(0.0, (now - confirmed_at).total_seconds() / DAY_S)
    return float(confidence * 0.5 ** (age_days / half_life_days))


DEFAULT_CORE_QUEUE = "xpando-core"


def knowledge_workflow_id(domain: str, core_task_queue: str = DEFAULT_CORE_QUEUE) -> str:
    """``knowledge-<domain>``; deployments that share a namespace under another core queue get
    their own entities (``knowledge-<domain>@<queue>``)."""
    if core_task_queue == DEFAULT_CORE_QUEUE:
        return f"knowledge-{domain}"
    return f"knowledge-{domain}@{core_task_queue}"


# Words whose presence on one side only flips what is asked ("read" vs "write").
_CONTRAST_PAIRS = [
    ("read", "write"),
    ("get", "set"),
    ("add", "remove"),
    ("create", "delete"),
    ("open", "close"),
    ("start", "stop"),
    ("enable", "disable"),
    ("encode", "decode"),
    ("serialize", "deserialize"),
    ("upload", "download"),
    ("send", "receive"),
    ("cancel", "terminate"),
    ("signal", "query"),
    ("activity", "workflow"),
    ("sync", "async"),
    ("min", "max"),
    ("minimum", "maximum"),
    ("first", "last"),
    ("before", "after"),
    ("request", "response"),
    ("client", "server"),
    ("input", "output"),
    ("import", "export"),
    ("lock", "unlock"),
    ("mint", "burn"),
    ("freeze", "thaw"),
    ("sign", "verify"),
    ("encrypt", "decrypt"),
    ("compress", "decompress"),
    ("join", "split"),
    ("increase", "decrease"),
    ("push", "pull"),
    ("load", "dump"),
    ("parse", "format"),
    ("header", "body"),
    ("default", "disable"),
    ("list", "dict"),
    ("tuple", "list"),
    ("file", "directory"),
    ("local", "remote"),
    ("child", "parent"),
    ("schedule", "cron"),
]
_CONTRAST: dict[str, set[str]] = {}
for _a, _b in _CONTRAST_PAIRS:
    for _x, _y in ((_a, _b), (_b, _a)):
        _CONTRAST.setdefault(tokenize(_x)[0] if tokenize(_x) else _x, set()).add(
            tokenize(_y)[0] if tokenize(_y) else _y
        )


def contrast(prompt: str, question: str) -> tuple[str, str] | None:
    """Contrastive terms: one only in the prompt and its opposite only in the question, or a
    contrastive term of the question that the prompt drops ("... inside an activity")."""
    p, q = set(tokenize(prompt)), set(tokenize(question))
    for term in sorted(p - q):
        for opposite in sorted(_CONTRAST.get(term, ())):
            if opposite in q and opposite not in p:
                return term, opposite
    for term in sorted(q - p):
        if term in _CONTRAST:
            return "", term
    return None


# Words that change how a question is phrased, not what it asks.
_PHRASING = frozenset(
    """
    able actually anyone best build building code correct correctly currently doing easiest
    easy exactly fine hey hi how idea im instead just kind know learn long looking mean
    need possible program project proper properly quick quickly really right script show simple
    simply stay stays still sure tell thanks think trying try want way ways wondering work
    working app application
    """.split()
)


# Stemmed, as tokenize() returns terms.
_SKIP = frozenset(stem(w) for w in _PHRASING | GENERIC_TERMS) | _PHRASING | GENERIC_TERMS


def _content(text: str) -> list[str]:
    return [t for t in tokenize(text) if t not in _SKIP]


def reversed_order(prompt: str, question: str) -> bool:
    """Same words in another order ("string to datetime" / "datetime to string")."""
    p, q = tokenize(prompt), tokenize(question)
    return len(p) >= 2 and sorted(p) == sorted(q) and p != q


def substitution(prompt: str, question: str) -> tuple[str, str] | None:
    """The two questions differ by exactly one content word each, over a shared rest."""
    p, q = set(_content(prompt)), set(_content(question))
    only_p, only_q = p - q, q - p
    if len(only_p) == 1 and len(only_q) == 1 and len(p & q) >= 2:
        return next(iter(only_p)), next(iter(only_q))
    return None


def unexplained_terms(prompt: str, question: str, answer: str) -> list[str]:
    """Content terms of the prompt found neither in the stored question nor in its answer.

    A paraphrase may use other words, but what it asks about is in the answer it would get; a
    different question that looks similar ("... a hard egg" for "... a soft egg") names
    something the stored answer does not talk about.
    """
    known = set(tokenize(question)) | set(tokenize(answer))
    return sorted(
        {
            t
            for t in tokenize(prompt)
            if t not in known and t not in _SKIP and not t.isdigit() and len(t) > 2
        }
    )


@dataclass(frozen=True)
class Hit:
    knowledge_id: str
    question: str
    answer: str
    domain: str | None
    similarity: float
    confidence: float  # effective, at search time


class KnowledgeIndex:
    """Active items' embeddings in one matrix, refreshed from the database incrementally."""

    def __init__(
        self,
        sessions: SessionFactory,
        embedder: Embedder,
        *,
        config: KnowledgeConfig | None = None,
        refresh_every_s: float = 0.5,
    ) -> None:
        self._sessions = sessions
        self.embedder = embedder
        self.config = config or KnowledgeConfig()
        self._refresh_every_s = refresh_every_s
        self._lock = asyncio.Lock()
        self._last_refresh = -math.inf
        self._watermark: datetime | None = None
        self._watermark_id = ""
        self._reset()

    def _reset(self) -> None:
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._vecs: NDArray[np.float32] = np.zeros((1024, self.embedder.dim), np.float32)
        self._active = np.zeros(1024, bool)
        self._conf = np.zeros(1024, np.float64)
        self._confirmed = np.zeros(1024, np.float64)  # epoch seconds, nan when unknown
        self._domains: list[str | None] = []
        self._domain_code = np.zeros(1024, np.int32)  # per row: index into _domain_names
        self._domain_names: dict[str | None, int] = {None: 0}
        self._text: dict[str, tuple[str, str]] = {}
        self._watermark = None
        self._watermark_id = ""

    def __len__(self) -> int:
        return int(self._active[: len(self._ids)].sum())

    def _slot(self, knowledge_id: str) -> int:
        row = self._row.get(knowledge_id)
        if row is not None:
            return row
        row = len(self._ids)
        if row >= len(self._active):
            grow = len(self._active) * 2
            self._vecs = np.resize(self._vecs, (grow, self.embedder.dim))
            self._active = np.resize(self._active, grow)
            self._active[row:] = False
            self._conf = np.resize(self._conf, grow)
            self._confirmed = np.resize(self._confirmed, grow)
            self._domain_code = np.resize(self._domain_code, grow)
        self._ids.append(knowledge_id)
        self._domains.append(None)
        self._row[knowledge_id] = row
        return row

    def put(
        self,
        *,
        knowledge_id: str,
        vector: NDArray[np.float32],
        domain: str | None,
        confidence: float,
        confirmed_at: datetime | None,
        question: str,
        answer: str,
        active: bool = True,
    ) -> None:
        row = self._slot(knowledge_id)
        self._vecs[row] = vector
        self._active[row] = active
        self._conf[row] = confidence
        self._confirmed[row] = confirmed_at.timestamp() if confirmed_at else np.nan
        self._domains[row] = domain
        self._domain_code[row] = self._domain_names.setdefault(domain, len(self._domain_names))
        self._text[knowledge_id] = (question, answer)

    def deactivate(self, knowledge_id: str) -> None:
        row = self._row.get(knowledge_id)
        if row is not None:
            self._active[row] = False

    async def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_refresh < self._refresh_every_s:
            return
        async with self._lock:
            if not force and time.monotonic() - self._last_refresh < self._refresh_every_s:
                return
            since, after = self._watermark, self._watermark_id
            while True:
                async with self._sessions() as session:
                    rows = await queries.knowledge_changed_since(
                        session=session, since=since, after_id=after, limit=REFRESH_PAGE
                    )
                await self._load(rows)
                if not rows:
                    break
                since, after = queries.as_utc(rows[-1].updated_at), rows[-1].knowledge_id
                self._watermark, self._watermark_id = since, after
                if len(rows) < REFRESH_PAGE:
                    break
            self._last_refresh = time.monotonic()

    async def _load(self, rows: list[Knowledge]) -> None:
        missing = [r for r in rows if r.embedding is None or r.embedder != self.embedder.name]
        vectors: dict[str, NDArray[np.float32]] = {}
        if missing:
            embedded = await asyncio.to_thread(self.embedder.embed, [r.question for r in missing])
            vectors = {r.knowledge_id: embedded[i] for i, r in enumerate(missing)}
        for r in rows:
            vec = vectors.get(r.knowledge_id)
            if vec is None:
                assert r.embedding is not None
                vec = np.frombuffer(r.embedding, dtype=np.float32)
            self.put(
                knowledge_id=r.knowledge_id,
                vector=vec,
                domain=r.domain,
                confidence=r.confidence,
                confirmed_at=queries.as_utc(r.confirmed_at),
                question=r.question,
                answer=r.answer,
                active=r.status == "active",
            )

    def search_vector(
        self,
        vector: NDArray[np.float32],
        *,
        domain: str | None = None,
        k: int = 5,
        now: datetime | None = None,
    ) -> list[Hit]:
        n = len(self._ids)
        if n == 0 or k <= 0:
            return []
        sims = self._vecs[:n] @ vector.astype(np.float32)
        mask = self._active[:n].copy()
        if domain is not None:
            code = self._domain_names.get(domain)
            if code is None:
                return []
            mask &= self._domain_code[:n] == code
        sims = np.where(mask, sims, -np.inf)
        top = min(k, int(mask.sum()))
        if top == 0:
            return []
        idx = np.argpartition(-sims, top - 1)[:top]
        idx = idx[np.lexsort((idx, -sims[idx]))]
        now_ts = (now or datetime.now(UTC)).timestamp()
        hits = []
        for i in idx:
            kid = self._ids[int(i)]
            confirmed = self._confirmed[i]
            conf = float(self._conf[i])
            if not math.isnan(confirmed):
                age_days = max(0.0, (now_ts - confirmed) / DAY_S)
                conf *= 0.5 ** (age_days / self.config.half_life_days)
            question, answer = self._text[kid]
            hits.append(
                Hit(
                    knowledge_id=kid,
                    question=question,
                    answer=answer,
                    domain=self._domains[int(i)],
                    similarity=round(float(sims[i]), 4),
                    confidence=round(conf, 4),
                )
            )
        return hits

    async def embed(self, text: str) -> NDArray[np.float32]:
        batched = getattr(self.embedder, "embed_one", None)  # a CachedEmbedder batches prompts
        if batched is not None:
            return np.asarray(await batched(text), dtype=np.float32)
        vecs = await asyncio.to_thread(self.embedder.embed, [text])
        vec: NDArray[np.float32] = np.asarray(vecs[0], dtype=np.float32)
        return vec

    async def search(self, text: str, *, domain: str | None = None, k: int = 5) -> list[Hit]:
        # The prompt's embedding (a thread) and the index's refresh (the database) overlap.
        _, vector = await asyncio.gather(self.refresh(), self.embed(text))
        return self.search_vector(vector, domain=domain, k=k)

    def reusable(self, prompt: str, hits: list[Hit]) -> Hit | None:
        """The hit a prompt may be answered from, or None (see the module docstring)."""
        cfg = self.config
        for hit in hits[:1]:
            if hit.similarity < cfg.reuse_similarity or hit.confidence < cfg.reuse_min_confidence:
                return None
            if refusal(prompt, hit, cfg) is not None:
                return None
            return hit
        return None


def refusal(prompt: str, hit: Hit, cfg: KnowledgeConfig) -> str | None:
    """Why a close match must not answer this prompt, or None.

    Embeddings place "convert a string to a datetime" and "convert a datetime to a string" at
    similarity 1.0, so closeness alone is not enough: a prompt that swaps a word for its
    opposite, reorders the same words, or differs in exactly one content word is a different
    question; below ``reuse_similarity_strong`` every content word the prompt adds must be
    explained by the stored question or its answer.
    """
    if pair := contrast(prompt, hit.question):
        return f"contrasting terms {pair}"
    if reversed_order(prompt, hit.question):
        return "same words in another order"
    if pair := substitution(prompt, hit.question):
        return f"one word differs {pair}"
    if hit.similarity >= cfg.reuse_similarity_strong:
        return None
    missing = unexplained_terms(prompt, hit.question, hit.answer)
    if len(missing) > cfg.reuse_unexplained_terms:
        return f"terms not covered by the stored answer {missing}"
    return None


def provenance_of(item: Knowledge) -> list[Provenance]:
    return [Provenance.model_validate(p) for p in item.provenance]


@dataclass
class _Stored:
    added: int = 0
    merged: int = 0
    stale: int = 0


class Consolidator:
    """Consolidation of one domain's new items (run for the domain's KnowledgeWorkflow, its
    single writer): store, merge near-duplicates, mark stale items; keeps ``index`` current.

    An item the database refuses (``xpando/db/errors.py``: text it cannot hold, a value out of
    range, a constraint) is skipped and counted, and the rest of its batch is stored: retried,
    it would fail the same way for ever and hold back every later item of the domain."""

    def __init__(self, *, sessions: SessionFactory, index: KnowledgeIndex) -> None:
        self._sessions = sessions
        self._index = index

    async def consolidate(self, input: ConsolidateInput) -> ConsolidateResult:
        """Store new items, merge near-duplicates, mark stale ones; one transaction (one per
        item, when the database refuses one of them)."""
        now = datetime.now(UTC)
        await self._index.refresh(force=True)
        vectors = (
            await asyncio.to_thread(self._index.embedder.embed, [i.question for i in input.items])
            if input.items
            else np.zeros((0, self._index.embedder.dim), np.float32)
        )
        batch = list(zip(input.items, vectors, strict=True))
        skipped = 0
        try:
            stored = await self._store(batch, input.domain, now, sweep=input.sweep)
        except Exception as err:
            if classify(err) is None:
                raise  # transient (connection, lock, timeout): the activity retries the batch
            stored = _Stored()
            for item, vec in batch:
                await self._index.refresh(force=True)  # reloads what a failed batch dropped
                try:
                    one = await self._store([(item, vec)], input.domain, now, sweep=False)
                except Exception as item_err:
                    found = classify(item_err)
                    if found is None:
                        raise
                    skipped += 1
                    log.warning(
                        "knowledge item skipped",
                        domain=input.domain,
                        task_id=item.task_id,
                        type=found.type,
                        reason=found.reason,
                    )
                    continue
                stored.added += one.added
                stored.merged += one.merged
            if input.sweep:
                stored.stale = (await self._store([], input.domain, now, sweep=True)).stale
        async with self._sessions() as session:
            items = await queries.count_knowledge(session=session, domain=input.domain)
        log.info(
            "knowledge consolidated",
            domain=input.domain,
            added=stored.added,
            merged=stored.merged,
            stale=stored.stale,
            skipped=skipped,
            items=items,
        )
        return ConsolidateResult(
            added=stored.added,
            merged=stored.merged,
            stale=stored.stale,
            skipped=skipped,
            items=items,
        )

    async def _store(
        self,
        batch: list[tuple[KnowledgeItemInput, NDArray[np.float32]]],
        domain: str,
        now: datetime,
        *,
        sweep: bool,
    ) -> _Stored:
        """Store ``batch`` (and sweep, if asked) in one transaction; on any failure the index
        forgets what the batch put into it (the next refresh reloads it from the database)."""
        cfg = self._index.config
        stored = _Stored()
        try:
            async with self._sessions() as session:
                for item, vec in batch:
                    kid = f"kn-{item.task_id}"
                    existing_row = await session.get(Knowledge, kid)
                    if existing_row is not None:
                        # A retried batch (or a local activity run again after its workflow
                        # task failed): stored already; count it as the first run did.
                        if existing_row.merged_into is not None:
                            stored.merged += 1
                        else:
                            stored.added += 1
                        continue
                    prov = Provenance(
                        task_id=item.task_id, confidence=item.confidence, nodes=item.nodes, at=now
                    ).model_dump(mode="json")
                    target = self._merge_target(item, vec, domain, now)
                    row = Knowledge(
                        knowledge_id=kid,
                        task_id=item.task_id,
                        question=item.question,
                        answer=item.answer,
                        domain=domain,
                        confidence=item.confidence,
                        nodes=sorted(n.node_id for n in item.nodes),
                        provenance=[prov],
                        embedding=vec.astype(np.float32).tobytes(),
                        embedder=self._index.embedder.name,
                        confirmed_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                    if target is not None:
                        existing = await session.get(Knowledge, target.knowledge_id)
                        assert existing is not None
                        current = effective_confidence(
                            existing.confidence,
                            queries.as_utc(existing.confirmed_at),
                            now,
                            cfg.half_life_days,
                        )
                        existing.confidence = round(
                            min(0.99, 1 - (1 - current) * (1 - item.confidence / 2)), 4
                        )
                        existing.provenance = [*existing.provenance, prov]
                        existing.nodes = sorted(set(existing.nodes) | set(row.nodes))
                        existing.support += 1
                        existing.confirmed_at = now
                        existing.updated_at = now
                        session.add(existing)
                        row.status, row.merged_into = "merged", existing.knowledge_id
                        stored.merged += 1
                        self._index.put(
                            knowledge_id=existing.knowledge_id,
                            vector=np.frombuffer(existing.embedding or b"", np.float32)
                            if existing.embedding and existing.embedder == self._index.embedder.name
                            else vec,
                            domain=existing.domain,
                            confidence=existing.confidence,
                            confirmed_at=now,
                            question=existing.question,
                            answer=existing.answer,
                        )
                    else:
                        stored.added += 1
                    session.add(row)
                    self._index.put(
                        knowledge_id=kid,
                        vector=vec,
                        domain=domain,
                        confidence=row.confidence,
                        confirmed_at=now,
                        question=row.question,
                        answer=row.answer,
                        active=row.status == "active",
                    )
                if sweep:
                    stored.stale = await self._mark_stale(session, domain, now)
                await session.commit()
        except BaseException:
            self._index._reset()  # drop what this failed batch put into the index
            raise
        return stored

    def _merge_target(
        self, item: KnowledgeItemInput, vec: NDArray[np.float32], domain: str, now: datetime
    ) -> Hit | None:
        cfg = self._index.config
        for hit in self._index.search_vector(vec, domain=domain, k=3, now=now):
            if hit.similarity < cfg.merge_similarity:
                break
            if contrast(item.question, hit.question) is not None:
                continue
            agreement = aggregate.cosine(item.answer, hit.answer)
            if agreement >= cfg.merge_answer_agreement:
                return hit
        return None

    async def _mark_stale(self, session: AsyncSession, domain: str, now: datetime) -> int:
        """Mark active items whose effective confidence decayed below the floor (full sweep)."""
        cfg = self._index.config
        stale = 0
        after: str | None = None
        while True:
            page = await queries.active_knowledge_page(
                session=session, domain=domain, after=after, limit=2000
            )
            if not page:
                return stale
            after = page[-1].knowledge_id
            for row in page:
                eff = effective_confidence(
                    row.confidence, queries.as_utc(row.confirmed_at), now, cfg.half_life_days
                )
                if eff >= cfg.stale_below:
                    continue
                row.status = "stale"
                row.updated_at = now
                session.add(row)
                self._index.deactivate(row.knowledge_id)
                stale += 1


def reuse_from(hit: Hit, item: Knowledge | None) -> KnowledgeReuse:
    return KnowledgeReuse(
        knowledge_id=hit.knowledge_id,
        question=hit.question,
        answer=item.answer if item is not None else hit.answer,
        domain=hit.domain,
        similarity=hit.similarity,
        confidence=max(0.0, min(1.0, hit.confidence)),
        provenance=provenance_of(item) if item is not None else [],
    )
