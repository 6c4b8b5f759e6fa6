"""`epochlens watch`: follow a run that is still training, one line per epoch.

Each poll reads the run's state (GetRun) and then its epochs (ListEpochs), in
that order, so once the state says the run is over the epochs read after it
are final. An epoch is printed once it has landed: when a later epoch exists,
when the run is over, or when its prediction count did not change between two
polls (the trainer writes an epoch's predictions in one burst). An epoch that
grows after it was printed is printed again, marked "(updated)".
"""

from collections.abc import Iterator

from epochlens.v1 import common_pb2, query_pb2
from services.cli.client import QueryClient
from services.cli.config import CliSettings
from services.cli.fetch import prediction_pages
from services.cli.render import percent
from services.cli.stats import EpochStats, epoch_stats


def epoch_line(stats: EpochStats, updated: bool = False) -> str:
    """What watch prints for one epoch."""
    exact = (f"exact match {stats.exact_match_count}/{stats.with_ground_truth} "
             f"({percent(stats.exact_match_rate)})" if stats.with_ground_truth
             else "exact match - (no ground truth)")
    mark = " (updated)" if updated else ""
    return (f"epoch {stats.epoch}  step {stats.latest_step}  "
            f"{stats.prediction_count} predictions  {exact}{mark}")


class EpochFollower:
    """Remembers what was seen and printed between polls of one run."""

    def __init__(self, client: QueryClient, settings: CliSettings, run_id: str) -> None:
        self._client, self._settings, self._run_id = client, settings, run_id
        self._seen: dict[int, int] = {}
        self._printed: dict[int, int] = {}

    def state(self) -> int:
        return self._client.run(self._run_id).state

    def poll(self, finished: bool) -> Iterator[str]:
        """Lines for the epochs that landed since the last poll."""
        epochs = self._client.epochs(self._run_id)
        for index, epoch in enumerate(epochs):
            if self._landed(epoch, finished or index + 1 < len(epochs)):
                yield from self._report(epoch.epoch)
        self._seen = {e.epoch: e.prediction_count for e in epochs}

    def _landed(self, epoch: query_pb2.EpochSummary, closed: bool) -> bool:
        if self._printed.get(epoch.epoch, -1) >= epoch.prediction_count:
            return False
        return closed or self._seen.get(epoch.epoch) == epoch.prediction_count

    def _report(self, epoch: int) -> Iterator[str]:
        pages = prediction_pages(self._client, self._settings, self._run_id, epoch)
        for stats in epoch_stats(pages):
            yield epoch_line(stats, updated=epoch in self._printed)
            self._printed[epoch] = stats.prediction_count


def is_running(state: int) -> bool:
    return state == common_pb2.RUN_STATE_RUNNING
