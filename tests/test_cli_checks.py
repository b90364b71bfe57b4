"""Bad input and unsafe requests are refused through the real command, before anything is written:
one line, exit 2 (usage) or 1 (the database is not ready); `db status` tells scripts by its exit code."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from baragg import migrate
from baragg.db import Database
from ops_helpers import baragg


def one_line(done) -> str:  # type: ignore[no-untyped-def]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def tomorrow() -> str:
    """A time after the real clock, whatever today is."""
    return (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def eurusd(db: Database) -> Database:
    assert baragg(db, "registry", "add", "EURUSD", "--calc-4h").returncode == 0
    assert baragg(db, "registry", "sync").returncode == 0
    return db


# ---------------------------------------------------------------------------------------------
# validation (item 8)
# ---------------------------------------------------------------------------------------------
def test_backfill_of_an_unknown_symbol_is_exit_2_naming_it(
    eurusd: Database, conn: psycopg.Connection
) -> None:
    before = conn.execute("SELECT count(*), max(updated_at) FROM data_agg_state").fetchone()
    done = baragg(eurusd, "backfill", "--symbol", "EURUSD", "--symbol", "NOPE")
    assert done.returncode == 2
    assert "unknown symbol 'NOPE'" in one_line(done) and "EURUSD" not in one_line(done)
    assert conn.execute("SELECT count(*), max(updated_at) FROM data_agg_state").fetchone() == before


@pytest.mark.parametrize("jobs", ["0", "-3", "two"])
def test_backfill_jobs_must_be_positive(eurusd: Database, jobs: str) -> None:
    done = baragg(eurusd, "backfill", "--jobs", jobs)
    assert done.returncode == 2 and "--jobs" in one_line(done)


def test_verify_from_after_to_is_refused(eurusd: Database) -> None:
    done = baragg(eurusd, "verify", "EURUSD", "5m", "--from", "2025-09-18", "--to", "2025-09-17")
    assert done.returncode == 2
    assert "--from 2025-09-18 00:00 is not before --to 2025-09-17 00:00" in one_line(done)


def test_reenable_refuses_a_task_the_registry_has_inactive(
    eurusd: Database, conn: psycopg.Connection
) -> None:
    conn.execute(
        "UPDATE data_agg_state SET status = 'disabled', hard_fail_streak = 3, last_error = 'boom'"
        " WHERE canonical_symbol = 'EURUSD' AND timeframe = '4h'"
    )
    assert baragg(eurusd, "registry", "set", "EURUSD", "--no-calc-4h").returncode == 0
    assert baragg(eurusd, "registry", "sync").returncode == 0  # the task is now off (enabled = false)
    done = baragg(eurusd, "reenable", "EURUSD", "4h")
    assert done.returncode == 2
    assert "EURUSD 4h: the registry has it inactive in env prod" in one_line(done)
    row = conn.execute(
        "SELECT status, enabled FROM data_agg_state WHERE canonical_symbol = 'EURUSD' AND timeframe = '4h'"
    ).fetchone()
    assert row == ("disabled", False)  # untouched


def test_reenable_of_an_unknown_task(eurusd: Database) -> None:
    done = baragg(eurusd, "reenable", "EURUSD", "1d")
    assert done.returncode == 2 and "no task EURUSD 1d" in one_line(done)


def test_db_status_exit_code_says_whether_the_schema_is_current(empty_db: Database) -> None:
    shipped = migrate.discover()
    migrate.upgrade(empty_db, shipped[:-1])
    behind = baragg(empty_db, "db", "status")
    assert behind.returncode == 1
    assert f"pending  {shipped[-1].name}" in behind.stdout
    assert baragg(empty_db, "db", "upgrade").returncode == 0
    current = baragg(empty_db, "db", "status")
    assert current.returncode == 0, current.stdout
    with empty_db.connect(autocommit=True) as conn:
        conn.execute("UPDATE baragg_schema_migrations SET checksum = 'x' WHERE version = 1")
    edited = baragg(empty_db, "db", "status")
    assert edited.returncode == 1 and "edited" in edited.stdout


def test_a_database_url_behind_the_migrations_names_db_upgrade(empty_db: Database) -> None:
    shipped = migrate.discover()
    migrate.upgrade(empty_db, shipped[:-1])
    for command in (("registry", "list"), ("status",), ("run", "--once"), ("worker",)):
        done = baragg(empty_db, *command)
        assert done.returncode == 1, (command, done.stderr)
        line = one_line(done)
        assert f"1 migration(s) pending ({shipped[-1].name})" in line and "`baragg db upgrade`" in line


# ---------------------------------------------------------------------------------------------
# times after the real clock (item 4)
# ---------------------------------------------------------------------------------------------
def test_backfill_from_the_future_is_refused_without_force(
    eurusd: Database, conn: psycopg.Connection
) -> None:
    done = baragg(eurusd, "backfill", "--from", "2030-01-01")
    assert done.returncode == 2
    assert "--from 2030-01-01 00:00 UTC is in the future" in one_line(done) and "--force" in one_line(done)
    assert conn.execute(
        "SELECT count(*) FROM data_agg_state WHERE agg_start_utc >= '2030-01-01'"
    ).fetchone() == (0,)


@pytest.mark.parametrize("command", [("run", "--once"), ("backfill",)])
def test_now_in_the_future_is_refused_without_force(eurusd: Database, command: tuple[str, ...]) -> None:
    done = baragg(eurusd, *command, "--now", tomorrow())
    assert done.returncode == 2
    assert "--now" in one_line(done) and "is in the future" in one_line(done)


def load_minutes(conn: psycopg.Connection, symbol: str, start: datetime, days: int) -> None:
    conn.execute(
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source)"
        " SELECT %s, '1m', t, 1, 2, 0.5, 1.5, 10, 'test'"
        " FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 minute', interval '1 minute') t",
        (symbol, start, start + timedelta(days=days)),
    )


def test_a_forced_future_clock_leaves_scheduling_to_the_real_clock(
    eurusd: Database, conn: psycopg.Connection
) -> None:
    load_minutes(conn, "EURUSD", datetime(2025, 9, 8, tzinfo=UTC), 1)
    done = baragg(eurusd, "run", "--once", "--now", tomorrow(), "--force")
    assert done.returncode == 0, done.stderr
    # Every next run is where a real-time run would have put it: within a minute of the real clock
    # (the windows after the data are final but empty), not a day ahead.
    late = conn.execute(
        "SELECT canonical_symbol || ' ' || timeframe, next_run_at - now() FROM data_agg_state"
        " WHERE next_run_at > now() + interval '2 minutes'"
    ).fetchall()
    assert late == []
    assert conn.execute("SELECT count(*) FROM derived_data_bars WHERE timeframe = '5m'").fetchone() == (288,)


def test_scheduling_functions_never_write_times_past_the_real_clock(
    eurusd: Database, conn: psycopg.Connection
) -> None:
    """Leases and retries from a clock a day ahead are as the real clock would write them."""
    ahead = conn.execute("SELECT now() + interval '1 day'").fetchone()[0]
    claimed = conn.execute(
        "SELECT lease_expires_at - now() FROM agg_claim_tasks('w', 10, 300, %s, ARRAY['EURUSD'], ARRAY['4h'])",
        (ahead,),
    ).fetchall()
    assert len(claimed) == 1 and claimed[0][0] <= timedelta(seconds=300)
    failed = conn.execute(
        "SELECT agg_finish('EURUSD', '4h', false, NULL, NULL, 'hard', 'boom', %s, 'w')", (ahead,)
    ).fetchone()[0]
    assert failed["changed"] is True
    retry = conn.execute(
        "SELECT next_run_at - now() FROM data_agg_state WHERE canonical_symbol = 'EURUSD' AND timeframe = '4h'"
    ).fetchone()[0]
    assert retry <= timedelta(minutes=5)  # the first strike's backoff, from the real clock


# ---------------------------------------------------------------------------------------------
# tasks a backfill could not run, and retrying them (item 5)
# ---------------------------------------------------------------------------------------------
NOW = "2025-09-10T00:10:00Z"


def test_backfill_reports_a_backing_off_task_and_reenable_retries_it(
    eurusd: Database, conn: psycopg.Connection
) -> None:
    load_minutes(conn, "EURUSD", datetime(2025, 9, 8, tzinfo=UTC), 2)
    conn.execute(
        "UPDATE data_agg_state SET hard_fail_streak = 1, last_error = 'deadlock detected',"
        " next_run_at = %s::timestamptz + interval '5 minutes'"
        " WHERE canonical_symbol = 'EURUSD' AND timeframe = '5m'",
        (NOW,),
    )
    done = baragg(eurusd, "backfill", "--now", NOW, "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert [(t["symbol"], t["timeframe"]) for t in report["not_run"]] == [("EURUSD", "5m")]
    plain = baragg(eurusd, "backfill", "--now", NOW)
    assert plain.returncode == 1
    assert (
        "not run: EURUSD 5m: backing off after a failure until 2025-09-10 00:15 UTC: deadlock detected; "
        "retry now with: baragg reenable EURUSD 5m"
    ) in plain.stderr

    retried = baragg(eurusd, "reenable", "EURUSD", "5m")
    assert retried.returncode == 0, retried.stderr
    again = baragg(eurusd, "backfill", "--now", NOW, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["not_run"] == []
    row = conn.execute(
        "SELECT status, hard_fail_streak, last_error, last_agg_bar_ts_utc FROM data_agg_state"
        " WHERE canonical_symbol = 'EURUSD' AND timeframe = '5m'"
    ).fetchone()
    assert row == ("idle", 0, None, datetime(2025, 9, 10, tzinfo=UTC))
    assert conn.execute("SELECT count(*) FROM derived_data_bars WHERE timeframe = '4h'").fetchone() == (12,)


def test_backfill_reports_disabled_and_inactive_tasks(eurusd: Database, conn: psycopg.Connection) -> None:
    assert baragg(eurusd, "registry", "add", "DXY", "--inactive").returncode == 0
    conn.execute(
        "UPDATE data_agg_state SET status = 'disabled', hard_fail_streak = 3, last_error = 'boom'"
        " WHERE canonical_symbol = 'EURUSD' AND timeframe = '4h'"
    )
    done = baragg(eurusd, "backfill", "--now", NOW, "--symbol", "EURUSD", "--symbol", "DXY")
    assert done.returncode == 1
    assert "not run: EURUSD 4h: disabled after 3 failures in a row: boom; retry now with" in done.stderr
    assert "not run: DXY: no active task in env prod" in done.stderr
