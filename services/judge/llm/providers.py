"""One judge call per provider through its official SDK, and the parsing of the verdict.

* openai: chat.completions with a strict JSON schema response format.
* anthropic: messages with a forced `record_verdict` tool call.
* openai_compatible (vLLM, Ollama, llama.cpp): the OpenAI SDK at the base URL of the endpoint
  the run names (operator configuration, with that endpoint's own key) with the
  JSON object response format and a lenient parse (the first JSON object in the text, else a
  "score: N" pattern).
Every call runs at temperature 0 (except for models configured as rejecting a temperature)
with the SDK's own retries off: retrying is the judge's decision (services.judge.llm.errors).
A reply without a usable score (none, or one outside the criterion's scale) is a Reply without
verdict and with the reason, never a low or clamped score.
"""

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import anthropic
import openai

from services.judge.llm.prompts import STANDARD_SCALE, RenderedPrompt, verdict_schema
from services.judge.llm.settings import LlmSettings
from services.judge.schema import LlmJudgeConfig

TOOL_NAME = "record_verdict"
SCHEMA_NAME = "judge_verdict"
# The OpenAI SDK refuses an empty key; servers without authentication ignore this one.
KEYLESS_SERVER_KEY = "no-key"
SCORE_PATTERN = re.compile(r"score\"?\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
REPLY_EXCERPT_CHARS = 200


@functools.lru_cache(maxsize=256)
def openai_response_format(scale: tuple[int, int] = STANDARD_SCALE) -> dict[str, Any]:
    """The strict JSON schema response format of a verdict on `scale` (do not mutate)."""
    return {"type": "json_schema", "json_schema": {
        "name": SCHEMA_NAME, "strict": True, "schema": verdict_schema(*scale)}}


@functools.lru_cache(maxsize=256)
def anthropic_tools(scale: tuple[int, int] = STANDARD_SCALE) -> list[dict[str, Any]]:
    """The forced verdict tool of a verdict on `scale` (do not mutate)."""
    return [{"name": TOOL_NAME, "description": "Record the score of the response.",
             "input_schema": verdict_schema(*scale)}]


OPENAI_RESPONSE_FORMAT = openai_response_format()
ANTHROPIC_TOOLS = anthropic_tools()


@dataclass(frozen=True)
class ParsedVerdict:
    score: float
    reasoning: str
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "reasoning": self.reasoning, "confidence": self.confidence}


@dataclass(frozen=True)
class Reply:
    """A call's outcome: the verdict, or why there is none; the tokens billed either way."""

    verdict: ParsedVerdict | None
    parse_error: str
    input_tokens: int
    output_tokens: int


class ProviderClients:
    """SDK clients, one per (provider, endpoint name), reused across calls (connection
    pools). URLs and keys come from the settings only: a key is sent to its own URL."""

    def __init__(self, settings: LlmSettings) -> None:
        self._settings = settings
        self._clients: dict[tuple[str, str | None], Any] = {}

    def get(self, provider: str, endpoint: str | None) -> Any:
        key = (provider, endpoint if provider == "openai_compatible" else None)
        if key not in self._clients:
            self._clients[key] = self._create(provider, endpoint)
        return self._clients[key]

    def _create(self, provider: str, endpoint: str | None) -> Any:
        s = self._settings
        common = {"timeout": s.llm_request_timeout_s, "max_retries": 0}
        if provider == "openai":
            return openai.AsyncOpenAI(api_key=_secret(s.openai_api_key),
                                      base_url=s.openai_base_url, **common)
        if provider == "anthropic":
            return anthropic.AsyncAnthropic(api_key=_secret(s.anthropic_api_key),
                                            base_url=s.anthropic_base_url, **common)
        known = s.llm_endpoints.get(endpoint or "")
        if known is None:
            raise ValueError(f"no LLM endpoint named {endpoint!r} is configured "
                             "(EPOCHLENS_JUDGE_LLM_ENDPOINTS)")
        return openai.AsyncOpenAI(api_key=known.key() or KEYLESS_SERVER_KEY,
                                  base_url=known.base_url, **common)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


async def call(clients: ProviderClients, settings: LlmSettings, config: LlmJudgeConfig,
               prompt: RenderedPrompt, scale: tuple[int, int] = STANDARD_SCALE) -> Reply:
    """One judge call for a score on `scale`; raises the SDK's errors (classified by the
    caller)."""
    client = clients.get(config.provider, config.endpoint)
    # Temperature 0 (deterministic verdicts), sent as a body field: the Anthropic SDK has no
    # argument for it any more, and reasoning models reject one (settings). The schema-bearing
    # fields go as body fields too: the wire format is the same, and the SDKs' recursive
    # transform of typed arguments cost ~3.5 ms of CPU per call on the schema alone.
    body = {"temperature": 0} if settings.sends_temperature(config.model) else {}
    limits = (settings.llm_max_output_tokens, body, scale)
    if config.provider == "anthropic":
        return await _call_anthropic(client, config.model, prompt, *limits)
    if config.provider == "openai":
        return await _call_openai(client, config.model, prompt, *limits)
    return await _call_compatible(client, config.model, prompt, *limits)


def _messages(prompt: RenderedPrompt) -> list[dict[str, str]]:
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}]


async def _call_openai(client: openai.AsyncOpenAI, model: str, prompt: RenderedPrompt,
                       max_tokens: int, body: dict[str, Any], scale: tuple[int, int]) -> Reply:
    response = await client.chat.completions.create(
        model=model, messages=_messages(prompt), max_completion_tokens=max_tokens,
        extra_body={**body, "response_format": openai_response_format(scale)},
    )
    usage = _openai_usage(response)
    message = response.choices[0].message if response.choices else None
    if message is None or getattr(message, "refusal", None):
        refusal = getattr(message, "refusal", None) or "no choices in reply"
        return Reply(None, f"no verdict: {refusal}", *usage)
    verdict, error = parse_strict(message.content or "", scale)
    return Reply(verdict, error, *usage)


async def _call_compatible(client: openai.AsyncOpenAI, model: str, prompt: RenderedPrompt,
                           max_tokens: int, body: dict[str, Any],
                           scale: tuple[int, int]) -> Reply:
    response = await client.chat.completions.create(
        model=model, messages=_messages(prompt), max_tokens=max_tokens,
        extra_body={**body, "response_format": {"type": "json_object"}},
    )
    usage = _openai_usage(response)
    text = response.choices[0].message.content if response.choices else None
    verdict, error = parse_lenient(text or "", scale)
    return Reply(verdict, error, *usage)


async def _call_anthropic(client: anthropic.AsyncAnthropic, model: str, prompt: RenderedPrompt,
                          max_tokens: int, body: dict[str, Any],
                          scale: tuple[int, int]) -> Reply:
    response = await client.messages.create(
        model=model, max_tokens=max_tokens, system=prompt.system,
        messages=[{"role": "user", "content": prompt.user}],
        extra_body={**body, "tools": anthropic_tools(scale),
                    "tool_choice": {"type": "tool", "name": TOOL_NAME}},
    )
    usage = (response.usage.input_tokens or 0, response.usage.output_tokens or 0)
    for block in response.content:
        if block.type == "tool_use" and block.name == TOOL_NAME:
            verdict, error = validate(block.input, scale)
            return Reply(verdict, error, *usage)
    return Reply(None, f"no {TOOL_NAME} tool call in reply", *usage)


def _openai_usage(response: Any) -> tuple[int, int]:
    usage = response.usage
    if usage is None:
        return 0, 0
    return usage.prompt_tokens or 0, usage.completion_tokens or 0


def parse_strict(text: str, scale: tuple[int, int] = STANDARD_SCALE
                 ) -> tuple[ParsedVerdict | None, str]:
    """A reply that must be exactly one JSON object (schema-constrained output)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"reply is not JSON ({exc.msg}): {_excerpt(text)}"
    return validate(data, scale)


def parse_lenient(text: str, scale: tuple[int, int] = STANDARD_SCALE
                  ) -> tuple[ParsedVerdict | None, str]:
    """The first JSON object with a score anywhere in the text, else a `score: N` pattern."""
    data = _first_json_object(text)
    if data is not None:
        return validate(data, scale)
    match = SCORE_PATTERN.search(text)
    if match is None:
        return None, f"no JSON object and no 'score: N' in reply: {_excerpt(text)}"
    return validate({"score": float(match.group(1)), "reasoning": text.strip()}, scale)


def _first_json_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            data, _ = decoder.raw_decode(text, start)
        except ValueError:
            data = None
        if isinstance(data, dict) and "score" in data:
            return data
        start = text.find("{", start + 1)
    return None


def validate(data: Any, scale: tuple[int, int] = STANDARD_SCALE
             ) -> tuple[ParsedVerdict | None, str]:
    """Checks a decoded verdict: a finite score within `scale` (default 1..10) is required,
    the rest is optional."""
    if not isinstance(data, dict):
        return None, f"verdict is not an object: {_excerpt(repr(data))}"
    score = data.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        return None, f"no numeric score in verdict: {_excerpt(json.dumps(data, default=str))}"
    low, high = scale
    if not low <= score <= high:  # NaN fails this too
        return None, f"score {score} is outside {low}..{high}"
    reasoning = data.get("reasoning")
    confidence = data.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
            or not 0.0 <= confidence <= 1.0:
        confidence = 0.0
    return ParsedVerdict(float(score), reasoning if isinstance(reasoning, str) else "",
                         float(confidence)), ""


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= REPLY_EXCERPT_CHARS else text[:REPLY_EXCERPT_CHARS] + "..."


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None
