"""Files of 1-minute bars → data_bars (DESIGN.md sections 8 and 9).

The file is streamed in chunks (a CSV cut into blocks of whole lines, each parsed by Arrow; a Parquet
file's record batches), so a file of ten million rows needs no more memory than a chunk (for Parquet:
a row group). Each chunk is checked by ``baragg.validation.check_bars`` and COPYed into a TEMP staging
table; duplicate times across the whole file are looked for in SQL when a chunk could hold one, and
one ``INSERT … SELECT … ON CONFLICT … DO UPDATE … WHERE the values differ`` moves the good rows into
data_bars. All of it is one transaction: by default a single bad row stores nothing; with a reject
file the good rows load and every bad one is written there. Re-ingesting a file rewrites no row.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from baragg import sessions
from baragg.db import Database
from baragg.errors import InvalidInput
from baragg.sql import query
from baragg.validation import COLUMNS, REQUIRED, check_bars

log = logging.getLogger(__name__)

# Chunk sizes: enough to amortise per-chunk overhead, small enough to keep memory flat.
# BARAGG_INGEST_BLOCK_BYTES overrides the CSV block size (tests use tiny blocks to cross chunk borders).
CSV_BLOCK_BYTES = 8 << 20
PARQUET_BATCH_ROWS = 250_000
# How many bad rows the error message names.
SHOWN_BAD_ROWS = 5

ProgressCallback = Callable[[int, int | None], None]  # (done, total or None) in bytes (CSV) or rows


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
    """One block of the file: its rows as read, and the line (CSV) or row (Parquet) of each."""

    lines: np.ndarray
    raw: pd.DataFrame
    done: int  # progress position after this chunk


class _Source:
    """A file being read in chunks."""

    unit = "line"  # how a row's position is named in messages
    columns: list[str]
    total: int

    def chunks(self, *, all_columns: bool = False) -> Iterator[_Chunk]:  # pragma: no cover - interface
        """The file's rows, chunk by chunk: the columns baragg reads, or every column (for the
        reject file, which keeps a bad row's original fields)."""
        raise NotImplementedError

    def malformed(self) -> list[tuple[int, list[str], str]]:
        """Rows the reader could not split into the header's fields: (line, fields, reason)."""
        return []

    def original_fields(self, lines: set[int]) -> dict[int, list[str]]:  # pragma: no cover - interface
        raise NotImplementedError


def is_parquet(path: Path) -> bool:
    if path.suffix.lower() in {".parquet", ".pq"}:
        return True
    with path.open("rb") as fh:
        return fh.read(4) == b"PAR1"


def _header(path: Path) -> list[str]:
    """The header's column names (the file may be compressed)."""
    with pa.input_stream(str(path), compression="detect") as stream:
        sample = stream.read(1 << 16)
    head = sample.decode("utf-8-sig", errors="replace")
    first = head.splitlines()[0] if head else ""
    return [name.strip() for name in next(csv.reader([first]), [])]


class _CsvSource(_Source):
    """A CSV file cut into blocks of whole lines, each parsed by Arrow's CSV reader.

    The file is cut here rather than handed to Arrow's streaming reader, which reads ahead as far as
    it likes (a whole file of hundreds of MB): memory stays at about one block, and every block knows
    its first line number, so rows keep the line numbers a person sees in an editor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = _header(path)
        if not self.header or self.header == [""]:
            raise InvalidInput(f"{path.name}: empty file (expected a header line with {', '.join(REQUIRED)})")
        self.columns = [c for c in self.header if c in COLUMNS]
        # Progress in bytes read; a compressed file's size does not compare with its text: no total.
        compressed = path.suffix.lower() in {".gz", ".bz2", ".zst", ".lz4", ".br"}
        self.total = 0 if compressed else path.stat().st_size
        self._malformed: list[tuple[int, list[str], str]] = []

    def malformed(self) -> list[tuple[int, list[str], str]]:
        return self._malformed

    def _blocks(self) -> Iterator[tuple[int, bytes, int]]:
        """(number of the block's first line, the block: whole lines, bytes read so far)."""
        block_bytes = int(os.environ.get("BARAGG_INGEST_BLOCK_BYTES") or CSV_BLOCK_BYTES)
        with pa.input_stream(str(self.path), compression="detect") as stream:
            carry = b""
            header_done = False
            line = 1
            read = 0
            while True:
                data = stream.read(block_bytes)
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
                    if data.strip(b"\r\n"):
                        yield line, data, read
                    return
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                block, carry = data[: cut + 1], data[cut + 1 :]
                yield line, block, read
                line += block.count(b"\n")

    def chunks(self, *, all_columns: bool = False) -> Iterator[_Chunk]:
        names = self.header
        for first_line, block, read in self._blocks():
            malformed: list[tuple[int, list[str], str]] = []

            def on_invalid_row(
                row: pa_csv.InvalidRow, first_line: int = first_line, bad: list = malformed
            ) -> str:
                fields = next(csv.reader([row.text]), [])
                reason = f"expected {row.expected_columns} fields, found {row.actual_columns}"
                bad.append((first_line + (row.number or 1) - 1, fields, reason))
                return "skip"

            table = pa_csv.read_csv(
                pa.BufferReader(block),
                read_options=pa_csv.ReadOptions(
                    column_names=names, use_threads=False, block_size=len(block) + 1
                ),
                parse_options=pa_csv.ParseOptions(
                    ignore_empty_lines=False, invalid_row_handler=on_invalid_row
                ),
                convert_options=pa_csv.ConvertOptions(
                    column_types={name: pa.string() for name in names},
                    include_columns=names if all_columns else self.columns,
                    strings_can_be_null=True,
                    null_values=[""],
                ),
            )
            self._malformed.extend(malformed)
            line_count = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            lines = np.arange(first_line, first_line + line_count, dtype=np.int64)
            if malformed:  # rows the reader skipped keep their line numbers: step over them
                lines = lines[~np.isin(lines, [n for n, _, _ in malformed])]
            raw = table.to_pandas(types_mapper=pd.ArrowDtype)
            blank = raw.isna().all(axis=1).to_numpy()
            if blank.any():  # empty lines are not rows
                raw, lines = raw[~blank].reset_index(drop=True), lines[~blank]
            yield _Chunk(lines=lines, raw=raw, done=min(read, self.total) if self.total else read)

    def original_fields(self, lines: set[int]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        with pa.input_stream(str(self.path), compression="detect") as stream:
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
            for number, fields in enumerate(csv.reader(text), start=1):
                if number in lines:
                    found[number] = fields
                    if len(found) == len(lines):
                        break
        return found


class _ParquetSource(_Source):
    unit = "row"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = pq.ParquetFile(str(path))
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidInput(f"{path.name}: not a readable Parquet file: {exc}") from exc
        self.header = list(self.file.schema_arrow.names)
        self.columns = [c for c in self.header if c in COLUMNS]
        self.total = self.file.metadata.num_rows

    def chunks(self, *, all_columns: bool = False) -> Iterator[_Chunk]:
        first = 1
        columns = self.header if all_columns else self.columns
        for batch in self.file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            raw = batch.to_pandas(types_mapper=pd.ArrowDtype)
            lines = np.arange(first, first + batch.num_rows, dtype=np.int64)
            first += batch.num_rows
            yield _Chunk(lines=lines, raw=raw, done=first - 1)

    def original_fields(self, lines: set[int]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        first = 1
        for batch in self.file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=self.header):
            wanted = [n - first for n in lines if first <= n < first + batch.num_rows]
            if wanted:
                rows = batch.take(pa.array(sorted(wanted))).to_pylist()
                for offset, row in zip(sorted(wanted), rows, strict=True):
                    found[first + offset] = ["" if v is None else str(v) for v in row.values()]
            first += batch.num_rows
        return found


def open_source(path: Path) -> _Source:
    if not path.exists():
        raise InvalidInput(f"{path}: no such file")
    if path.is_dir():
        raise InvalidInput(f"{path}: is a directory, not a file")
    source: _Source = _ParquetSource(path) if is_parquet(path) else _CsvSource(path)
    missing = [c for c in REQUIRED if c not in source.header]
    if missing:
        raise InvalidInput(
            f"{path.name}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(found: {', '.join(source.header)}; expected ts_utc, open, high, low, close, "
            "optional vol, vwap, trade_count, canonical_symbol)"
        )
    return source


class _BadRows:
    """Every bad row: counted, the first few kept for the error message, all written to the reject
    file (CSV: line or row number, the original fields, the reason) when there is one."""

    def __init__(self, reject_file: Path | None, unit: str, header: list[str]) -> None:
        self.count = 0
        self.first: list[BadRow] = []
        self.unknown_symbols: set[str] = set()
        self.header = header
        self.file = reject_file.open("w", newline="", encoding="utf-8") if reject_file else None
        self.writer = csv.writer(self.file) if self.file else None
        if self.writer:
            self.writer.writerow([unit, *header, "reason"])

    def _keep_first(self, rows: list[BadRow]) -> None:
        self.first = sorted(self.first + rows, key=lambda r: r.line)[:SHOWN_BAD_ROWS]

    def add(self, row: BadRow, fields: list[str]) -> None:
        self.count += 1
        self._keep_first([row])
        if self.writer:
            self.writer.writerow([row.line, *fields, f"{row.column}: {row.reason}"])

    def add_chunk(self, chunk: _Chunk, checked: Any, positions: np.ndarray) -> None:
        """The bad rows of one chunk (``positions`` into it), in one go."""
        self.count += len(positions)
        column = checked.column.iloc[positions]
        reason = checked.reason.iloc[positions]
        lines = chunk.lines[positions]
        self._keep_first(
            [BadRow(int(n), c, r) for n, c, r in zip(lines[:SHOWN_BAD_ROWS], column, reason, strict=False)]
        )
        unknown = reason.str.startswith("unknown symbol").to_numpy()
        if unknown.any():
            symbols = checked.bars["canonical_symbol"].iloc[positions][unknown]
            self.unknown_symbols.update(symbols.astype(str))
        if self.writer:
            original = chunk.raw.iloc[positions]
            fields = [
                original[name].astype("string").fillna("").tolist()
                if name in original
                else [""] * len(positions)
                for name in self.header
            ]
            self.writer.writerows(
                zip(lines.tolist(), *fields, (column + ": " + reason).tolist(), strict=True)
            )

    def close(self) -> None:
        if self.file:
            self.file.close()


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


def _may_repeat_times(bars: pd.DataFrame, newest_seen: dict[str, pd.Timestamp]) -> bool:
    """True when this chunk may repeat a (symbol, time): within itself, or of an earlier chunk.

    Cheap for the usual file sorted by time; ``newest_seen`` (symbol → newest time so far) is
    updated.
    """
    keyed = bars[["canonical_symbol", "ts_utc"]].dropna()
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
) -> IngestReport:
    """Load a CSV or Parquet file of 1m bars into data_bars; see the module docstring.

    Raises InvalidInput naming the first bad rows when any row is bad and no reject file is given;
    nothing is stored then.
    """
    path = Path(path)
    reader = open_source(path)
    report = IngestReport(file=str(path), ignored_columns=[c for c in reader.header if c not in COLUMNS])
    if symbol is None and "canonical_symbol" not in reader.header:
        raise InvalidInput(f"{path.name}: no canonical_symbol column; name the symbol with --symbol")
    bad = _BadRows(Path(reject_file) if reject_file else None, reader.unit, reader.header)
    report.reject_file = str(reject_file) if reject_file else None
    # Duplicate times are looked for in SQL over the whole file only when a chunk could hold one: a
    # repeat inside the chunk, or a time not after everything seen before for its symbol (unsorted).
    may_have_duplicates = False
    newest_seen: dict[str, pd.Timestamp] = {}

    try:
        with db.connect() as conn:
            known = {name for (name,) in conn.execute(query("ingest_known_symbols"))}
            if symbol is not None and symbol not in known:
                raise InvalidInput(
                    f"unknown symbol '{symbol}': not in core_asset_registry_all "
                    f"(add it with: baragg registry add {symbol})"
                )
            # The staging table lives in temp buffers, and the duplicate search hashes it: give both
            # room (this session only; memory is taken as used).
            conn.execute(query("ingest_session_settings"))
            conn.execute(query("ingest_create_stage"))
            with conn.cursor() as cur:
                for chunk in reader.chunks(all_columns=reject_file is not None):
                    report.read += len(chunk.lines)
                    checked = check_bars(chunk.raw, known_symbols=known, symbol=symbol)
                    ok = checked.ok.to_numpy()
                    bad_positions = np.flatnonzero(~ok)
                    if len(bad_positions):
                        bad.add_chunk(chunk, checked, bad_positions)
                    if not may_have_duplicates:
                        may_have_duplicates = _may_repeat_times(checked.bars, newest_seen)
                    payload = _stage_csv(chunk.lines, checked.bars, ok)
                    if payload:
                        with cur.copy(query("ingest_copy_stage")) as copy:
                            copy.write(payload)
                    if on_progress:
                        on_progress(chunk.done, reader.total or None)
                for line, fields, reason in reader.malformed():
                    report.read += 1
                    bad.add(BadRow(line, "(row)", reason), fields)
                duplicates = cur.execute(query("ingest_duplicates")).fetchall() if may_have_duplicates else []
            if duplicates:
                originals = reader.original_fields({line for line, _, _ in duplicates}) if reject_file else {}
                for line, ts, others in duplicates:
                    also = ", ".join(str(n) for n in others)
                    bad.add(
                        BadRow(
                            line,
                            "ts_utc",
                            f"duplicate time {ts.astimezone(UTC):%Y-%m-%d %H:%M} (also on {reader.unit} {also})",
                        ),
                        originals.get(line, []),
                    )
                conn.execute(query("ingest_drop_duplicates"))
            if bad.count and not reject_file:
                conn.rollback()
                raise InvalidInput(
                    _bad_rows_message(path.name, reader.unit, bad.count, bad.first, bad.unknown_symbols)
                )
            report.rejected = bad.count
            counts = conn.execute(query("ingest_upsert"), {"source": source}).fetchone()
            assert counts is not None
            report.inserted, report.updated, staged = (int(v) for v in counts)
            report.unchanged = staged - report.inserted - report.updated
            spans = conn.execute(query("ingest_stage_symbols")).fetchall()
            report.symbols = [s for s, _, _ in spans]
            # The symbols' sessions must know the trading days of the new rows (DESIGN.md 3b).
            for sym, first, last in spans:
                sessions.ensure_for_range(conn, [sym], first, last)
            conn.commit()
    finally:
        bad.close()
    log.info("ingested %s", path, extra={"ingest": report.as_dict()})
    return report


def _bad_rows_message(name: str, unit: str, count: int, first: list[BadRow], unknown: set[str]) -> str:
    shown = "; ".join(row.describe(unit) for row in first)
    more = "; ..." if count > len(first) else ""
    text = f"{name}: {count} bad row{'s' if count != 1 else ''}; {shown}{more}"
    if unknown:
        names = ", ".join(sorted(unknown))
        text += f" (unknown symbols: {names}; add them with: baragg registry add SYMBOL)"
    return text + "; nothing was stored (use --reject-file PATH to load the good rows)"
