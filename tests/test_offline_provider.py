"""The offline retrieval provider: quotes its corpus, cites knowledge, declines off-domain."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from xpando.contracts import ContributionStatus, KnowledgeSnippet
from xpando.corpus import ensure_domain_corpus
from xpando.providers.base import Provider, ProviderRequest
from xpando.providers.offline import OfflineRetrievalProvider
from xpando.retrieval import Passage, save_passages

CORPUS = [
    Passage(
        "temporal.retry",
        "A RetryPolicy tells Temporal how to retry a failed activity: the initial interval, "
        "the backoff coefficient and the maximum number of attempts.",
    ),
    Passage(
        "temporal.signal",
        "Send a signal to a running workflow with the workflow handle's signal method.",
    ),
    Passage(
        "temporal.timeouts",
        "An activity needs a start_to_close_timeout; a retry happens when it is exceeded.",
    ),
    Passage("temporal.worker", "A worker polls a task queue and runs workflows and activities."),
]


make_provider = functools.partial(OfflineRetrievalProvider, CORPUS, domain="demo")


async def test_in_domain_question_gets_labelled_extractive_answer() -> None:
    provider: Provider = make_provider()
    assert (provider.name, provider.model) == ("offline", "bm25-retrieval")
    reply = await provider.answer(ProviderRequest("how do I retry a failed activity?"))
    assert reply.status is ContributionStatus.OK
    lines = reply.text.splitlines()
    assert lines[0] == "Most relevant passages from the demo corpus:"
    assert lines[1].startswith("[1] temporal.retry: A RetryPolicy tells Temporal")
    assert reply.citations[0].source == "temporal.retry"
    assert "RetryPolicy" in reply.citations[0].text
    scores = [c.score for c in reply.citations]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert len(reply.citations) <= 3
    assert 0.5 < reply.relevance <= 1.0
    assert reply.model == "bm25-retrieval" and reply.finish_reason == "stop"
    assert reply.input_tokens == 7  # whitespace-separated words of the prompt
    assert reply.output_tokens == len(reply.text.split())


async def test_off_domain_question_gets_no_answer() -> None:
    reply = await make_provider().answer(ProviderRequest("what is the capital of France"))
    assert reply.status is ContributionStatus.NO_ANSWER
    assert reply.text == "No relevant passage found in the demo corpus for this question."
    assert reply.citations == []
    assert reply.relevance == 0.0


async def test_low_coverage_declines_even_if_one_word_matches() -> None:
    # "retry" is known, but the question is about something else entirely
    reply = await make_provider().answer(
        ProviderRequest("retry baking sourdough bread with rye flour")
    )
    assert reply.status is ContributionStatus.NO_ANSWER
    assert 0.0 < reply.relevance < 0.35


async def test_top_k_limits_citations() -> None:
    reply = await make_provider(top_k=1).answer(ProviderRequest("activity retry workflow signal"))
    assert len(reply.citations) == 1
    assert reply.text.count("\n[") == 1


async def test_matching_knowledge_snippet_is_cited() -> None:
    snippet = KnowledgeSnippet(
        knowledge_id="k-42",
        question="What is the capital of France?",
        answer="Paris is the capital of France.",
        confidence=0.9,
    )
    unrelated = KnowledgeSnippet(
        knowledge_id="k-7", question="How to prune roses?", answer="In spring.", confidence=0.8
    )
    reply = await make_provider().answer(
        ProviderRequest("what is the capital of France", context=[unrelated, snippet])
    )
    assert reply.status is ContributionStatus.OK
    assert [c.source for c in reply.citations] == ["knowledge:k-42"]
    assert reply.citations[0].text == (
        "Q: What is the capital of France? A: Paris is the capital of France."
    )
    assert reply.text.splitlines()[0] == (
        "Most relevant passages from the demo corpus and stored knowledge:"
    )
    assert "[1] knowledge:k-42: Q: What is the capital of France?" in reply.text
    assert reply.relevance > 0.5


async def test_knowledge_and_corpus_passages_are_ranked_together() -> None:
    snippet = KnowledgeSnippet(
        knowledge_id="k-1",
        question="How do I retry a failed activity?",
        answer="Give it a RetryPolicy with maximum_attempts.",
        confidence=0.7,
    )
    reply = await make_provider().answer(
        ProviderRequest("how do I retry a failed activity", context=[snippet])
    )
    sources = [c.source for c in reply.citations]
    assert "knowledge:k-1" in sources and "temporal.retry" in sources
    assert reply.input_tokens == 7 + 7 + 6


async def test_answers_are_deterministic() -> None:
    request = ProviderRequest("activity retry timeout")
    first = await make_provider().answer(request)
    second = await make_provider().answer(request)
    assert first == second
    sources = [c.source for c in first.citations]
    assert sources[0] == "temporal.timeouts" and "temporal.retry" in sources
    assert "temporal.signal" not in sources


async def test_long_passages_are_trimmed(tmp_path: Path) -> None:
    long_text = "workflow " + "history event " * 200
    provider = OfflineRetrievalProvider([Passage("big", long_text)], domain="demo")
    reply = await provider.answer(ProviderRequest("workflow history"))
    assert reply.status is ContributionStatus.OK
    assert len(reply.citations[0].text) <= 610
    assert reply.citations[0].text.endswith("…")


async def test_from_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "demo.jsonl"
    save_passages(path, CORPUS)
    provider = OfflineRetrievalProvider.from_file(path, domain="demo")
    reply = await provider.answer(ProviderRequest("send a signal to a workflow"))
    assert reply.citations[0].source == "temporal.signal"

    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        OfflineRetrievalProvider.from_file(tmp_path / "missing.jsonl")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"source": "x", "text": "fine"}\n{truncated', encoding="utf-8")
    with pytest.raises(ValueError, match=r"corrupt\.jsonl"):
        OfflineRetrievalProvider.from_file(corrupt)


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="top_k"):
        make_provider(top_k=0)
    with pytest.raises(ValueError, match="min_coverage"):
        make_provider(min_coverage=1.5)


async def test_real_temporal_corpus(tmp_path: Path) -> None:
    path = ensure_domain_corpus("temporal", tmp_path)
    assert path == tmp_path / "temporal.jsonl"
    built_at = path.stat().st_mtime_ns
    assert ensure_domain_corpus("temporal", tmp_path) == path
    assert path.stat().st_mtime_ns == built_at  # not rebuilt

    provider = OfflineRetrievalProvider.from_file(path, domain="temporal")
    assert len(provider.index) > 200

    reply = await provider.answer(ProviderRequest("how do I retry an activity with a retry policy"))
    assert reply.status is ContributionStatus.OK
    assert reply.citations[0].source.startswith("temporalio")
    assert reply.text.startswith("Most relevant passages from the temporal corpus:")

    off = await provider.answer(ProviderRequest("what is the capital of France"))
    assert off.status is ContributionStatus.NO_ANSWER
    assert off.citations == []
