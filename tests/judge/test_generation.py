"""JudgeService.GenerateResponses over real gRPC against the fake OpenAI wire server: the request
the endpoint saw (model, max_tokens, messages, that endpoint's key only), retries on 500 and
429 (Retry-After honoured), no retry on 401, an error per prompt, and validation."""

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.auth import mint_token
from services.judge.config import JudgeSettings
from services.judge.server import start
from tests.helpers import field_violations, rich_status
from tests.judge.fake_llm import (
    ECHO_PREFIX,
    EchoLlmServer,
    rate_limited,
    server_error,
    unauthorized,
)

KEY_A, KEY_B = "key-of-endpoint-a", "key-of-endpoint-b"
MAX_PROMPTS, DEFAULT_TOKENS, CEILING = 8, 77, 1000


@pytest.fixture
def echo_llm() -> AsyncIterator[EchoLlmServer]:
    server = EchoLlmServer(input_tokens=11, output_tokens=5).start()
    yield server
    server.stop()


@pytest.fixture
def other_llm() -> AsyncIterator[EchoLlmServer]:
    server = EchoLlmServer().start()
    yield server
    server.stop()


class Gen:
    def __init__(self, stub: judge_pb2_grpc.JudgeServiceStub, auth) -> None:
        self.stub, self._auth = stub, auth

    async def __call__(self, prompts: list[str], user: str = "alice",
                       **generation: Any) -> judge_pb2.GenerateResponsesResponse:
        config = {"endpoint": "a", "model": "m1", **generation}
        request = judge_pb2.GenerateResponsesRequest(
            generation=judge_pb2.GenerationConfig(**config),
            prompts=[judge_pb2.GenerationPrompt(index=10 + i, prompt=p)
                     for i, p in enumerate(prompts)])
        metadata = (("authorization", f"Bearer {mint_token(self._auth, user)}"),)
        return await self.stub.GenerateResponses(request, metadata=metadata)


@pytest.fixture
async def gen(judge_sqlite_dir, auth_settings, echo_llm, other_llm) -> AsyncIterator[Gen]:
    settings = JudgeSettings(
        sqlite_dir=judge_sqlite_dir, port=0, worker_count=0, shutdown_grace_s=0.5,
        _env_file=None, generation_max_prompts=MAX_PROMPTS,
        generation_max_tokens_default=DEFAULT_TOKENS, generation_max_tokens_ceiling=CEILING,
        generation_concurrency=2, generation_max_retries=2, llm_backoff_base_s=0.05,
        llm_backoff_max_s=0.1,
        llm_endpoints={"a": {"base_url": echo_llm.openai_url, "api_key": KEY_A,
                             "models": ["m1", "m2"]},
                       "b": {"base_url": other_llm.openai_url, "api_key": KEY_B}})
    running = await start(settings, auth_settings)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield Gen(judge_pb2_grpc.JudgeServiceStub(channel), auth_settings)
    finally:
        await running.stop(0.5)


async def test_generates_one_response_per_prompt_with_the_endpoint(gen, echo_llm, other_llm):
    reply = await gen(["first", "second", "third"], system_prompt="be brief",
                      temperature=0.7, max_new_tokens=33)
    assert [(r.index, r.response, r.error) for r in reply.responses] == [
        (10, ECHO_PREFIX + "first", ""), (11, ECHO_PREFIX + "second", ""),
        (12, ECHO_PREFIX + "third", "")]
    assert all(r.prompt_tokens == 11 and r.completion_tokens == 5 and r.generation_time_ms > 0
               for r in reply.responses)
    assert len(echo_llm.requests) == 3 and other_llm.requests == []
    seen = sorted(echo_llm.requests, key=lambda r: r.body["messages"][-1]["content"])[0]
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == "m1" and seen.body["max_tokens"] == 33
    assert seen.body["temperature"] == 0.7
    assert seen.body["messages"] == [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "first"}]
    assert {r.headers["authorization"] for r in echo_llm.requests} == {f"Bearer {KEY_A}"}


async def test_defaults_and_the_other_endpoints_key(gen, echo_llm, other_llm):
    reply = await gen(["hello"], endpoint="b", model="anything")
    assert [r.response for r in reply.responses] == [ECHO_PREFIX + "hello"]
    assert echo_llm.requests == [] and len(other_llm.requests) == 1
    seen = other_llm.requests[0]
    assert seen.headers["authorization"] == f"Bearer {KEY_B}"
    assert seen.body["max_tokens"] == DEFAULT_TOKENS and seen.body["temperature"] == 0
    assert seen.body["messages"] == [{"role": "user", "content": "hello"}]


async def test_retries_500_and_429_then_succeeds(gen, echo_llm):
    echo_llm.script(server_error(), rate_limited(retry_after_s=0.3))
    started = time.monotonic()
    reply = await gen(["only"])
    assert [(r.response, r.error) for r in reply.responses] == [(ECHO_PREFIX + "only", "")]
    assert [r.status for r in echo_llm.requests] == [500, 429, 200]
    assert echo_llm.requests[2].arrived - echo_llm.requests[1].finished >= 0.25
    assert time.monotonic() - started >= 0.3


async def test_errors_are_per_prompt_and_auth_is_never_retried(gen, echo_llm):
    echo_llm.script(unauthorized())
    reply = await gen(["a"])
    assert reply.responses[0].response == "" and "authentication" in reply.responses[0].error
    assert [r.status for r in echo_llm.requests] == [401]
    echo_llm.reset()
    echo_llm.script(*[server_error()] * 3)  # first prompt: 1 try + 2 retries, all 500
    reply = await gen(["x"])
    assert reply.responses[0].error.startswith("server error from openai_compatible (HTTP 500)")
    assert [r.status for r in echo_llm.requests] == [500, 500, 500]


async def test_one_failed_prompt_leaves_the_others(gen, echo_llm):
    echo_llm.script(unauthorized())
    reply = await gen(["p0", "p1", "p2"], max_new_tokens=0)
    assert [r.index for r in reply.responses] == [10, 11, 12]
    failed = [r for r in reply.responses if r.error]
    assert len(failed) == 1 and failed[0].response == ""
    assert all(r.response == f"{ECHO_PREFIX}p{r.index - 10}"
               for r in reply.responses if not r.error)
    assert len(echo_llm.requests) == 3


@pytest.mark.parametrize(("prompts", "generation", "field"), [
    (["x"], {"endpoint": "nope"}, "generation.endpoint"),
    (["x"], {"endpoint": ""}, "generation.endpoint"),
    (["x"], {"model": "m3"}, "generation.model"),
    (["x"], {"model": ""}, "generation.model"),
    (["x"], {"temperature": 2.5}, "generation.temperature"),
    (["x"], {"temperature": -0.1}, "generation.temperature"),
    (["x"], {"temperature": float("nan")}, "generation.temperature"),
    (["x"], {"max_new_tokens": -1}, "generation.max_new_tokens"),
    (["x"], {"max_new_tokens": CEILING + 1}, "generation.max_new_tokens"),
    ([""], {}, "prompts[0].prompt"),
    (["ok", "a\x00b"], {}, "prompts[1].prompt"),
    ([], {}, "prompts"),
    (["x"] * (MAX_PROMPTS + 1), {}, "prompts"),
])
async def test_invalid_requests_name_the_field(gen, echo_llm, prompts, generation, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gen(prompts, **generation)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(rich_status(caught.value))
    assert echo_llm.requests == []


async def test_needs_a_token(gen):
    request = judge_pb2.GenerateResponsesRequest(
        generation=judge_pb2.GenerationConfig(endpoint="a", model="m1"),
        prompts=[judge_pb2.GenerationPrompt(index=0, prompt="x")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gen.stub.GenerateResponses(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
