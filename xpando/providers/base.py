"""The provider interface every expert backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pydantic import SecretStr

from xpando.contracts import Citation, ContributionStatus, KnowledgeSnippet
from xpando.providers import errors
from xpando.retrieval import tokenize

# Providers a node can answer through (``offline`` is the default when a node has no key).
PROVIDERS = ("offline", "openai", "openai-compatible", "anthropic", "gemini")


@dataclass(frozen=True)
class ProviderRequest:
    prompt: str
    context: list[KnowledgeSnippet] = field(default_factory=list)


@dataclass(frozen=True)
class ProviderReply:
    status: ContributionStatus  # OK or NO_ANSWER; failures raise instead
    text: str
    model: str
    citations: list[Citation] = field(default_factory=list)
    relevance: float = 0.0  # in [0, 1]: how well the material matched the prompt
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    request_id: str | None = None  # the provider's id for the call (support tickets, logs)
    cost_usd: float = 0.0  # from the node's prices per 1M input/output tokens


@dataclass(frozen=True)
class Pricing:
    """A node's price in USD per 1M input and output tokens (0 for free or offline)."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        usd = input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok
        return round(usd / 1_000_000, 8)


@dataclass(frozen=True)
class ProviderConfig:
    """Everything a language-model provider needs. The key is a secret: only the SDK client
    built from it ever sees its value (it is never logged and never put in a payload)."""

    provider: str
    model: str
    api_key: SecretStr | None = None
    base_url: str | None = None
    timeout_s: float = 60.0  # one HTTP call, end to end (the SDK's read timeout)
    connect_timeout_s: float = 5.0
    max_output_tokens: int = 1024
    pricing: Pricing = field(default_factory=Pricing)


SYSTEM_PROMPT = (
    "You are one expert node in xpando, a network of AI experts whose answers are compared and "
    "combined. Answer the question directly, accurately and concisely. If stored knowledge is "
    "given and relevant, use it; if you do not know, say so plainly."
)


def system_prompt(request: ProviderRequest) -> str:
    """The instructions, with the stored knowledge handed to the expert as context."""
    if not request.context:
        return SYSTEM_PROMPT
    lines = [SYSTEM_PROMPT, "", "Stored knowledge that may help:"]
    for snippet in request.context:
        lines.append(f"- Q: {snippet.question}\n  A: {snippet.answer}")
    return "\n".join(lines)


def answer_relevance(prompt: str, answer: str) -> float:
    """A language model does not score its own answer; the node reports the share of the
    prompt's distinct terms that the answer addresses (0..1), the same lexical yardstick the
    offline expert uses, so the aggregator can compare both kinds of expert."""
    terms = set(tokenize(prompt))
    if not terms:
        return 0.0
    present = set(tokenize(answer))
    return round(len(terms & present) / len(terms), 4)


def build_reply(
    config: ProviderConfig,
    request: ProviderRequest,
    *,
    text: str | None,
    model: str,
    input_tokens: int,
    output_tokens: int,
    finish_reason: str | None,
    request_id: str | None,
    unusable: tuple[str, str] | None = None,
) -> ProviderReply:
    """The reply to a response the adapter has read, or the non-retryable error when it holds no
    answer to store: ``unusable`` (an error type and why, from the provider's finish reason) or
    an empty text. A failure carries the call's :class:`~xpando.providers.errors.Usage`, so
    a contribution that earns nothing still accounts for what it cost."""
    cost = config.pricing.cost(input_tokens, output_tokens)
    usage = errors.Usage(input_tokens, output_tokens, cost, request_id, finish_reason)
    if unusable is not None:
        error_type, why = unusable
        raise errors.non_retryable(error_type, config.provider, why, usage=usage)
    if not text or not text.strip():
        raise errors.non_retryable(
            errors.EMPTY, config.provider, "the answer is empty", usage=usage
        )
    return ProviderReply(
        status=ContributionStatus.OK,
        text=text.strip(),
        model=model,
        relevance=answer_relevance(request.prompt, text),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason=finish_reason,
        request_id=request_id,
        cost_usd=cost,
    )


class Provider(Protocol):
    """One expert backend. Raises on failure; returns a reply otherwise."""

    name: str
    model: str

    async def answer(self, request: ProviderRequest) -> ProviderReply: ...
