"""Each sample's prompt and ground truth goes up once per run, not with every prediction.

The spool keeps every prediction whole (prompt and ground truth included), so a replay after
a crash, `epochlens-sync` and a quarantined batch need nothing else. When a batch is sent,
SampleTracker declares in its `samples` every sample it names that the writer has not
acknowledged as stored, and leaves the prompt of its predictions empty. A sample counts as
stored once a batch that declared it is acknowledged without a rejection; a new stream (a
reconnect) forgets what was declared but not acknowledged, and a rejected batch's samples are
declared again by the next batch that needs them, since the writer may not have them.

A prediction whose text differs from its sample's (a bug in the dataset pass) keeps its own
prompt and ground truth: the writer then refuses the batch naming the field, as it should.
"""

from epochlens.v1 import common_pb2, writer_pb2

# (prompt, ground truth)
SampleText = tuple[str, str | None]


class SampleTracker:
    """Which samples of one run the writer stores, and which sent batches declared which."""

    def __init__(self) -> None:
        self._stored: dict[int, SampleText] = {}
        self._in_flight: dict[int, dict[int, SampleText]] = {}

    @property
    def stored_count(self) -> int:
        return len(self._stored)

    def prepare(self, sequence: int, predictions: list[common_pb2.PredictionInput]
                ) -> list[writer_pb2.SampleInput]:
        """Empties the prompt of `predictions` (in place) whose sample is stored or declared
        here; the samples the batch of `sequence` declares."""
        declared: dict[int, SampleText] = {}
        for item in predictions:
            if not item.prompt:
                continue
            sample = _text_of(item)
            known = self._stored.get(item.sample_index) or declared.get(item.sample_index)
            if known is None:
                declared[item.sample_index] = known = sample
            if known == sample:
                item.prompt = ""
                item.ClearField("ground_truth")
        if declared:
            self._in_flight[sequence] = declared
        return [_sample_input(index, sample) for index, sample in declared.items()]

    def settle(self, acked_sequence: int, rejected: set[int]) -> None:
        """An ack up to `acked_sequence`: the samples of its batches that were not rejected
        are stored from now on."""
        for sequence in [s for s in self._in_flight if s <= acked_sequence]:
            declared = self._in_flight.pop(sequence)
            if sequence not in rejected:
                self._stored.update(declared)

    def new_stream(self) -> None:
        """What was declared on a stream that ended is not known to be stored."""
        self._in_flight.clear()


def _text_of(item: common_pb2.PredictionInput) -> SampleText:
    return item.prompt, (item.ground_truth if item.HasField("ground_truth") else None)


def _sample_input(index: int, sample: SampleText) -> writer_pb2.SampleInput:
    prompt, truth = sample
    message = writer_pb2.SampleInput(sample_index=index, prompt=prompt)
    if truth is not None:
        message.ground_truth = truth
    return message
