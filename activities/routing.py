"""Routing policy (first version): domain fit between the prompt and each node's profile.

``fit(node)`` is the IDF-weighted share of the prompt's distinct terms found in the node's
profile (domain names, descriptions and keywords). A term that appears in every node's profile
carries no weight; one that appears in a single node's profile carries the most. A task that
names a domain adds 1.0 to the fit of nodes serving it.

Selection is greedy by score with a diversity rule: among nodes of equal score the one whose
(provider, region) pair is not yet chosen goes first, and each repeat of a pair costs 10 % of
the score. Standbys are the next best live nodes, used when a chosen expert fails or is slow;
each next standby prefers a provider not yet among the chosen experts and earlier standbys, so a
provider-wide outage can be answered around. Nodes behind an open circuit breaker
(``activities/breaker.py``) are filtered out before scoring reaches selection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xpando.retrieval import tokenize


@dataclass(frozen=True)
class NodeCard:
    node_id: str
    region: str
    provider: str
    model: str
    task_queue: str
    domains: tuple[str, ...]
    terms: frozenset[str]


@dataclass(frozen=True)
class Scored:
    node: NodeCard
    fit: float
    score: float


def node_terms(domains: Iterable[dict[str, object]]) -> frozenset[str]:
    words: list[str] = []
    for d in domains:
        words.extend(tokenize(str(d.get("name", ""))))
        words.extend(tokenize(str(d.get("description", ""))))
        keywords = d.get("keywords") or []
        if isinstance(keywords, list):
            for kw in keywords:
                words.extend(tokenize(str(kw)))
    return frozenset(words)


def score_nodes(
    prompt: str, nodes: Sequence[NodeCard], *, domain: str | None = None
) -> list[Scored]:
    query = set(tokenize(prompt))
    n = max(1, len(nodes))
    df: dict[str, int] = {}
    for term in query:
        df[term] = sum(1 for node in nodes if term in node.terms)
    weight = {t: math.log(1 + n / (1 + c)) if c < n or n == 1 else 0.0 for t, c in df.items()}
    total = sum(math.log(1 + n) for _ in query) or 1.0
    out: list[Scored] = []
    for node in nodes:
        fit = sum(weight[t] for t in query if t in node.terms) / total
        if domain and domain in node.domains:
            fit += 1.0
        out.append(Scored(node=node, fit=round(fit, 6), score=round(fit, 6)))
    out.sort(key=lambda s: (-s.score, s.node.node_id))
    return out


def select(ranked: Sequence[Scored], *, k: int, standbys: int) -> tuple[list[Scored], list[Scored]]:
    """Pick ``k`` experts with provider/region diversity, then ``standbys`` more."""
    remaining = list(ranked)
    chosen: list[Scored] = []
    pairs: dict[tuple[str, str], int] = {}
    while remaining and len(chosen) < k:
        best_index = max(
            range(len(remaining)),
            key=lambda i: (
                remaining[i].score * 0.9 ** pairs.get(_pair(remaining[i]), 0),
                -pairs.get(_pair(remaining[i]), 0),  # equal scores: the new pair first
                -i,
            ),
        )
        pick = remaining.pop(best_index)
        pairs[_pair(pick)] = pairs.get(_pair(pick), 0) + 1
        chosen.append(pick)
    return chosen, pick_standbys(remaining, chosen, standbys)


def pick_standbys(remaining: Sequence[Scored], chosen: Sequence[Scored], n: int) -> list[Scored]:
    """The ``n`` best of ``remaining`` in score order, each preferring a provider not yet used
    by ``chosen`` or an earlier standby (when every provider is used, simply the next best)."""
    pool = list(remaining)
    used = {s.node.provider for s in chosen}
    out: list[Scored] = []
    while pool and len(out) < n:
        index = next((i for i, s in enumerate(pool) if s.node.provider not in used), 0)
        pick = pool.pop(index)
        used.add(pick.node.provider)
        out.append(pick)
    return out


def _pair(s: Scored) -> tuple[str, str]:
    return (s.node.provider, s.node.region)
