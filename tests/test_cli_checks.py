"""Bad input and unsafe requests are refused through the real command, before anything is written:
one line, exit 2 (usage) or 1 (the database is not ready); `db status` tells scripts by its exit code."""

from __future__ import annotations

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
    for command in (("registry", "list"), ("status",), ("run", "--once")):
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
