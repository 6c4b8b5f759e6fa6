"""One pairwise call per provider through its official SDK (the clients, keys and URLs of
services.judge.llm.providers.ProviderClients), and the strict check of the answer.

* openai: chat.completions with a strict JSON schema response format.
* anthropic: messages with a forced tool call (the tool's input is the answer).
* openai_compatible: the JSON object response format; the whole reply must be that object.
An answer is usable only when it is exactly {"preferred": "A"|"B"|"tie", "reason": "..."}:
anything else is a PairReply without an answer and with the reason (unscored, never a loss).
"""

import json
from dataclasses import dataclass
from typing import Any

from services.judge.llm.prompts import RenderedPrompt
from services.judge.llm.providers import TOOL_NAME, ProviderClients
from services.judge.llm.settings import LlmSettings
from services.judge.pairwise.prompts import ANSWER_SCHEMA, PREFERENCES

SCHEMA_NAME = "pairwise_preference"
EXCERPT_CHARS = 200
OPENAI_RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {
    "name": SCHEMA_NAME, "strict": True, "schema": ANSWER_SCHEMA}}
ANTHROPIC_TOOLS = [{"name": TOOL_NAME, "description": "Record which response is better.",
                    "input_schema": ANSWER_SCHEMA}]


@dataclass(frozen=True)
class PairReply:
    """A call's outcome: the preferred position and the reason, or why there is none; the
    tokens billed either way."""

    preferred: str | None
    reason: str
    error: str
    input_tokens: int
    output_tokens: int


async def call(clients: ProviderClients, settings: LlmSettings, provider: str,
               endpoint: str | None, model: str, prompt: RenderedPrompt) -> PairReply:
    """One pairwise call; raises the SDK's errors (classified by the caller)."""
    client = clients.get(provider, endpoint)
    body: dict[str, Any] = {"temperature": 0} if settings.sends_temperature(model) else {}
    tokens = settings.llm_max_output_tokens
    messages = [{"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user}]
    if provider == "anthropic":
        response = await client.messages.create(
            model=model, max_tokens=tokens, system=prompt.system,
            messages=messages[1:], extra_body={
                **body, "tools": ANTHROPIC_TOOLS,
                "tool_choice": {"type": "tool", "name": TOOL_NAME}})
        usage = (response.usage.input_tokens or 0, response.usage.output_tokens or 0)
        for block in response.content:
            if block.type == "tool_use" and block.name == TOOL_NAME:
                return _reply(validate(block.input), usage)
        return PairReply(None, "", f"no {TOOL_NAME} tool call in reply", *usage)
    response_format = (OPENAI_RESPONSE_FORMAT if provider == "openai"
                       else {"type": "json_object"})
    limit = {"max_completion_tokens" if provider == "openai" else "max_tokens": tokens}
    response = await client.chat.completions.create(
        model=model, messages=messages, **limit,
        extra_body={**body, "response_format": response_format})
    usage = ((response.usage.prompt_tokens or 0, response.usage.completion_tokens or 0)
             if response.usage is not None else (0, 0))
    message = response.choices[0].message if response.choices else None
    if message is None or getattr(message, "refusal", None):
        return PairReply(None, "", "no answer: " + (getattr(message, "refusal", None)
                                                    or "no choices in reply"), *usage)
    return _reply(parse(message.content or ""), usage)


def _reply(parsed: tuple[str | None, str, str], usage: tuple[int, int]) -> PairReply:
    return PairReply(*parsed, *usage)


def parse(text: str) -> tuple[str | None, str, str]:
    """(preferred, reason, error) of a reply that must be exactly one JSON object."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, "", f"reply is not JSON ({exc.msg}): {_excerpt(text)}"
    return validate(data)


def validate(data: Any) -> tuple[str | None, str, str]:
    """(preferred, reason, error): preferred is "A", "B" or "tie", reason a string, and
    nothing else in the object."""
    if not isinstance(data, dict):
        return None, "", f"answer is not an object: {_excerpt(repr(data))}"
    extra = sorted(set(data) - {"preferred", "reason"})
    if extra:
        return None, "", f"unexpected keys {extra} in answer"
    preferred, reason = data.get("preferred"), data.get("reason")
    if preferred not in PREFERENCES:
        return None, "", (f"preferred must be one of {list(PREFERENCES)}, got "
                          f"{_excerpt(json.dumps(preferred, default=str))}")
    if not isinstance(reason, str):
        return None, "", "reason must be a string"
    return preferred, reason, ""


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."
