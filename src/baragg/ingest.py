"""Files of 1-minute bars → data_bars (DESIGN.md sections 8 and 9).

The file is streamed in chunks (a CSV cut into blocks of whole lines, each parsed by Arrow; a Parquet
file's record batches), so a file of ten million rows needs no more memory than a chunk (for Parquet:
a row group). Each chunk is checked by ``baragg.validation.check_bars`` and COPYed into a TEMP staging
table; duplicate times across the whole file are looked for in SQL when a chunk could hold one, and
one ``INSERT … SELECT … ON CONFLICT … DO UPDATE … WHERE the values differ`` moves the good rows into
data_bars. All of it is one transaction: by default a single bad row stores nothing; with a reject
file the good rows load and every bad one is written there. Re-ingesting a file rewrites no row.

Hostile files stay cheap: a line longer than ``MAX_LINE_BYTES`` is refused with its number, bad rows
are counted and streamed to the reject file (only the first few are kept for the message), reading
stops after ``max_rejects`` bad rows, and values quoted in messages are escaped and cut short.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import queue
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from baragg import partitions, sessions
from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput, shown
from baragg.sql import query
from baragg.validation import REQUIRED, Checked, check_bars, column_names

log = logging.getLogger(__name__)

# Chunk sizes: enough to amortise per-chunk overhead, small enough to keep memory flat.
# BARAGG_INGEST_BLOCK_BYTES overrides the CSV block size (tests use tiny blocks to cross chunk borders).
CSV_BLOCK_BYTES = 8 << 20
FIRST_BLOCK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 250_000
# A line of 1m bars is well under 200 bytes; a longer line than this is not a CSV of bars (and would
# have to be held in memory whole).
MAX_LINE_BYTES = 1 << 20
# How many bad rows the error message names, and how many bad rows stop the reading by default.
SHOWN_BAD_ROWS = 5
MAX_REJECTS = 1000
# How many unknown symbols the error message names.
SHOWN_SYMBOLS = 10

ProgressCallback = Callable[[int, int | None], None]  # (done, total or None) in bytes (CSV) or rows
T = TypeVar("T")


@dataclass
class BadRow:
    line: int
    column: str
    reason: str

    def describe(self, unit: str) -> str:
        return f"{unit} {self.line}: {self.column}: {self.reason}"


@dataclass
class IngestReport:
    """What happened to every row of the file; read == inserted + updated + unchanged + rejected."""

    file: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    symbols: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)
    reject_file: str | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _Chunk:
    """One block of the file: its rows as read (named as in ``COLUMNS``), the line (CSV) or row
    (Parquet) of each, every field of each row when asked (for the reject file), and the rows the
    reader could not split into fields."""

    lines: np.ndarray
    raw: pd.DataFrame | None  # None once checked
    done: int  # progress position after this chunk
    fields: list[pd.Series] | None = None  # one per file column, in file order (all_columns only)
    malformed: list[tuple[int, str, str]] = field(default_factory=list)  # (line, text, reason)


@dataclass
class _Prepared:
    """A chunk as the reader thread hands it over: read, checked, and, when it may go straight into
    data_bars, its good rows' span per symbol and their COPY payload (so that the main thread only
    streams bytes while the server works)."""

    chunk: _Chunk
    checked: Checked
    ok: np.ndarray
    span: tuple[list[str], list[datetime], list[datetime]] | None = None  # symbols, first, last times
    payload: list[Any] | None = None  # from _copy_binary


class _Source:
    """A file being read in chunks."""

    unit = "line"  # how a row's position is named in messages
    header: list[str]
    positions: dict[int, str]  # file column position -> name in COLUMNS
    total: int

    @property
    def columns(self) -> list[str]:
        """The columns of ``COLUMNS`` the file has."""
        return list(self.positions.values())

    def chunks(self, *, all_columns: bool = False) -> Iterator[_Chunk]:  # pragma: no cover - interface
        """The file's rows, chunk by chunk: the columns baragg reads, and with ``all_columns`` every
        field too (for the reject file, which keeps a bad row's original fields)."""
        raise NotImplementedError

    def with_fields(self, items: Iterable[T], line_of: Callable[[T], int]) -> Iterator[tuple[T, list[str]]]:
        """Each item with the original fields of its line; ``items`` come in ascending line order,
        and the file is read once (pragma: interface)."""
        raise NotImplementedError  # pragma: no cover


def is_parquet(path: Path) -> bool:
    if path.suffix.lower() in {".parquet", ".pq"}:
        return True
    with path.open("rb") as fh:
        return fh.read(4) == b"PAR1"


def _unreadable(path: Path, exc: BaseException) -> InvalidInput:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InvalidInput(f"{path.name}: cannot read the file: {shown(text, 120)} (truncated or damaged?)")


def _too_long(path: Path, line: int) -> InvalidInput:
    return InvalidInput(
        f"{path.name}: line {line} is longer than {MAX_LINE_BYTES:,} bytes: not a CSV file of 1m bars? "
        "nothing was stored"
    )


class _CsvSource(_Source):
    """A CSV file cut into blocks of whole lines, each parsed by Arrow's CSV reader.

    The file is cut here rather than handed to Arrow's streaming reader, which reads ahead as far as
    it likes (a whole file of hundreds of MB): memory stays at about one block, and every block knows
    its first line number, so rows keep the line numbers a person sees in an editor.
    """

    def __init__(self, path: Path, ignore: Collection[str] = ()) -> None:
        self.path = path
        self.header = self._header()
        if not self.header or self.header == [""]:
            raise InvalidInput(f"{path.name}: empty file (expected a header line with {', '.join(REQUIRED)})")
        self.positions = _positions(path, self.header, ignore)
        # Progress in bytes read; a compressed file's size does not compare with its text: no total.
        compressed = path.suffix.lower() in {".gz", ".bz2", ".zst", ".lz4", ".br"}
        self.total = 0 if compressed else path.stat().st_size

    @contextlib.contextmanager
    def _stream(self) -> Iterator[Any]:
        """The file's bytes (decompressed); a read error names the file (exit 2)."""
        try:
            with pa.input_stream(str(self.path), compression="detect") as stream:
                yield stream
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(self.path, exc) from exc

    def _header(self) -> list[str]:
        """The header's column names (the file may be compressed)."""
        with self._stream() as stream:
            sample = b""
            while b"\n" not in sample:
                data = stream.read(1 << 16)
                if not data:
                    break
                sample += data
                if len(sample) > MAX_LINE_BYTES and b"\n" not in sample[: MAX_LINE_BYTES + 1]:
                    raise _too_long(self.path, 1)
        first = sample.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig", errors="replace")
        return [name.strip() for name in next(csv.reader([first]), [])]

    def _blocks(self) -> Iterator[tuple[int, bytes, int]]:
        """(number of the block's first line, the block: whole lines, bytes read so far)."""
        block_bytes = int(os.environ.get("BARAGG_INGEST_BLOCK_BYTES") or CSV_BLOCK_BYTES)
        # The first block is small: the database waits for it (nothing else to do yet), while every
        # later block is read while the one before it is written.
        size = min(block_bytes, FIRST_BLOCK_BYTES)
        with self._stream() as stream:
            carry = b""
            header_done = False
            line = 1
            read = 0
            while True:
                data = stream.read(size)
                size = block_bytes
                read += len(data)
                at_end = not data
                data = carry + data
                if not header_done:
                    cut = data.find(b"\n")
                    if cut < 0 and not at_end:
                        carry = data
                        continue
                    data = data[cut + 1 :] if cut >= 0 else b""
                    header_done = True
                    line = 2
                if at_end:
                    self._check_lengths(data, line)
                    if data.strip(b"\r\n"):
                        yield line, data, read
                    return
                cut = data.rfind(b"\n")
                if cut < 0:
                    if len(data) > MAX_LINE_BYTES:
                        raise _too_long(self.path, line)
                    carry = data
                    continue
                block, carry = data[: cut + 1], data[cut + 1 :]
                self._check_lengths(block, line)
                if len(carry) > MAX_LINE_BYTES:
                    raise _too_long(self.path, line + block.count(b"\n"))
                yield line, block, read
                line += block.count(b"\n")

    def _check_lengths(self, block: bytes, first_line: int) -> None:
        """Refuse the first line of ``block`` longer than MAX_LINE_BYTES."""
        if len(block) <= MAX_LINE_BYTES:
            return
        ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
        if not len(ends) or ends[-1] != len(block) - 1:
            ends = np.append(ends, len(block))
        lengths = np.diff(ends, prepend=-1) - 1
        over = np.flatnonzero(lengths > MAX_LINE_BYTES)
        if len(over):
            raise _too_long(self.path, first_line + int(over[0]))

    def _not_utf8(self, block: bytes, first_line: int) -> tuple[bytes, list[tuple[int, str, str]]]:
        """The block with its lines that are not UTF-8 blanked (line numbers kept), and those lines
        as malformed rows."""
        lines = block.split(b"\n")
        bad: list[tuple[int, str, str]] = []
        for offset, raw in enumerate(lines):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = raw.decode("utf-8", errors="replace").rstrip("\r")
                byte = raw[exc.start : exc.start + 1].hex()
                bad.append((first_line + offset, text, f"not UTF-8 text (byte 0x{byte})"))
                lines[offset] = b""
        return b"\n".join(lines), bad

    def _typed(self, names: list[str], ts_type: pa.DataType) -> dict[str, pa.DataType]:
        """Arrow types for the columns baragg reads, so that the C++ parser converts the numbers and
        times (strings, then pandas, cost several times more per row). Any value these types do not
        take (a word in a price, a time without an offset, spaces around a time) makes the block be
        read as text instead, where the rules name what is wrong."""
        types: dict[str, pa.DataType] = {}
        for position, column in self.positions.items():
            if column == "canonical_symbol":
                types[names[position]] = pa.string()
            elif column == "ts_utc":
                types[names[position]] = ts_type
            else:
                types[names[position]] = pa.float64()
        return types

    def chunks(self, *, all_columns: bool = False) -> Iterator[_Chunk]:
        width = len(self.header)
        names = [f"c{i}" for i in range(width)]  # by position: header names may repeat or be empty
        wanted = names if all_columns else [names[p] for p in self.positions]
        # Typed parsing is for the rows only: the reject file keeps a bad row's fields as written.
        ts_types = [] if all_columns else [pa.timestamp("us", tz="UTC"), pa.timestamp("us")]
        for first_line, block, read in self._blocks():
            line_count = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            not_utf8: list[tuple[int, str, str]] = []  # blanked lines: read as empty lines, dropped below
            table = None
            for ts_type in list(ts_types):
                with contextlib.suppress(pa.ArrowInvalid):
                    table, malformed = self._parse(
                        block, first_line, names, wanted, self._typed(names, ts_type)
                    )
                    if ts_types[0] is not ts_type:  # the next block likely has the same kind of time
                        ts_types.remove(ts_type)
                        ts_types.insert(0, ts_type)
                    break
            try:
                try:
                    if table is None:
                        table, malformed = self._parse(block, first_line, names, wanted)
                except pa.ArrowInvalid as exc:
                    if "UTF8" not in str(exc):
                        raise
                    block, not_utf8 = self._not_utf8(block, first_line)
                    table, malformed = self._parse(block, first_line, names, wanted)
            except pa.ArrowInvalid as exc:
                last = first_line + line_count - 1
                raise InvalidInput(
                    f"{self.path.name}: cannot parse lines {first_line}-{last} as CSV: {shown(exc, 120)}"
                ) from exc
            lines = np.arange(first_line, first_line + line_count, dtype=np.int64)
            if malformed:  # rows the reader skipped keep their line numbers: step over them
                lines = lines[~np.isin(lines, [n for n, _, _ in malformed])]
            frame = table.to_pandas(types_mapper=pd.ArrowDtype)
            raw = pd.DataFrame({column: frame[names[p]] for p, column in self.positions.items()})
            blank = raw.isna().all(axis=1).to_numpy()
            if blank.any():  # empty lines are not rows
                keep = ~blank
                frame, raw, lines = (
                    frame[keep].reset_index(drop=True),
                    raw[keep].reset_index(drop=True),
                    lines[keep],
                )
            fields = [frame[name] for name in names] if all_columns else None
            done = min(read, self.total) if self.total else read
            yield _Chunk(
                lines=lines, raw=raw, done=done, fields=fields, malformed=sorted(malformed + not_utf8)
            )

    def _parse(
        self,
        block: bytes,
        first_line: int,
        names: list[str],
        wanted: list[str],
        types: dict[str, pa.DataType] | None = None,
    ) -> tuple[pa.Table, list[tuple[int, str, str]]]:
        malformed: list[tuple[int, str, str]] = []

        def on_invalid_row(row: pa_csv.InvalidRow) -> str:
            reason = f"expected {row.expected_columns} fields, found {row.actual_columns}"
            malformed.append((first_line + (row.number or 1) - 1, row.text, reason))
            return "skip"

        table = pa_csv.read_csv(
            pa.BufferReader(block),
            read_options=pa_csv.ReadOptions(column_names=names, use_threads=False, block_size=len(block) + 1),
            parse_options=pa_csv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=on_invalid_row),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: (types or {}).get(name, pa.string()) for name in names},
                include_columns=wanted,
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
        return table, malformed

    def with_fields(self, items: Iterable[T], line_of: Callable[[T], int]) -> Iterator[tuple[T, list[str]]]:
        with self._stream() as stream:
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
            records = enumerate(csv.reader(text), start=1)
            number, fields = 0, []
            for item in items:
                wanted = line_of(item)
                while number < wanted:
                    number, fields = next(records, (wanted, []))
                yield item, fields if number == wanted else []


class _ParquetSource(_Source):
    unit = "row"

    def __init__(self, path: Path, ignore: Collection[str] = ()) -> None:
        self.path = path
        try:
            # A buffered stream, not the whole column chunk at once: a file written as one huge row
            # group is read page by page (1M rows in one group: +65 MiB instead of +220 MiB).
            self.file = pq.ParquetFile(str(path), buffer_size=1 << 20, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise InvalidInput(f"{path.name}: not a readable Parquet file: {shown(exc, 120)}") from exc
        self.header = list(self.file.schema_arrow.names)
        self.positions = _positions(path, self.header, ignore)
        self.total = self.file.metadata.num_rows

    def _batches(self, columns: list[int] | None) -> Iterator[pa.RecordBatch]:
        names = None if columns is None else [self.header[p] for p in columns]
        try:
            yield from self.file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=names)
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(self.path, exc) from exc

    def chunks(self, *, all_columns: bool = False) -> Iterator[_Chunk]:
        first = 1
        wanted = None if all_columns else list(self.positions)
        for batch in self._batches(wanted):
            # the batch's columns: every one of the file's, or the ones read, in file order
            index = dict(self.positions) if all_columns else dict(enumerate(self.positions.values()))
            raw = pd.DataFrame(
                {c: batch.column(i).to_pandas(types_mapper=pd.ArrowDtype) for i, c in index.items()}
            )
            fields = (
                [column.to_pandas(types_mapper=pd.ArrowDtype) for column in batch.columns]
                if all_columns
                else None
            )
            lines = np.arange(first, first + batch.num_rows, dtype=np.int64)
            first += batch.num_rows
            yield _Chunk(lines=lines, raw=raw, done=first - 1, fields=fields)

    def with_fields(self, items: Iterable[T], line_of: Callable[[T], int]) -> Iterator[tuple[T, list[str]]]:
        batches = self._batches(None)
        first, rows = 1, []  # rows of the current batch, from row number `first`
        for item in items:
            wanted = line_of(item)
            while wanted >= first + len(rows):
                batch = next(batches, None)
                if batch is None:
                    break
                first += len(rows)
                rows = list(zip(*(column.to_pylist() for column in batch.columns), strict=True))
            if first <= wanted < first + len(rows):
                yield item, ["" if v is None else str(v) for v in rows[wanted - first]]
            else:
                yield item, []


def _positions(path: Path, header: list[str], ignore: Collection[str]) -> dict[int, str]:
    try:
        return column_names(header, ignore=ignore)
    except InvalidInput as exc:
        raise InvalidInput(f"{path.name}: {exc}") from None


def open_source(path: Path, ignore: Collection[str] = ()) -> _Source:
    if not path.exists():
        raise InvalidInput(f"{path}: no such file")
    if path.is_dir():
        raise InvalidInput(f"{path}: is a directory, not a file")
    try:
        parquet = is_parquet(path)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    source: _Source = _ParquetSource(path, ignore) if parquet else _CsvSource(path, ignore)
    missing = [c for c in REQUIRED if c not in source.columns]
    if missing:
        found = ", ".join(shown(name) for name in source.header[:20])
        raise InvalidInput(
            f"{path.name}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(found: {found}; expected ts_utc, open, high, low, close, "
            "optional vol, vwap, trade_count, canonical_symbol)"
        )
    return source


# ---------------------------------------------------------------------------------------------
# The reject file
# ---------------------------------------------------------------------------------------------
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"


def spreadsheet_safe(cells: pd.Series) -> pd.Series:
    """Cells a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage return)
    get a leading ``'``, so opening a reject file never runs a formula from the data (CSV injection).
    A plain number such as -5 is left as it is: it is not a formula."""
    text = cells.astype("string").fillna("")
    risky = text.str.startswith(_FORMULA_START) & ~text.str.fullmatch(_NUMBER)
    return text.where(~risky, "'" + text).astype("object")


def check_reject_path(reject_file: Path, input_file: Path) -> None:
    """Refuse a reject file that would destroy or redirect something: the input itself, a symbolic
    link (whatever it points to), anything but a regular file, or a directory that is not there."""
    name = f"--reject-file {shown(reject_file, 200)}"
    if reject_file.is_symlink():
        raise InvalidInput(f"{name} is a symbolic link: give the path of a regular file")
    if reject_file.exists():
        if reject_file.samefile(input_file):
            raise InvalidInput(f"{name} is the input file itself: give another path")
        if not stat.S_ISREG(reject_file.stat().st_mode):
            raise InvalidInput(f"{name} exists and is not a regular file")
    parent = reject_file.parent
    if not parent.is_dir():
        raise InvalidInput(f"{name}: directory {shown(parent, 200)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInput(f"{name}: directory {shown(parent, 200)} is not writable")


class _RejectFile:
    """The reject file, written only when there is a bad row: into a new temporary file beside it,
    renamed over the target when the load has committed (so the target is never half-written, never
    truncated for nothing, and a link at its path is replaced, never followed)."""

    def __init__(self, target: Path, unit: str, header: list[str]) -> None:
        self.target = target
        self.header = [unit, *spreadsheet_safe(pd.Series(header, dtype="object")), "reason"]
        self.temp: Path | None = None
        self.file: Any = None
        self.writer: Any = None

    def _open(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        self.temp = Path(name)
        self.file = open(fd, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in finish/discard
        self.writer = csv.writer(self.file)
        self.writer.writerow(self.header)

    def write(self, rows: Iterable[Iterable[Any]]) -> None:
        if self.writer is None:
            self._open()
        self.writer.writerows(rows)

    def finish(self) -> bool:
        """Move the rows written into place; False when there were none (the target is untouched)."""
        if self.file is None or self.temp is None:
            return False
        self.file.close()
        mode = self.target.stat().st_mode & 0o777 if self.target.exists() else _default_mode()
        os.chmod(self.temp, mode)
        os.replace(self.temp, self.target)
        self.file = self.temp = None
        return True

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
        self.file = self.temp = None


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _TooManyBadRows(Exception):
    """Reading stops: more bad rows than ``max_rejects``."""


class _BadRows:
    """Every bad row: counted, the first few kept for the error message, all streamed to the reject
    file (CSV: line or row number, the original fields, the reason) when there is one. Memory stays
    bounded whatever the file: nothing else is kept per bad row."""

    def __init__(self, reject: _RejectFile | None, max_rejects: int | None) -> None:
        self.count = 0
        self.first: list[BadRow] = []
        self.unknown_symbols: set[str] = set()
        self.more_unknown = False
        self.reject = reject
        self.max_rejects = max_rejects
        self.stopped_at: int | None = None  # the line where reading stopped (too many bad rows)

    def _keep_first(self, rows: list[BadRow]) -> None:
        self.first = sorted(self.first + rows, key=lambda r: r.line)[:SHOWN_BAD_ROWS]

    def _room(self, n: int) -> int:
        """How many of ``n`` more bad rows to take: up to one past the limit (which stops reading)."""
        if self.max_rejects is None:
            return n
        return max(0, min(n, self.max_rejects + 1 - self.count))

    def _check(self, last_line: int) -> None:
        if self.max_rejects is not None and self.count > self.max_rejects:
            self.stopped_at = last_line
            raise _TooManyBadRows

    def add(self, row: BadRow, fields: list[str]) -> None:
        if not self._room(1):
            return
        self.count += 1
        self._keep_first([row])
        if self.reject:
            cells = spreadsheet_safe(pd.Series(fields, dtype="object")).tolist()
            self.reject.write([[row.line, *cells, f"{row.column}: {row.reason}"]])
        self._check(row.line)

    def add_malformed(self, malformed: list[tuple[int, str, str]]) -> None:
        """Rows the reader could not split into the header's fields: (line, text, reason)."""
        for line, text, reason in malformed:
            fields = next(csv.reader([text]), []) if self.reject else []
            self.add(BadRow(line, "(row)", reason), fields)

    def add_chunk(self, chunk: _Chunk, checked: Any, positions: np.ndarray) -> None:
        """The bad rows of one chunk (``positions`` into it), in one go."""
        positions = positions[: self._room(len(positions))]
        if not len(positions):
            return
        self.count += len(positions)
        column = checked.column.iloc[positions]
        reason = checked.reason.iloc[positions]
        lines = chunk.lines[positions]
        self._keep_first(
            [BadRow(int(n), c, r) for n, c, r in zip(lines[:SHOWN_BAD_ROWS], column, reason, strict=False)]
        )
        unknown = reason.str.startswith("unknown symbol").to_numpy()
        if unknown.any() and len(self.unknown_symbols) < SHOWN_SYMBOLS:
            symbols = checked.bars["canonical_symbol"].iloc[positions][unknown].drop_duplicates()
            for symbol in symbols.head(SHOWN_SYMBOLS + 1).astype(str):
                if len(self.unknown_symbols) < SHOWN_SYMBOLS:
                    self.unknown_symbols.add(shown(symbol))
                else:
                    self.more_unknown = True
        if self.reject and chunk.fields is not None:
            cells = [spreadsheet_safe(f.iloc[positions]).tolist() for f in chunk.fields]
            self.reject.write(zip(lines.tolist(), *cells, (column + ": " + reason).tolist(), strict=True))
        self._check(int(lines[-1]))


def _stage_csv(lines: np.ndarray, bars: pd.DataFrame, ok: np.ndarray) -> bytes:
    """The chunk's rows that have a symbol and a time, as CSV for COPY (values only for good rows)."""
    keep = bars["canonical_symbol"].notna().to_numpy() & bars["ts_utc"].notna().to_numpy()
    if not keep.any():
        return b""
    rows = bars[keep]
    good = ok[keep]
    mask = pa.array(~good)
    columns: dict[str, pa.Array] = {
        "line": pa.array(lines[keep]),
        "canonical_symbol": pa.array(rows["canonical_symbol"].astype("string[pyarrow]"), type=pa.string()),
        # Microseconds since the epoch: formatting timestamps as text costs 30x more than integers.
        "ts_us": pa.array(rows["ts_utc"].dt.tz_convert("UTC"), type=pa.timestamp("us", tz="UTC")).cast(
            pa.int64()
        ),
    }
    for name in ("open", "high", "low", "close", "vol", "vwap"):
        values = rows[name].to_numpy(dtype="float64", na_value=np.nan)
        columns[name] = pa.array(values, mask=np.isnan(values) | ~good)
    columns["trade_count"] = pa.array(rows["trade_count"].astype("Int64"), type=pa.int64())
    columns["trade_count"] = pa.compute.if_else(mask, pa.scalar(None, pa.int64()), columns["trade_count"])
    columns["ok"] = pa.array(good)
    buffer = io.BytesIO()
    pa_csv.write_csv(pa.table(columns), buffer, pa_csv.WriteOptions(include_header=False))
    return buffer.getvalue()


# COPY's binary format (PostgreSQL docs, "COPY", Binary Format): a signature, a flags word and an
# empty header extension; then per row a field count and per field its length (-1: NULL) and bytes,
# big-endian; timestamptz is microseconds since 2000-01-01 UTC.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_COPY_TRAILER = b"\xff\xff"
_PG_EPOCH_US = 946_684_800_000_000
_DIRECT_COLUMNS = 13  # as listed in the query ingest_copy_direct


def _text_field(fields: list[tuple[str, Any]], values: dict[str, Any], name: str, text: str | None) -> None:
    """One text column holding the same value on every row of a group (or NULL)."""
    if text is None:
        fields.append((f"{name}_len", ">i4"))
        values[f"{name}_len"] = -1
        return
    data = text.encode()
    fields.append((f"{name}_len", ">i4"))
    values[f"{name}_len"] = len(data)
    if data:
        fields.append((name, f"S{len(data)}"))
        values[name] = data


def _copy_binary(
    bars: pd.DataFrame, good: np.ndarray, tickers: dict[str, str | None], source: str
) -> list[Any]:
    """The good rows of a chunk in COPY's binary format for ``ingest_copy_direct``, built with numpy
    (no Python per row): rows are grouped by symbol and by which optional values are NULL, so each
    group has one fixed layout, written as a structured array. Row order within data_bars does not
    matter; within a group it is the file's. Returns the buffers to write in order (not joined:
    each copy of a chunk's bytes costs as much as building them)."""
    rows = bars[good] if not good.all() else bars
    n = len(rows)
    if not n:
        return []
    ts = pa.array(rows["ts_utc"], type=pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
    prices = {c: rows[c].to_numpy(dtype="float64", na_value=np.nan) for c in ("open", "high", "low", "close")}
    # Good rows hold only finite numbers, so NaN here is a missing (NULL) value.
    vol = rows["vol"].to_numpy(dtype="float64", na_value=np.nan)
    vwap = rows["vwap"].to_numpy(dtype="float64", na_value=np.nan)
    count_na = rows["trade_count"].isna().to_numpy()
    counts = rows["trade_count"].fillna(0).to_numpy(dtype="int64")
    symbol_column = rows["canonical_symbol"]
    first_symbol = symbol_column.iloc[0]
    if (symbol_column == first_symbol).all():  # one symbol (--symbol, or a file per symbol)
        codes, symbols = np.zeros(n, dtype=np.int64), [first_symbol]
    else:
        codes, symbols = pd.factorize(symbol_column.astype("object"))
    pattern = np.isnan(vol).astype(np.int64) | np.isnan(vwap) << 1 | count_na.astype(np.int64) << 2
    group = codes.astype(np.int64) * 8 + pattern
    parts: list[Any] = [_COPY_SIGNATURE]
    single = bool((group == group[0]).all())
    for key in [int(group[0])] if single else np.unique(group):
        where: Any = slice(None) if single else np.flatnonzero(group == key)
        symbol, null = str(symbols[key // 8]), int(key % 8)
        fields: list[tuple[str, Any]] = [("count", ">i2")]
        values: dict[str, Any] = {"count": _DIRECT_COLUMNS}
        _text_field(fields, values, "symbol", symbol)
        _text_field(fields, values, "ticker", tickers.get(symbol))
        _text_field(fields, values, "timeframe", "1m")
        fields += [("ts_len", ">i4"), ("ts", ">i8")]
        values.update(ts_len=8, ts=ts[where] - _PG_EPOCH_US)
        for name, column in prices.items():
            fields += [(f"{name}_len", ">i4"), (name, ">f8")]
            values.update({f"{name}_len": 8, name: column[where]})
        for bit, name, column, width, kind in (
            (1, "vol", vol, 8, ">f8"),
            (2, "vwap", vwap, 8, ">f8"),
            (4, "trade_count", counts, 4, ">i4"),
        ):
            fields.append((f"{name}_len", ">i4"))
            if null & bit:
                values[f"{name}_len"] = -1
            else:
                fields.append((name, kind))
                values.update({f"{name}_len": width, name: column[where]})
        fields += [("partial_len", ">i4"), ("partial", "u1")]
        values.update(partial_len=1, partial=0)
        _text_field(fields, values, "source", source)
        dtype = np.dtype(fields)
        # Constant fields (lengths, symbol, flags) come from one template row repeated (a memcpy);
        # only the columns that vary are written field by field.
        template = np.zeros(1, dtype=dtype)
        varying = {}
        for name, value in values.items():
            if isinstance(value, np.ndarray):
                varying[name] = value
            else:
                template[name] = value
        out = np.repeat(template, n if single else len(where))
        for name, value in varying.items():
            out[name] = value
        parts.append(memoryview(out.view(np.uint8)))
    parts.append(_COPY_TRAILER)
    return parts


def _spans(good: pd.DataFrame, known: set[str]) -> tuple[list[str], list[datetime], list[datetime]]:
    """The good rows' symbols, each with its first and last time."""
    one = _one_symbol_span(good, known)
    if one is not None:
        return [one[0]], [one[1].to_pydatetime()], [one[2].to_pydatetime()]
    span = good.groupby("canonical_symbol", observed=True)["ts_utc"].agg(["min", "max"])
    return (
        [str(s) for s in span.index],
        [t.to_pydatetime() for t in span["min"]],
        [t.to_pydatetime() for t in span["max"]],
    )


def _one_symbol_span(bars: pd.DataFrame, known: set[str]) -> tuple[str, pd.Timestamp, pd.Timestamp] | None:
    """(symbol, first, last) when every row of the chunk has the same registered symbol and a time,
    and the times strictly rise; None otherwise (the general, slower checks decide then)."""
    if not len(bars):
        return None
    symbols = bars["canonical_symbol"]
    symbol = symbols.iloc[0]
    if pd.isna(symbol) or symbol not in known or not (symbols == symbol).all():
        return None
    times = bars["ts_utc"]
    if times.isna().any():
        return None
    ticks = times.to_numpy(dtype="datetime64[us]").view("int64")
    if len(ticks) > 1 and not (np.diff(ticks) > 0).all():
        return None
    return str(symbol), times.iloc[0], times.iloc[-1]


def _may_repeat_times(bars: pd.DataFrame, newest_seen: dict[str, pd.Timestamp], known: set[str]) -> bool:
    """True when this chunk may repeat a (symbol, time): within itself, or of an earlier chunk.

    Cheap for the usual file sorted by time; ``newest_seen`` (symbol → newest time so far) is
    updated. Only registered symbols count (a row of any other is bad anyway), so it stays small.
    """
    one = _one_symbol_span(bars, known)
    if one is not None:  # the usual chunk: one symbol, times rising (no hashing needed)
        symbol, first, last = one
        seen = newest_seen.get(symbol)
        newest_seen[symbol] = last if seen is None else max(seen, last)
        return seen is not None and first <= seen
    keyed = bars[["canonical_symbol", "ts_utc"]].dropna()
    keyed = keyed[keyed["canonical_symbol"].isin(known)]
    if keyed.empty:
        return False
    if keyed.duplicated().any():
        return True
    span = keyed.groupby("canonical_symbol", observed=True)["ts_utc"].agg(["min", "max"])
    repeat = False
    for symbol, (first, last) in span.iterrows():
        seen = newest_seen.get(str(symbol))
        if seen is not None and first <= seen:
            repeat = True
        newest_seen[str(symbol)] = last if seen is None else max(seen, last)
    return repeat


def ingest_file(
    db: Database,
    path: str | Path,
    *,
    symbol: str | None = None,
    reject_file: str | Path | None = None,
    source: str = "file",
    on_progress: ProgressCallback | None = None,
    ignore_columns: Collection[str] = (),
    max_rejects: int | None = MAX_REJECTS,
) -> IngestReport:
    """Load a CSV or Parquet file of 1m bars into data_bars; see the module docstring.

    Raises InvalidInput naming the first bad rows when any row is bad and no reject file is given,
    or when there are more than ``max_rejects`` bad rows (None: no limit); nothing is stored then.
    """
    path = Path(path)
    reader = open_source(path, ignore_columns)
    if symbol is None and "canonical_symbol" not in reader.columns:
        raise InvalidInput(f"{path.name}: no canonical_symbol column; name the symbol with --symbol")
    if reject_file is not None:
        check_reject_path(Path(reject_file), path)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    load = _Load(
        db, reader, path, symbol=symbol, reject_file=reject_file, source=source,
        on_progress=on_progress, max_rejects=max_rejects,
    )  # fmt: skip
    with db.connect() as conn:
        tickers: dict[str, str | None] = dict(conn.execute(query("ingest_symbol_tickers")).fetchall())
        if symbol is not None and symbol not in tickers:
            raise InvalidInput(
                f"unknown symbol '{shown(symbol)}': not in core_asset_registry_all "
                f"(add it with: baragg registry add {shown(symbol)})"
            )
        try:
            # Not on Citus: there the session days (a reference table) must be written before any bar.
            on_citus = bool(conn.execute(query("on_citus")).fetchone()[0])
            report = load.run(conn, tickers, direct=not on_citus)
        except _Restart:
            # An unsorted file after some chunks went straight into data_bars: the duplicate search
            # needs every row in the staging table, so the file is read again, staged only.
            conn.rollback()
            log.debug("%s: times out of order after direct chunks; reading it again through the stage", path)
            report = load.run(conn, tickers, direct=False)
    load.finish_reject(report)
    log.info("ingested %s", path, extra={"ingest": report.as_dict()})
    return report


class _Restart(Exception):
    """The direct path cannot go on (see ``_Load.run``); nothing is committed yet."""


class _Load:
    """One reading of the file into the database, in the caller's transaction.

    Each chunk's good rows go one of two ways. **Direct**: when the chunk overlaps no stored row
    (one index probe per symbol), no earlier chunk could repeat one of its times (the file is sorted
    per symbol, as files of history are) and nothing is bad yet (or there is a reject file), its rows
    are COPYed straight into data_bars in binary, under a savepoint (a row stored meanwhile by
    someone else sends the chunk the other way): every row is new, so inserted = rows. **Staged**:
    otherwise the chunk goes into the TEMP staging table, as every row did before, and one upsert at
    the end inserts, updates or leaves each row (inserted / updated / unchanged counts). Both run in
    one transaction, so a refusal still stores nothing. When a chunk turns out to repeat times after
    direct chunks were written, ``_Restart`` is raised: the caller rolls back and reads the file
    again with ``direct=False`` (everything staged: the duplicate search sees the whole file).
    """

    def __init__(
        self,
        db: Database,
        reader: _Source,
        path: Path,
        *,
        symbol: str | None,
        reject_file: str | Path | None,
        source: str,
        on_progress: ProgressCallback | None,
        max_rejects: int | None,
    ) -> None:
        self.db, self.reader, self.path, self.symbol, self.source = db, reader, path, symbol, source
        self.months_ready: set[datetime] = set()  # months whose partitions exist (direct path)
        self.reject_file, self.on_progress, self.max_rejects = reject_file, on_progress, max_rejects
        self.reject: _RejectFile | None = None
        self.copy_refused = False  # COPY into data_bars refused (row-level security): stage only
        self.side: psycopg.Connection | None = None  # the reader thread's, for partitions (see _prepared)

    def run(self, conn: Any, tickers: dict[str, str | None], *, direct: bool) -> IngestReport:
        reader, path = self.reader, self.path
        ignored = [name for position, name in enumerate(reader.header) if position not in reader.positions]
        report = IngestReport(file=str(path), ignored_columns=ignored)
        if self.reject is not None:
            self.reject.discard()
        reject = self.reject = (
            _RejectFile(Path(self.reject_file), reader.unit, reader.header)
            if self.reject_file is not None
            else None
        )
        bad = _BadRows(reject, self.max_rejects)
        known = set(tickers)
        # Duplicate times are looked for in SQL over the whole file only when a chunk could hold one: a
        # repeat inside the chunk, or a time not after everything seen before for its symbol (unsorted).
        may_have_duplicates = False
        newest_seen: dict[str, pd.Timestamp] = {}
        direct_rows = 0
        direct_chunks = False  # a chunk went the direct way (its rows, good or bad, are not staged)
        direct_spans: dict[str, tuple[Any, Any]] = {}
        try:
            # The staging table lives in temp buffers, and the duplicate search hashes it: give both
            # room (this session only; memory is taken as used).
            conn.execute(query("ingest_session_settings"))
            conn.execute(query("ingest_create_stage"))
            try:
                with conn.cursor() as cur:
                    for prepared in _prefetch(
                        self._prepared(tickers, direct=direct, with_reject=reject is not None)
                    ):
                        chunk, checked, ok = prepared.chunk, prepared.checked, prepared.ok
                        report.read += len(chunk.lines) + len(chunk.malformed)
                        bad.add_malformed(chunk.malformed)
                        bad_positions = np.flatnonzero(~ok)
                        if len(bad_positions):
                            bad.add_chunk(chunk, checked, bad_positions)
                        if not may_have_duplicates:
                            may_have_duplicates = _may_repeat_times(checked.bars, newest_seen, known)
                            if may_have_duplicates and direct_chunks:
                                raise _Restart
                        written = False
                        if (
                            direct
                            and not self.copy_refused
                            and not may_have_duplicates
                            and (reject is not None or not bad.count)
                        ):
                            written = self._direct(conn, cur, prepared, direct_spans)
                        if written:
                            direct_chunks = True
                            direct_rows += int(ok.sum())
                        else:
                            payload = _stage_csv(chunk.lines, checked.bars, ok)
                            if payload:
                                with cur.copy(query("ingest_copy_stage")) as copy:
                                    copy.write(payload)
                        if self.on_progress:
                            self.on_progress(chunk.done, reader.total or None)
                if may_have_duplicates:
                    _add_duplicates(conn, reader, bad, with_fields=reject is not None)
            except _TooManyBadRows:
                conn.rollback()
                raise InvalidInput(
                    _too_many_message(path.name, reader.unit, bad, reject is not None)
                ) from None
            if bad.count and reject is None:
                conn.rollback()
                raise InvalidInput(
                    _bad_rows_message(path.name, reader.unit, bad.count, bad.first, _unknown_text(bad))
                )
            report.rejected = bad.count
            # The staged rows' months (the direct chunks' months were made by the reader).
            row = conn.execute(query("partitions_stage_months")).fetchone()
            self._make_partitions(list(row[0]) if row and row[0] else [])
            self._close_side()
            spans = {sym: (first, last) for sym, first, last in conn.execute(query("ingest_stage_symbols"))}
            for sym, (first, last) in direct_spans.items():
                if sym in spans:
                    first, last = min(first, spans[sym][0]), max(last, spans[sym][1])
                spans[sym] = (first, last)
            report.symbols = sorted(spans)
            # The symbols' sessions must know the trading days of the new rows (DESIGN.md 3b). Before
            # the staged rows are written: on Citus a write to a reference table (the days) may not
            # follow a parallel write to the bars' shards in one transaction (there the direct path,
            # which writes during the reading, is off).
            for sym in report.symbols:
                sessions.ensure_for_range(conn, [sym], *spans[sym])
            counts = conn.execute(query("ingest_upsert"), {"source": self.source}).fetchone()
            assert counts is not None
            report.inserted, report.updated, staged = (int(v) for v in counts)
            report.unchanged = staged - report.inserted - report.updated
            report.inserted += direct_rows
            conn.commit()
        except BaseException:
            if reject is not None:
                reject.discard()
            raise
        return report

    def _prepared(
        self, tickers: dict[str, str | None], *, direct: bool, with_reject: bool
    ) -> Iterator[_Prepared]:
        """The file's chunks, each checked, and (on the direct path) its months' partitions made and its
        good rows encoded: run in the reader thread (see ``_prefetch``), one chunk ahead of the one the
        main thread streams into COPY. A chunk that will be staged (a bad row and no reject file: the
        file is refused anyway) is not encoded."""
        known = set(tickers)
        try:
            for chunk in self.reader.chunks(all_columns=with_reject):
                checked = check_bars(chunk.raw, known_symbols=known, symbol=self.symbol)
                chunk.raw = None  # parsed into checked.bars: not kept while the chunk waits and is written
                ok = checked.ok.to_numpy()
                prepared = _Prepared(chunk, checked, ok)
                clean = with_reject or (ok.all() and not chunk.malformed)
                if direct and not self.copy_refused and clean and ok.any():
                    good = checked.bars[ok] if not ok.all() else checked.bars
                    prepared.span = _spans(good, known)
                    # Before the main thread's probe of this chunk: creating a partition waits for every
                    # lock on the table's default partition. The probe's bounds prune to the chunk's
                    # months (then all partitions), so the load never locks the default partition and
                    # later chunks' months can still be attached while it writes.
                    self._make_partitions(partitions.months(min(prepared.span[1]), max(prepared.span[2])))
                    prepared.payload = _copy_binary(checked.bars, ok, tickers, self.source)
                yield prepared
        finally:
            self._close_side()

    def _direct(
        self,
        conn: Any,
        cur: Any,
        prepared: _Prepared,
        spans: dict[str, tuple[Any, Any]],
    ) -> bool:
        """COPY the chunk's good rows straight into data_bars when none of them can exist there;
        False (nothing written) when the chunk must be staged."""
        if not prepared.ok.any():
            return True
        if prepared.span is None or prepared.payload is None:
            # Not encoded by the reader, which encodes every chunk this is called for (the same
            # conditions, and copy_refused only ever turns true): staged, never written unprepared.
            return False
        symbols, firsts, lasts = prepared.span
        first, last = min(firsts), max(lasts)
        row = conn.execute(
            query("ingest_overlaps"),
            {"symbols": symbols, "firsts": firsts, "lasts": lasts, "first": first, "last": last},
            prepare=False,
        )
        if row.fetchone()[0]:
            return False
        try:
            with conn.transaction(), cur.copy(query("ingest_copy_direct")) as copy:
                for buffer in prepared.payload:
                    copy.write(buffer)
        except psycopg.errors.UniqueViolation:  # stored by someone else since the probe
            return False
        except psycopg.errors.FeatureNotSupported:
            # COPY FROM is refused for a role under row-level security (a baragg_worker login on a
            # database where RLS is on, issue 13): every chunk goes through the stage's INSERT then.
            self.copy_refused = True
            return False
        prepared.payload = None  # the bytes are on the server: free them before the next chunk
        for sym, first, last in zip(symbols, firsts, lasts, strict=True):
            old = spans.get(sym)
            spans[sym] = (first, last) if old is None else (min(first, old[0]), max(last, old[1]))
        return True

    def _make_partitions(self, months: list[datetime]) -> None:
        """The partitions of ``months`` in both bar tables (DESIGN.md 11; derived_data_bars too: the
        bars built from these rows fall in the same months), created on a connection of their own (not
        in this load's transaction) before the rows are written. A no-op on unpartitioned tables; never
        fatal (the default partition takes the rows, and the worker moves them out later); each month
        is tried once. The connection stays open for the load (a new one per chunk cost ~40 ms of
        server start each time): the reader thread's while it reads, then the stage path's."""
        months = [m for m in months if m not in self.months_ready]
        if not months:
            return
        try:
            if self.side is None or self.side.closed:
                self.side = partitions.side_connection(self.db)
            for table in partitions.TABLES:
                partitions.ensure_months_on(self.side, table, months)
        except (psycopg.Error, BaraggError) as exc:
            log.warning("could not create the partitions of the new rows' months (%s)", str(exc).strip())
            self._close_side()
        self.months_ready.update(months)

    def _close_side(self) -> None:
        if self.side is not None:
            self.side.close()
            self.side = None

    def finish_reject(self, report: IngestReport) -> None:
        """After the commit: move the reject file into place (only when there were bad rows)."""
        reject = self.reject
        if reject is None:
            return
        try:
            written = reject.finish()
        except OSError as exc:
            raise BaraggError(
                f"the good rows of {self.path.name} were stored, but the reject file could not be written: {exc}"
            ) from exc
        finally:
            reject.discard()
        report.reject_file = str(self.reject_file) if written else None


_DONE = object()


def _prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """``items``, produced ahead in a thread: the next chunk is read, checked and encoded (Arrow and
    numpy release the GIL for most of it) while the database takes the current one. The queue holds
    ``depth`` items, so memory stays at a few chunks; an error in the thread is raised here (the same
    exception), a thread that dies without a word is an error too (never a wait for ever), and a
    consumer that stops early stops the thread."""
    results: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        outcome: tuple[Any, BaseException | None] = (_DONE, None)
        try:
            for item in items:
                if not hand_over((item, None)):
                    break
        except BaseException as exc:
            outcome = (_DONE, exc)
        finally:
            try:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            except BaseException as exc:
                if outcome[1] is None:
                    outcome = (_DONE, exc)
            hand_over(outcome)

    thread = threading.Thread(target=produce, name="ingest-read", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item, error = results.get(timeout=0.5)
            except queue.Empty:
                if thread.is_alive() or not results.empty():
                    continue
                raise BaraggError("ingest: the file reader stopped without a result") from None
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _add_duplicates(conn: Any, reader: _Source, bad: _BadRows, *, with_fields: bool) -> None:
    """Rows whose (symbol, time) repeats in the file, streamed from the staging table (a server-side
    cursor, in line order) into ``bad``; then they are marked not ok."""
    with conn.cursor(name="ingest_duplicates") as dup:
        dup.itersize = 10_000
        dup.execute(query("ingest_duplicates"))
        rows: Iterator[Any] = iter(dup)
        with_original = reader.with_fields(rows, lambda r: r[0]) if with_fields else ((r, []) for r in rows)
        for (line, ts, others, n_others), fields in with_original:
            also = ", ".join(str(n) for n in others)
            if n_others > len(others):
                also += f" and {n_others - len(others):,} more"
            moment = ts.astimezone(UTC)
            bad.add(
                BadRow(
                    line, "ts_utc", f"duplicate time {moment:%Y-%m-%d %H:%M} (also on {reader.unit} {also})"
                ),
                fields,
            )
    conn.execute(query("ingest_drop_duplicates"))


def _unknown_text(bad: _BadRows) -> str:
    if not bad.unknown_symbols:
        return ""
    names = ", ".join(sorted(bad.unknown_symbols)) + (", ..." if bad.more_unknown else "")
    return f" (unknown symbols: {names}; add them with: baragg registry add SYMBOL)"


def _bad_rows_message(name: str, unit: str, count: int, first: list[BadRow], unknown: str) -> str:
    shown_rows = "; ".join(row.describe(unit) for row in first)
    more = "; ..." if count > len(first) else ""
    text = f"{name}: {count} bad row{'s' if count != 1 else ''}; {shown_rows}{more}{unknown}"
    return text + "; nothing was stored (use --reject-file PATH to load the good rows)"


def _too_many_message(name: str, unit: str, bad: _BadRows, with_reject_file: bool) -> str:
    shown_rows = "; ".join(row.describe(unit) for row in bad.first)
    hint = (
        "--max-rejects N (or all) allows more"
        if with_reject_file
        else ("--reject-file PATH with --max-rejects N (or all) loads the good rows")
    )
    return (
        f"{name}: more than {bad.max_rejects:,} bad rows, stopped reading at {unit} {bad.stopped_at}; "
        f"{shown_rows}; ...{_unknown_text(bad)}; nothing was stored (is it the right file and format? "
        f"{hint})"
    )
