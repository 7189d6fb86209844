"""Google Gemini through ``google-genai`` (``generate_content``).

The deprecated ``google-generativeai`` package is not used. The client is given explicit
``HttpRetryOptions(attempts=1)``: without retry options google-genai would not retry through
tenacity, but its aiohttp transport (when aiohttp is installed) then retries connection errors
on its own; with them set, the SDK makes exactly one HTTP call and Temporal decides the rest.
"""

from __future__ import annotations

from typing import Any

import httpx
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from xpando.providers import errors
from xpando.providers.base import (
    ProviderConfig,
    ProviderReply,
    ProviderRequest,
    build_reply,
    system_prompt,
)

try:  # google-genai may use httpx or its fork httpx2, whichever is installed
    import httpx2

    _TIMEOUTS: tuple[type[BaseException], ...] = (httpx.TimeoutException, httpx2.TimeoutException)
    _TRANSPORT: tuple[type[BaseException], ...] = (httpx.TransportError, httpx2.TransportError)
except ImportError:  # pragma: no cover - httpx2 comes with the openai SDK
    _TIMEOUTS = (httpx.TimeoutException,)
    _TRANSPORT = (httpx.TransportError,)

# Finish reasons that mean the model (or its safety system) declined to answer.
REFUSED = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "MODEL_ARMOR",
}


def _error_response(err: genai_errors.APIError) -> errors.ErrorResponse:
    headers = getattr(err.response, "headers", None)
    request_id = None
    if headers is not None:
        request_id = headers.get("x-request-id") or headers.get("x-goog-request-id")
    return errors.ErrorResponse(
        int(err.code or 0), headers, err.details, str(err.message or err), request_id
    )


SDK_EXCEPTIONS = errors.SdkExceptions(
    timeout=_TIMEOUTS,
    connection=_TRANSPORT,
    status=(genai_errors.APIError,),
    response_of=_error_response,
)


def _name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


class GeminiProvider:
    name = "gemini"

    def __init__(self, config: ProviderConfig) -> None:
        if config.provider != "gemini":
            raise ValueError(f"GeminiProvider cannot serve {config.provider!r}")
        self.model = config.model
        self._config = config
        self._client = genai.Client(
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            http_options=types.HttpOptions(
                base_url=config.base_url,
                timeout=int(config.timeout_s * 1000),  # milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    async def answer(self, request: ProviderRequest) -> ProviderReply:
        with errors.mapped_sdk_errors(self.name, SDK_EXCEPTIONS, timeout_s=self._config.timeout_s):
            response = await self._client.aio.models.generate_content(
                model=self.model,
                contents=request.prompt,
                config=types.GenerateContentConfig(
                    system_instruction=system_prompt(request),
                    max_output_tokens=self._config.max_output_tokens,
                ),
            )
        return self._reply(request, response)

    def _reply(self, request: ProviderRequest, response: Any) -> ProviderReply:
        request_id = getattr(response, "response_id", None)
        try:
            meta = response.usage_metadata
            input_tokens = int(getattr(meta, "prompt_token_count", 0) or 0) if meta else 0
            output_tokens = 0
            if meta is not None:
                # thinking tokens are billed as output
                output_tokens = int(getattr(meta, "candidates_token_count", 0) or 0)
                output_tokens += int(getattr(meta, "thoughts_token_count", 0) or 0)
            feedback = response.prompt_feedback
            blocked = _name(getattr(feedback, "block_reason", None)) if feedback else None
            candidates = list(response.candidates or [])
            finish = _name(candidates[0].finish_reason) if candidates else None
            text = ""
            if candidates and candidates[0].content is not None:
                text = "".join(
                    str(part.text)
                    for part in (candidates[0].content.parts or [])
                    if getattr(part, "text", None) and not getattr(part, "thought", False)
                )
            model = str(response.model_version or self.model)
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            raise errors.malformed(
                self.name,
                f"not a generateContent response ({type(err).__name__}: {err})",
                usage=errors.Usage(request_id=request_id),
            ) from None
        unusable = None
        if blocked or finish in REFUSED:
            unusable = errors.REFUSAL, f"blocked by the provider ({blocked or finish})"
        elif not candidates:
            unusable = errors.MALFORMED, "unusable response: no candidates in the response"
        elif finish == "MAX_TOKENS":
            why = f"answer cut off at {output_tokens} tokens (finishReason=MAX_TOKENS)"
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
