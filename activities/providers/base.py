"""The provider interface every expert backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from xpando.contracts import Citation, ContributionStatus, KnowledgeSnippet


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


class Provider(Protocol):
    """One expert backend. Raises on failure; returns a reply otherwise."""

    name: str
    model: str

    async def answer(self, request: ProviderRequest) -> ProviderReply: ...
