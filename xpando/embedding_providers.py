"""Sentence embeddings from a provider's API: ``XPANDO_EMBEDDER=openai`` or ``gemini``.

The default embedder runs locally with no download (``xpando/embedding.py``); these are for a
network that prefers a hosted model. They speak to the provider through its official SDK
(``openai``, ``google-genai``) with the SDK's own retries off (the Temporal activity that
embeds — ``plan``, ``route`` — retries), return L2-normalised float32 rows like every
:class:`~xpando.embedding.Embedder`, embed an empty text as a zero row without a call, and raise
:class:`EmbeddingUnavailable` when the provider fails.

Settings: ``XPANDO_EMBEDDING_MODEL`` (default ``text-embedding-3-small`` /
``gemini-embedding-001``), ``XPANDO_EMBEDDING_DIMENSIONS`` (default 1536 / 768; asked of the
model, so vectors have a known size before the first call), ``XPANDO_EMBEDDING_BASE_URL``,
``XPANDO_EMBEDDING_API_KEY`` (default the provider's key, ``OPENAI_API_KEY`` / ``GEMINI_API_KEY``).
An embedder's ``name`` includes its model and size, so vectors stored under one (knowledge items,
node domains) are never compared with another's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from xpando.settings import Settings

DEFAULTS = {"openai": ("text-embedding-3-small", 1536), "gemini": ("gemini-embedding-001", 768)}
BATCH = 96  # texts per request (both APIs accept at least this many)
TIMEOUT_S = 30.0


class EmbeddingUnavailable(RuntimeError):
    """The provider did not embed the texts (down, refused, bad key): retry later."""


def _normalise(rows: list[list[float]], texts: Sequence[str], dim: int) -> NDArray[np.float32]:
    out = np.zeros((len(texts), dim), np.float32)
    for i, row in enumerate(rows):
        vec = np.asarray(row, np.float32)
        if vec.shape != (dim,):
            raise EmbeddingUnavailable(f"the provider returned {vec.size} dimensions, not {dim}")
        norm = float(np.linalg.norm(vec))
        out[i] = vec / norm if norm > 0 else vec
    return out


class _Batched:
    name: str
    dim: int

    def _call(self, texts: list[str]) -> list[list[float]]:
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        out = np.zeros((len(texts), self.dim), np.float32)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        for start in range(0, len(todo), BATCH):
            chunk = todo[start : start + BATCH]
            rows = self._call([texts[i] for i in chunk])
            if len(rows) != len(chunk):
                raise EmbeddingUnavailable(f"asked for {len(chunk)} vectors, got {len(rows)}")
            out[chunk] = _normalise(rows, [texts[i] for i in chunk], self.dim)
        return out


class OpenAIEmbedder(_Batched):
    """``POST /embeddings`` through ``openai.OpenAI`` (any OpenAI-compatible server by URL)."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str = DEFAULTS["openai"][0],
        dimensions: int = DEFAULTS["openai"][1],
        base_url: str | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        import openai

        self._openai = openai
        self._client = openai.OpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s
        )
        self._model = model
        self.dim = dimensions
        self.name = f"openai:{model}:{dimensions}"

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self._model!r}, dim={self.dim})"

    def _call(self, texts: list[str]) -> list[list[float]]:
        try:
            resp = self._client.embeddings.create(
                model=self._model, input=texts, dimensions=self.dim
            )
        except self._openai.OpenAIError as err:
            raise EmbeddingUnavailable(f"openai embeddings: {err}") from err
        return [list(d.embedding) for d in sorted(resp.data, key=lambda d: d.index)]


class GeminiEmbedder(_Batched):
    """``models/{model}:batchEmbedContents`` through ``google-genai``."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str = DEFAULTS["gemini"][0],
        dimensions: int = DEFAULTS["gemini"][1],
        base_url: str | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        from google import genai
        from google.genai import errors, types

        self._types, self._errors = types, errors
        self._client = genai.Client(
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=base_url,
                timeout=int(timeout_s * 1000),
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )
        self._model = model
        self.dim = dimensions
        self.name = f"gemini:{model}:{dimensions}"

    def __repr__(self) -> str:
        return f"GeminiEmbedder({self._model!r}, dim={self.dim})"

    def _call(self, texts: list[str]) -> list[list[float]]:
        try:
            resp = self._client.models.embed_content(
                model=self._model,
                contents=list(texts),
                config=self._types.EmbedContentConfig(output_dimensionality=self.dim),
            )
        except (self._errors.APIError, OSError) as err:
            raise EmbeddingUnavailable(f"gemini embeddings: {err}") from err
        return [list(e.values or []) for e in (resp.embeddings or [])]


_CACHE: dict[tuple[str, str, int, str | None, str], _Batched] = {}
_LOCK = threading.Lock()


def provider_embedder(settings: Settings) -> _Batched:
    """The process-wide provider embedder ``settings`` describe (one client per configuration).

    Raises ``ValueError`` naming what is missing (the key)."""
    kind = settings.embedder
    if kind not in DEFAULTS:
        raise ValueError(f"{kind!r} is not a provider embedder")
    model = settings.embedding_model or DEFAULTS[kind][0]
    dimensions = settings.embedding_dimensions or DEFAULTS[kind][1]
    secret = settings.embedding_api_key or (
        settings.openai_api_key if kind == "openai" else settings.gemini_api_key
    )
    if secret is None or not secret.get_secret_value():
        variable = "OPENAI_API_KEY" if kind == "openai" else "GEMINI_API_KEY"
        raise ValueError(
            f"XPANDO_EMBEDDER={kind} needs a key: XPANDO_EMBEDDING_API_KEY or {variable}"
        )
    key = secret.get_secret_value()
    cache_key = (kind, model, dimensions, settings.embedding_base_url, key)
    with _LOCK:
        embedder = _CACHE.get(cache_key)
        if embedder is None:
            cls = OpenAIEmbedder if kind == "openai" else GeminiEmbedder
            embedder = cls(
                api_key=key,
                model=model,
                dimensions=dimensions,
                base_url=settings.embedding_base_url,
            )
            _CACHE[cache_key] = embedder
        return embedder
