"""Classification of LLM provider errors, decided before any retry.

* PAUSE: authentication (401/403), an unknown model or endpoint (404) and exhausted quota or
  credit (OpenAI 429 insufficient_quota, Anthropic 402 / billing_error) never retry; the run's
  LLM judging pauses (run_llm_state.paused_reason) until an operator clears it.
* RATE_LIMIT: 429; retried after Retry-After (retry-after-ms / retry-after headers), and the
  run's concurrency is halved.
* RETRY: 408/409, 5xx (and Anthropic 529 overloaded), connection errors and timeouts;
  retried with exponential backoff and jitter up to max_retries.
* FATAL: any other 4xx (a request the provider will never accept); not retried.
After the retries, the run's on_error decides (services.judge.llm.judge).
"""

import email.utils
import enum
import random
import time
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai

MESSAGE_CHARS = 300
QUOTA_CODES = frozenset({"insufficient_quota"})
BILLING_TYPES = frozenset({"billing_error"})
RETRYABLE_STATUSES = frozenset({408, 409})


class LlmJudgingFailed(Exception):
    """A judgment failed after its retries and the run's on_error is `fail` (or `retry` past
    the retry ceiling): the task fails visibly."""


class ErrorKind(enum.Enum):
    PAUSE = "pause"
    RATE_LIMIT = "rate_limit"
    RETRY = "retry"
    FATAL = "fatal"


@dataclass(frozen=True)
class CallError:
    """What went wrong with one call, and what to do about it."""

    kind: ErrorKind
    message: str
    retry_after_s: float | None = None


def backoff_wait(settings: Any, attempt: int) -> float:
    """Exponential backoff with jitter for retry `attempt` (0-based): half the step fixed,
    half random; settings are the LLM settings (llm_backoff_base_s, llm_backoff_max_s)."""
    step = min(settings.llm_backoff_max_s, settings.llm_backoff_base_s * 2 ** attempt)
    return step / 2 + random.uniform(0, step / 2)


def retry_wait(settings: Any, error: CallError, attempt: int) -> float:
    """How long to wait before retrying after `error`: the Retry-After it carried (capped
    by llm_retry_after_max_s), else backoff_wait."""
    if error.retry_after_s is not None:
        return min(error.retry_after_s, settings.llm_retry_after_max_s)
    return backoff_wait(settings, attempt)


SDK_STATUS_ERRORS = (openai.APIStatusError, anthropic.APIStatusError)
SDK_CONNECTION_ERRORS = (openai.APIConnectionError, anthropic.APIConnectionError)
SDK_ERRORS = SDK_STATUS_ERRORS + SDK_CONNECTION_ERRORS


def classify(provider: str, exc: Exception) -> CallError:
    """Classify an SDK error raised by a call to `provider`."""
    if isinstance(exc, SDK_CONNECTION_ERRORS):
        return CallError(ErrorKind.RETRY, f"{provider}: {_short(exc)}")
    if not isinstance(exc, SDK_STATUS_ERRORS):
        raise TypeError(f"not an LLM SDK error: {exc!r}")
    status = exc.status_code
    text = f"{provider} (HTTP {status}): {_short(exc)}"
    if status in (401, 403):
        return CallError(ErrorKind.PAUSE, f"authentication failed for {text}")
    if status == 404:
        return CallError(ErrorKind.PAUSE, f"model or endpoint not found for {text}")
    if _is_quota(exc):
        return CallError(ErrorKind.PAUSE, f"quota or credit exhausted for {text}")
    if status == 429:
        return CallError(ErrorKind.RATE_LIMIT, f"rate limited by {text}",
                         retry_after(exc.response.headers))
    if status >= 500 or status in RETRYABLE_STATUSES:
        return CallError(ErrorKind.RETRY, f"server error from {text}")
    return CallError(ErrorKind.FATAL, f"request rejected by {text}")


def _is_quota(exc: Exception) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 and (exc.code in QUOTA_CODES or exc.type in QUOTA_CODES)
    if isinstance(exc, anthropic.APIStatusError):
        return exc.status_code == 402 or exc.type in BILLING_TYPES
    return False


def retry_after(headers: httpx2.Headers) -> float | None:
    """Seconds to wait from retry-after-ms or retry-after (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(exc: Exception) -> str:
    message = (getattr(exc, "api_message", None) or getattr(exc, "message", None) or str(exc)
               or type(exc).__name__)
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "..."
