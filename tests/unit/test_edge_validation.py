"""The edge check (services/common/validation.py) on its own: what it refuses, the paths it
names, and that its fast pass never clears a request its full walk would refuse."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epochlens.v1 import common_pb2, judge_pb2, query_pb2, writer_pb2
from services.common.errors import InvalidArgument, Violations
from services.common.validation import EdgeLimits, RequestChecker, key_path, replace_nul
from tests.fuzz.strategies import MessageStrategies
from tests.helpers import item

CHECKER = RequestChecker(EdgeLimits(max_abs_integer=2**53 - 1, max_struct_depth=4))


def violations(message) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as err:
        CHECKER.check(message)
    return {v.field: v.description for v in err.value.violations}


def test_valid_batch_passes_and_model_texts_may_hold_nul():
    batch = writer_pb2.WritePredictionsRequest(run_id="r", predictions=[
        item(1, 0, prediction="a\x00b", prompt="\x00", ground_truth="x\x00")])
    CHECKER.check(batch)


def test_every_bad_value_is_named_by_its_path():
    request = writer_pb2.StreamPredictionsRequest(run_id="r\x00", sequence=2**60, predictions=[
        item(1, 0), item(-2**62, 1, generation_time_ms=math.nan)])
    assert violations(request) == {
        "run_id": "must not contain a NUL character (U+0000)",
        "sequence": f"{2**60} is out of range (magnitude at most {2**53 - 1})",
        "predictions[1].step": f"{-2**62} is out of range (magnitude at most {2**53 - 1})",
        "predictions[1].generation_time_ms": "must be a finite number, got nan",
    }


def test_struct_values_keys_and_depth():
    request = writer_pb2.CreateRunRequest(name="n", model_name="m")
    request.config.update({"ok": 1, "odd key": "x\x00", "list": [1, "a\x00"],
                           "deep": {"b": {"c": {"d": {"e": 1}}}}})
    request.config.fields["lr"].number_value = math.inf
    request.config.fields["k\x00"].number_value = 1
    assert violations(request) == {
        "config['odd key']": "must not contain a NUL character (U+0000)",
        "config.list[1]": "must not contain a NUL character (U+0000)",
        "config.deep.b.c.d": "nested deeper than 4 levels",
        "config.lr": "must be a finite number, got inf",
        "config": "a key contains a NUL character (U+0000)",
    }


def test_unknown_enum_values_are_refused():
    request = query_pb2.ListJudgmentsRequest(run_id="r", judge_type=42)
    assert violations(request) == {"judge_type": "unknown JudgeType value 42"}
    assert violations(writer_pb2.FinishRunRequest(run_id="r", state=-1)) == {
        "state": "unknown RunState value -1"}


def test_helpers():
    assert replace_nul("a\x00b\x00") == "a\ufffdb\ufffd"
    assert key_path("", "a") == "a" and key_path("c", "a_1") == "c.a_1"
    assert key_path("c", "x y") == "c['x y']" and key_path("c", "\u00e9") == "c['\\xe9']"


MESSAGES = [writer_pb2.CreateRunRequest, writer_pb2.StreamPredictionsRequest,
            judge_pb2.JudgePredictionsRequest, judge_pb2.EstimateCostRequest,
            query_pb2.ListPredictionsRequest, common_pb2.PredictionInput]


@pytest.mark.parametrize("message_type", MESSAGES, ids=[m.__name__ for m in MESSAGES])
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fast_pass_agrees_with_the_full_walk(message_type, data):
    strategy = MessageStrategies(["r"], [{"a": 1}]).for_message(message_type.DESCRIPTOR)
    message = data.draw(strategy)
    walked = Violations()
    CHECKER._message(message, "", walked)
    if walked.items:  # the fast pass may send a valid request to the walk, never the reverse
        assert not CHECKER._fast_ok(message)
