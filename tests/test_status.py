"""`baragg status` and `baragg backfill` through the real command, with the real worker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from baragg.db import Database
from ops_helpers import baragg

START = datetime(2025, 9, 8, 0, 0, tzinfo=UTC)  # a Monday
NOW = "2025-09-10T00:10:00Z"


def load_minutes(conn: psycopg.Connection, symbol: str, days: int, start: datetime = START) -> None:
    conn.execute(
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source)"
        " SELECT %s, '1m', t, 1, 2, 0.5, 1.5, 10, 'test'"
        " FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 minute', interval '1 minute') t",
        (symbol, start, start + timedelta(days=days)),
    )


@pytest.fixture
def two_symbols(db: Database, conn: psycopg.Connection) -> Database:
    assert baragg(db, "registry", "add", "EURUSD", "--calc-4h", "--calc-1d").returncode == 0
    assert baragg(db, "registry", "add", "XAUUSD").returncode == 0
    load_minutes(conn, "EURUSD", 2)
    load_minutes(conn, "XAUUSD", 2)
    return db


def test_backfill_catches_everything_up(two_symbols: Database, conn: psycopg.Connection) -> None:
    done = baragg(two_symbols, "backfill", "--now", NOW, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tasks"] == 6  # EURUSD 5m 1h 4h 1d, XAUUSD 5m 1h
    counts = dict(
        conn.execute(
            "SELECT canonical_symbol || ' ' || timeframe, count(*) FROM derived_data_bars GROUP BY 1"
        ).fetchall()
    )
    assert counts["EURUSD 5m"] == counts["XAUUSD 5m"] == 2 * 288
    assert counts["EURUSD 1h"] == 48 and counts["EURUSD 4h"] == 12 and counts["EURUSD 1d"] == 2
    assert report["bars_created"] == sum(counts.values())
    for timeframe in ("5m", "1h", "4h", "1d"):
        check = baragg(two_symbols, "verify", "EURUSD", timeframe)
        assert check.returncode == 0, check.stdout


def test_backfill_of_one_symbol_and_timeframe(two_symbols: Database, conn: psycopg.Connection) -> None:
    done = baragg(
        two_symbols, "backfill", "--symbol", "XAUUSD", "--timeframe", "5m", "--now", NOW, "--jobs", "1"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("backfill: 1 task(s)")
    rows = conn.execute("SELECT DISTINCT canonical_symbol, timeframe FROM derived_data_bars").fetchall()
    assert rows == [("XAUUSD", "5m")]


def test_status_shows_lags_and_problems_first(two_symbols: Database, conn: psycopg.Connection) -> None:
    assert baragg(two_symbols, "backfill", "--now", NOW).returncode == 0
    # new data after the cursor: the 5m task is now behind its data
    load_minutes(conn, "EURUSD", 1, start=START + timedelta(days=2))
    conn.execute(
        "UPDATE data_agg_state SET status = 'hard_failed', hard_fail_streak = 3, last_error = 'boom'"
        " WHERE canonical_symbol = 'XAUUSD' AND timeframe = '1h'"
    )
    done = baragg(two_symbols, "status", "--now", "2025-09-11T00:10:00Z", "--json")
    assert done.returncode == 0, done.stderr
    tasks = json.loads(done.stdout)
    assert (tasks[0]["symbol"], tasks[0]["timeframe"], tasks[0]["alert"]) == ("XAUUSD", "1h", True)
    by_key = {(t["symbol"], t["timeframe"]): t for t in tasks}
    eur5 = by_key[("EURUSD", "5m")]
    assert eur5["cursor"] == "2025-09-10 00:00:00+00:00"
    assert eur5["lag_frontier_seconds"] == 86400.0  # a day of new 1m data not aggregated yet
    assert eur5["lag_now_seconds"] == 86400.0 + 600
    assert eur5["bars_created"] == 576
    human = baragg(two_symbols, "status")
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert lines[2].split()[:3] == ["XAUUSD", "1h", "FAILED"]  # under the two-line header, first
    assert "XAUUSD 1h last error (3 in a row): boom" in lines
    assert "1 task(s) need attention" in human.stdout


def test_status_of_an_empty_database(db: Database) -> None:
    done = baragg(db, "status")
    assert done.returncode == 0 and "no tasks yet" in done.stdout


def test_backfill_from_aggregates_history_before_agg_start(db: Database, conn: psycopg.Connection) -> None:
    # tasks that start at 2025-07-01, as the seed's production tasks do
    assert baragg(db, "registry", "add", "EURUSD", "--agg-start", "2025-07-01").returncode == 0
    load_minutes(conn, "EURUSD", 1, start=datetime(2024, 3, 4, tzinfo=UTC))  # before agg_start
    first = baragg(db, "backfill", "--now", NOW, "--json")
    assert first.returncode == 0 and json.loads(first.stdout)["bars_created"] == 0
    done = baragg(db, "backfill", "--now", NOW, "--from", "2024-03-04", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bars_created"] == 288 + 24
    starts = {row[0] for row in conn.execute("SELECT agg_start_utc FROM data_agg_state")}
    assert starts == {datetime(2024, 3, 4, tzinfo=UTC)}
    assert baragg(db, "verify", "EURUSD", "1h").returncode == 0


def test_reenable_a_failed_task(two_symbols: Database, conn: psycopg.Connection) -> None:
    assert baragg(two_symbols, "registry", "sync").returncode == 0
    conn.execute(
        "UPDATE data_agg_state SET status = 'disabled', hard_fail_streak = 3"
        " WHERE canonical_symbol = 'EURUSD' AND timeframe = '4h'"
    )
    done = baragg(two_symbols, "reenable", "EURUSD", "4h")
    assert done.returncode == 0, done.stderr
    row = conn.execute(
        "SELECT status, hard_fail_streak FROM data_agg_state WHERE canonical_symbol = 'EURUSD' AND timeframe = '4h'"
    ).fetchone()
    assert row == ("idle", 0)
    again = baragg(two_symbols, "reenable", "EURUSD", "4h")
    assert again.returncode == 2 and "neither failing nor disabled" in again.stderr


def status_lines(db: Database, columns: int) -> list[str]:
    done = baragg(db, "status", "--now", NOW, env={"COLUMNS": str(columns)})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize("columns", [80, 120])
def test_status_is_readable_at_80_and_120_columns(
    two_symbols: Database, conn: psycopg.Connection, columns: int
) -> None:
    assert (
        baragg(two_symbols, "registry", "add", "GBPUSD", "--calc-15m", "--calc-4h", "--calc-1d").returncode
        == 0
    )
    load_minutes(conn, "GBPUSD", 2)
    assert baragg(two_symbols, "backfill", "--now", NOW).returncode == 0
    conn.execute(
        "UPDATE data_agg_state SET status = 'hard_failed', hard_fail_streak = 3, last_error = %s"
        " WHERE canonical_symbol = 'GBPUSD' AND timeframe = '1h'",
        ("connection to server lost while writing the 1h bars of a very long backfill; " * 3,),
    )
    lines = status_lines(two_symbols, columns)
    assert all(len(line) <= columns for line in lines), [line for line in lines if len(line) > columns]
    assert "…" not in "\n".join(lines[:13])  # the two header lines and 11 rows: nothing cut
    tasks = [line.split() for line in lines if line.split()[:1] in (["EURUSD"], ["XAUUSD"], ["GBPUSD"])]
    rows = [t for t in tasks if t[1] in ("5m", "15m", "1h", "4h", "1d") and t[2] != "last"]
    assert len(rows) == 4 + 2 + 5  # one line per task, the full symbol first
    assert rows[0][:3] == ["GBPUSD", "1h", "FAILED"]  # problems first
    assert any(
        line.startswith("GBPUSD 1h last error (3 in a row): connection to server lost") for line in lines
    )


def test_status_escapes_control_characters_in_names_and_errors(
    db: Database, conn: psycopg.Connection
) -> None:
    # A name the registry would refuse, as an upgraded database may hold it (the CHECK is NOT VALID).
    evil = "EVIL\x1b[2J\x1b]0;pwned\x07"
    conn.execute(
        "ALTER TABLE core_asset_registry_all DROP CONSTRAINT IF EXISTS core_asset_registry_all_symbol_check"
    )
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES (%s)", (evil,))
    assert baragg(db, "registry", "sync").returncode == 0
    conn.execute(
        "UPDATE data_agg_state SET status = 'hard_failed', hard_fail_streak = 3, last_error = %s WHERE timeframe = '5m'",
        ("bad\rrow \x1b[31mred\x1b[0m \u202etxt.exe",),
    )
    done = baragg(db, "status")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert "EVIL\\x1b[2J\\x1b]0;pwned\\x07" in out
    assert "bad row \\x1b[31mred\\x1b[0m \\u202etxt.exe" in out  # line breaks become spaces
    listed = baragg(db, "registry", "list")
    assert listed.returncode == 0 and "\x1b" not in listed.stdout and "EVIL\\x1b[2J" in listed.stdout
