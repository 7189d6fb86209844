"""The provider nodes' SDK clients against a loopback server speaking each wire format.

The official SDKs (openai, anthropic, google-genai) are pointed at ``bench/loopback_providers.py``;
every fault is asserted for the classification the workflow acts on and for the number of HTTP
calls the SDK made (always one: Temporal is the only retry loop).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from bench.loopback_providers import DEFAULT_ANSWER, FakeProviders, Fault
from workers.node import NodeConfigError, NodeSpec, build_node
from xpando.contracts import ContributionStatus, KnowledgeSnippet
from xpando.providers import errors
from xpando.providers.base import Pricing, Provider, ProviderConfig, ProviderRequest
from xpando.providers.registry import ProviderConfigError, make_provider
from xpando.settings import Settings

PROVIDERS = ("openai", "anthropic", "gemini")
PROMPT = "Why does bread dough rise?"
KEY = "sk-test-secret-value"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviders]:
    with FakeProviders() as server:
        yield server


def _provider(fake: FakeProviders, provider: str, node: str, timeout_s: float = 5.0) -> Provider:
    config = ProviderConfig(
        provider=provider,
        model=f"{provider}-test-model",
        api_key=SecretStr(KEY),
        base_url=fake.base_url(provider, node),
        timeout_s=timeout_s,
        pricing=Pricing(input_per_mtok=2.5, output_per_mtok=10.0),
    )
    return make_provider(config)


# (fault, type, retried by Temporal, expected next_retry_delay)
FAULTS = [
    (Fault.RATE_LIMIT, "ProviderRateLimited", True, timedelta(milliseconds=1500)),
    (Fault.SERVER_ERROR, "ProviderServerError", True, None),
    (Fault.OVERLOADED, "ProviderOverloaded", True, None),
    (Fault.HANG, "ProviderTimeout", True, None),
    (Fault.MALFORMED, "ProviderMalformedResponse", False, None),
    (Fault.REFUSAL, "ProviderRefusal", False, None),
    (Fault.AUTH, "ProviderAuthError", False, None),
    (Fault.INSUFFICIENT_QUOTA, "InsufficientQuota", False, None),
    (Fault.CONTEXT_LENGTH, "ContextLengthExceeded", False, None),
    (Fault.EMPTY, "ProviderEmptyAnswer", False, None),
    (Fault.TRUNCATED, "ProviderTruncated", False, None),
    (Fault.NOT_FOUND, "ProviderNotFound", False, None),
]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_good_answer_carries_tokens_cost_request_id_and_finish_reason(
    fake: FakeProviders, provider: str
) -> None:
    node = f"ok-{provider}"
    p = _provider(fake, provider, node)
    context = [
        KnowledgeSnippet(
            knowledge_id="kn-1", question="What is yeast?", answer="A fungus.", confidence=0.8
        )
    ]
    reply = await p.answer(ProviderRequest(PROMPT, context=context))
    calls = fake.calls(node=node)
    assert len(calls) == 1
    assert calls[0].api_key == KEY  # the SDK sent the node's key, to the provider only
    assert calls[0].model == f"{provider}-test-model" and PROMPT in calls[0].prompt
    assert reply.status == ContributionStatus.OK and reply.text == DEFAULT_ANSWER
    assert reply.input_tokens == len(PROMPT.split()) + 20
    assert reply.output_tokens == len(DEFAULT_ANSWER.split())
    expected = (reply.input_tokens * 2.5 + reply.output_tokens * 10.0) / 1_000_000
    assert reply.cost_usd == pytest.approx(expected)
    assert reply.request_id and reply.request_id.startswith("req_")
    assert reply.finish_reason in ("stop", "end_turn", "STOP")
    assert 0 < reply.relevance <= 1  # "bread", "dough", "rise" are in the answer


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("fault", "type_", "retryable", "delay"), FAULTS, ids=[f[0] for f in FAULTS]
)
async def test_each_fault_is_one_http_call_classified_for_temporal(
    fake: FakeProviders,
    provider: str,
    fault: Fault,
    type_: str,
    retryable: bool,
    delay: timedelta | None,
) -> None:
    node = f"{fault}-{provider}"
    p = _provider(fake, provider, node, timeout_s=0.3)
    fake.fail(node, fault, retry_after_ms=1500, hang_s=5)
    try:
        with pytest.raises(ApplicationError) as info:
            await p.answer(ProviderRequest(PROMPT))
    finally:
        fake.heal(node)
    err = info.value
    assert err.type == type_, err.message
    assert err.non_retryable is (not retryable)
    assert err.next_retry_delay == delay
    assert KEY not in err.message and KEY not in str(err.details)
    calls = fake.calls(node=node)
    assert len(calls) == 1, "the SDK retried on its own"
    if fault == Fault.HANG:  # the client gave up and closed the connection
        for _ in range(50):
            if calls[0].disconnected:
                break
            await asyncio.sleep(0.05)
        assert calls[0].disconnected
    if fault in (Fault.REFUSAL, Fault.TRUNCATED, Fault.EMPTY):
        usage = errors.usage_of(err)  # a failed answer still accounts for what it cost
        assert usage is not None and usage.input_tokens > 0 and usage.cost_usd > 0
        assert usage.request_id and usage.request_id.startswith("req_")


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_retry_after_in_seconds_is_honoured(fake: FakeProviders, provider: str) -> None:
    node = f"retry-after-s-{provider}"
    p = _provider(fake, provider, node)
    with (
        fake.failing(node, Fault.RATE_LIMIT, retry_after_s=7),
        pytest.raises(ApplicationError) as info,
    ):
        await p.answer(ProviderRequest(PROMPT))
    assert info.value.type == "ProviderRateLimited"
    assert info.value.next_retry_delay == timedelta(seconds=7)


async def test_an_unreachable_provider_is_a_retryable_connection_error() -> None:
    config = ProviderConfig(
        provider="openai-compatible",
        model="llama3",
        base_url="http://127.0.0.1:9/v1",  # discard port: nothing listens
        timeout_s=2,
        connect_timeout_s=1,
    )
    with pytest.raises(ApplicationError) as info:
        await make_provider(config).answer(ProviderRequest(PROMPT))
    assert info.value.type == "ProviderConnectionError" and not info.value.non_retryable


async def test_openai_compatible_needs_no_key_and_uses_max_tokens(fake: FakeProviders) -> None:
    node = "compat"
    config = ProviderConfig(
        provider="openai-compatible", model="llama3", base_url=fake.base_url("openai", node)
    )
    reply = await make_provider(config).answer(ProviderRequest(PROMPT))
    assert reply.status == ContributionStatus.OK and reply.cost_usd == 0.0
    assert fake.calls(node=node)[0].api_key == "not-needed"


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"retry-after-ms": "250"}, None, 0.25),
        ({"Retry-After": "3"}, None, 3.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None, 0.0),  # a date in the past
        ({}, {"error": {"details": [{"retryDelay": "12s"}]}}, 12.0),
        ({}, {"error": {"message": "slow down"}}, None),
        ({"retry-after": "soon"}, None, None),
    ],
)
def test_retry_after_parsing(headers: dict[str, str], body: object, expected: float | None) -> None:
    assert errors.retry_after_s(headers, body) == expected


def test_a_huge_retry_after_is_capped() -> None:
    err = errors.from_status(
        "openai", 429, headers={"retry-after": "86400"}, body=None, message="limit"
    )
    assert err.next_retry_delay == timedelta(seconds=errors.MAX_RETRY_AFTER_S)


def test_gemini_rate_limit_with_retry_info_is_not_a_spent_quota() -> None:
    body = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "You exceeded your current quota, please check your plan and billing.",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}],
        }
    }
    err = errors.from_status("gemini", 429, headers={}, body=body, message="")
    assert err.type == "ProviderRateLimited" and err.next_retry_delay == timedelta(seconds=2)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ProviderConfig(provider="openai", model="m"), "OPENAI_API_KEY"),
        (
            ProviderConfig(provider="anthropic", model="m", api_key=SecretStr(" ")),
            "ANTHROPIC_API_KEY",
        ),
        (ProviderConfig(provider="gemini", model="m"), "GEMINI_API_KEY"),
        (ProviderConfig(provider="openai-compatible", model="m"), "needs a base URL"),
        (ProviderConfig(provider="mistral", model="m"), "unknown provider"),
        (
            ProviderConfig(provider="openai", model="m", api_key=SecretStr("k"), timeout_s=0),
            "timeouts must be > 0",
        ),
    ],
)
def test_a_provider_that_cannot_work_is_refused_with_what_to_set(
    config: ProviderConfig, message: str
) -> None:
    with pytest.raises(ProviderConfigError, match=message):
        make_provider(config)


def test_keys_come_from_the_conventional_variables_and_stay_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    monkeypatch.setenv("GOOGLE_API_KEY", "g-key")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("XPANDO_NODE_API_KEY", raising=False)
    settings = Settings(_env_file=None)
    assert _key(settings, "openai") == "sk-openai"
    assert _key(settings, "anthropic") == "sk-ant"
    assert _key(settings, "gemini") == "g-key"
    assert "sk-openai" not in repr(settings) and "g-key" not in str(settings.model_dump())
    monkeypatch.setenv("XPANDO_GEMINI_API_KEY", "x-key")  # the prefixed name wins
    assert _key(Settings(_env_file=None), "gemini") == "x-key"
    monkeypatch.setenv("XPANDO_NODE_API_KEY", "node-key")  # a node's own key wins over both
    assert _key(Settings(_env_file=None), "openai") == "node-key"


def _key(settings: Settings, provider: str) -> str | None:
    key = settings.provider_key(provider)
    return None if key is None else key.get_secret_value()


def test_a_model_node_profile_names_provider_and_model(tmp_path: Path) -> None:
    spec = NodeSpec(
        node_id="gpt-1",
        region="eu-west",
        provider="openai",
        api_key=SecretStr("k"),
        base_url="http://127.0.0.1:9/v1",
        domain="temporal",
    )
    profile, provider = build_node(spec, data_dir=tmp_path)
    assert (profile.provider, profile.model) == ("openai", "gpt-4o-mini")
    assert (provider.name, provider.model) == ("openai", "gpt-4o-mini")
    assert profile.domains[0].name == "temporal" and profile.domains[0].description
    assert "k" not in profile.model_dump_json().replace('"', " ").split()  # no key in a payload
    with pytest.raises(NodeConfigError, match="unknown provider 'mistral'"):
        build_node(NodeSpec(node_id="x", region="r", provider="mistral"), data_dir=tmp_path)


def test_cli_refuses_a_provider_node_without_a_key(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "XPANDO_DATA_DIR": str(tmp_path),
        "XPANDO_TEMPORAL_ADDRESS": "127.0.0.1:9",  # never reached: the node fails first
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "worker",
            "node",
            "--node-id",
            "a1",
            "--provider",
            "anthropic",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs an API key" in proc.stderr and "ANTHROPIC_API_KEY" in proc.stderr
