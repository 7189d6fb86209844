"""OpenAI Chat Completions, and any OpenAI-compatible server (Ollama, vLLM, llama.cpp server).

The SDK client is built with ``max_retries=0`` (Temporal retries); failures are classified by
:mod:`xpando.providers.errors`. Module name avoids shadowing the ``openai`` package.
"""

from __future__ import annotations

from typing import Any

import openai

from xpando.providers import errors
from xpando.providers.base import (
    ProviderConfig,
    ProviderReply,
    ProviderRequest,
    build_reply,
    system_prompt,
)

# An OpenAI-compatible server without authentication still needs a non-empty key for the SDK.
NO_KEY = "not-needed"
SDK_EXCEPTIONS = errors.stainless_exceptions(openai)


class OpenAIChatProvider:
    """``openai`` (api.openai.com, or ``base_url``) and ``openai-compatible`` (``base_url``)."""

    def __init__(self, config: ProviderConfig) -> None:
        if config.provider not in ("openai", "openai-compatible"):
            raise ValueError(f"OpenAIChatProvider cannot serve provider {config.provider!r}")
        self.name = config.provider
        self.model = config.model
        self._config = config
        compatible = config.provider == "openai-compatible"
        key = config.api_key.get_secret_value() if config.api_key else None
        self._client = openai.AsyncOpenAI(
            api_key=key or (NO_KEY if compatible else None),
            base_url=config.base_url,
            max_retries=0,
            timeout=openai.Timeout(config.timeout_s, connect=config.connect_timeout_s),
        )
        # OpenAI deprecated max_tokens for max_completion_tokens; compatible servers know the
        # older name best.
        self._limit_param = "max_tokens" if compatible else "max_completion_tokens"

    async def answer(self, request: ProviderRequest) -> ProviderReply:
        limit: dict[str, Any] = {self._limit_param: self._config.max_output_tokens}
        with errors.mapped_sdk_errors(self.name, SDK_EXCEPTIONS, timeout_s=self._config.timeout_s):
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": system_prompt(request)},
                    {"role": "user", "content": request.prompt},
                ],
                **limit,
            )
        return self._reply(request, completion)

    def _reply(self, request: ProviderRequest, completion: Any) -> ProviderReply:
        request_id = getattr(completion, "_request_id", None)
        try:
            usage = completion.usage
            input_tokens = int(usage.prompt_tokens) if usage is not None else 0
            output_tokens = int(usage.completion_tokens) if usage is not None else 0
            choice = completion.choices[0]
            message = choice.message
            text = message.content
            refusal = getattr(message, "refusal", None)
            finish = choice.finish_reason
            model = str(completion.model or self.model)
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            raise errors.malformed(
                self.name,
                f"not a chat completion ({type(err).__name__}: {err})",
                usage=errors.Usage(request_id=request_id),
            ) from None
        if text is not None and not isinstance(text, str):
            raise errors.malformed(self.name, "message content is not text")
        unusable = None
        if refusal or finish == "content_filter":
            why = refusal or "the provider's content filter stopped the answer"
            unusable = errors.REFUSAL, why
        elif finish == "length":
            why = f"answer cut off at {output_tokens} tokens (finish_reason=length)"
            unusable = errors.TRUNCATED, why
        return build_reply(
            self._config,
            request,
            text=text,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            finish_reason=finish,
            request_id=request_id,
            unusable=unusable,
        )
