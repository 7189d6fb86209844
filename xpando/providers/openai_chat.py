"""OpenAI Chat Completions, and any OpenAI-compatible server (Ollama, vLLM, llama.cpp server).

The SDK client is built with ``max_retries=0`` (Temporal retries); failures are classified by
:mod:`xpando.providers.errors`. Module name avoids shadowing the ``openai`` package.
"""

from __future__ import annotations

from typing import Any

import openai

from xpando.contracts import ContributionStatus
from xpando.providers import errors
from xpando.providers.base import (
    ProviderConfig,
    ProviderReply,
    ProviderRequest,
    answer_relevance,
    system_prompt,
)

# An OpenAI-compatible server without authentication still needs a non-empty key for the SDK.
NO_KEY = "not-needed"


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
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": system_prompt(request)},
                    {"role": "user", "content": request.prompt},
                ],
                **limit,
            )
        except openai.APITimeoutError:
            raise errors.timeout_error(self.name, self._config.timeout_s) from None
        except openai.APIConnectionError as err:
            raise errors.connection_error(self.name, err) from None
        except openai.APIStatusError as err:
            raise errors.from_status(
                self.name,
                err.status_code,
                headers=err.response.headers,
                body=err.body,
                message=err.message,
                request_id=err.request_id,
            ) from None
        except openai.APIResponseValidationError as err:
            raise errors.malformed(self.name, str(err)) from None
        except ValueError as err:  # a body that is not JSON
            raise errors.malformed(self.name, f"{type(err).__name__}: {err}") from None
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
        cost = self._config.pricing.cost(input_tokens, output_tokens)
        usage_info = errors.Usage(input_tokens, output_tokens, cost, request_id, finish)
        if refusal or finish == "content_filter":
            reason = refusal or "the provider's content filter stopped the answer"
            raise errors.non_retryable(errors.REFUSAL, self.name, reason, usage=usage_info)
        if finish == "length":
            raise errors.non_retryable(
                errors.TRUNCATED,
                self.name,
                f"answer cut off at {output_tokens} tokens (finish_reason=length)",
                usage=usage_info,
            )
        if not text or not text.strip():
            raise errors.non_retryable(
                errors.EMPTY, self.name, "the answer is empty", usage=usage_info
            )
        return ProviderReply(
            status=ContributionStatus.OK,
            text=text.strip(),
            model=model,
            relevance=answer_relevance(request.prompt, text),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            finish_reason=finish,
            request_id=request_id,
            cost_usd=cost,
        )
