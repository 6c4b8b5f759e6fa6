"""A rich progress bar on stderr around a stream of pages (export, summary)."""

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from services.cli.config import CliSettings

T = TypeVar("T")


def progress_pages(pages: Iterable[list[T]], total: int, description: str,
                   settings: CliSettings, show: bool) -> Iterator[list[T]]:
    """The same pages; with `show`, a bar on stderr advances by each page's length."""
    if not show:
        yield from pages
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True),
                  refresh_per_second=settings.progress_refresh_per_s) as bar:
        task = bar.add_task(description, total=total)
        for page in pages:
            yield page
            bar.advance(task, len(page))


def stderr_is_terminal() -> bool:
    return Console(stderr=True).is_terminal


class CountBar:
    """A bar on stderr set to absolute counts (judged of total), or nothing without `show`.

    Use as a context manager; update(completed) moves it."""

    def __init__(self, total: int, description: str, settings: CliSettings, show: bool) -> None:
        self._progress = None
        if show:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TaskProgressColumn(), TimeElapsedColumn())
            self._progress = Progress(*columns, console=Console(stderr=True),
                                      refresh_per_second=settings.progress_refresh_per_s)
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> "CountBar":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, completed: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)
