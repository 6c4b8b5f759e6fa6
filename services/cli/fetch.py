"""Pages of predictions fetched ahead in a worker thread, so the next gRPC
round trip overlaps the work on the current page (export, summary).

Memory stays bounded: at most `depth` pages wait in the queue, plus the one
being fetched and the one being consumed. A failure in the worker (a CliError
from the client) is raised in the consumer; a consumer that stops early stops
the worker.
"""

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

from services.cli.client import QueryClient
from services.cli.config import CliSettings

T = TypeVar("T")
_DONE = object()


class _Prefetcher:
    def __init__(self, items: Iterator[T], size: int, depth: int, poll_s: float) -> None:
        self._items, self._size, self._poll_s = items, size, poll_s
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="epochlens-prefetch",
                                        daemon=True)

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = list(itertools.islice(self._items, self._size))
                if not chunk:
                    break
                self._put(chunk)
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _put(self, value: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=self._poll_s)
                return
            except queue.Full:
                continue

    def pages(self) -> Iterator[list[T]]:
        self._thread.start()
        try:
            while (value := self._queue.get()) is not _DONE:
                if isinstance(value, BaseException):
                    raise value
                yield value
        finally:
            self._stop.set()
            self._thread.join()


def prefetched(items: Iterator[T], size: int, depth: int,
               poll_s: float) -> Iterator[list[T]]:
    """`items` in lists of `size`, produced by a thread up to `depth` lists ahead (a full
    queue is re-checked every poll_s, so a consumer that stops early is noticed)."""
    return _Prefetcher(items, size, depth, poll_s).pages()


def prediction_pages(client: QueryClient, settings: CliSettings, run_id: str,
                     epoch: int | None = None) -> Iterator[list]:
    """Every prediction of the run (or of one epoch), page by page, prefetched."""
    items = client.predictions(run_id, epoch=epoch, page_size=settings.export_page_size)
    return prefetched(items, settings.export_page_size, settings.prefetch_pages,
                      settings.prefetch_poll_s)
