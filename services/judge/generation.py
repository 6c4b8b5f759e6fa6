"""JudgeService.GenerateResponses: one response per prompt from an OpenAI-compatible endpoint the
operator configured by name (EPOCHLENS_JUDGE_LLM_ENDPOINTS).

The request names an endpoint, never a URL: the call goes to that endpoint's base_url with
that endpoint's own key (services.judge.llm.providers.ProviderClients), and a model outside the
endpoint's `models` list is refused. Calls run through the OpenAI SDK (its own retries off)
with at most generation_concurrency in flight in this process, all requests together. A failed
call is classified by services.judge.llm.errors: authentication, quota, not-found and other
rejected requests are never retried; a 429 waits for its Retry-After (capped by
llm_retry_after_max_s) or the backoff; 5xx and network errors back off exponentially with
jitter; at most generation_max_retries retries. A prompt that still failed gets `error` set
and no response; the other prompts of the call are unaffected. Nothing is stored here.
"""

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from epochlens.v1 import judge_pb2
from services.common.errors import Violations
from services.common.validation import NUL
from services.judge.config import JudgeSettings
from services.judge.llm.errors import SDK_ERRORS, ErrorKind, classify, retry_wait
from services.judge.llm.providers import ProviderClients

log = logging.getLogger(__name__)

# The provider name the error classification and the SDK clients know these endpoints by.
PROVIDER = "openai_compatible"
_NO_RETRY = (ErrorKind.PAUSE, ErrorKind.FATAL)


@dataclass(frozen=True)
class GenerationPlan:
    """A validated generation config: where to send the prompts and how."""

    endpoint: str
    model: str
    max_tokens: int
    temperature: float
    system_prompt: str


def validate_generation(settings: JudgeSettings, request: judge_pb2.GenerateResponsesRequest
                        ) -> GenerationPlan:
    """The request's plan, or InvalidArgument naming every bad field."""
    violations = Violations()
    plan = check_generation_config(settings, request.generation, violations, "generation")
    _check_prompts(settings, request.prompts, violations)
    violations.raise_if_any()
    assert plan is not None
    return plan


def check_generation_config(settings: JudgeSettings, config: judge_pb2.GenerationConfig,
                            violations: Violations, path: str) -> GenerationPlan | None:
    """Checks a GenerationConfig; problems go to `violations` under `path`."""
    endpoint = settings.llm_endpoints.get(config.endpoint)
    if not config.endpoint:
        violations.add(f"{path}.endpoint", "required: the name of a configured endpoint")
    elif endpoint is None:
        violations.add(f"{path}.endpoint", f"no endpoint named {config.endpoint[:64]!r} is "
                       "configured on the judge (EPOCHLENS_JUDGE_LLM_ENDPOINTS)")
    if not config.model.strip():
        violations.add(f"{path}.model", "required (empty)")
    elif len(config.model) > settings.max_name_chars:
        violations.add(f"{path}.model", f"{len(config.model)} characters exceed the maximum "
                       f"of {settings.max_name_chars}")
    elif endpoint is not None and endpoint.models is not None \
            and config.model not in endpoint.models:
        violations.add(f"{path}.model", f"endpoint {config.endpoint!r} does not serve model "
                       f"{config.model[:64]!r}")
    ceiling = settings.generation_max_tokens_ceiling
    if not 0 <= config.max_new_tokens <= ceiling:
        violations.add(f"{path}.max_new_tokens", f"must be 0 (the default) to {ceiling}, got "
                       f"{config.max_new_tokens}")
    if not 0.0 <= config.temperature <= 2.0:  # NaN fails this too
        violations.add(f"{path}.temperature", f"must be 0 to 2, got {config.temperature}")
    _check_text(settings, config.system_prompt, f"{path}.system_prompt", violations)
    return GenerationPlan(config.endpoint, config.model,
                          config.max_new_tokens or settings.generation_max_tokens_default,
                          config.temperature, config.system_prompt)


def _check_prompts(settings: JudgeSettings, prompts: Any, violations: Violations) -> None:
    if not prompts:
        violations.add("prompts", "at least one prompt is required")
        return
    if len(prompts) > settings.generation_max_prompts:
        violations.add("prompts", f"{len(prompts)} prompts exceed the maximum of "
                       f"{settings.generation_max_prompts}")
        return
    for position, prompt in enumerate(prompts):
        path = f"prompts[{position}]"
        if prompt.index < 0:
            violations.add(f"{path}.index", f"must be >= 0, got {prompt.index}")
        if not prompt.prompt:
            violations.add(f"{path}.prompt", "required (empty)")
        _check_text(settings, prompt.prompt, f"{path}.prompt", violations)


def _check_text(settings: JudgeSettings, text: str, path: str, violations: Violations) -> None:
    if len(text) > settings.max_text_chars:
        violations.add(path, f"{len(text)} characters exceed the maximum of "
                       f"{settings.max_text_chars}")
    if NUL in text:
        violations.add(path, "must not contain a NUL character (U+0000)")


class Generator:
    """Generates responses for GenerateResponses; one per judge process (its concurrency
    limit and SDK clients are shared by every call)."""

    def __init__(self, settings: JudgeSettings) -> None:
        self._settings = settings
        self._clients = ProviderClients(settings.model_copy(update={
            "llm_request_timeout_s": settings.generation_request_timeout_s}))
        self._slots = asyncio.Semaphore(settings.generation_concurrency)
        self.counts: Counter[str] = Counter()

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def generate(self, user_id: str, plan: GenerationPlan,
                       prompts: Any) -> judge_pb2.GenerateResponsesResponse:
        """One outcome per prompt, in request order."""
        outcomes = await asyncio.gather(*(self._one(plan, prompt) for prompt in prompts))
        failed = sum(1 for outcome in outcomes if outcome.error)
        self.counts["generated"] += len(outcomes) - failed
        self.counts["failed"] += failed
        log.info("generated %d responses for %s with endpoint %s model %s (%d failed; %d "
                 "generated and %d failed so far)", len(outcomes) - failed, user_id,
                 plan.endpoint, plan.model, failed, self.counts["generated"],
                 self.counts["failed"])
        return judge_pb2.GenerateResponsesResponse(responses=outcomes)

    async def _one(self, plan: GenerationPlan,
                   prompt: judge_pb2.GenerationPrompt) -> judge_pb2.GeneratedResponse:
        """One prompt, with the retries its errors allow."""
        attempt = 0
        while True:
            async with self._slots:
                started = time.monotonic()
                try:
                    response = await self._call(plan, prompt.prompt)
                except SDK_ERRORS as exc:
                    error = classify(PROVIDER, exc)
                else:
                    return _outcome(prompt.index, response, time.monotonic() - started)
            self.counts[f"error_{error.kind.value}"] += 1
            log.warning("generation call failed (endpoint %s, prompt %d, attempt %d): %s "
                        "(%d %s errors so far)", plan.endpoint, prompt.index, attempt + 1,
                        error.message, self.counts[f"error_{error.kind.value}"],
                        error.kind.value)
            if error.kind in _NO_RETRY or attempt >= self._settings.generation_max_retries:
                return judge_pb2.GeneratedResponse(index=prompt.index, error=error.message)
            await asyncio.sleep(retry_wait(self._settings, error, attempt))
            attempt += 1

    async def _call(self, plan: GenerationPlan, text: str) -> Any:
        client = self._clients.get(PROVIDER, plan.endpoint)
        messages = ([{"role": "system", "content": plan.system_prompt}]
                    if plan.system_prompt else [])
        messages.append({"role": "user", "content": text})
        extra = ({"temperature": plan.temperature}
                 if self._settings.sends_temperature(plan.model) else {})
        return await client.chat.completions.create(
            model=plan.model, messages=messages, max_tokens=plan.max_tokens, **extra)


def _outcome(index: int, response: Any, seconds: float) -> judge_pb2.GeneratedResponse:
    """The prompt's outcome from a completed call (a reply without choices is an error). The
    text is returned as generated: the caller stores it with NUL replaced and says so."""
    if not response.choices:
        return judge_pb2.GeneratedResponse(
            index=index, error=f"{PROVIDER}: the reply has no choices")
    usage = response.usage
    return judge_pb2.GeneratedResponse(
        index=index, response=response.choices[0].message.content or "",
        generation_time_ms=seconds * 1000.0,
        prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
        completion_tokens=(usage.completion_tokens or 0) if usage else 0)
