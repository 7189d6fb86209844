"""The offline provider: a retrieval expert over a local corpus, used when a node has no API key.

It is not a language model and never writes like one: an answer is a labelled list of the most
relevant passages from the node's corpus (and from the stored knowledge handed to it as
context), each cited with its source and BM25 score. When the corpus has nothing on the
question, it says so and returns ``NO_ANSWER``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xpando.contracts import Citation, ContributionStatus, KnowledgeSnippet
from xpando.providers.base import ProviderReply, ProviderRequest
from xpando.retrieval import Passage, RetrievalIndex, load_passages, tokenize

__all__ = ["KNOWLEDGE_MIN_OVERLAP", "OfflineRetrievalProvider"]

# A knowledge snippet is used when it contains at least this IDF-weighted share of the prompt's
# terms (it is a single Q/A pair, so it must match more of the prompt than the corpus as a whole).
KNOWLEDGE_MIN_OVERLAP = 0.5
# Passages are shown (and cited) trimmed to about this many characters.
CITED_CHARS = 600
# Corpora at least this large are searched in a worker thread, off the event loop.
_THREAD_THRESHOLD = 500

_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class _Hit:
    passage: Passage
    score: float


def _trim(text: str, limit: int = CITED_CHARS) -> str:
    flat = _SPACE_RE.sub(" ", text).strip()
    if len(flat) <= limit:
        return flat
    cut = flat.rfind(" ", 0, limit)
    cut = cut if cut > limit // 2 else limit
    return flat[:cut].rstrip() + " …"


def _snippet_passage(snippet: KnowledgeSnippet) -> Passage:
    return Passage(
        source=f"knowledge:{snippet.knowledge_id}",
        text=f"Q: {snippet.question} A: {snippet.answer}",
    )


class OfflineRetrievalProvider:
    """A BM25 retrieval expert over a fixed corpus of passages (see the module docstring).

    ``min_coverage`` is the least :meth:`RetrievalIndex.coverage` of the prompt for which the
    corpus is considered to know about the question; ``top_k`` passages are quoted per answer.
    """

    name: str = "offline"
    model: str = "bm25-retrieval"

    def __init__(
        self,
        passages: Sequence[Passage],
        *,
        domain: str | None = None,
        min_coverage: float = 0.35,
        top_k: int = 3,
    ) -> None:
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be within [0, 1], got {min_coverage}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.domain = domain
        self.min_coverage = min_coverage
        self.top_k = top_k
        self._index = RetrievalIndex(passages)

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        domain: str | None = None,
        min_coverage: float = 0.35,
        top_k: int = 3,
    ) -> OfflineRetrievalProvider:
        """A provider over the JSONL corpus at ``path`` (format: :func:`load_passages`).

        Raises ``FileNotFoundError`` or ``ValueError`` naming the file if it is missing or corrupt.
        """
        return cls(load_passages(path), domain=domain, min_coverage=min_coverage, top_k=top_k)

    @property
    def index(self) -> RetrievalIndex:
        return self._index

    @property
    def _corpus_label(self) -> str:
        return f"the {self.domain} corpus" if self.domain else "this node's corpus"

    async def answer(self, request: ProviderRequest) -> ProviderReply:
        if len(self._index) >= _THREAD_THRESHOLD:
            return await asyncio.to_thread(self._answer, request)
        return self._answer(request)

    def _overlap(self, prompt_terms: Sequence[str], passage: Passage) -> float:
        """IDF-weighted share of the prompt's distinct terms that ``passage`` contains."""
        if not prompt_terms:
            return 0.0
        present = set(tokenize(passage.source)) | set(tokenize(passage.text))
        weights = {term: self._index.idf(term) for term in prompt_terms}
        total = sum(weights.values())
        return sum(w for term, w in weights.items() if term in present) / total

    def _answer(self, request: ProviderRequest) -> ProviderReply:
        """Search the corpus and the knowledge snippets; quote the best passages or decline.

        Relevance (0..1) is the mean of two numbers: the *coverage* (the corpus's IDF-weighted
        share of the prompt's terms, or the best knowledge snippet's overlap if that is higher)
        and the *top score* normalised by :meth:`RetrievalIndex.max_score` (the score of an
        average-length passage containing every prompt term once), capped at 1. So a question
        whose words the corpus knows and that one passage answers closely is near 1.
        """
        prompt = request.prompt
        terms = list(dict.fromkeys(tokenize(prompt)))
        coverage = self._index.coverage(prompt)
        input_tokens = len(prompt.split()) + sum(
            len(s.question.split()) + len(s.answer.split()) for s in request.context
        )

        knowledge: list[_Hit] = []
        best_overlap = 0.0
        for snippet in request.context:
            passage = _snippet_passage(snippet)
            overlap = self._overlap(terms, passage)
            if overlap >= KNOWLEDGE_MIN_OVERLAP:
                best_overlap = max(best_overlap, overlap)
                knowledge.append(_Hit(passage, self._index.score(prompt, passage)))

        corpus: list[_Hit] = []
        if coverage >= self.min_coverage:
            corpus = [_Hit(p, s) for p, s in self._index.search(prompt, k=self.top_k)]

        # knowledge first so that it wins ties; sorted() is stable
        hits = sorted(knowledge + corpus, key=lambda hit: -hit.score)[: self.top_k]
        hits = [hit for hit in hits if hit.score > 0.0]
        if not hits:
            text = f"No relevant passage found in {self._corpus_label} for this question."
            return ProviderReply(
                status=ContributionStatus.NO_ANSWER,
                text=text,
                model=self.model,
                relevance=round(min(1.0, max(0.0, coverage)), 4),
                input_tokens=input_tokens,
                output_tokens=len(text.split()),
                finish_reason="stop",
            )

        used_knowledge = any(hit.passage.source.startswith("knowledge:") for hit in hits)
        heading = f"Most relevant passages from {self._corpus_label}"
        heading += " and stored knowledge:" if used_knowledge else ":"
        lines = [heading]
        citations: list[Citation] = []
        for number, hit in enumerate(hits, start=1):
            quoted = _trim(hit.passage.text)
            lines.append(f"[{number}] {hit.passage.source}: {quoted}")
            citations.append(
                Citation(source=hit.passage.source, text=quoted, score=round(hit.score, 4))
            )
        text = "\n".join(lines)

        effective_coverage = max(coverage if corpus else 0.0, best_overlap)
        reference = self._index.max_score(prompt)
        top = min(1.0, hits[0].score / reference) if reference > 0 else 0.0
        relevance = min(1.0, max(0.0, (effective_coverage + top) / 2))
        return ProviderReply(
            status=ContributionStatus.OK,
            text=text,
            model=self.model,
            citations=citations,
            relevance=round(relevance, 4),
            input_tokens=input_tokens,
            output_tokens=len(text.split()),
            finish_reason="stop",
        )
