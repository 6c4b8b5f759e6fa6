"""trainer_client.samples.SampleTracker: which samples a sent batch declares."""

from epochlens.v1 import common_pb2
from trainer_client.samples import SampleTracker


def batch(*indices: int, prompt: str = "p", truth: str | None = "t"):
    items = []
    for index in indices:
        item = common_pb2.PredictionInput(sample_index=index, prompt=f"{prompt}{index}",
                                          prediction="o")
        if truth is not None:
            item.ground_truth = f"{truth}{index}"
        items.append(item)
    return items


def declared(samples) -> list[tuple[int, str, str | None]]:
    return [(s.sample_index, s.prompt, s.ground_truth if s.HasField("ground_truth") else None)
            for s in samples]


def test_a_sample_goes_up_until_a_batch_that_declared_it_is_acked():
    tracker = SampleTracker()
    first = batch(0, 1, 0)
    assert declared(tracker.prepare(1, first)) == [(0, "p0", "t0"), (1, "p1", "t1")]
    assert [(i.prompt, i.HasField("ground_truth")) for i in first] == [("", False)] * 3
    # Not acked yet: the next batch declares them again.
    assert declared(tracker.prepare(2, batch(1))) == [(1, "p1", "t1")]
    tracker.settle(1, set())
    later = batch(0, 1)
    assert tracker.prepare(3, later) == [] and {i.prompt for i in later} == {""}
    assert tracker.stored_count == 2


def test_a_rejected_or_unacked_batch_declares_nothing_stored():
    tracker = SampleTracker()
    tracker.prepare(1, batch(5))
    tracker.prepare(2, batch(6, truth=None))
    tracker.settle(2, {1})
    assert declared(tracker.prepare(3, batch(5))) == [(5, "p5", "t5")]
    assert tracker.prepare(4, batch(6, truth=None)) == []
    tracker.new_stream()  # batch 3 was never acked: a replay declares sample 5 again
    assert declared(tracker.prepare(3, batch(5))) == [(5, "p5", "t5")]


def test_a_prediction_with_other_text_keeps_it_for_the_writer_to_refuse():
    tracker = SampleTracker()
    tracker.prepare(1, batch(0))
    tracker.settle(1, set())
    changed = batch(0, prompt="other")
    assert tracker.prepare(2, changed) == []
    assert (changed[0].prompt, changed[0].ground_truth) == ("other0", "t0")
