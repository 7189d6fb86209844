"""Anthropic Messages API. Module name avoids shadowing the ``anthropic`` package."""

from __future__ import annotations

from typing import Any

import anthropic

from xpando.providers import errors
from xpando.providers.base import (
    ProviderConfig,
    ProviderReply,
    ProviderRequest,
    build_reply,
    system_prompt,
)

SDK_EXCEPTIONS = errors.stainless_exceptions(anthropic)


class AnthropicMessagesProvider:
    name = "anthropic"

    def __init__(self, config: ProviderConfig) -> None:
        if config.provider != "anthropic":
            raise ValueError(f"AnthropicMessagesProvider cannot serve {config.provider!r}")
        self.model = config.model
        self._config = config
        self._client = anthropic.AsyncAnthropic(
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            base_url=config.base_url,
            max_retries=0,
            timeout=anthropic.Timeout(config.timeout_s, connect=config.connect_timeout_s),
        )

    async def answer(self, request: ProviderRequest) -> ProviderReply:
        with errors.mapped_sdk_errors(self.name, SDK_EXCEPTIONS, timeout_s=self._config.timeout_s):
            message = await self._client.messages.create(
                model=self.model,
                max_tokens=self._config.max_output_tokens,
                system=system_prompt(request),
                messages=[{"role": "user", "content": request.prompt}],
            )
        return self._reply(request, message)

    def _reply(self, request: ProviderRequest, message: Any) -> ProviderReply:
        request_id = getattr(message, "_request_id", None)
        try:
            usage = message.usage
            input_tokens = int(usage.input_tokens or 0)
            # Prompt-cache reads and writes are input tokens too (billed at their own rates;
            # the node's single input price is an approximation for them).
            for extra in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                input_tokens += int(getattr(usage, extra, 0) or 0)
            output_tokens = int(usage.output_tokens or 0)
            blocks = list(message.content)
            text = "".join(
                str(block.text) for block in blocks if getattr(block, "type", None) == "text"
            )
            stop = message.stop_reason
            model = str(message.model or self.model)
        except (AttributeError, TypeError, ValueError) as err:
            raise errors.malformed(
                self.name,
                f"not a message ({type(err).__name__}: {err})",
                usage=errors.Usage(request_id=request_id),
            ) from None
        unusable = None
        if stop == "refusal":
            unusable = errors.REFUSAL, "the model declined to answer"
        elif stop == "model_context_window_exceeded":
            unusable = errors.CONTEXT_LENGTH, "context window exceeded"
        elif stop == "max_tokens":
            why = f"answer cut off at {output_tokens} tokens (stop_reason=max_tokens)"
            unusable = errors.TRUNCATED, why
        return build_reply(
            self._config,
            request,
            text=text,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            finish_reason=stop,
            request_id=request_id,
            unusable=unusable,
        )
