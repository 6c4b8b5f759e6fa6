"""Client-side balancing over several replicas: the writer's judge channel over an ipv4:
target with two real gRPC servers (round_robin reaches both, pick_first one; a stopped
one is skipped), and the service config every balanced channel gets."""

import json
from collections import Counter

import grpc
import pytest

from epochlens.v1 import judge_pb2
from services.common.balancing import balancing_options, service_config
from services.writer.config import WriterSettings
from services.writer.outbox import JUDGE_SERVICE, judge_channel

CALLS = 20
TIMEOUT_S = 5.0
METHOD = "EnqueueJudging"


async def start_counting_server(name: str, served: Counter) -> tuple[grpc.aio.Server, str]:
    """A server whose JudgeService/EnqueueJudging counts its calls under `name`."""
    async def enqueue(request: bytes, context) -> bytes:
        served[name] += 1
        return judge_pb2.EnqueueJudgingResponse().SerializeToString()

    handler = grpc.method_handlers_generic_handler(JUDGE_SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(enqueue)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def call_many(channel: grpc.aio.Channel, calls: int) -> None:
    enqueue = channel.unary_unary(f"/{JUDGE_SERVICE}/{METHOD}",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=judge_pb2.EnqueueJudgingResponse.FromString)
    for _ in range(calls):
        await enqueue(judge_pb2.EnqueueJudgingRequest(), timeout=TIMEOUT_S, wait_for_ready=True)


@pytest.fixture
async def two_judges():
    served: Counter[str] = Counter()
    servers = [await start_counting_server(name, served) for name in ("a", "b")]
    yield served, servers
    for server, _ in servers:
        await server.stop(None)


def settings(addresses: list[str], policy: str) -> WriterSettings:
    return WriterSettings(port=0, judge_address="ipv4:" + ",".join(addresses),
                          judge_lb_policy=policy, _env_file=None)


async def test_round_robin_spreads_calls_and_skips_a_stopped_replica(two_judges):
    served, servers = two_judges
    channel = judge_channel(settings([address for _, address in servers], "round_robin"), None)
    try:
        await channel.channel_ready()
        await call_many(channel, CALLS)
        assert served["a"] > 0 and served["b"] > 0, served
        assert served.total() == CALLS
        await servers[0][0].stop(None)
        before = served["b"]
        await call_many(channel, CALLS)
        assert served["b"] == before + CALLS
    finally:
        await channel.close()


async def test_pick_first_sends_everything_to_one_replica(two_judges):
    served, servers = two_judges
    channel = judge_channel(settings([address for _, address in servers], "pick_first"), None)
    try:
        await call_many(channel, CALLS)
    finally:
        await channel.close()
    assert sorted(served.values()) == [CALLS]


def test_service_config_keeps_the_retry_policy_beside_the_policy():
    config = json.loads(service_config("round_robin", methodConfig=[{"name": []}]))
    assert config == {"loadBalancingConfig": [{"round_robin": {}}],
                      "methodConfig": [{"name": []}]}
    [(option, value)] = balancing_options("pick_first")
    assert (option, json.loads(value)) == ("grpc.service_config",
                                           {"loadBalancingConfig": [{"pick_first": {}}]})


def test_address_settings_take_targets_naming_several_replicas():
    target = "dns:///judge.internal:50053"
    assert WriterSettings(port=0, judge_address=target, _env_file=None).judge_address == target
    with pytest.raises(ValueError, match="judge_lb_policy"):
        WriterSettings(port=0, judge_lb_policy="random", _env_file=None)
