import pytest

from epochlens.v1 import common_pb2, writer_pb2
from services.common.errors import InvalidArgument
from services.writer.config import WriterSettings
from services.writer.validation import check_finish_state, validate_batch, validate_create_run
from tests.helpers import item

RUN = "6f1c1f3e-8f7e-4d8e-9a3c-1d2e3f4a5b6c"


@pytest.fixture
def settings() -> WriterSettings:
    return WriterSettings(port=0, max_batch_size=3, max_text_chars=10, max_name_chars=5,
                          max_config_bytes=20, _env_file=None)


def violations(exc: InvalidArgument) -> dict[str, str]:
    return {v.field: v.description for v in exc.violations}


def test_valid_batch_returns_run_id(settings):
    assert str(validate_batch(RUN, [item(1, 0, prompt="p", prediction="o", ground_truth="g")],
                              settings)) == RUN


def test_every_bad_field_is_named_with_its_index(settings):
    items = [item(1, 0, prompt="p", prediction="o", ground_truth="g"),
             item(-1, -2, epoch=-3, prompt="", prediction="x" * 11, ground_truth="y" * 11,
                  generation_time_ms=-1, prompt_tokens=-1)]
    with pytest.raises(InvalidArgument) as err:
        validate_batch("bad", items, settings)
    assert set(violations(err.value)) == {
        "run_id", "predictions[1].step", "predictions[1].sample_index", "predictions[1].epoch",
        "predictions[1].prediction", "predictions[1].ground_truth",
        "predictions[1].generation_time_ms", "predictions[1].prompt_tokens"}


def test_declared_samples_are_checked_like_predictions(settings):
    """An empty prompt on a prediction is checked at commit (its sample may be stored); on a
    declared sample it is always a violation."""
    samples = [writer_pb2.SampleInput(sample_index=0, prompt="p"),
               writer_pb2.SampleInput(sample_index=-1, prompt="", ground_truth="y" * 11)]
    with pytest.raises(InvalidArgument) as err:
        validate_batch(RUN, [item(1, 0, prompt="", prediction="o")], settings,
                       samples=samples)
    assert set(violations(err.value)) == {
        "samples[1].sample_index", "samples[1].prompt", "samples[1].ground_truth"}


def test_batch_size_limits(settings):
    ok = item(1, 0, prompt="p", prediction="o", ground_truth="g")
    for items in ([], [ok] * 4):
        with pytest.raises(InvalidArgument) as err:
            validate_batch(RUN, items, settings)
        assert "predictions" in violations(err.value)


def test_create_run_limits(settings):
    request = writer_pb2.CreateRunRequest(name="toolong", model_name="", request_id="r")
    request.config.update({"k": "x" * 30})
    with pytest.raises(InvalidArgument) as err:
        validate_create_run(request, settings)
    assert set(violations(err.value)) == {"name", "model_name", "config"}


def test_finish_state():
    assert check_finish_state(common_pb2.RUN_STATE_UNSPECIFIED) == common_pb2.RUN_STATE_SUCCEEDED
    assert check_finish_state(common_pb2.RUN_STATE_CANCELLED) == common_pb2.RUN_STATE_CANCELLED
    with pytest.raises(InvalidArgument):
        check_finish_state(common_pb2.RUN_STATE_RUNNING)
