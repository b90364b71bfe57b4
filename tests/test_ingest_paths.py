"""Ingest's two ways into data_bars (issue 15): new rows COPYed straight in, the rest staged and upserted.

Small CSV blocks (``BARAGG_INGEST_BLOCK_BYTES``) cut a few hundred rows into many chunks, so one file
sends some chunks the direct way and others through the staging table; what a user sees (counts,
stored values, late-data log, refusals, memory) must not depend on which way a chunk went.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from baragg import ingest
from baragg.db import Database
from baragg.errors import InvalidInput
from ops_helpers import baragg, write_csv
from rss_helpers import baragg_peak_rss

START = datetime(2024, 1, 2, 10, 0, tzinfo=UTC)
HEADER = "ts_utc,open,high,low,close,vol,trade_count"


@pytest.fixture
def registered(db: Database, conn: psycopg.Connection) -> Database:
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('EURUSD')")
    return db


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BARAGG_INGEST_BLOCK_BYTES", "1024")  # ~25 lines per chunk


@pytest.fixture
def direct_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows per chunk that went the direct way (the binary COPY into data_bars). Counted where the
    chunk is written, not where it is encoded: the reader thread encodes a chunk ahead, before the
    overlap probe decides which way it goes."""
    calls: list[int] = []
    real = ingest._Load._direct

    def spy(self, conn, cur, prepared, spans):  # type: ignore[no-untyped-def]
        written = real(self, conn, cur, prepared, spans)
        if written and prepared.ok.any():
            calls.append(int(prepared.ok.sum()))
        return written

    monkeypatch.setattr(ingest._Load, "_direct", spy)
    return calls


def line(minute: int, close: float = 1.15) -> str:
    ts = START + timedelta(minutes=minute)
    return f"{ts:%Y-%m-%d %H:%M},1.1,1.3,1.0,{close},{10 + minute % 7},{1 + minute % 5}"


def stored(conn: psycopg.Connection) -> dict[datetime, tuple]:
    rows = conn.execute(
        "SELECT ts_utc, open, high, low, close, vol, trade_count, xmin::text, source, provider_ticker"
        " FROM data_bars ORDER BY ts_utc"
    ).fetchall()
    return {r[0]: r[1:] for r in rows}


def counts(report: ingest.IngestReport) -> tuple[int, int, int, int, int]:
    return report.read, report.inserted, report.updated, report.unchanged, report.rejected


def test_a_mixed_file_counts_new_changed_and_equal_rows(
    registered: Database, conn, tmp_path: Path, small_blocks, direct_calls: list[int]
) -> None:
    conn.execute("UPDATE core_asset_registry_all SET provider_ticker = 'C:EURUSD'")
    first = write_csv(tmp_path / "first.csv", HEADER, *[line(m) for m in range(60)])
    assert counts(ingest.ingest_file(registered, first, symbol="EURUSD")) == (60, 60, 0, 0, 0)
    before = stored(conn)
    direct_calls.clear()
    # minutes 0-19 equal, 20-39 changed, 40-59 equal, 60-299 new (most in chunks of new rows only)
    rows = [line(m, 1.2 if 20 <= m < 40 else 1.15) for m in range(300)]
    mixed = write_csv(tmp_path / "mixed.csv", HEADER, *rows)
    report = ingest.ingest_file(registered, mixed, symbol="EURUSD", source="vendor")
    assert counts(report) == (300, 240, 20, 40, 0)
    assert report.symbols == ["EURUSD"]
    assert direct_calls and sum(direct_calls) < 240  # some new rows direct, some through the upsert
    after = stored(conn)
    assert len(after) == 300
    for m in range(300):
        ts = START + timedelta(minutes=m)
        values = after[ts]
        assert values[3] == (1.2 if 20 <= m < 40 else 1.15)
        assert values[5] == 1 + m % 5 and values[8] == "C:EURUSD"
        if m < 60 and not 20 <= m < 40:
            assert values == before[ts]  # an equal row is not rewritten (same xmin, source kept)
        else:
            assert values[7] == "vendor"


def test_new_rows_before_a_task_cursor_are_logged_as_late_data_on_the_direct_path(
    registered: Database, conn, tmp_path: Path, small_blocks, direct_calls: list[int]
) -> None:
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, last_agg_bar_ts_utc,"
        " agg_start_utc) VALUES ('EURUSD', '5m', '1m', %s, '-infinity')",
        (START + timedelta(hours=6),),
    )
    path = write_csv(tmp_path / "late.csv", HEADER, *[line(m) for m in range(100)])
    report = ingest.ingest_file(registered, path, symbol="EURUSD")
    assert counts(report) == (100, 100, 0, 0, 0)
    assert sum(direct_calls) == 100  # every row went the direct way
    logged = conn.execute(
        "SELECT window_start FROM agg_invalidations WHERE canonical_symbol = 'EURUSD' AND timeframe = '5m'"
        " ORDER BY 1"
    ).fetchall()
    assert [w for (w,) in logged] == [START + timedelta(minutes=5 * k) for k in range(20)]


def test_every_month_of_a_long_file_gets_its_partition(
    registered: Database, conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_calls: list[int]
) -> None:
    """A file over a dozen months, read in many chunks: each chunk's months are attached before its
    rows go in, and none lands in the default partition (the overlap probe, once psycopg prepared it,
    locked every partition, so from the 6th chunk on no month could be attached: those rows waited in
    the default partition for the worker to move them)."""
    if conn.execute("SELECT to_regclass('data_bars_default')").fetchone() == (None,):
        pytest.skip("data_bars is not partitioned on this server (Citus keeps plain tables)")
    days = [START + timedelta(days=15 * k) for k in range(30)]  # 30 rows, 15 months
    rows = [f"{ts:%Y-%m-%d %H:%M},1.1,1.3,1.0,1.2,10,1" for ts in days]
    path = write_csv(tmp_path / "long.csv", HEADER, *rows)
    monkeypatch.setenv("BARAGG_INGEST_BLOCK_BYTES", "64")  # about one row per chunk
    report = ingest.ingest_file(registered, path, symbol="EURUSD")
    assert counts(report) == (30, 30, 0, 0, 0)
    assert len(direct_calls) >= 10
    assert conn.execute("SELECT count(*) FROM data_bars_default").fetchone() == (0,)
    months = {datetime(d.year, d.month, 1, tzinfo=UTC) for d in days}
    attached = conn.execute(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'data_bars'::regclass"
        " AND inhrelid::regclass::text <> 'data_bars_default'"
        " AND inhrelid::regclass::text = ANY (%s)",
        ([f"data_bars_p{m:%Y%m%d}" for m in months],),
    ).fetchone()
    assert attached == (len(months),)


def test_a_row_stored_after_the_probe_sends_its_chunk_to_the_upsert(
    registered: Database, conn, tmp_path: Path, small_blocks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overlap probe and the COPY are not atomic: a row stored in between (another ingest) makes
    the COPY hit the primary key; the chunk then goes through the stage, and the counts stay right."""
    first = write_csv(tmp_path / "first.csv", HEADER, *[line(m) for m in range(0, 100, 2)])
    ingest.ingest_file(registered, first, symbol="EURUSD")
    real_query = ingest.query
    monkeypatch.setattr(
        ingest, "query", lambda name: "SELECT false" if name == "ingest_overlaps" else real_query(name)
    )
    path = write_csv(
        tmp_path / "all.csv", HEADER, *[line(m, 1.2 if m % 4 == 0 else 1.15) for m in range(100)]
    )
    report = ingest.ingest_file(registered, path, symbol="EURUSD")
    assert counts(report) == (100, 50, 25, 25, 0)
    assert len(stored(conn)) == 100


def test_times_out_of_order_after_direct_chunks_read_the_file_again(
    registered: Database, conn, tmp_path: Path, small_blocks, direct_calls: list[int]
) -> None:
    """A chunk that goes back in time after direct chunks were written may repeat one of their times:
    the file is read again through the stage, the duplicate search sees it whole, and the reject file
    holds each bad row once."""
    minutes = [*range(0, 150), *range(200, 300), *range(150, 200)]
    rows = [line(m) for m in minutes]
    rows[3] = rows[3].replace(",1.3,", ",0.5,")  # high below low: bad
    rows[-1] = line(10)  # the same time as row 11 (line 12), far apart
    path = write_csv(tmp_path / "unsorted.csv", HEADER, *rows)
    rejects = tmp_path / "rejects.csv"
    report = ingest.ingest_file(registered, path, symbol="EURUSD", reject_file=rejects)
    assert counts(report) == (300, 297, 0, 0, 3)
    assert direct_calls  # the first reading went direct before the restart
    with rejects.open(newline="") as fh:
        bad = list(csv.reader(fh))[1:]
    assert [(r[0], r[-1].split(":")[0]) for r in bad] == [("5", "high"), ("12", "ts_utc"), ("301", "ts_utc")]
    assert len(stored(conn)) == 297
    # without a reject file the same file stores nothing and names the rows
    conn.execute("DELETE FROM data_bars")
    with pytest.raises(InvalidInput, match=r"3 bad rows; line 5: high: .*line 12: ts_utc: duplicate time"):
        ingest.ingest_file(registered, path, symbol="EURUSD")
    assert stored(conn) == {}


def test_memory_stays_flat_with_ten_times_the_rows(registered: Database, conn, tmp_path: Path) -> None:
    """Peak RSS of `baragg ingest` for a file and for one ten times longer: chunks are streamed (one
    being written, one read ahead), so the longer file costs no more memory."""
    peaks = []
    for n in (20_000, 200_000):
        path = tmp_path / f"bars{n}.csv"
        with path.open("w") as fh:
            fh.write(HEADER + "\n")
            fh.writelines(line(m) + "\n" for m in range(n))
        conn.execute("DELETE FROM data_bars")
        done, peak = baragg_peak_rss(
            registered, "ingest", path, "--symbol", "EURUSD", env={"BARAGG_INGEST_BLOCK_BYTES": "262144"}
        )
        assert done.returncode == 0, done.stderr
        assert f"inserted {n:,}" in done.stdout or f"inserted {n}" in done.stdout, done.stdout
        peaks.append(peak)
    assert peaks[1] - peaks[0] < 20, f"peak RSS {peaks[0]:.0f} MiB -> {peaks[1]:.0f} MiB"


def test_a_bad_row_in_a_later_chunk_stores_nothing_though_earlier_chunks_went_in(
    registered: Database, conn, tmp_path: Path, small_blocks, direct_calls: list[int]
) -> None:
    """Chunks are read, checked and encoded one ahead of the one being written, so earlier chunks are
    already in data_bars (in the load's transaction) when a bad row turns up: the command still exits
    2 naming the row, on one line, and nothing is stored."""
    rows = [line(m) for m in range(300)]
    rows[247] = rows[247].replace(",1.3,", ",0.5,")  # line 249: high below low
    path = write_csv(tmp_path / "late_bad.csv", HEADER, *rows)
    with pytest.raises(InvalidInput, match=r"^late_bad.csv: 1 bad row; line 249: high: high 0.5 below low 1"):
        ingest.ingest_file(registered, path, symbol="EURUSD")
    assert sum(direct_calls) >= 200  # the chunks before it had gone the direct way
    assert stored(conn) == {}
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", env={"BARAGG_INGEST_BLOCK_BYTES": "1024"})
    assert done.returncode == 2
    assert "line 249: high: high 0.5 below low 1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert stored(conn) == {}


@pytest.mark.timeout(60)
def test_an_error_in_the_reader_thread_is_raised_and_nothing_is_stored(
    registered: Database, conn, tmp_path: Path, small_blocks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader thread fails on its fourth chunk while the main thread writes the third: the same
    exception comes out of ingest_file (no wait for ever), the transaction is rolled back, and the
    thread is gone."""
    calls = []
    real = ingest.check_bars

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "check_bars", failing)
    path = write_csv(tmp_path / "bars.csv", HEADER, *[line(m) for m in range(300)])
    with pytest.raises(OSError, match="disk went away"):
        ingest.ingest_file(registered, path, symbol="EURUSD")
    assert stored(conn) == {}
    assert not [t for t in threading.enumerate() if t.name == "ingest-read"]


@pytest.mark.timeout(30)
def test_prefetch_raises_what_the_producer_raised_even_from_its_cleanup() -> None:
    """``_prefetch`` hands over each item and then the producer's error; an error while the producer
    closes its source (after its last item, so no item carries it) is raised too, never waited for."""

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("bad block")

    assert_items = []
    with pytest.raises(ValueError, match="bad block"):
        for item in ingest._prefetch(failing()):
            assert_items.append(item)
    assert assert_items == [1, 2]

    class Source:
        def __iter__(self) -> Iterator[int]:
            return iter([1, 2, 3])

        def close(self) -> None:
            raise RuntimeError("cannot close the file")

    items = []
    with pytest.raises(RuntimeError, match="cannot close the file"):
        for item in ingest._prefetch(Source()):  # type: ignore[arg-type]
            items.append(item)
    assert items == [1, 2, 3]


@pytest.mark.timeout(30)
def test_prefetch_stops_its_thread_when_the_consumer_stops() -> None:
    produced = []

    def endless() -> Iterator[int]:
        n = 0
        while n < 1_000_000:  # bounded; the consumer stops long before
            produced.append(n)
            yield n
            n += 1

    for item in ingest._prefetch(endless()):
        if item == 3:
            break
    assert not [t for t in threading.enumerate() if t.name == "ingest-read"]
    assert len(produced) <= 6  # one handed over, one waiting in the queue, one being made
