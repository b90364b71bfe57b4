"""The operator commands' shared behaviour (exit codes, one-line errors) and `cleanup legacy-derived`."""

from __future__ import annotations

import json

import psycopg

from baragg.db import Database
from ops_helpers import baragg


def test_cleanup_legacy_derived_soft_deletes_1m_rows(db: Database, conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('DXY'), ('EURUSD')")
    conn.execute(
        "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close)"
        " SELECT 'DXY', '1m', t, 1, 1, 1, 1"
        " FROM generate_series('2024-01-01'::timestamptz, '2024-01-01 00:09', '1 minute') t"
    )
    conn.execute(
        "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close)"
        " VALUES ('EURUSD', '5m', '2024-01-01', 1, 1, 1, 1)"
    )
    dry = baragg(db, "cleanup", "legacy-derived", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "would soft-delete 10 1m row(s) in derived_data_bars (DXY 10)"
    assert conn.execute("SELECT count(*) FROM derived_data_bars WHERE deleted_at IS NULL").fetchone() == (11,)

    done = baragg(db, "cleanup", "legacy-derived", "--json")
    assert json.loads(done.stdout) == {
        "dry_run": False,
        "timeframe": "1m",
        "rows": 10,
        "by_symbol": {"DXY": 10},
    }
    rows = conn.execute(
        "SELECT timeframe, count(*), count(deleted_at) FROM derived_data_bars GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [("1m", 10, 10), ("5m", 1, 0)]  # soft-deleted, not removed; 5m untouched
    again = baragg(db, "cleanup", "legacy-derived")
    assert again.stdout.startswith("soft-deleted 0 ")


def test_cleanup_refuses_derived_timeframes(db: Database) -> None:
    done = baragg(db, "cleanup", "legacy-derived", "--timeframe", "5m")
    assert done.returncode == 2
    assert done.stderr == (
        "baragg: error: baragg cleanup legacy-derived: argument --timeframe: invalid choice: '5m'"
        " (choose from '1m')\n"
    )


def test_runtime_failure_is_one_line_exit_1(tmp_path) -> None:
    done = baragg(None, "--database-url", "postgresql://nobody@127.0.0.1:1/none", "registry", "list")
    assert done.returncode == 1
    assert done.stderr.startswith("baragg: error: cannot connect to the database")
    assert len(done.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(db: Database, tmp_path) -> None:
    done = baragg(db, "--debug", "ingest", tmp_path / "missing.csv", "--symbol", "X")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_usage_error_exit_2_one_line(db: Database) -> None:
    done = baragg(db, "ingest")
    assert done.returncode == 2
    assert done.stderr == "baragg: error: baragg ingest: the following arguments are required: file\n"
    done = baragg(db, "ingest", "bars.csv", "--no-such-option")
    assert done.returncode == 2
    assert done.stderr == "baragg: error: baragg: unrecognized arguments: --no-such-option\n"


def test_a_database_without_the_schema_says_what_to_do(empty_db: Database, tmp_path) -> None:
    done = baragg(empty_db, "registry", "list")
    assert done.returncode == 1
    assert "run `baragg db upgrade`" in done.stderr and len(done.stderr.strip().splitlines()) == 1
