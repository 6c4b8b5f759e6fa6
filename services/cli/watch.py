"""`epochlens watch`: follow a run that is still training, one line per epoch.

The run's changes arrive on QueryService.WatchRun (no polling): each epoch summary as
its predictions are committed, and the run's state. An epoch is printed once it has
landed: when a later epoch appears, when the stream ends (the run is over), or when
nothing arrived for one interval (the trainer writes an epoch's predictions in one burst).
An epoch that grows after it was printed is printed again, marked "(updated)". A broken
stream is opened again with the last resume token, so nothing is missed or repeated.
"""

import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from epochlens.v1 import common_pb2, query_pb2
from services.cli.client import QueryClient
from services.cli.config import CliSettings
from services.cli.fetch import prediction_pages
from services.cli.render import percent
from services.cli.stats import EpochStats, epoch_stats

# What EventStream.take returns besides events.
QUIET, END = "quiet", "end"


def epoch_line(stats: EpochStats, updated: bool = False) -> str:
    """What watch prints for one epoch."""
    exact = (f"exact match {stats.exact_match_count}/{stats.with_ground_truth} "
             f"({percent(stats.exact_match_rate)})" if stats.with_ground_truth
             else "exact match - (no ground truth)")
    mark = " (updated)" if updated else ""
    return (f"epoch {stats.epoch}  step {stats.latest_step}  "
            f"{stats.prediction_count} predictions  {exact}{mark}")


class EventStream:
    """One WatchRun call read by a background thread, so that the caller can wait for the
    next event with a timeout."""

    def __init__(self, client: QueryClient, run_id: str, resume_token: str) -> None:
        self._client = client
        self._call = client.watch(run_id, resume_token)
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, name="watch-stream", daemon=True).start()

    def _pump(self) -> None:
        try:
            for event in self._call:
                self._queue.put(event)
            self._queue.put(END)
        except grpc.RpcError as exc:
            self._queue.put(exc)

    def take(self, timeout: float) -> query_pb2.WatchRunEvent | str:
        """The next event, END when the stream ended, or QUIET after `timeout` seconds
        without one; a failed stream raises its CliError."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return QUIET
        if isinstance(item, grpc.RpcError):
            raise self._client.stream_error(item, "run")
        return item

    def close(self) -> None:
        self._call.cancel()


class EpochFollower:
    """What one watch has seen and printed, fed with WatchRun events."""

    def __init__(self, client: QueryClient, settings: CliSettings, run_id: str) -> None:
        self._client, self._settings, self._run_id = client, settings, run_id
        self._counts: dict[int, int] = {}
        self._printed: dict[int, int] = {}
        self.state = common_pb2.RUN_STATE_RUNNING
        self.resume_token = ""

    def on_event(self, event: query_pb2.WatchRunEvent) -> Iterator[str]:
        """Lines for the epochs this event shows to have landed (those before a new one)."""
        self.resume_token = event.resume_token
        change = event.WhichOneof("change")
        if change == "run":
            self.state = event.run.state
        elif change == "epoch":
            self._counts[event.epoch.epoch] = event.epoch.prediction_count
            yield from self._land(lambda epoch: epoch < event.epoch.epoch)

    def on_quiet(self) -> Iterator[str]:
        """Nothing arrived for one interval: every epoch seen has landed."""
        yield from self._land(lambda epoch: True)

    def _land(self, which: Callable[[int], bool]) -> Iterator[str]:
        for epoch in sorted(self._counts):
            if which(epoch) and self._printed.get(epoch, -1) < self._counts[epoch]:
                yield from self._report(epoch)

    def _report(self, epoch: int) -> Iterator[str]:
        pages = prediction_pages(self._client, self._settings, self._run_id, epoch)
        for stats in epoch_stats(pages):
            yield epoch_line(stats, updated=epoch in self._printed)
            self._printed[epoch] = stats.prediction_count


def follow(follower: EpochFollower, client: QueryClient, run_id: str, quiet_s: float,
           echo: Callable[[str], None]) -> None:
    """Reads one WatchRun stream (from the follower's resume token) until it ends, echoing
    each landed epoch; a failure raises its CliError."""
    stream = EventStream(client, run_id, follower.resume_token)
    try:
        while (item := stream.take(quiet_s)) is not END:
            lines = follower.on_quiet() if item is QUIET else follower.on_event(item)
            for line in lines:
                echo(line)
        for line in follower.on_quiet():
            echo(line)
    finally:
        stream.close()
