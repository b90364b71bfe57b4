"""Terminal output: progress bars for long commands (on stderr, only on a terminal) and the console
that tables are printed to."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ProgressBar:
    """One bar; ``update(done, total)`` may be called from a library callback."""

    def __init__(self, label: str, unit: str) -> None:
        amount: tuple = ()
        if unit == "bytes":
            amount = (DownloadColumn(), TransferSpeedColumn())
        elif unit == "rows":
            amount = (MofNCompleteColumn(), TextColumn("rows"))
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            *amount,
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task(label, total=None, rate="")

    def update(self, done: float, total: float | None = None, rate: str = "") -> None:
        self.progress.update(self.task, completed=done, total=total, rate=rate)

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()


def progress_bar(label: str, unit: str) -> ProgressBar:
    return ProgressBar(label, unit)


def stdout_console() -> Console:
    """A console for tables on stdout; when stdout is not a terminal (a pipe, a file, a test), wide
    enough that rows are not wrapped (rich would assume 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=180)
