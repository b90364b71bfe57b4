"""`baragg ingest`: the real command, in a subprocess, against a real database (DESIGN.md 8 and 9)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baragg.db import Database
from ops_helpers import baragg, write_csv

HEADER = "canonical_symbol,ts_utc,open,high,low,close,vol,trade_count"
GOOD = [
    "EURUSD,2024-01-02 10:00,1.10,1.20,1.00,1.15,10,3",
    "EURUSD,2024-01-02 10:01,1.15,1.25,1.10,1.20,12,4",
    "EURUSD,2024-01-02 10:02,1.20,1.30,1.15,1.25,,",
]


@pytest.fixture
def registered(db: Database, conn: psycopg.Connection) -> Database:
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('EURUSD'), ('XAUUSD')")
    return db


def bars(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT canonical_symbol, ts_utc, open, high, low, close, vol, vwap, trade_count, source"
        " FROM data_bars ORDER BY canonical_symbol, ts_utc"
    ).fetchall()


def test_good_file_loads_every_row_with_counts(registered: Database, conn, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bars.csv", HEADER, *GOOD)
    done = baragg(registered, "ingest", path, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (
        report["read"],
        report["inserted"],
        report["updated"],
        report["unchanged"],
        report["rejected"],
    ) == (
        3,
        3,
        0,
        0,
        0,
    )
    rows = bars(conn)
    assert rows[0] == (
        "EURUSD",
        datetime(2024, 1, 2, 10, 0, tzinfo=UTC),
        1.10,
        1.20,
        1.00,
        1.15,
        10.0,
        None,
        3,
        "file",
    )
    assert rows[2][6] is None and rows[2][8] is None  # empty optional fields are NULL, not 0


def test_reingesting_the_same_file_changes_nothing(registered: Database, conn, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bars.csv", HEADER, *GOOD)
    assert baragg(registered, "ingest", path).returncode == 0
    before = conn.execute("SELECT id, ingested_at, xmin::text FROM data_bars ORDER BY id").fetchall()
    again = baragg(registered, "ingest", path, "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["inserted"], report["updated"], report["unchanged"]) == (0, 0, 3)
    after = conn.execute("SELECT id, ingested_at, xmin::text FROM data_bars ORDER BY id").fetchall()
    assert after == before  # same rows, same ingested_at, no new row versions (xmin)


def test_a_corrected_bar_is_updated_and_only_it(registered: Database, conn, tmp_path: Path) -> None:
    assert baragg(registered, "ingest", write_csv(tmp_path / "a.csv", HEADER, *GOOD)).returncode == 0
    corrected = [*GOOD[:2], "EURUSD,2024-01-02 10:02,1.20,1.35,1.15,1.25,,"]
    done = baragg(registered, "ingest", write_csv(tmp_path / "b.csv", HEADER, *corrected), "--json")
    report = json.loads(done.stdout)
    assert (report["inserted"], report["updated"], report["unchanged"]) == (0, 1, 2)
    assert bars(conn)[2][3] == 1.35


def test_offset_times_are_converted_to_utc(registered: Database, conn, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "tz.csv",
        "ts_utc,open,high,low,close",
        "2024-01-02T12:00:00+02:00,1,2,0.5,1",
        "2024-01-02T10:01:00Z,1,2,0.5,1",
        "2024-01-02 10:02:00,1,2,0.5,1",
    )
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 0, done.stderr
    times = [r[1] for r in bars(conn)]
    assert times == [datetime(2024, 1, 2, 10, m, tzinfo=UTC) for m in range(3)]


def test_symbol_option_replaces_the_column(registered: Database, conn, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "ts_utc,open,high,low,close", "2024-01-02 10:00,1,2,0.5,1")
    assert baragg(registered, "ingest", path, "--symbol", "XAUUSD").returncode == 0
    assert bars(conn)[0][0] == "XAUUSD"


BAD_ROWS = [
    (
        "high below low",
        "EURUSD,2024-01-02 10:05,1.1,1.1,1.2,1.15,1,1",
        "line 3: high: high 1.1 below low 1.2",
    ),
    (
        "open above high",
        "EURUSD,2024-01-02 10:05,1.3,1.2,1.0,1.15,1,1",
        "line 3: open: open 1.3 above high 1.2",
    ),
    ("open below low", "EURUSD,2024-01-02 10:05,0.9,1.2,1.0,1.15,1,1", "line 3: open: open 0.9 below low 1"),
    (
        "close above high",
        "EURUSD,2024-01-02 10:05,1.1,1.2,1.0,1.25,1,1",
        "line 3: close: close 1.25 above high 1.2",
    ),
    (
        "close below low",
        "EURUSD,2024-01-02 10:05,1.1,1.2,1.0,0.95,1,1",
        "line 3: close: close 0.95 below low 1",
    ),
    ("NaN price", "EURUSD,2024-01-02 10:05,NaN,1.2,1.0,1.1,1,1", "line 3: open: not finite (nan)"),
    ("infinite price", "EURUSD,2024-01-02 10:05,1.1,inf,1.0,1.1,1,1", "line 3: high: not finite (inf)"),
    ("missing price", "EURUSD,2024-01-02 10:05,1.1,1.2,,1.1,1,1", "line 3: low: missing"),
    ("text price", "EURUSD,2024-01-02 10:05,1.1,1.2,abc,1.1,1,1", "line 3: low: not a number: 'abc'"),
    ("negative volume", "EURUSD,2024-01-02 10:05,1.1,1.2,1.0,1.1,-5,1", "line 3: vol: negative (-5)"),
    (
        "negative trade count",
        "EURUSD,2024-01-02 10:05,1.1,1.2,1.0,1.1,5,-1",
        "line 3: trade_count: negative (-1)",
    ),
    (
        "fractional trade count",
        "EURUSD,2024-01-02 10:05,1.1,1.2,1.0,1.1,5,1.5",
        "line 3: trade_count: not a whole number (1.5)",
    ),
    (
        "time not on a minute",
        "EURUSD,2024-01-02 10:05:30,1.1,1.2,1.0,1.1,5,1",
        "line 3: ts_utc: not on a minute (2024-01-02 10:05:30)",
    ),
    (
        "time that cannot be parsed",
        "EURUSD,yesterday noon,1.1,1.2,1.0,1.1,5,1",
        "line 3: ts_utc: cannot parse 'yesterday noon' as a time",
    ),
    ("missing time", "EURUSD,,1.1,1.2,1.0,1.1,5,1", "line 3: ts_utc: missing"),
    (
        "unknown symbol",
        "GBPJPY,2024-01-02 10:05,1.1,1.2,1.0,1.1,5,1",
        "line 3: canonical_symbol: unknown symbol 'GBPJPY'",
    ),
    (
        "duplicate time",
        "EURUSD,2024-01-02 10:00,1.1,1.2,1.0,1.1,5,1",
        "line 2: ts_utc: duplicate time 2024-01-02 10:00 (also on line 3)",
    ),
    (
        "wrong number of fields",
        "EURUSD,2024-01-02 10:05,1.1,1.2,1.0",
        "line 3: (row): expected 8 fields, found 5",
    ),
]


@pytest.mark.parametrize(("kind", "row", "message"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_one_bad_row_stores_nothing_and_names_it(
    registered: Database, conn, tmp_path: Path, kind: str, row: str, message: str
) -> None:
    path = write_csv(tmp_path / "bars.csv", HEADER, GOOD[0], row, *GOOD[1:])
    done = baragg(registered, "ingest", path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one readable line, no traceback
    assert lines[0].startswith("baragg: error: bars.csv: ")
    assert message in lines[0]
    assert bars(conn) == []


def test_error_names_the_first_bad_rows_and_counts_all(registered: Database, conn, tmp_path: Path) -> None:
    rows = [f"EURUSD,2024-01-02 11:{m:02d},1.1,1.0,1.2,1.1,1,1" for m in range(20)]
    done = baragg(registered, "ingest", write_csv(tmp_path / "many.csv", HEADER, *GOOD, *rows))
    assert done.returncode == 2
    assert "many.csv: 20 bad rows; line 5: high: high 1 below low 1.2; line 6: " in done.stderr
    assert "line 10:" not in done.stderr  # only the first few are named


def test_unknown_symbol_option_is_named(registered: Database, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "ts_utc,open,high,low,close", "2024-01-02 10:00,1,2,0.5,1")
    done = baragg(registered, "ingest", path, "--symbol", "NOPE")
    assert done.returncode == 2
    assert "unknown symbol 'NOPE'" in done.stderr and "registry add NOPE" in done.stderr


def test_missing_columns_and_missing_file_are_usage_errors(registered: Database, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "open,high,low,close", "1,2,0.5,1")
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 2 and "missing column ts_utc" in done.stderr
    done = baragg(registered, "ingest", tmp_path / "nope.csv", "--symbol", "EURUSD")
    assert done.returncode == 2 and "no such file" in done.stderr
    no_symbol = write_csv(tmp_path / "y.csv", "ts_utc,open,high,low,close", "2024-01-02 10:00,1,2,0.5,1")
    done = baragg(registered, "ingest", no_symbol)
    assert done.returncode == 2 and "--symbol" in done.stderr


def test_reject_file_gets_every_bad_row_and_good_rows_load(
    registered: Database, conn, tmp_path: Path
) -> None:
    rows = [
        GOOD[0],
        "EURUSD,2024-01-02 10:05,1.1,1.1,1.2,1.15,1,1",  # line 3: high below low
        GOOD[1],
        "EURUSD,2024-01-02 10:06:30,1.1,1.2,1.0,1.1,5,1",  # line 5: not on a minute
        "EURUSD,2024-01-02 10:07,1.1,1.2,1.0,1.1,-5,1",  # line 6: negative volume
        GOOD[2],
        "EURUSD,2024-01-02 10:01,1.15,1.25,1.10,1.20,12,4",  # line 8: duplicate of line 3's good twin (line 4)
    ]
    rejects = tmp_path / "rejects.csv"
    done = baragg(
        registered,
        "ingest",
        write_csv(tmp_path / "bars.csv", HEADER, *rows),
        "--reject-file",
        rejects,
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["read"], report["inserted"], report["rejected"]) == (7, 2, 5)
    assert report["read"] == report["inserted"] + report["updated"] + report["unchanged"] + report["rejected"]
    assert [r[1].minute for r in bars(conn)] == [0, 2]
    with rejects.open() as fh:
        rejected = list(csv.DictReader(fh))
    assert list(rejected[0]) == ["line", *HEADER.split(","), "reason"]
    by_line = {int(r["line"]): r for r in rejected}
    assert set(by_line) == {3, 4, 5, 6, 8}
    assert by_line[3]["reason"] == "high: high 1.1 below low 1.2"
    assert by_line[3]["ts_utc"] == "2024-01-02 10:05" and by_line[3]["low"] == "1.2"  # original fields
    assert by_line[5]["reason"].startswith("ts_utc: not on a minute")
    assert by_line[6]["reason"] == "vol: negative (-5)"
    assert by_line[8]["reason"] == "ts_utc: duplicate time 2024-01-02 10:01 (also on line 4)"
    assert by_line[4]["vol"] == "12"


def test_parquet_input(registered: Database, conn, tmp_path: Path) -> None:
    table = pa.table(
        {
            "canonical_symbol": ["XAUUSD", "XAUUSD"],
            "ts_utc": pa.array(
                pd.to_datetime(["2024-01-02 10:00", "2024-01-02 10:01"]).tz_localize("UTC"),
                pa.timestamp("us", tz="UTC"),
            ),
            "open": [2000.0, 2001.0],
            "high": [2002.0, 2003.0],
            "low": [1999.0, 2000.0],
            "close": [2001.0, 2002.0],
            "vol": pa.array([None, 3.0], pa.float64()),
            "trade_count": pa.array([7, None], pa.int32()),
        }
    )
    path = tmp_path / "bars.parquet"
    pq.write_table(table, path)
    done = baragg(registered, "ingest", path, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inserted"] == 2
    rows = bars(conn)
    assert rows[0][1:7] == (datetime(2024, 1, 2, 10, 0, tzinfo=UTC), 2000.0, 2002.0, 1999.0, 2001.0, None)
    assert rows[0][8] == 7 and rows[1][6] == 3.0


def test_parquet_bad_rows_are_named_by_row(registered: Database, conn, tmp_path: Path) -> None:
    table = pa.table(
        {
            "ts_utc": ["2024-01-02 10:00", "2024-01-02 10:01", "2024-01-02 10:02"],
            "open": [1.0, float("nan"), 1.0],
            "high": pa.array([2.0, 2.0, None], pa.float64()),
            "low": [0.5, 0.5, 0.5],
            "close": [1.0, 1.0, 1.0],
        }
    )
    path = tmp_path / "bars.parquet"
    pq.write_table(table, path)
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 2
    assert "bars.parquet: 2 bad rows; row 2: open: not finite (nan); row 3: high: missing" in done.stderr
    assert bars(conn) == []


def test_naive_parquet_timestamps_are_utc(registered: Database, conn, tmp_path: Path) -> None:
    table = pa.table(
        {
            "ts_utc": pa.array(pd.to_datetime(["2024-01-02 10:00"]), pa.timestamp("ns")),
            "open": [1.0],
            "high": [2.0],
            "low": [0.5],
            "close": [1.0],
        }
    )
    pq.write_table(table, tmp_path / "naive.parquet")
    assert baragg(registered, "ingest", tmp_path / "naive.parquet", "--symbol", "EURUSD").returncode == 0
    assert bars(conn)[0][1] == datetime(2024, 1, 2, 10, 0, tzinfo=UTC)


def test_parquet_times_beyond_what_postgresql_holds_are_bad_rows(
    registered: Database, conn, tmp_path: Path
) -> None:
    """A Parquet time in seconds too large for microseconds is named as a bad row. pandas' conversion
    wrapped it around into 1970: this one was refused as "not on a minute (1970-05-20 17:46:40)", and
    a wrapped time that fell on a whole minute would have been stored as a wrong bar."""
    table = pa.table(
        {
            "ts_utc": pa.array([1_704_189_600, 10**13], pa.timestamp("s", tz="UTC")),
            "open": [1.0, 1.0],
            "high": [2.0, 2.0],
            "low": [0.5, 0.5],
            "close": [1.0, 1.0],
        }
    )
    pq.write_table(table, tmp_path / "far.parquet")
    done = baragg(registered, "ingest", tmp_path / "far.parquet", "--symbol", "EURUSD")
    assert done.returncode == 2, done.stderr
    assert "far.parquet: 1 bad row; row 2: ts_utc: cannot parse '318857-05-20 17:46:40" in done.stderr
    assert bars(conn) == []


def test_many_chunks_and_duplicates_across_chunks(
    registered: Database, conn, tmp_path: Path, monkeypatch
) -> None:
    """Duplicates far apart (in different chunks) are still found; chunks keep line numbers right."""
    times = pd.date_range("2024-01-01", periods=5000, freq="min").strftime("%Y-%m-%d %H:%M")
    rows = [f"{t},1,2,0.5,1" for t in times] + [f"{times[0]},1,2,0.5,1", ""]
    path = write_csv(tmp_path / "big.csv", "ts_utc,open,high,low,close", *rows)
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", env={"BARAGG_INGEST_BLOCK_BYTES": "4096"})
    assert done.returncode == 2
    assert (
        "2 bad rows; line 2: ts_utc: duplicate time 2024-01-01 00:00 (also on line 5002); line 5002:"
        in done.stderr
    )


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared/data/real").exists(), reason="no real data"
)
def test_real_es_file_loads(registered: Database, conn, tmp_path: Path) -> None:
    from conftest import REAL_DATA

    frame = pd.read_csv(REAL_DATA / "ES_ESZ13_cme_1m_trade_20131006-20131014_UTC.csv")
    frame = frame.rename(columns={"timestamp_utc": "ts_utc", "volume": "vol"})
    path = tmp_path / "es.csv"
    frame.to_csv(path, index=False)
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('ES')")
    done = baragg(registered, "ingest", path, "--symbol", "ES", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inserted"] == len(frame) == 8198


def test_gzip_crlf_bom_and_blank_lines_keep_line_numbers(registered: Database, conn, tmp_path: Path) -> None:
    import gzip

    text = (
        "\ufeffts_utc,open,high,low,close\r\n2024-01-02 10:00,1,2,0.5,1\r\n\r\n2024-01-02 10:01,1,2,0.5,1\r\n"
    )
    good = tmp_path / "bars.csv.gz"
    good.write_bytes(gzip.compress(text.encode()))
    done = baragg(registered, "ingest", good, "--symbol", "EURUSD", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inserted"] == 2
    bad = tmp_path / "bad.csv"
    bad.write_bytes((text + "\r\n2024-01-02 10:02,1,0.2,0.5,1\r\n").encode())
    done = baragg(registered, "ingest", bad, "--symbol", "EURUSD", env={"BARAGG_INGEST_BLOCK_BYTES": "20"})
    assert done.returncode == 2
    assert "1 bad row; line 6: high: high 0.2 below low 0.5" in done.stderr


def test_extra_columns_are_refused_unless_ignored_and_kept_in_the_reject_file(
    registered: Database, conn, tmp_path: Path
) -> None:
    path = write_csv(
        tmp_path / "x.csv",
        "ts_utc,provider,open,high,low,close",
        "2024-01-02 10:00,oanda,1,2,0.5,1",
        "2024-01-02 10:01,oanda,1,2,0.5,-inf",
    )
    rejects = tmp_path / "r.csv"
    refused = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", rejects)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "unknown column 'provider'" in refused.stderr and "--ignore-column provider" in refused.stderr
    assert bars(conn) == [] and not rejects.exists()
    done = baragg(
        registered,
        "ingest",
        path,
        "--symbol",
        "EURUSD",
        "--reject-file",
        rejects,
        "--ignore-column",
        "provider",
    )
    assert done.returncode == 0, done.stderr
    assert "ignored columns: provider" in done.stdout and "rejected 1" in done.stdout
    assert rejects.read_text().splitlines() == [
        "line,ts_utc,provider,open,high,low,close,reason",
        "3,2024-01-02 10:01,oanda,1,2,0.5,'-inf,close: not finite (-inf)",
    ]


def test_messages_are_in_utc_whatever_the_server_time_zone(
    registered: Database, conn, tmp_path: Path
) -> None:
    dbname = conn.info.dbname
    conn.execute(f"ALTER DATABASE \"{dbname}\" SET timezone = 'Asia/Tokyo'")
    path = write_csv(
        tmp_path / "d.csv",
        "ts_utc,open,high,low,close",
        "2024-01-02 10:00,1,2,0.5,1",
        "2024-01-02 10:00,1,2,0.5,1",
    )
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD")
    assert "duplicate time 2024-01-02 10:00 (also on line 3)" in done.stderr
