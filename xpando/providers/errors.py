"""How a provider's failure becomes a Temporal outcome the workflow can act on.

SDK clients are built with ``max_retries=0``: Temporal's retry policy is the one retry loop.
Every failure therefore leaves a provider as an ``ApplicationError`` whose ``type`` names what
happened and whose ``non_retryable`` flag tells Temporal whether the same node is worth another
attempt:

=================================================  ===========================  =========
what the provider did                              ``type``                     retried
=================================================  ===========================  =========
429 rate limit (``retry-after[-ms]`` honoured)     ``ProviderRateLimited``      yes
429/402 spend limit (``insufficient_quota``)       ``InsufficientQuota``        no
5xx                                                ``ProviderServerError``      yes
529 / ``overloaded_error``                         ``ProviderOverloaded``       yes
408, a read/connect timeout                        ``ProviderTimeout``          yes
connection refused / reset                         ``ProviderConnectionError``  yes
400 / 422                                          ``ProviderBadRequest``       no
400/413 context length                             ``ContextLengthExceeded``    no
content-policy error, or a refusal answer          ``ProviderRefusal``          no
401 / 403 (and Gemini's ``API_KEY_INVALID``)       ``ProviderAuthError``        no
404 (unknown model)                                ``ProviderNotFound``         no
200 whose body is not the provider's format        ``ProviderMalformedResponse`` no
200 with an empty answer                           ``ProviderEmptyAnswer``      no
200 cut off at the token limit (``length``)        ``ProviderTruncated``        no
=================================================  ===========================  =========

The last three are answers that must not be stored: the contribution fails and earns nothing.
A retry of the same node would most likely repeat them, so the workflow asks a standby instead.
When a call got as far as a response, the error's first detail is a :class:`Usage` dict (tokens,
cost, request id, finish reason) so a failed contribution still accounts for what it cost.

:data:`BREAKER_EFFECT` says how each type counts for the circuit breakers
(``xpando/breakers.py``).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any, Literal

from temporalio.exceptions import ApplicationError

__all__ = [
    "BREAKER_EFFECT",
    "MAX_RETRY_AFTER_S",
    "BreakerEffect",
    "ErrorResponse",
    "SdkExceptions",
    "Usage",
    "breaker_effect",
    "connection_error",
    "from_status",
    "malformed",
    "mapped_sdk_errors",
    "non_retryable",
    "retry_after_s",
    "stainless_exceptions",
    "timeout_error",
    "usage_of",
]

# A provider asking us to wait longer than this is treated as if it had said this: the next
# attempt waits at most this long (meanwhile the workflow's hedge deadline may ask a standby).
MAX_RETRY_AFTER_S = 60.0
MESSAGE_CHARS = 400

RATE_LIMITED = "ProviderRateLimited"
INSUFFICIENT_QUOTA = "InsufficientQuota"
SERVER_ERROR = "ProviderServerError"
OVERLOADED = "ProviderOverloaded"
TIMEOUT = "ProviderTimeout"
CONNECTION = "ProviderConnectionError"
BAD_REQUEST = "ProviderBadRequest"
CONTEXT_LENGTH = "ContextLengthExceeded"
REFUSAL = "ProviderRefusal"
AUTH = "ProviderAuthError"
NOT_FOUND = "ProviderNotFound"
MALFORMED = "ProviderMalformedResponse"
EMPTY = "ProviderEmptyAnswer"
TRUNCATED = "ProviderTruncated"

BreakerEffect = Literal["provider", "node", "healthy", "ignore"]

# How an outcome counts for the circuit breakers:
#   provider — a failure of the node *and* of its provider in its region (outages, overload);
#   node     — a failure of this node only (its key, its quota, its configuration, its output);
#   healthy  — the node answered; the request was the problem (refusal, too long): a success;
#   ignore   — not the node's doing (the workflow cancelled it because another expert won).
# Types not listed (an unexpected exception in a node) count as ``node``.
BREAKER_EFFECT: dict[str, BreakerEffect] = {
    SERVER_ERROR: "provider",
    OVERLOADED: "provider",
    TIMEOUT: "provider",
    CONNECTION: "provider",
    "DeadlineExceeded": "provider",  # no answer within the workflow's per-expert deadline
    RATE_LIMITED: "node",  # limits are per key, and every node has its own key
    INSUFFICIENT_QUOTA: "node",
    AUTH: "node",
    NOT_FOUND: "node",
    BAD_REQUEST: "node",
    MALFORMED: "node",
    EMPTY: "node",
    TRUNCATED: "node",
    "NodeUnresponsive": "node",  # the node's worker stopped heartbeating
    "NodeUnavailable": "node",  # no worker of the node took the ask in time (stopped, or full)
    REFUSAL: "healthy",
    CONTEXT_LENGTH: "healthy",
    "Superseded": "ignore",
    "QuorumReached": "ignore",  # a straggler the task stopped waiting for
    "Cancelled": "ignore",
}


def breaker_effect(error_type: str | None) -> BreakerEffect:
    return BREAKER_EFFECT.get(error_type or "", "node")


@dataclass(frozen=True)
class Usage:
    """What a call that reached the provider cost, carried on its failure as the first detail."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    request_id: str | None = None
    finish_reason: str | None = None


def usage_of(error: BaseException | None) -> Usage | None:
    """The :class:`Usage` a provider failure carries (``None`` if it carries none)."""
    if not isinstance(error, ApplicationError) or not error.details:
        return None
    first = error.details[0]
    if not isinstance(first, Mapping) or "cost_usd" not in first:
        return None
    fields = {k: first.get(k) for k in Usage.__dataclass_fields__}
    try:
        return Usage(
            input_tokens=int(fields["input_tokens"] or 0),
            output_tokens=int(fields["output_tokens"] or 0),
            cost_usd=float(fields["cost_usd"] or 0.0),
            request_id=str(fields["request_id"]) if fields["request_id"] else None,
            finish_reason=str(fields["finish_reason"]) if fields["finish_reason"] else None,
        )
    except (TypeError, ValueError):
        return None


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MESSAGE_CHARS else flat[: MESSAGE_CHARS - 1] + "…"


def _label(provider: str, request_id: str | None) -> str:
    return f"{provider} (request {request_id})" if request_id else provider


def non_retryable(
    type: str, provider: str, message: str, *, usage: Usage | None = None
) -> ApplicationError:
    details = (asdict(usage),) if usage is not None else ()
    request_id = usage.request_id if usage else None
    return ApplicationError(
        f"{_label(provider, request_id)}: {_short(message)}",
        *details,
        type=type,
        non_retryable=True,
    )


def _retryable(
    type: str,
    provider: str,
    message: str,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> ApplicationError:
    delay = None
    if retry_after is not None:
        delay = timedelta(seconds=min(MAX_RETRY_AFTER_S, max(0.0, retry_after)))
    return ApplicationError(
        f"{_label(provider, request_id)}: {_short(message)}",
        type=type,
        non_retryable=False,
        next_retry_delay=delay,
    )


def malformed(provider: str, what: str, *, usage: Usage | None = None) -> ApplicationError:
    return non_retryable(MALFORMED, provider, f"unusable response: {what}", usage=usage)


def timeout_error(provider: str, timeout_s: float) -> ApplicationError:
    return _retryable(TIMEOUT, provider, f"no response within {timeout_s:g}s")


def connection_error(provider: str, err: BaseException) -> ApplicationError:
    cause = err.__cause__ or err.__context__
    detail = f"{type(err).__name__}: {err}" + (f" ({cause})" if cause else "")
    return _retryable(CONNECTION, provider, f"connection failed: {detail}")


# --- reading an error response -------------------------------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)s\s*$")


def retry_after_s(headers: Mapping[str, str] | None, body: object = None) -> float | None:
    """Seconds the provider asked us to wait: ``retry-after-ms``, ``retry-after`` (seconds or an
    HTTP date), or Gemini's ``RetryInfo.retryDelay`` in the body. ``None`` when it did not say."""
    if headers is not None:
        lowered = {k.lower(): v for k, v in headers.items()}
        ms = lowered.get("retry-after-ms")
        if ms is not None:
            try:
                return max(0.0, float(ms) / 1000.0)
            except ValueError:
                pass
        value = lowered.get("retry-after")
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                try:
                    parsed = email.utils.parsedate_to_datetime(value)
                except (TypeError, ValueError):
                    parsed = None
                if parsed is not None:
                    return max(0.0, parsed.timestamp() - time.time())
    for detail in _error_details(body):
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and (m := _DURATION.match(delay)):
            return float(m.group(1))
    return None


def _error_object(body: object) -> Mapping[str, Any]:
    """The error object of any of the three wire formats (or of an SDK that unwrapped it)."""
    if not isinstance(body, Mapping):
        return {}
    inner = body.get("error")
    return inner if isinstance(inner, Mapping) else body


def _error_details(body: object) -> list[Mapping[str, Any]]:
    details = _error_object(body).get("details")
    if isinstance(details, list):
        return [d for d in details if isinstance(d, Mapping)]
    return []


def _words(body: object) -> str:
    """code, type, status, message and detail reasons, lower-cased, for matching."""
    err = _error_object(body)
    parts = [str(err.get(k) or "") for k in ("code", "type", "status", "message")]
    parts += [str(d.get("reason") or "") for d in _error_details(body)]
    if isinstance(body, str):
        parts.append(body)
    return " ".join(parts).lower()


_SPEND_LIMIT = ("insufficient_quota", "billing_error", "credit balance", "spend limit")
_QUOTA_WORDS = ("exceeded your current quota", "check your plan and billing")
_CONTEXT = (
    "context_length_exceeded",
    "context length",
    "context window",
    "prompt is too long",
    "maximum number of tokens",
    "too many tokens",
    "input is too long",
)
_POLICY = ("content_policy", "content policy", "content_filter", "safety system")
_AUTH = ("api_key_invalid", "api key not valid", "unauthenticated", "permission_denied")


def from_status(
    provider: str,
    status: int,
    *,
    headers: Mapping[str, str] | None,
    body: object,
    message: str,
    request_id: str | None = None,
) -> ApplicationError:
    """Classify an HTTP error response (see the module docstring's table)."""
    words = _words(body)
    text = str(_error_object(body).get("message") or message)
    usage = Usage(request_id=request_id) if request_id else None
    wait = retry_after_s(headers, body)
    if status == 402 or (status in (400, 403, 429) and any(w in words for w in _SPEND_LIMIT)):
        return non_retryable(INSUFFICIENT_QUOTA, provider, f"{status} {text}", usage=usage)
    # "You exceeded your current quota" is also how Gemini words a per-minute limit; there it
    # comes with a retry delay, and a spend limit never does.
    if status == 429 and wait is None and any(w in words for w in _QUOTA_WORDS):
        return non_retryable(INSUFFICIENT_QUOTA, provider, f"{status} {text}", usage=usage)
    if status == 429:
        return _retryable(
            RATE_LIMITED, provider, f"429 {text}", request_id=request_id, retry_after=wait
        )
    if status == 529 or (status >= 500 and "overloaded" in words):
        return _retryable(
            OVERLOADED,
            provider,
            f"{status} {text}",
            request_id=request_id,
            retry_after=wait,
        )
    if status >= 500:
        return _retryable(
            SERVER_ERROR,
            provider,
            f"{status} {text}",
            request_id=request_id,
            retry_after=wait,
        )
    if status == 408:
        return _retryable(TIMEOUT, provider, f"408 {text}", request_id=request_id)
    if status == 409:
        return _retryable(SERVER_ERROR, provider, f"409 {text}", request_id=request_id)
    if status in (401, 403) or any(w in words for w in _AUTH):
        return non_retryable(AUTH, provider, f"{status} {text}", usage=usage)
    if status == 404:
        return non_retryable(NOT_FOUND, provider, f"404 {text}", usage=usage)
    if status == 413 or any(w in words for w in _CONTEXT):
        return non_retryable(CONTEXT_LENGTH, provider, f"{status} {text}", usage=usage)
    if any(w in words for w in _POLICY):
        return non_retryable(REFUSAL, provider, f"{status} {text}", usage=usage)
    return non_retryable(BAD_REQUEST, provider, f"{status} {text}", usage=usage)


# --- one SDK call --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorResponse:
    """The HTTP error response an SDK's status exception carries."""

    status: int
    headers: Mapping[str, str] | None
    body: object
    message: str
    request_id: str | None = None


@dataclass(frozen=True)
class SdkExceptions:
    """What one SDK's exceptions mean: each adapter describes its SDK once, and
    :func:`mapped_sdk_errors` does the mapping for all of them."""

    timeout: tuple[type[BaseException], ...]
    connection: tuple[type[BaseException], ...]
    status: tuple[type[BaseException], ...]
    response_of: Callable[[Any], ErrorResponse]  # reads an exception of ``status``
    invalid: tuple[type[BaseException], ...] = ()  # a 2xx body the SDK's own models rejected


def stainless_exceptions(sdk: ModuleType) -> SdkExceptions:
    """``openai`` and ``anthropic`` are generated by the same tool (Stainless): their exceptions
    have the same names and carry the same fields."""

    def response_of(err: Any) -> ErrorResponse:
        return ErrorResponse(
            err.status_code, err.response.headers, err.body, err.message, err.request_id
        )

    return SdkExceptions(
        timeout=(sdk.APITimeoutError,),
        connection=(sdk.APIConnectionError,),
        status=(sdk.APIStatusError,),
        response_of=response_of,
        invalid=(sdk.APIResponseValidationError,),
    )


@contextmanager
def mapped_sdk_errors(provider: str, sdk: SdkExceptions, *, timeout_s: float) -> Iterator[None]:
    """Around one SDK call: its failure leaves as the typed ``ApplicationError`` of the table
    above (the SDK's exception is dropped: its message is in ours, its traceback is noise)."""
    try:
        yield
    except sdk.timeout:  # first: an SDK's timeout may be a kind of its connection error
        raise timeout_error(provider, timeout_s) from None
    except sdk.connection as err:
        raise connection_error(provider, err) from None
    except sdk.status as err:
        response = sdk.response_of(err)
        raise from_status(
            provider,
            response.status,
            headers=response.headers,
            body=response.body,
            message=response.message,
            request_id=response.request_id,
        ) from None
    except sdk.invalid as err:
        raise malformed(provider, str(err)) from None
    except ValueError as err:  # a body that is not JSON
        raise malformed(provider, f"{type(err).__name__}: {err}") from None
