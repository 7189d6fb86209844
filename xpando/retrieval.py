"""BM25 retrieval over passages: ``bm25s`` scores, this module's tokenizer.

The offline expert provider answers from a corpus of passages with it, and a node derives its
domain keywords from it. Everything here is deterministic: the same passages and query always give
the same results in the same order (ties are broken by passage order).

The tokenizer is this module's own, not ``bm25s``'s with PyStemmer's Snowball stemmer: it splits
identifiers (``RetryPolicy``, ``start_workflow``), and its light stemmer only removes inflections.
Snowball also removes derivations (``activity``, ``active`` and ``activate`` all become ``activ``;
``authority`` becomes ``author``), which makes a corpus seem to know questions of another domain:
on the 440 questions of ``bench/workloads/knowledge_500.jsonl`` the four dev experts declined
50.7 % of other domains' questions with it against 55.0 % with this stemmer, at every coverage
threshold.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import bm25s

__all__ = [
    "STOPWORDS",
    "Passage",
    "RetrievalIndex",
    "load_passages",
    "save_passages",
    "tokenize",
]

# A compact English stopword list: function words that carry no topical signal.
_STOPWORDS_TEXT = """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can cannot could did do does doing done down during each either
    else etc ever every few for from further had has have having he her here hers herself him
    himself his how however if in into is it its itself just let me might more most must my
    myself neither no nor not now of off on once only or other ought our ours ourselves out over
    own per please same shall she should since so some such than that the their theirs them
    themselves then there these they this those though through thus to too under until up upon
    us very via was we were what when where whether which while who whom whose why will with
    within without would yet you your yours yourself yourselves
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORDS_TEXT.split())

# Words that are frequent in any technical documentation or question and say nothing about a
# subject. They stay searchable, but are never reported as a corpus's characteristic terms and do
# not count towards a query's coverage.
_GENERIC_TEXT = """
    also always another anything args argument arguments attr attribute attributes available
    base based best better bool call called calling calls case cases class classes cls com
    default defaults defined deprecated dict different error errors example examples
    experimental explain false first float following func function functions generate generated
    get gets given good help html https import imports instance instead int kwargs like list
    make makes many may meth method methods mod much name names need needs new non none note
    number obj object objects one ones optional org otherwise param parameter parameters params
    passed provided py python raise raised raises rather return returned returns see self set
    sets something specified str string support supported tell thing things true tuple two type
    types use used useful uses using usually value values want warning way well whose work www
"""
_GENERIC_TERMS: frozenset[str] = frozenset(_GENERIC_TEXT.split())
GENERIC_TERMS = _GENERIC_TERMS  # public: other modules skip the same words

_WORD_RE = re.compile(r"[A-Za-z0-9_]+")
_PART_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

BM25_K1 = 1.5
BM25_B = 0.75


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lowercase search terms.

    Words are split on anything that is not a letter, digit or underscore; identifiers are also
    split on snake_case and camelCase boundaries while the whole identifier is kept, so
    ``"start_workflow"`` gives ``["start_workflow", "start", "workflow"]`` and ``"RetryPolicy"``
    gives ``["retrypolicy", "retry", "policy"]``. Stopwords and one-character tokens are dropped.
    Word parts are reduced by :func:`stem` so "boiling", "boiled" and "boils" all match "boil".
    """
    return [term for term, _ in _terms(text)]


def _terms(text: str) -> list[tuple[str, str]]:
    """:func:`tokenize`'s terms, each with the word (lowercased) it was made from."""
    terms: list[tuple[str, str]] = []
    for match in _WORD_RE.finditer(text):
        word = match.group()
        parts = [p.lower() for piece in word.split("_") for p in _PART_RE.findall(piece)]
        whole = word.strip("_").lower()
        if len(parts) > 1 and len(whole) >= 2 and whole not in STOPWORDS:
            terms.append((whole, whole))
        terms.extend((stem(p), p) for p in parts if len(p) >= 2 and p not in STOPWORDS)
    return terms


def stem(word: str) -> str:
    """A deliberately light suffix stripper (plural, -ing, -ed), enough for retrieval recall.

    ``activities → activity``, ``retrying → retry``, ``boiled → boil``, ``eggs → egg``; words
    ending in -ss, -us, -is and short words are left alone.
    """
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            if len(base) >= 4 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]  # running → run, stopped → stop
            return base
    if word.endswith("es") and word[-3] in "sxz" and len(word) > 4:
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@dataclass(frozen=True)
class Passage:
    """One searchable piece of text and where it comes from (a module path, URL, ...)."""

    source: str
    text: str


def load_passages(path: Path) -> list[Passage]:
    """Read a JSONL corpus: one ``{"source": ..., "text": ...}`` object per line.

    Raises ``FileNotFoundError`` if the file does not exist and ``ValueError`` naming the file and
    line if a line is not a passage. Blank lines are ignored.
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus file {path} is not UTF-8 text: {exc}") from exc
    passages: list[Passage] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"corpus file {path}, line {lineno}: invalid JSON ({exc})") from exc
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("source"), str)
            or not isinstance(item.get("text"), str)
        ):
            raise ValueError(
                f"corpus file {path}, line {lineno}: expected an object with string "
                '"source" and "text" fields'
            )
        passages.append(Passage(source=item["source"], text=item["text"]))
    return passages


def save_passages(path: Path, passages: Sequence[Passage]) -> None:
    """Write ``passages`` as JSONL, atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; a corpus is not secret
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for passage in passages:
                record = {"source": passage.source, "text": passage.text}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class RetrievalIndex:
    """An immutable BM25 index over passages: ``bm25s``, Lucene's variant, k1=1.5, b=0.75.

    Each passage is indexed with the terms of its source and its text. ``bm25s`` keeps every
    (passage, term) score in a sparse matrix, so a search adds up the query terms' columns. Safe
    to share between threads once built.
    """

    def __init__(self, passages: Iterable[Passage]) -> None:
        self._passages: tuple[Passage, ...] = tuple(passages)
        documents = [tokenize(p.source) + tokenize(p.text) for p in self._passages]
        self._df: Counter[str] = Counter(term for doc in documents for term in dict.fromkeys(doc))
        self._avgdl: float = sum(map(len, documents)) / len(documents) if documents else 0.0
        self._bm25: bm25s.BM25 | None = None
        if self._df:  # bm25s cannot index a corpus without a single term
            # imported here: most processes only tokenize, and bm25s costs ~40 ms to import
            import bm25s

            self._bm25 = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
            self._bm25.index(documents, create_empty_token=False, show_progress=False)

    def __len__(self) -> int:
        return len(self._passages)

    @property
    def passages(self) -> tuple[Passage, ...]:
        return self._passages

    def document_frequency(self, term: str) -> int:
        """How many passages contain ``term`` (an already tokenized term)."""
        return self._df.get(term, 0)

    def idf(self, term: str) -> float:
        """BM25 inverse document frequency, Lucene's as in ``bm25s``; always > 0, largest for
        terms absent from the corpus."""
        n = len(self._passages)
        df = self.document_frequency(term)
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def _term_weight(self, tf: int, length: int) -> float:
        # bm25s's Lucene term-frequency factor, for passages scored outside the index
        norm = 1.0 - BM25_B + BM25_B * (length / self._avgdl if self._avgdl else 1.0)
        return tf / (tf + BM25_K1 * norm)

    def search(self, query: str, k: int = 3) -> list[tuple[Passage, float]]:
        """The ``k`` best passages for ``query`` with their BM25 scores, best first.

        Only passages with a positive score are returned; equal scores keep passage order.
        """
        terms = [term for term in dict.fromkeys(tokenize(query)) if term in self._df]
        if k <= 0 or not terms or self._bm25 is None:
            return []
        scores = self._bm25.get_scores(terms)
        best = np.argsort(-scores, kind="stable")[:k]  # stable: equal scores keep passage order
        return [(self._passages[i], float(scores[i])) for i in best if scores[i] > 0.0]

    def score(self, query: str, passage: Passage) -> float:
        """BM25 score of an outside ``passage`` for ``query``, using this corpus's statistics.

        Makes passages that are not in the index (e.g. knowledge snippets) comparable with
        :meth:`search` results.
        """
        counts = Counter(tokenize(passage.source) + tokenize(passage.text))
        length = sum(counts.values())
        total = 0.0
        for term in dict.fromkeys(tokenize(query)):
            tf = counts.get(term, 0)
            if tf:
                total += self.idf(term) * self._term_weight(tf, length)
        return total

    def max_score(self, query: str) -> float:
        """A reference score for ``query``: what a passage of average length containing each of
        its distinct terms once scores (their IDF summed, over ``1 + k1``).

        So ``score / max_score`` is a rough 0..1 measure of how fully a passage matches.
        """
        return sum(self.idf(term) for term in dict.fromkeys(tokenize(query))) / (1.0 + BM25_K1)

    def coverage(self, query: str) -> float:
        """How much of the query the corpus knows about, in [0, 1].

        The IDF-weighted share of the query's distinct terms that occur in the corpus. Details
        that make it a useful "is this question in my domain?" signal:

        * weights are IDF squared, so rare, specific words (``retrypolicy``, ``keypair``) count
          much more than common ones, and a word absent from the corpus weighs the most;
        * generic filler words (``good``, ``use``, ``value``, ...) are ignored unless the query
          has nothing else;
        * in a large corpus a term found in only one or two passages counts as partly present
          (a word a corpus mentions once in passing, e.g. ``dog`` in an example, is no sign the
          question is in its domain): full credit needs ``N / 300`` passages, between 1 and 3.

        Returns 0.0 for a query without any searchable term.
        """
        terms = list(dict.fromkeys(tokenize(query)))
        specific = [term for term in terms if term not in _GENERIC_TERMS]
        terms = specific or terms
        if not terms:
            return 0.0
        full_presence = min(3.0, max(1.0, len(self._passages) / 300))
        total = 0.0
        present = 0.0
        for term in terms:
            weight = self.idf(term) ** 2
            total += weight
            present += weight * min(1.0, self.document_frequency(term) / full_presence)
        return min(1.0, max(0.0, present / total)) if total > 0 else 0.0

    def top_terms(self, n: int) -> list[str]:
        """The ``n`` most characteristic words of the corpus, most characteristic first.

        A term's weight is ``df * log(1 + N / df)``: terms found in many passages rank high, but
        the log dampens terms that are everywhere. Stopwords, generic documentation words,
        numbers and very short tokens are left out. Each term is given as the corpus most often
        writes it (``raised``, not the stem ``rais``): node profiles show these words to people
        and to the routing embedder.
        """
        if n <= 0:
            return []
        total = len(self._passages)
        ranked: list[tuple[float, str]] = []
        for term, df in self._df.items():
            if len(term) < 3 or term in _GENERIC_TERMS or term.isdigit():
                continue
            if df < 2 and total > 50:  # small corpora: every term is characteristic
                continue
            ranked.append((df * math.log(1.0 + total / df), term))
        best = [term for _, term in heapq.nsmallest(n, ranked, key=lambda i: (-i[0], i[1]))]
        written: dict[str, Counter[str]] = {term: Counter() for term in best}
        for passage in self._passages:
            for text in (passage.source, passage.text):
                for term, word in _terms(text):
                    if term in written:
                        written[term][word] += 1
        # the most frequent word, the alphabetically first on a tie; listed once should two
        # terms share it (an identifier kept whole and the same word stemmed)
        words = (min(written[t].items(), key=lambda item: (-item[1], item[0]))[0] for t in best)
        return list(dict.fromkeys(words))
