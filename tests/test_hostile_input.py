"""Broken and hostile input files through the real `baragg ingest` (issue 14, items 9, 12 and 13).

Whatever the file: one readable line naming the file and what is wrong, exit 2, nothing stored,
memory bounded, and a reject file that never destroys or redirects anything.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from baragg.db import Database
from ops_helpers import baragg, write_csv
from rss_helpers import baragg_peak_rss

# A `baragg ingest` process imports pandas, pyarrow and psycopg (~190 MiB here) and holds one block
# being written and one read ahead (Arrow's CSV reader, issue 15): 230-330 MiB whatever the file's
# size; a bound well above that but far below what an unbounded reader takes on the files below
# (GBs before the fix).
PEAK_RSS_MIB = 450


@pytest.fixture
def registered(db: Database, conn: psycopg.Connection) -> Database:
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('EURUSD')")
    return db


def stored(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM data_bars").fetchone()[0]  # type: ignore[index]


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


GOOD = "2024-01-02 10:{:02d},1.1,1.2,1.0,1.15"


# --- item 9: a damaged compressed file, header aliases -------------------------------------------


def test_a_truncated_gzip_names_the_file_exits_2_and_stores_nothing(
    registered: Database, conn, tmp_path: Path
) -> None:
    text = "ts_utc,open,high,low,close\n" + "\n".join(GOOD.format(m) for m in range(60)) + "\n"
    whole = gzip.compress(text.encode())
    path = tmp_path / "bars.csv.gz"
    path.write_bytes(whole[: len(whole) - 12])  # the end of the stream is missing
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert line.startswith("baragg: error: bars.csv.gz: cannot read the file: ") and "runcated" in line
    assert stored(conn) == 0


def test_header_aliases_in_any_case_load_every_column(registered: Database, conn, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "vendor.csv",
        "Timestamp, Symbol ,Open,HIGH,low,Close,Volume,num_trades",
        "2024-01-02 10:00,EURUSD,1.1,1.2,1.0,1.15,42.5,7",
    )
    done = baragg(registered, "ingest", path, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ignored_columns"] == []
    row = conn.execute("SELECT canonical_symbol, open, close, vol, trade_count FROM data_bars").fetchone()
    assert row == ("EURUSD", 1.1, 1.15, 42.5, 7)  # the volume column is stored, not dropped


def test_two_columns_for_one_name_are_refused(registered: Database, conn, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "twice.csv",
        "ts_utc,open,high,low,close,volume,vol",
        "2024-01-02 10:00,1.1,1.2,1.0,1.15,1,2",
    )
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 2
    assert "twice.csv: columns 'volume' and 'vol' both mean vol" in one_line(done)
    assert stored(conn) == 0


# --- item 12: the reject file ---------------------------------------------------------------------


def test_an_existing_reject_file_is_left_alone_when_nothing_is_rejected(
    registered: Database, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "good.csv", "ts_utc,open,high,low,close", GOOD.format(0))
    rejects = tmp_path / "rejects.csv"
    rejects.write_text("yesterday's rejects\n")
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", rejects, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reject_file"] is None
    assert rejects.read_text() == "yesterday's rejects\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv", "rejects.csv"]  # no temp file left


def test_a_reject_file_through_a_symlink_or_onto_the_input_is_refused(
    registered: Database, conn, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "bars.csv", "ts_utc,open,high,low,close", GOOD.format(0), "bad,1,2,0.5,1")
    original = path.read_bytes()
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("do not overwrite\n")
    link = tmp_path / "link.csv"
    link.symlink_to(elsewhere)
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", link)
    assert done.returncode == 2 and "is a symbolic link" in one_line(done)
    assert elsewhere.read_text() == "do not overwrite\n" and link.is_symlink()
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", path)
    assert done.returncode == 2 and "is the input file itself" in one_line(done)
    assert path.read_bytes() == original
    assert stored(conn) == 0


def test_reject_file_cells_cannot_run_as_spreadsheet_formulas(
    registered: Database, conn, tmp_path: Path
) -> None:
    path = write_csv(
        tmp_path / "bars.csv",
        "ts_utc,open,high,low,close,vol",
        GOOD.format(0) + ",1",
        '=HYPERLINK("http://evil"),1,2,0.5,1,1',
        "2024-01-02 10:02,+1+cmd|' /C calc'!A0,2,0.5,1,1",
        "2024-01-02 10:03,1,2,0.5,1,-5",
        "2024-01-02 10:04,1,2,0.5,1,@SUM(1)",
    )
    rejects = tmp_path / "rejects.csv"
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", rejects)
    assert done.returncode == 0, done.stderr
    with rejects.open(newline="") as fh:
        rows = {int(r["line"]): r for r in csv.DictReader(fh)}
    assert rows[3]["ts_utc"] == "'" + '=HYPERLINK("http://evil")'
    assert rows[4]["open"] == "'+1+cmd|' /C calc'!A0"
    assert rows[5]["vol"] == "-5"  # a plain number is no formula: left as it is
    assert rows[6]["vol"] == "'@SUM(1)"
    cells = [cell for row in rows.values() for cell in row.values()]
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and c != "-5")]
    assert stored(conn) == 1


# --- item 13: bounded memory, bounded messages ----------------------------------------------------


def test_a_huge_line_is_refused_with_its_number_in_bounded_memory(
    registered: Database, conn, tmp_path: Path
) -> None:
    path = tmp_path / "bomb.csv.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:  # 192 MiB of one line, ~1 MB on disk
        fh.write(("ts_utc,open,high,low,close\n" + GOOD.format(0) + "\n").encode())
        for _ in range(192):
            fh.write(b"9" * (1 << 20))
        fh.write(b"\n")
    done, peak = baragg_peak_rss(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 2, done.stderr
    assert "bomb.csv.gz: line 3 is longer than 1,048,576 bytes" in one_line(done)
    assert peak < PEAK_RSS_MIB, f"peak RSS {peak:.0f} MiB"
    assert stored(conn) == 0


def test_a_flood_of_malformed_rows_stops_at_max_rejects_in_bounded_memory(
    registered: Database, conn, tmp_path: Path
) -> None:
    path = tmp_path / "flood.csv.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(b"ts_utc,open,high,low,close\n")
        fh.write(b"1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16\n" * 1_500_000)
    done, peak = baragg_peak_rss(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert "flood.csv.gz: more than 1,000 bad rows, stopped reading at line 1002; line 2: (row): " in line
    assert "--max-rejects" in line
    assert peak < PEAK_RSS_MIB, f"peak RSS {peak:.0f} MiB"
    assert stored(conn) == 0


def test_max_rejects_sets_the_limit_and_all_streams_every_bad_row_to_the_reject_file(
    registered: Database, conn, tmp_path: Path
) -> None:
    rows = [GOOD.format(0)] + [f"2024-01-03 {m // 60:02d}:{m % 60:02d},1,0.5,0.9,1" for m in range(1200)]
    path = write_csv(tmp_path / "bars.csv", "ts_utc,open,high,low,close", *rows)
    rejects = tmp_path / "rejects.csv"
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", rejects)
    assert done.returncode == 2 and "more than 1,000 bad rows" in one_line(done)
    assert not rejects.exists() and stored(conn) == 0  # nothing stored, nothing written
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--max-rejects", "10")
    assert done.returncode == 2 and "more than 10 bad rows, stopped reading at line 13" in one_line(done)
    done = baragg(
        registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", rejects, "--max-rejects", "all"
    )
    assert done.returncode == 0, done.stderr
    assert "rejected 1200" in done.stdout
    with rejects.open(newline="") as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == 1200
    assert stored(conn) == 1


def test_a_time_repeated_thousands_of_times_names_a_few_lines_and_counts_the_rest(
    registered: Database, conn, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "same.csv", "ts_utc,open,high,low,close", *[GOOD.format(0)] * 3000)
    rejects = tmp_path / "rejects.csv"
    done = baragg(
        registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", rejects, "--max-rejects", "all"
    )
    assert done.returncode == 0, done.stderr
    with rejects.open(newline="") as fh:
        reasons = {int(r["line"]): r["reason"] for r in csv.DictReader(fh)}
    assert len(reasons) == 3000
    assert reasons[2] == "ts_utc: duplicate time 2024-01-02 10:00 (also on line 3, 4, 5, 6, 7 and 2,994 more)"
    assert max(len(r) for r in reasons.values()) < 120


def test_nul_bytes_and_huge_values_are_never_echoed(registered: Database, conn, tmp_path: Path) -> None:
    path = tmp_path / "nul.csv"
    path.write_bytes(
        b"ts_utc,open,high,low,close\n"
        + b"\x00" * 65536
        + b",1,2,0.5,1\n"
        + b"2024-01-02 10:01,"
        + b"7" * 200_000
        + b"x,2,0.5,1\n"
    )
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD")
    assert done.returncode == 2
    line = one_line(done)
    assert "\x00" not in done.stderr and len(done.stderr) < 1000
    assert "line 2: ts_utc: cannot parse '\\x00\\x00\\x00" in line and "(65,536 characters)" in line
    assert "line 3: open: not a number: '777" in line and "(200,001 characters)" in line
    assert stored(conn) == 0


def test_bytes_that_are_not_utf8_make_a_bad_row_not_a_crash(
    registered: Database, conn, tmp_path: Path
) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        b"ts_utc,open,high,low,close\n2024-01-02 10:00,1,2,0.5,1\n2024-01-02 10:01,1\xe9,2,0.5,1\n"
    )
    rejects = tmp_path / "rejects.csv"
    done = baragg(registered, "ingest", path, "--symbol", "EURUSD", "--reject-file", rejects)
    assert done.returncode == 0, done.stderr
    assert "rejected 1" in done.stdout and stored(conn) == 1
    assert "line 3" not in done.stderr
    with rejects.open(newline="", encoding="utf-8") as fh:
        [row] = list(csv.DictReader(fh))
    assert row["line"] == "3" and row["reason"] == "(row): not UTF-8 text (byte 0xe9)"
    assert os.path.getsize(rejects) < 200
