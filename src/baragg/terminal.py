"""Terminal output: progress bars for long commands (on stderr, only on a terminal) and the console
that tables are printed to."""

from __future__ import annotations

import os
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
    """A console for tables on stdout. On a terminal, or when $COLUMNS says how wide, rich uses
    that width; otherwise (a pipe, a file) wide enough that rows are not wrapped (rich would assume
    80 columns)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").strip().isdigit():
        return Console()
    return Console(width=180)


def printable(text: str) -> str:
    """``text`` with control and format characters (ESC, CR, BEL, bidi overrides, ...) written as
    escapes (``\\x1b``, ``\\u202e``), so that a name or an error message from the database cannot
    move the cursor, recolour or rewrite the terminal. Other characters (accents, CJK) stay."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or char == " ":
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "".join(out)
