"""Provider embeddings (``XPANDO_EMBEDDER=openai|gemini``) through the official SDKs, pointed at a
loopback server that speaks the two embeddings wire formats (the real APIs need keys and the
internet); and routing on top of them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from xpando.contracts import NodeDomain, NodeProfile
from xpando.db import SessionFactory, queries
from xpando.embedding import HashingEmbedder, embedder_from_settings
from xpando.embedding_providers import EmbeddingUnavailable, GeminiEmbedder, OpenAIEmbedder
from xpando.routing.index import RoutingIndex
from xpando.settings import Settings


class FakeEmbeddings:
    """OpenAI ``POST /v1/embeddings`` and Gemini ``POST /v1beta/models/{m}:batchEmbedContents``;
    a text's vector is the lexical hashing embedding times 3 (so clients must normalise)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("authorization")
                        or self.headers.get("x-goog-api-key"),
                        "body": body,
                    }
                )
                if fake.fail:
                    self._send(500, {"error": {"message": "overloaded", "code": 500}})
                elif self.path.endswith("/embeddings"):
                    vecs = fake.vectors(body["input"], body.get("dimensions") or 1536)
                    data = [
                        {"object": "embedding", "index": i, "embedding": v}
                        for i, v in enumerate(vecs)
                    ]
                    usage = {"prompt_tokens": 1, "total_tokens": 1}
                    self._send(
                        200,
                        {"object": "list", "data": data, "model": body["model"], "usage": usage},
                    )
                elif self.path.endswith(":batchEmbedContents"):
                    texts = [r["content"]["parts"][0]["text"] for r in body["requests"]]
                    dims = body["requests"][0].get("outputDimensionality") or 768
                    self._send(
                        200, {"embeddings": [{"values": v} for v in fake.vectors(texts, dims)]}
                    )
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def vectors(texts: list[str], dim: int) -> list[list[float]]:
        return [(v * 3).tolist() for v in HashingEmbedder(dim).embed(texts)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeEmbeddings]:
    server = FakeEmbeddings()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["openai", "gemini"])
def test_provider_embedders_through_the_official_sdks(fake: FakeEmbeddings, kind: str) -> None:
    embedder: OpenAIEmbedder | GeminiEmbedder
    if kind == "openai":
        embedder = OpenAIEmbedder(api_key="sk-test", dimensions=64, base_url=f"{fake.url}/v1")
    else:
        embedder = GeminiEmbedder(api_key="g-test", dimensions=64, base_url=fake.url)
    vecs = embedder.embed(["bread dough and yeast", "", "planets and stars"])
    assert vecs.shape == (3, 64) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs[[0, 2]], axis=1), 1.0)  # normalised by the client
    assert not vecs[1].any()  # an empty text is a zero row, not a request
    [request] = fake.requests
    assert "test" in (request["auth"] or "")
    if kind == "openai":
        assert request["path"] == "/v1/embeddings"
        assert request["body"]["input"] == ["bread dough and yeast", "planets and stars"]
        assert request["body"]["dimensions"] == 64
    else:
        assert request["path"].endswith("models/gemini-embedding-001:batchEmbedContents")
    assert embedder.name.startswith(f"{kind}:") and embedder.name.endswith(":64")

    fake.fail = True
    with pytest.raises(EmbeddingUnavailable):
        embedder.embed(["anything"])


def test_settings_choose_a_provider_embedder_and_need_its_key(fake: FakeEmbeddings) -> None:
    settings = Settings(
        _env_file=None,
        embedder="openai",
        embedding_base_url=f"{fake.url}/v1",
        embedding_dimensions=32,
        openai_api_key=SecretStr("sk-from-openai-key"),
    )
    embedder = embedder_from_settings(settings)
    assert isinstance(embedder, OpenAIEmbedder) and embedder.dim == 32
    assert embedder_from_settings(settings) is embedder  # one client per configuration
    embedder.embed(["hello"])
    assert fake.requests[-1]["auth"] == "Bearer sk-from-openai-key"
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        embedder_from_settings(Settings(_env_file=None, embedder="gemini"))


async def test_routing_on_provider_embeddings(
    fake: FakeEmbeddings, sessions: SessionFactory
) -> None:
    embedder = OpenAIEmbedder(api_key="sk-test", dimensions=256, base_url=f"{fake.url}/v1")
    async with sessions() as s:
        for name, description in (
            ("cooking", "bread dough yeast ovens"),
            ("astronomy", "planets stars telescopes"),
        ):
            await queries.upsert_node(
                session=s,
                profile=NodeProfile(
                    node_id=name,
                    region="eu",
                    provider="p",
                    model="m",
                    domains=[NodeDomain(name=name, description=description)],
                ),
                now=datetime.now(UTC),
            )
    index = RoutingIndex(sessions, embedder)
    await index.refresh()
    ranked, _ = index.rank(await index.embed_prompt("which telescope shows planets"))
    assert [s.node.node_id for s in ranked] == ["astronomy", "cooking"]
    calls = len(fake.requests)
    # Domain vectors were stored under the embedder's name: a second index loads, not embeds.
    again = RoutingIndex(sessions, embedder)
    await again.refresh()
    assert len(fake.requests) == calls
