"""Time partitions and retention (DESIGN.md 11, issue 15 part 2): a new install is partitioned by
month; `baragg db partition` converts a database with data online (nothing lost, writes during the
conversion kept, resumable after kill -9); `baragg retention` drops only 1m months every level has
finished with, keeping the derived bars."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from baragg import migrate, partitions
from baragg.db import Database
from baragg.ingest import ingest_file
from baragg.verify import verify
from ops_helpers import baragg, write_csv
from test_invalidation import (
    MONDAY,
    NOW,
    SYMBOL,
    active_bars,
    add_asset,
    assert_matches_scratch,
    insert_bars,
    minutes,
    pending,
    run,
)

DERIVED_COLUMNS = (
    "id, canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, is_partial, source,"
    " source_timeframe, source_candles, expected_candles, quality_score, deleted_at"
)


def kind(conn: psycopg.Connection, table: str) -> str:
    row = conn.execute("SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)", (table,)).fetchone()
    return row[0] if row else ""


def raw_rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, source"
        " FROM data_bars ORDER BY 1, 2, 3"
    ).fetchall()


def derived_rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(f"SELECT {DERIVED_COLUMNS} FROM derived_data_bars ORDER BY id").fetchall()


def partitions_of(conn: psycopg.Connection, table: str) -> list[str]:
    return [name for name, _, _ in conn.execute(partitions.query("partitions_list"), {"table": table})]


def security_of(conn: psycopg.Connection, table: str) -> tuple:
    """Grants, row-level security, policies and (non-internal) triggers of a table."""
    return conn.execute(
        """
        SELECT c.relacl::text, c.relrowsecurity,
               ARRAY(SELECT p.polname || ':' || p.polroles::regrole[]::text FROM pg_policy p
                     WHERE p.polrelid = c.oid ORDER BY 1),
               ARRAY(SELECT t.tgname FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal ORDER BY 1)
        FROM pg_class c WHERE c.oid = to_regclass(%s)""",
        (table,),
    ).fetchone()


@pytest.fixture
def plain_db(empty_db: Database) -> Iterator[Database]:
    """A database from before partitions: its bar tables hold rows when the function files arrive, so
    they stay plain tables (as on every existing install), with a week of bars aggregated at every level."""
    migrate.upgrade(empty_db, migrate.discover(migrate.migrations_dir()))  # the numbered migrations only
    with empty_db.connect(autocommit=True) as conn:
        add_asset(conn)
        insert_bars(conn, minutes(MONDAY, 1))
    migrate.upgrade(empty_db)
    with empty_db.connect(autocommit=True) as conn:
        assert kind(conn, "data_bars") == "r"
        insert_bars(conn, minutes(MONDAY + timedelta(minutes=1), 4 * 1440 - 1))
        conn.execute("SELECT 1")
    run(empty_db)
    yield empty_db


# ---------------------------------------------------------------------------------------------
# new installs
# ---------------------------------------------------------------------------------------------
def test_a_new_install_is_partitioned_by_month_with_a_default_partition(db: Database, tmp_path) -> None:
    with db.connect(autocommit=True) as conn:
        for table in partitions.TABLES:
            assert kind(conn, table) == "p"
            assert conn.execute("SELECT pg_get_partkeydef(%s::regclass)", (table,)).fetchone() == (
                "RANGE (ts_utc)",
            )
            # pg_partman 5's names: <parent>_p<YYYYMMDD> for a month, <parent>_default.
            this_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            names = partitions_of(conn, table)
            assert f"{table}_p{this_month:%Y%m%d}" in names and f"{table}_default" in names
        add_asset(conn)
    # Ingest creates the months it writes before writing them: nothing lands in the default partition.
    rows = [f"{SYMBOL},2025-03-31T23:59:00Z,1,2,0.5,1.5,10", f"{SYMBOL},2025-04-01T00:00:00Z,1,2,0.5,1.5,10"]
    ingest_file(
        db, write_csv(tmp_path / "bars.csv", "canonical_symbol,ts_utc,open,high,low,close,vol", *rows)
    )
    with db.connect(autocommit=True) as conn:
        names = partitions_of(conn, "data_bars")
        assert {"data_bars_p20250301", "data_bars_p20250401"} <= set(names)
        assert conn.execute("SELECT count(*) FROM data_bars_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM data_bars_p20250301").fetchone() == (1,)
        # A row of a month with no partition never fails: the default partition takes it, and the
        # upkeep (db upgrade, the worker's sync) moves it into its month, unchanged, logging nothing.
        conn.execute(
            "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close)"
            " VALUES (%s, '1h', '2019-05-06 07:00Z', 1, 2, 0.5, 1.5)",
            (SYMBOL,),
        )
        before = derived_rows(conn)
        assert conn.execute("SELECT count(*) FROM derived_data_bars_default").fetchone() == (1,)
        assert partitions.maintain(conn) >= 1
        assert conn.execute("SELECT count(*) FROM derived_data_bars_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM derived_data_bars_p20190501").fetchone() == (1,)
        assert derived_rows(conn) == before
        assert pending(conn) == []
        # Partitions are reached through their parent only (no grant; row-level security on).
        acl, rls, _, _ = security_of(conn, "derived_data_bars_p20190501")
        assert rls and (acl is None or "baragg_worker" not in acl)


# ---------------------------------------------------------------------------------------------
# db partition: online conversion
# ---------------------------------------------------------------------------------------------
def test_db_partition_converts_a_database_with_data_and_keeps_writes_made_meanwhile(
    plain_db: Database,
) -> None:
    with plain_db.connect(autocommit=True) as conn:
        security = {t: security_of(conn, t) for t in partitions.TABLES}
        raw_before = raw_rows(conn)
        derived_before = derived_rows(conn)
        assert len(raw_before) == 4 * 1440 and len(derived_before) > 1000

    writes: list[str] = []

    def write_meanwhile(table: str, step: str, rows: int) -> None:
        """Between batches, other sessions write: new, corrected and deleted 1m rows, then the worker."""
        if step != "copy" or rows == 0 or len(writes) >= 2:
            return
        with plain_db.connect(autocommit=True) as other:
            if table == "data_bars" and "raw" not in writes:
                insert_bars(other, [MONDAY + timedelta(days=4, minutes=k) for k in range(3)])
                other.execute(
                    "UPDATE data_bars SET close = close + 1, high = high + 1 WHERE ts_utc = %s", (MONDAY,)
                )
                other.execute("DELETE FROM data_bars WHERE ts_utc = %s", (MONDAY + timedelta(hours=30),))
                writes.append("raw")
            elif table == "derived_data_bars" and "derived" not in writes:
                # The worker re-aggregates those rows now (data_bars is already swapped, derived_data_bars
                # is being copied): its rewrites of derived bars must reach the copy.
                assert pending(other) != []
                summary = run(plain_db)
                assert summary.totals["bars_rewritten"] > 0
                writes.append("derived")

    report = partitions.convert(plain_db, batch_rows=700, on_batch=write_meanwhile)
    assert writes == ["raw", "derived"]
    assert [t.rows_copied >= 1 for t in report.tables] == [True, True]
    with plain_db.connect(autocommit=True) as conn:
        for table in partitions.TABLES:
            assert kind(conn, table) == "p"
            assert kind(conn, f"{table}_unpartitioned") == "r"
            # The same grants, policies and triggers as before, on the new table.
            assert security_of(conn, table) == security[table]
            assert security_of(conn, f"{table}_unpartitioned")[3] == []
        raw_after = raw_rows(conn)
        # Every row from before, and the writes made during the conversion.
        assert len(raw_after) == len(raw_before) + 3 - 1
        assert raw_after == raw_rows_of(conn, "data_bars_unpartitioned")
        assert derived_rows(conn) == derived_rows_of(conn, "derived_data_bars_unpartitioned")
        assert conn.execute("SELECT count(*) FROM data_bars_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM baragg_partition_log").fetchone() == (0,)
        # Foreign keys hold on the new tables.
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute(
                "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, source)"
                " VALUES ('NOPE', '1m', %s, 1, 1, 1, 1, 't')",
                (MONDAY,),
            )
        # The engine goes on: a correction now, through the new table's triggers, rewrites every level.
        conn.execute("UPDATE data_bars SET low = low - 5 WHERE ts_utc = %s", (MONDAY + timedelta(hours=50),))
        assert pending(conn) != []
        run(plain_db)
        assert_matches_scratch(plain_db, conn)
        run(plain_db)
        assert pending(conn) == []
    # Resuming a finished conversion does nothing.
    again = partitions.convert(plain_db)
    assert all(t.already for t in again.tables)


def raw_rows_of(conn: psycopg.Connection, table: str) -> list[tuple]:
    return conn.execute(
        "SELECT canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, source"
        f" FROM {table} ORDER BY 1, 2, 3"
    ).fetchall()


def derived_rows_of(conn: psycopg.Connection, table: str) -> list[tuple]:
    return conn.execute(f"SELECT {DERIVED_COLUMNS} FROM {table} ORDER BY id").fetchall()


def _progress(db: Database, table: str) -> tuple:
    with db.connect(autocommit=True) as conn:
        row = conn.execute(
            "SELECT phase, rows_copied FROM baragg_partition_progress WHERE table_name = %s", (table,)
        ).fetchone()
    return row or ("", 0)


def _start_and_kill(db: Database, table: str) -> None:
    """Start `baragg db partition` (small, paused batches) and kill -9 it while it copies ``table``."""
    env = {k: v for k, v in os.environ.items() if k != "BARAGG_DEBUG"}
    env["DATABASE_URL"] = db.url
    proc = subprocess.Popen(
        [sys.executable, "-m", "baragg.cli", "db", "partition", "--batch-rows", "300", "--pause", "0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            phase, copied = _progress(db, table)
            if phase == "copying" and copied > 0:
                break
            assert proc.poll() is None, "the conversion ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail(f"{table} was never being copied within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_db_partition_resumes_after_kill_9(plain_db: Database) -> None:
    with plain_db.connect(autocommit=True) as conn:
        raw_before = raw_rows(conn)
        derived_before = derived_rows(conn)
    _start_and_kill(plain_db, "data_bars")
    with plain_db.connect(autocommit=True) as conn:
        # Killed mid-copy: the table is still the plain one and takes writes (logged for the copy).
        assert kind(conn, "data_bars") == "r"
        insert_bars(conn, [MONDAY + timedelta(days=5)])
    _start_and_kill(plain_db, "derived_data_bars")
    with plain_db.connect(autocommit=True) as conn:
        assert kind(conn, "data_bars") == "p" and kind(conn, "derived_data_bars") == "r"
    done = baragg(plain_db, "db", "partition", "--batch-rows", "5000")
    assert done.returncode == 0, done.stderr
    assert "rows verified equal" in done.stdout
    with plain_db.connect(autocommit=True) as conn:
        assert kind(conn, "derived_data_bars") == "p"
        assert raw_rows(conn) == sorted(raw_before + raw_rows_of(conn, "data_bars")[-1:])
        assert derived_rows(conn) == derived_before
        run(plain_db, NOW)
        assert_matches_scratch(plain_db, conn)


# ---------------------------------------------------------------------------------------------
# retention
# ---------------------------------------------------------------------------------------------
DAYS = (datetime(2025, 6, 2, tzinfo=UTC), datetime(2025, 7, 7, tzinfo=UTC), datetime(2025, 8, 4, tzinfo=UTC))
LATER = datetime(2025, 8, 10, tzinfo=UTC)


def test_retention_drops_only_months_every_level_has_finished_with(db: Database) -> None:
    with db.connect(autocommit=True) as conn:
        add_asset(conn)
        for day in DAYS:
            partitions.ensure_months(db, "data_bars", [day])
            insert_bars(conn, minutes(day, 6 * 60))
        run(db, LATER)
        derived_before = active_bars(conn)
        assert {ts.month for _, tf, ts in derived_before if tf == "1h"} == {6, 7, 8}
        # A correction in June waits to be re-aggregated: June stays, and so does everything after it.
        conn.execute(
            "UPDATE data_bars SET close = close + 2 WHERE ts_utc = %s", (DAYS[0] + timedelta(hours=1),)
        )
        assert pending(conn) != []
    fates = partitions.retention(db, timedelta(days=1), now=LATER)
    assert [(f.name, f.dropped) for f in fates] == [("data_bars_p20250601", False)]
    assert "late data waits" in fates[0].blocked_by[0]
    run(db, LATER)
    # A task that has not aggregated past a month's end keeps it too.
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = '2025-07-07 03:00Z' WHERE timeframe = '1h'"
        )
        fates = partitions.retention(db, timedelta(days=1), now=LATER, dry_run=True)
        assert [(f.name, f.dropped, bool(f.blocked_by)) for f in fates] == [
            ("data_bars_p20250601", False, False),
            ("data_bars_p20250701", False, True),
        ]
        assert "task AAA 1h has aggregated up to 2025-07-07 03:00" in fates[1].blocked_by[0]
        conn.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = '2025-08-04 06:00Z' WHERE timeframe = '1h'"
        )
        derived_before = active_bars(conn)
    # The CLI (real clock: these months are long past 90 days), dry run first: nothing goes.
    listed = baragg(db, "retention", "--raw", "90d", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert (
        "would drop data_bars_p20250601" in listed.stdout
        and "would drop data_bars_p20250701" in listed.stdout
    )
    with db.connect(autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM data_bars").fetchone() == (3 * 6 * 60,)
    fates = partitions.retention(db, timedelta(days=1), now=LATER)
    assert [(f.name, f.dropped) for f in fates] == [
        ("data_bars_p20250601", True),
        ("data_bars_p20250701", True),
    ]
    with db.connect(autocommit=True) as conn:
        assert {row[2].month for row in raw_rows(conn)} == {8}
        # The derived bars stay, unchanged, and nothing was logged as late data.
        assert active_bars(conn) == derived_before
        assert pending(conn) == []
    # verify holds for the bars kept: 5m from the first 1m row kept, the levels above in full.
    for timeframe in ("5m", "1h", "1d"):
        report = verify(db, SYMBOL, timeframe)
        assert report.ok, (timeframe, report.as_dict())
    report = verify(db, SYMBOL, "5m")
    assert any("dropped by retention" in note for note in report.notes)
    assert report.window_from is not None and report.window_from >= datetime(2025, 8, 1, tzinfo=UTC)


def test_retention_refuses_an_unpartitioned_database_and_bad_ages(plain_db: Database) -> None:
    refused = baragg(plain_db, "retention", "--raw", "90d")
    assert refused.returncode == 1
    assert "data_bars is not partitioned" in refused.stderr and "baragg db partition" in refused.stderr
    bad = baragg(plain_db, "retention", "--raw", "90x")
    assert bad.returncode == 2
    assert "--raw '90x'" in bad.stderr
