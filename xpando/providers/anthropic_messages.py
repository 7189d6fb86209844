"""Anthropic Messages API. Module name avoids shadowing the ``anthropic`` package."""

from __future__ import annotations

from typing import Any

import anthropic

from xpando.contracts import ContributionStatus
from xpando.providers import errors
from xpando.providers.base import (
    ProviderConfig,
    ProviderReply,
    ProviderRequest,
    answer_relevance,
    system_prompt,
)


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
        try:
            message = await self._client.messages.create(
                model=self.model,
                max_tokens=self._config.max_output_tokens,
                system=system_prompt(request),
                messages=[{"role": "user", "content": request.prompt}],
            )
        except anthropic.APITimeoutError:
            raise errors.timeout_error(self.name, self._config.timeout_s) from None
        except anthropic.APIConnectionError as err:
            raise errors.connection_error(self.name, err) from None
        except anthropic.APIStatusError as err:
            raise errors.from_status(
                self.name,
                err.status_code,
                headers=err.response.headers,
                body=err.body,
                message=err.message,
                request_id=err.request_id,
            ) from None
        except anthropic.APIResponseValidationError as err:
            raise errors.malformed(self.name, str(err)) from None
        except ValueError as err:  # a body that is not JSON
            raise errors.malformed(self.name, f"{type(err).__name__}: {err}") from None
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
        cost = self._config.pricing.cost(input_tokens, output_tokens)
        usage_info = errors.Usage(input_tokens, output_tokens, cost, request_id, stop)
        if stop == "refusal":
            raise errors.non_retryable(
                errors.REFUSAL, self.name, "the model declined to answer", usage=usage_info
            )
        if stop == "model_context_window_exceeded":
            raise errors.non_retryable(
                errors.CONTEXT_LENGTH, self.name, "context window exceeded", usage=usage_info
            )
        if stop == "max_tokens":
            raise errors.non_retryable(
                errors.TRUNCATED,
                self.name,
                f"answer cut off at {output_tokens} tokens (stop_reason=max_tokens)",
                usage=usage_info,
            )
        if not text.strip():
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
            finish_reason=stop,
            request_id=request_id,
            cost_usd=cost,
        )
