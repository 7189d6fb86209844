"""Mother Core aggregation (first policy: consensus over the experts' answers).

Pure functions, called from the ``aggregate`` core activity and tested directly.

Scores, all in [0, 1]:

* ``agreement(i)`` — mean cosine similarity (bag of words) of answer *i* with the other answers
  that have status ``ok``; 0 when it is the only one.
* ``quality(i)`` — ``0.6 * relevance(i) + 0.4 * agreement(i)`` for an ``ok`` answer, where
  relevance is what the expert reported about its own material; 0 for ``no_answer`` and ``failed``.
* the task's answer is the ``ok`` answer of highest quality (ties: lowest node id), and the
  task's confidence is ``relevance(best) * (0.6 + 0.4 * agreement(best))``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from xpando.contracts import AggregateResult, Contribution, ContributionStatus
from xpando.retrieval import tokenize

NO_ANSWER_TEXT = "No expert found relevant material for this question."


def cosine(a: str, b: str) -> float:
    ta, tb = Counter(tokenize(a)), Counter(tokenize(b))
    if not ta or not tb:
        return 0.0
    dot = sum(count * tb[term] for term, count in ta.items())
    norm = math.sqrt(sum(v * v for v in ta.values())) * math.sqrt(sum(v * v for v in tb.values()))
    return dot / norm if norm else 0.0


def consensus(contributions: Sequence[Contribution]) -> AggregateResult:
    ok = [c for c in contributions if c.status == ContributionStatus.OK]
    agreement: dict[str, float] = {}
    for c in ok:
        others = [cosine(c.answer, o.answer) for o in ok if o.node_id != c.node_id]
        agreement[c.node_id] = sum(others) / len(others) if others else 0.0
    scored: list[Contribution] = []
    for c in contributions:
        if c.status == ContributionStatus.OK:
            quality = 0.6 * c.relevance + 0.4 * agreement[c.node_id]
        else:
            quality = 0.0
        scored.append(c.model_copy(update={"quality": round(min(1.0, max(0.0, quality)), 4)}))
    best = max(
        (c for c in scored if c.status == ContributionStatus.OK),
        key=lambda c: (c.quality, _reverse(c.node_id)),
        default=None,
    )
    if best is None:
        return AggregateResult(answer=NO_ANSWER_TEXT, confidence=0.0, contributions=scored)
    confidence = best.relevance * (0.6 + 0.4 * agreement[best.node_id])
    return AggregateResult(
        answer=best.answer,
        confidence=round(min(1.0, max(0.0, confidence)), 4),
        contributions=scored,
    )


def _reverse(node_id: str) -> tuple[int, ...]:
    # max() with a key that prefers the lowest node id among equal qualities
    return tuple(-ord(ch) for ch in node_id)
