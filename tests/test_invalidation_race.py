"""A late row written while a catch-up is in flight is never lost (DESIGN.md 5, "nothing lost").

The worker locks its task rows for the whole catch-up transaction; the invalidation triggers lock the
same rows before reading a cursor. Without that, a row committed during the catch-up is neither seen
by the catch-up's snapshot nor recorded (its window was still at or after the old cursor).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg

from baragg.db import Database
from baragg.sql import query
from baragg.worker import run_once

T0 = datetime(2025, 7, 7, 10, 0, tzinfo=UTC)  # a Monday
NOW = T0 + timedelta(minutes=30)


def insert_minute(conn: psycopg.Connection, ts: datetime, high: float = 101.0) -> None:
    conn.execute(
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source)"
        " VALUES ('AAA', '1m', %s, 100, %s, 99, 100.5, 10, 'test')",
        (ts, high),
    )


def wait_until_blocked(conn: psycopg.Connection, pid: int) -> None:
    """Poll pg_stat_activity until backend `pid` waits on a lock (bounded: 20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row[0] == "Lock":
            return
        time.sleep(0.02)
    raise AssertionError("the late insert never waited for the worker's lock")


def test_late_row_during_catch_up_is_recorded_then_reaggregated(
    db: Database, conn: psycopg.Connection
) -> None:
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('AAA')")
    conn.execute("SELECT sync_agg_state_from_registry('prod', %s)", (NOW,))
    conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (T0,))
    for minute in range(10):
        insert_minute(conn, T0 + timedelta(minutes=minute))
    claimed = conn.execute(
        "SELECT canonical_symbol FROM agg_claim_tasks('w1', 10, 300, %s, NULL, ARRAY['5m'])", (NOW,)
    ).fetchall()
    assert claimed == [("AAA",)]
    batch = {"worker_id": "w1", "now": NOW, "symbols": ["AAA"], "timeframe": "5m"}

    with db.connect() as worker, db.connect(autocommit=True) as writer:
        # The worker's catch-up transaction, as worker.py runs it.
        worker.execute(query("worker_lock_tasks"), batch)
        (result,) = worker.execute(
            query("worker_catchup_many"), {**batch, "cursors": [None], "max_windows": 100}
        ).fetchone()[1:]
        assert result["bars_created"] == 2 and result["cursor_advanced_to"].startswith("2025-07-07T10:10")

        # A corrected 10:06 bar arrives while the catch-up is uncommitted.
        writer_pid = writer.info.backend_pid
        late = threading.Thread(target=insert_minute_replacing, args=(writer, T0 + timedelta(minutes=6)))
        late.start()
        wait_until_blocked(conn, writer_pid)
        worker.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE canonical_symbol = 'AAA' AND timeframe = '5m'",
            (T0 + timedelta(minutes=10),),
        )
        worker.commit()
        late.join(timeout=20)
        assert not late.is_alive()

    pending = conn.execute("SELECT timeframe, window_start FROM agg_invalidations").fetchall()
    assert pending == [("5m", T0 + timedelta(minutes=5))]
    conn.execute("UPDATE data_agg_state SET status = 'idle', lease_owner = NULL, lease_expires_at = NULL")
    run_once(db, now=NOW)
    high = conn.execute(
        "SELECT high FROM derived_data_bars WHERE timeframe = '5m' AND ts_utc = %s AND deleted_at IS NULL",
        (T0 + timedelta(minutes=5),),
    ).fetchone()
    assert high == (250.0,)


def insert_minute_replacing(conn: psycopg.Connection, ts: datetime) -> None:
    conn.execute(
        "UPDATE data_bars SET high = 250 WHERE canonical_symbol = 'AAA' AND timeframe = '1m' AND ts_utc = %s",
        (ts,),
    )
