"""A loopback HTTP server that speaks the three providers' wire formats, with fault switches.

The official SDKs are pointed at it (``base_url``) so tests exercise the real clients: request
building, auth headers, error parsing, timeouts and cancellation. It is not a model: it answers
with a configurable text and counts tokens as words.

Routes (``<node>`` lets several nodes share one server and be counted apart):

* OpenAI chat completions: ``POST /<node>/v1/chat/completions`` (base URL ``…/<node>/v1``)
* Anthropic messages: ``POST /<node>/v1/messages`` (base URL ``…/<node>``)
* Gemini generateContent: ``POST /<node>/v1[beta]/models/<model>:generateContent`` (base URL
  ``…/<node>``)

Faults are set per provider or per node (a node's rule wins) with :meth:`FakeProviders.fail`;
each rule can apply a number of ``times`` and/or with a probability ``rate`` (seeded).
Every request is recorded as a :class:`Call`. The server runs in its own thread and event loop,
so a test's (or a benchmark's) workers do not share a loop with it.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

PROVIDERS = ("openai", "anthropic", "gemini")
_GEMINI = re.compile(r"^v1[a-z0-9]*/models/(?P<model>[^/:]+):generateContent$")
DEFAULT_ANSWER = "Bread rises because yeast ferments the sugars in the dough into carbon dioxide."


class Fault(StrEnum):
    OK = "ok"
    RATE_LIMIT = "rate_limit"  # 429 with retry-after (seconds) or retry-after-ms
    SERVER_ERROR = "server_error"  # 500
    OVERLOADED = "overloaded"  # 529 (Anthropic's overloaded_error; 503 UNAVAILABLE for Gemini)
    HANG = "hang"  # no response until the client gives up (or hang_s passes)
    MALFORMED = "malformed"  # 200 with a body that is not the provider's format
    REFUSAL = "refusal"  # 200 with the provider's refusal shape
    AUTH = "auth"  # 401 (Gemini: 400 API_KEY_INVALID)
    INSUFFICIENT_QUOTA = "insufficient_quota"  # 429 insufficient_quota (Anthropic: 400 billing)
    CONTEXT_LENGTH = "context_length"  # 400 context length exceeded
    EMPTY = "empty"  # 200 with an empty answer
    TRUNCATED = "truncated"  # 200 cut off at the token limit
    NOT_FOUND = "not_found"  # 404 unknown model


@dataclass
class Rule:
    fault: Fault
    times: int | None = None  # None: every matching call
    rate: float = 1.0  # probability that a call gets the fault
    retry_after_s: float | None = None
    retry_after_ms: int | None = None
    hang_s: float = 30.0


@dataclass
class Call:
    provider: str
    node: str
    path: str
    fault: Fault
    api_key: str | None
    model: str
    prompt: str
    started: float
    ended: float | None = None
    disconnected: bool = False  # the client closed the connection before the answer
    traceparent: str | None = None  # the W3C trace context the caller sent, if it traces


@dataclass
class FakeProviders:
    """See the module docstring. Use as a context manager (``with FakeProviders() as fake``)."""

    seed: int = 0
    answers: dict[str, str] = field(default_factory=dict)  # node -> answer text
    latency_s: float = 0.0  # added to every answer and error (a model is not instant)
    _rules: dict[str, Rule] = field(default_factory=dict)
    _calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FakeProviders:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/{node}/{rest:path}", self._handle, methods=["POST"])])
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=1, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def run() -> None:
            async def serve() -> None:
                assert self._server is not None
                task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
                while not self._server.started and not task.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                started.set()
                await task

            asyncio.run(serve())

        self._thread = threading.Thread(target=run, name="fake-providers", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake provider server did not start")

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    # --- configuration ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    def base_url(self, provider: str, node: str) -> str:
        """The ``base_url`` to give the SDK of ``provider`` for a node called ``node``."""
        root = f"http://127.0.0.1:{self._port}/{node}"
        return f"{root}/v1" if provider in ("openai", "openai-compatible") else root

    def fail(
        self,
        target: str,
        fault: Fault | str,
        *,
        times: int | None = None,
        rate: float = 1.0,
        retry_after_s: float | None = None,
        retry_after_ms: int | None = None,
        hang_s: float = 30.0,
    ) -> None:
        """Make calls to ``target`` (a provider name or a node) fail with ``fault``."""
        with self._lock:
            self._rules[target] = Rule(
                Fault(fault), times, rate, retry_after_s, retry_after_ms, hang_s
            )

    def heal(self, target: str | None = None) -> None:
        with self._lock:
            if target is None:
                self._rules.clear()
            else:
                self._rules.pop(target, None)

    def calls(self, *, provider: str | None = None, node: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self._calls
                if (provider is None or c.provider == provider) and (node is None or c.node == node)
            ]

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    @contextmanager
    def failing(self, target: str, fault: Fault | str, **kw: Any) -> Iterator[None]:
        self.fail(target, fault, **kw)
        try:
            yield
        finally:
            self.heal(target)

    # --- serving ---------------------------------------------------------------------------------

    def _pick(self, provider: str, node: str) -> Rule | None:
        with self._lock:
            for target in (node, provider):
                rule = self._rules.get(target)
                if rule is None:
                    continue
                if rule.times is not None and rule.times <= 0:
                    continue
                if rule.rate < 1.0 and self._random.random() >= rule.rate:
                    return None
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None

    async def _handle(self, request: Request) -> Response:
        node = request.path_params["node"]
        rest = request.path_params["rest"]
        if rest == "v1/chat/completions":
            provider = "openai"
        elif rest == "v1/messages":
            provider = "anthropic"
        elif _GEMINI.match(rest):
            provider = "gemini"
        else:
            return PlainTextResponse(f"no route {rest}", status_code=404)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "invalid JSON"}}, status_code=400)
        model, prompt = _model_and_prompt(provider, rest, body)
        rule = self._pick(provider, node)
        fault = rule.fault if rule else Fault.OK
        call = Call(
            provider=provider,
            node=node,
            path=request.url.path,
            fault=fault,
            api_key=_api_key(provider, request),
            model=model,
            prompt=prompt,
            started=time.monotonic(),
            traceparent=request.headers.get("traceparent"),
        )
        with self._lock:
            self._calls.append(call)
        try:
            if fault == Fault.HANG:
                assert rule is not None
                deadline = time.monotonic() + rule.hang_s
                while time.monotonic() < deadline and not self._stopping.is_set():
                    if await request.is_disconnected():
                        call.disconnected = True
                        break
                    await asyncio.sleep(0.02)
                return JSONResponse({"error": {"message": "hung"}}, status_code=504)
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            answer = self.answers.get(node, DEFAULT_ANSWER)
            return _respond(provider, fault, rule, model=model, prompt=prompt, answer=answer)
        finally:
            call.ended = time.monotonic()


def _api_key(provider: str, request: Request) -> str | None:
    bearer = request.headers.get("authorization", "").removeprefix("Bearer ") or None
    if provider == "openai":
        return bearer
    if provider == "anthropic":
        return request.headers.get("x-api-key") or bearer
    return request.headers.get("x-goog-api-key") or request.query_params.get("key")


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return " ".join(_text_of(value.get(k)) for k in ("text", "content", "parts") if k in value)
    return ""


def _model_and_prompt(provider: str, rest: str, body: dict[str, Any]) -> tuple[str, str]:
    if provider == "gemini":
        match = _GEMINI.match(rest)
        model = match.group("model") if match else ""
        return model, _text_of(body.get("contents"))
    messages = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return str(body.get("model", "")), _text_of([m.get("content") for m in messages])


def _tokens(text: str) -> int:
    return len(text.split())


def _error(provider: str, status: int, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    if provider == "openai":
        return {"error": {"message": message, "type": kind, "param": None, "code": kind, **extra}}
    if provider == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"code": status, "message": message, "status": kind, **extra}}


def _respond(
    provider: str, fault: Fault, rule: Rule | None, *, model: str, prompt: str, answer: str
) -> Response:
    request_id = f"req_{uuid.uuid4().hex[:16]}"
    headers = {"x-request-id": request_id, "request-id": request_id}
    if fault == Fault.RATE_LIMIT:
        assert rule is not None
        if rule.retry_after_ms is not None:
            headers["retry-after-ms"] = str(rule.retry_after_ms)
        if rule.retry_after_s is not None:
            headers["retry-after"] = f"{rule.retry_after_s:g}"
        if provider == "gemini":  # Gemini words a rate limit like a quota, with a RetryInfo
            details = []
            if rule.retry_after_s is not None:
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{rule.retry_after_s:g}s",
                    }
                )
            message = "You exceeded your current quota, please check your plan and billing."
            body = _error(provider, 429, "RESOURCE_EXHAUSTED", message, details=details)
            if details or rule.retry_after_ms is not None:
                return JSONResponse(body, 429, headers)
            body["error"]["message"] = "Resource has been exhausted (e.g. check quota)."
            return JSONResponse(body, 429, headers)
        kind = {"openai": "rate_limit_exceeded", "anthropic": "rate_limit_error"}[provider]
        return JSONResponse(
            _error(provider, 429, kind, "Rate limit reached, slow down"), 429, headers
        )
    if fault == Fault.SERVER_ERROR:
        kind = {"openai": "server_error", "anthropic": "api_error"}.get(provider, "INTERNAL")
        return JSONResponse(_error(provider, 500, kind, "Internal server error"), 500, headers)
    if fault == Fault.OVERLOADED:
        if provider == "gemini":
            body = _error(provider, 503, "UNAVAILABLE", "The model is overloaded.")
            return JSONResponse(body, 503, headers)
        kind = "overloaded_error" if provider == "anthropic" else "server_error"
        return JSONResponse(_error(provider, 529, kind, "Overloaded"), 529, headers)
    if fault == Fault.AUTH:
        if provider == "gemini":
            body = _error(
                provider,
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                    }
                ],
            )
            return JSONResponse(body, 400, headers)
        kind = "invalid_api_key" if provider == "openai" else "authentication_error"
        return JSONResponse(_error(provider, 401, kind, "Invalid API key"), 401, headers)
    if fault == Fault.INSUFFICIENT_QUOTA:
        if provider == "anthropic":
            message = "Your credit balance is too low to access the Anthropic API."
            body = _error(provider, 400, "invalid_request_error", message)
            return JSONResponse(body, 400, headers)
        if provider == "gemini":
            message = "You exceeded your current quota, please check your plan and billing."
            return JSONResponse(_error(provider, 429, "RESOURCE_EXHAUSTED", message), 429, headers)
        message = "You exceeded your current quota, please check your plan and billing details."
        return JSONResponse(_error(provider, 429, "insufficient_quota", message), 429, headers)
    if fault == Fault.CONTEXT_LENGTH:
        message = {
            "openai": "This model's maximum context length is 8192 tokens.",
            "anthropic": "prompt is too long: 250000 tokens > 200000 maximum",
            "gemini": "The input token count exceeds the maximum number of tokens allowed.",
        }[provider]
        kind = {"openai": "context_length_exceeded", "anthropic": "invalid_request_error"}.get(
            provider, "INVALID_ARGUMENT"
        )
        return JSONResponse(_error(provider, 400, kind, message), 400, headers)
    if fault == Fault.NOT_FOUND:
        kind = {"openai": "model_not_found", "anthropic": "not_found_error"}.get(
            provider, "NOT_FOUND"
        )
        return JSONResponse(_error(provider, 404, kind, f"model {model} not found"), 404, headers)
    if fault == Fault.MALFORMED:
        return Response('{"this is": "not what', 200, headers, media_type="application/json")

    text = answer
    finish = {"openai": "stop", "anthropic": "end_turn", "gemini": "STOP"}[provider]
    refusal: str | None = None
    if fault == Fault.EMPTY:
        text = ""
    elif fault == Fault.TRUNCATED:
        text = " ".join(answer.split()[:4])
        finish = {"openai": "length", "anthropic": "max_tokens", "gemini": "MAX_TOKENS"}[provider]
    elif fault == Fault.REFUSAL:
        refusal = "I'm sorry, I can't help with that."
        text = "" if provider != "anthropic" else refusal
        finish = {"openai": "stop", "anthropic": "refusal", "gemini": "SAFETY"}[provider]
    in_tokens, out_tokens = _tokens(prompt) + 20, _tokens(text)
    if provider == "openai":
        return JSONResponse(
            {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": None if refusal else text,
                            "refusal": refusal,
                        },
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": in_tokens,
                    "completion_tokens": out_tokens,
                    "total_tokens": in_tokens + out_tokens,
                },
            },
            200,
            headers,
        )
    if provider == "anthropic":
        return JSONResponse(
            {
                "id": f"msg_{request_id}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}] if text else [],
                "stop_reason": finish,
                "stop_sequence": None,
                "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens},
            },
            200,
            headers,
        )
    candidate: dict[str, Any] = {"finishReason": finish, "index": 0}
    if fault != Fault.REFUSAL:
        candidate["content"] = {"parts": [{"text": text}], "role": "model"}
    return JSONResponse(
        {
            "candidates": [candidate],
            "usageMetadata": {
                "promptTokenCount": in_tokens,
                "candidatesTokenCount": out_tokens,
                "totalTokenCount": in_tokens + out_tokens,
            },
            "modelVersion": model,
            "responseId": request_id,
        },
        200,
        headers,
    )
