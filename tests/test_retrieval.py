"""BM25 retrieval library and docstring corpus builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xpando.corpus import DEV_DOMAINS, build_docstring_corpus, ensure_domain_corpus
from xpando.retrieval import Passage, RetrievalIndex, load_passages, save_passages, tokenize

CORPUS = [
    Passage("cooking.pasta", "Boil the pasta in salted water for nine minutes, then drain it."),
    Passage(
        "temporal.retry",
        "A RetryPolicy tells Temporal how to retry a failed activity: the initial interval, "
        "the backoff coefficient and the maximum number of attempts.",
    ),
    Passage("garden.roses", "Prune roses in early spring and water them deeply once a week."),
    Passage(
        "temporal.signal",
        "Send a signal to a running workflow with the workflow handle's signal method.",
    ),
    Passage("python.files", "Path.read_text opens a file, reads it and closes it again."),
]


def test_tokenize_splits_identifiers_and_drops_stopwords() -> None:
    assert tokenize("start_workflow") == ["start_workflow", "start", "workflow"]
    assert tokenize("RetryPolicy") == ["retrypolicy", "retry", "policy"]
    assert tokenize("HTTPServer") == ["httpserver", "http", "server"]
    assert tokenize("How do I use the client.get_workflow_handle() in a test?") == [
        "use",
        "client",
        "get_workflow_handle",
        "get",
        "workflow",
        "handle",
        "test",
    ]
    # one-character tokens and stopwords disappear
    assert tokenize("a b c is the of") == []


def test_search_ranks_the_passage_about_the_topic_first() -> None:
    index = RetrievalIndex(CORPUS)
    results = index.search("how do I retry a failed activity with a retry policy", k=3)
    assert results[0][0].source == "temporal.retry"
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)
    assert all(score > 0 for score in scores)
    signal = index.search("send a signal to my workflow", k=1)
    assert [passage.source for passage, _ in signal] == ["temporal.signal"]


def test_search_returns_only_matching_passages() -> None:
    index = RetrievalIndex(CORPUS)
    assert index.search("quantum chromodynamics lattice", k=3) == []
    assert [p.source for p, _ in index.search("pasta", k=5)] == ["cooking.pasta"]
    assert index.search("pasta", k=0) == []
    assert len(index) == 5


def test_search_is_deterministic_and_breaks_ties_by_passage_order() -> None:
    twins = [
        Passage("first", "workflow replay history"),
        Passage("other", "garden hose"),
        Passage("second", "workflow replay history"),
    ]
    index = RetrievalIndex(twins)
    results = index.search("workflow replay", k=3)
    assert [p.source for p, _ in results] == ["first", "second"]
    assert results[0][1] == results[1][1]
    assert RetrievalIndex(twins).search("workflow replay", k=3) == results


def test_coverage_is_high_in_domain_and_low_off_domain() -> None:
    index = RetrievalIndex(CORPUS)
    in_domain = index.coverage("retry policy for a failed activity")
    off_domain = index.coverage("what is the capital of France")
    assert in_domain > 0.9
    assert off_domain == 0.0
    partial = index.coverage("retry the volcano eruption")
    assert 0.0 < partial < 0.6
    assert index.coverage("the of and") == 0.0  # nothing searchable


def test_coverage_weights_specific_words_more_than_common_ones() -> None:
    corpus = [Passage(f"doc{i}", f"activity number {i}") for i in range(8)]
    corpus.append(Passage("special", "activity heartbeat"))
    index = RetrievalIndex(corpus)
    # "heartbeat" is in one passage, "activity" in all of them: knowing the rare word matters more
    assert index.coverage("heartbeat banana") > index.coverage("activity banana")


def test_top_terms_name_the_corpus_subject() -> None:
    corpus = [
        Passage("wf.a", "The workflow returns a value once the activity completes."),
        Passage("wf.b", "A workflow schedules an activity on a task queue."),
        Passage("wf.c", "Signals change a running workflow; queries read its state."),
        Passage("wf.d", "An activity may heartbeat while the workflow waits."),
    ]
    terms = RetrievalIndex(corpus).top_terms(2)
    assert terms == ["workflow", "activity"]
    everything = RetrievalIndex(corpus).top_terms(50)
    assert "the" not in everything and "returns" not in everything


def test_top_terms_are_words_as_the_corpus_writes_them() -> None:
    corpus = [
        Passage("eggs.a", "Boiling eggs: put the eggs in cold water."),
        Passage("eggs.b", "Boiling eggs for six minutes gives soft eggs."),
        Passage("eggs.c", "Boiled eggs keep for a week."),
    ]
    # the index matches on stems ("boil", "egg"); people and the routing embedder read words
    assert {"boil", "egg"} <= set(tokenize(" ".join(p.text for p in corpus)))
    assert RetrievalIndex(corpus).top_terms(2) == ["boiling", "eggs"]


def test_an_outside_passage_scores_as_it_would_inside_the_index() -> None:
    # knowledge snippets are scored with score() and ranked together with search() results
    index = RetrievalIndex(CORPUS)
    query = "how do I retry a failed activity with a retry policy"
    for passage, score in index.search(query, k=5):
        assert index.score(query, passage) == pytest.approx(score, rel=1e-5)
    # an average-length passage holding each query term once scores max_score: less here,
    # where the best passage has only some of the terms
    assert 0 < index.search(query, k=1)[0][1] < index.max_score(query)


def test_empty_index_finds_nothing() -> None:
    index = RetrievalIndex([])
    assert len(index) == 0
    assert index.search("workflow") == []
    assert index.coverage("workflow") == 0.0
    assert index.top_terms(5) == []


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "corpus.jsonl"
    passages = [
        Passage("a.b", "line one\nline two"),
        Passage("ünïcode", 'quotes " and emoji 🚀'),
    ]
    save_passages(path, passages)
    assert load_passages(path) == passages
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"source": "a.b", "text": "line one\nline two"},
        {"source": "ünïcode", "text": 'quotes " and emoji 🚀'},
    ]
    assert path.stat().st_mode & 0o777 == 0o644
    # the atomic write leaves no temporary file behind
    assert [p.name for p in path.parent.iterdir()] == ["corpus.jsonl"]


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_passages(missing)


@pytest.mark.parametrize(
    "content",
    ['{"source": "a", "text": "ok"}\nnot json at all\n', '{"source": "a"}\n', "[1, 2]\n"],
)
def test_load_corrupt_file_names_it(tmp_path: Path, content: str) -> None:
    bad = tmp_path / "broken.jsonl"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line \d"):
        load_passages(bad)


def test_docstring_corpus_from_stdlib_module() -> None:
    passages = build_docstring_corpus(["json"], max_chars=300)
    sources = {p.source for p in passages}
    assert "json" in sources and "json.dumps" in sources
    assert all(p.source == "json" or p.source.startswith("json.") for p in passages)
    assert all(40 <= len(p.text) <= 300 for p in passages)
    assert len({p.text for p in passages}) == len(passages)  # no duplicate texts
    assert build_docstring_corpus(["json"], max_chars=300) == passages  # deterministic
    assert len(build_docstring_corpus(["json", "csv"], max_passages=10)) == 10


def test_docstring_corpus_skips_unimportable_and_noisy_modules() -> None:
    passages = build_docstring_corpus(["no_such_module_xyz", "this", "antigravity", "csv"])
    assert passages and all(p.source.startswith("csv") for p in passages)


def test_ensure_domain_corpus_rejects_unknown_domain(tmp_path: Path) -> None:
    assert list(DEV_DOMAINS) == ["python", "temporal", "web-api", "solana"]
    with pytest.raises(ValueError, match="unknown corpus domain 'cooking'"):
        ensure_domain_corpus("cooking", tmp_path)
