"""Scheduling in SQL (migration 0003): due order, claims and leases, finishing, failures, registry sync.

Every call passes a fixed clock (p_now_utc); nothing sleeps.
"""

from __future__ import annotations

import time
from datetime import timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from scheduling_helpers import T0, add_assets, sql1, task

NOW = T0 + timedelta(days=3)
MIN = timedelta(minutes=1)


def sync(conn: psycopg.Connection, env: str = "prod") -> dict:
    return sql1(conn, "SELECT sync_agg_state_from_registry(%s, %s)", env, NOW)


def claim(
    conn: psycopg.Connection, worker: str, limit: int = 100, now=NOW, lease: int = 300, **kw
) -> list[tuple]:
    return conn.execute(
        "SELECT canonical_symbol, timeframe, rescued_from FROM agg_claim_tasks(%s, %s, %s, %s, %s, %s)",
        (worker, limit, lease, now, kw.get("symbols"), kw.get("timeframes")),
    ).fetchall()


def start(
    conn: psycopg.Connection, symbol: str, tf: str, worker: str | None = "w1", now=NOW, lease: int = 300
):
    return sql1(conn, "SELECT agg_start(%s, %s, %s, %s, %s)", symbol, tf, now, worker, lease)


def finish(
    conn, symbol, tf, success, *, cursor=None, stats=None, kind=None, error=None, now=NOW, worker="w1"
):
    return sql1(
        conn,
        "SELECT agg_finish(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        symbol,
        tf,
        success,
        cursor,
        Jsonb(stats) if stats is not None else None,
        kind,
        error,
        now,
        worker,
    )


def due(conn: psycopg.Connection, now=NOW, limit: int = 100) -> list[tuple[str, str]]:
    return [
        (r[0], r[1])
        for r in conn.execute("SELECT * FROM agg_get_due_tasks('prod', %s, %s)", (limit, now)).fetchall()
    ]


@pytest.fixture
def one(conn: psycopg.Connection) -> psycopg.Connection:
    """EURUSD with its two mandatory tasks."""
    add_assets(conn, ["EURUSD"])
    sync(conn)
    return conn


# ---------------------------------------------------------------------------------------------
# (d) due order
# ---------------------------------------------------------------------------------------------
def test_due_order_is_mandatory_then_duration_then_priority_then_least_recent(conn) -> None:
    add_assets(conn, ["AAA", "BBB"], calc_15m=True, calc_4h=True, calc_1d=True, calc_1w=True)
    sync(conn)
    order = due(conn)
    # Mandatory 5m and 1h first (5m before 1h although '1h' < '5m' as text), then the optional
    # ones by duration: 15m, 4h, 1d, 1w.
    assert [tf for _, tf in order] == [
        "5m",
        "5m",
        "1h",
        "1h",
        "15m",
        "15m",
        "4h",
        "4h",
        "1d",
        "1d",
        "1w",
        "1w",
    ]
    conn.execute(
        "UPDATE data_agg_state SET task_priority = 5 WHERE canonical_symbol = 'BBB' AND timeframe = '5m'"
    )
    assert due(conn)[:2] == [("BBB", "5m"), ("AAA", "5m")]
    conn.execute("UPDATE data_agg_state SET task_priority = 100")
    conn.execute(
        "UPDATE data_agg_state SET last_successful_at_utc = %s WHERE canonical_symbol = 'AAA'", (NOW - MIN,)
    )
    assert due(conn)[:2] == [("BBB", "5m"), ("AAA", "5m")], "never-run tasks first"
    # The claim hands tasks out in the same order.
    assert [(s, tf) for s, tf, _ in claim(conn, "w1", limit=4)] == [
        ("BBB", "5m"),
        ("AAA", "5m"),
        ("BBB", "1h"),
        ("AAA", "1h"),
    ]


def test_due_means_enabled_idle_and_next_run_reached(one) -> None:
    conn = one
    assert due(conn) == [("EURUSD", "5m"), ("EURUSD", "1h")]  # new tasks: next_run_at NULL = due
    conn.execute("UPDATE data_agg_state SET next_run_at = %s WHERE timeframe = '5m'", (NOW + MIN,))
    conn.execute("UPDATE data_agg_state SET enabled = false WHERE timeframe = '1h'")
    assert due(conn) == []
    assert due(conn, now=NOW + MIN) == [("EURUSD", "5m")]


# ---------------------------------------------------------------------------------------------
# claims and leases
# ---------------------------------------------------------------------------------------------
def test_claims_are_exclusive(conn) -> None:
    add_assets(conn, [f"S{i:02d}" for i in range(10)])
    sync(conn)
    first = claim(conn, "w1", limit=7)
    second = claim(conn, "w2", limit=100)
    assert len(first) == 7 and len(second) == 13
    assert not {r[:2] for r in first} & {r[:2] for r in second}
    assert claim(conn, "w3") == []
    owners = conn.execute("SELECT lease_owner, count(*) FROM data_agg_state GROUP BY 1 ORDER BY 1").fetchall()
    assert owners == [("w1", 7), ("w2", 13)]


def test_a_claim_skips_a_row_another_transaction_has_locked_instead_of_waiting(conn, db) -> None:
    """Another transaction (a worker finishing, an operator's UPDATE) holds one task row: claims pass
    it over at once and take the others; it is claimed once the lock is gone."""
    add_assets(conn, ["AAA", "BBB", "CCC"])
    sync(conn)
    # Were the claim to wait for the lock, it would fail after 2 s instead of returning.
    conn.execute("SET lock_timeout = '2s'")
    with db.connect() as holder:
        holder.execute(
            "SELECT 1 FROM data_agg_state WHERE canonical_symbol = 'BBB' AND timeframe = '5m' FOR UPDATE"
        )
        t0 = time.monotonic()
        claimed = claim(conn, "w1")
        one = start(conn, "BBB", "5m", "w2")
        elapsed = time.monotonic() - t0
        holder.rollback()
    assert sorted(r[:2] for r in claimed) == [
        ("AAA", "1h"), ("AAA", "5m"), ("BBB", "1h"), ("CCC", "1h"), ("CCC", "5m"),
    ]  # fmt: skip
    assert (one["claimed"], one["reason"]) == (False, "being claimed by another worker")
    assert elapsed < 2
    assert task(conn, "BBB", "5m")["status"] == "idle"
    assert claim(conn, "w2") == [("BBB", "5m", None)]


def test_live_lease_is_never_taken_over_and_an_expired_one_is_rescued(one) -> None:
    conn = one
    won = start(conn, "EURUSD", "5m", "w1", lease=300)
    assert won["claimed"] is True and won["success"] is True
    later = NOW + timedelta(seconds=299)
    lost = start(conn, "EURUSD", "5m", "w2", now=later)
    assert lost["claimed"] is False and "held by w1" in lost["reason"]
    assert claim(conn, "w2", now=later, timeframes=["5m"]) == []
    assert task(conn, "EURUSD", "5m")["lease_owner"] == "w1"

    expired = NOW + timedelta(seconds=300)
    assert claim(conn, "w2", now=expired, timeframes=["5m"]) == [("EURUSD", "5m", "w1")]
    t = task(conn, "EURUSD", "5m")
    assert t["lease_owner"] == "w2" and t["total_rescues"] == 1
    assert "lease of worker w1 expired" in t["last_rescue"] and "reclaimed by w2" in t["last_rescue"]
    # The old owner can no longer store anything.
    gone = finish(conn, "EURUSD", "5m", True, cursor=NOW, worker="w1", now=expired)
    assert gone["changed"] is False and "not held by w1" in gone["reason"]
    assert (
        sql1(conn, "SELECT agg_checkpoint('EURUSD', '5m', 'w1', %s, NULL, %s)", NOW, expired)["changed"]
        is False
    )
    assert task(conn, "EURUSD", "5m")["last_agg_bar_ts_utc"] is None


def test_checkpoint_renews_the_lease_and_stores_progress(one) -> None:
    conn = one
    start(conn, "EURUSD", "5m", "w1", lease=60)
    at = NOW + timedelta(seconds=50)
    out = sql1(
        conn,
        "SELECT agg_checkpoint('EURUSD', '5m', 'w1', %s, %s, %s, 60)",
        T0 + timedelta(hours=1),
        Jsonb({"windows_processed": 12, "bars_created": 12, "bars_quality_poor": 1}),
        at,
    )
    assert out["changed"] is True
    t = task(conn, "EURUSD", "5m")
    assert t["lease_expires_at"] == at + timedelta(seconds=60)
    assert t["last_agg_bar_ts_utc"] == T0 + timedelta(hours=1)
    assert (t["total_bars_created"], t["total_bars_quality_poor"], t["total_windows_processed"]) == (
        12,
        1,
        12,
    )
    assert t["status"] == "running"
    # Past the first lease but inside the renewed one: still not claimable.
    assert claim(conn, "w2", now=NOW + timedelta(seconds=70), timeframes=["5m"]) == []


def checkpoint(conn, worker: str | None, cursor=T0, windows: int = 12, now=NOW, lease: int = 300) -> dict:
    return sql1(
        conn,
        "SELECT agg_checkpoint('EURUSD', '5m', %s, %s, %s, %s, %s)",
        worker,
        cursor,
        Jsonb({"windows_processed": windows, "bars_created": windows}),
        now,
        lease,
    )


def unchanged_by(conn, call) -> dict:
    """Run ``call``; assert the task row is exactly as before; return what the call returned."""
    before = task(conn, "EURUSD", "5m")
    out = call()
    assert task(conn, "EURUSD", "5m") == before
    return out


def test_checkpoint_of_a_worker_whose_lease_was_taken_over_changes_nothing(one) -> None:
    conn = one
    start(conn, "EURUSD", "5m", "w1", lease=60)
    assert checkpoint(conn, "w1", now=NOW + timedelta(seconds=30), lease=60)["changed"] is True
    taken = NOW + timedelta(seconds=91)  # 60 s after the renewed lease began
    assert claim(conn, "w2", now=taken, timeframes=["5m"]) == [("EURUSD", "5m", "w1")]
    out = unchanged_by(conn, lambda: checkpoint(conn, "w1", cursor=T0 + timedelta(hours=2), now=taken))
    assert out == {"changed": False, "reason": "task EURUSD 5m is not held by w1"}
    t = task(conn, "EURUSD", "5m")
    assert (t["lease_owner"], t["last_agg_bar_ts_utc"], t["total_bars_created"]) == ("w2", T0, 12)


def test_checkpoint_of_another_worker_than_the_owner_changes_nothing(one) -> None:
    conn = one
    start(conn, "EURUSD", "5m", "w1")
    for intruder in ("w2", "W1", "w1 ", "", None):
        out = unchanged_by(conn, lambda w=intruder: checkpoint(conn, w, now=NOW + timedelta(seconds=10)))
        assert out["changed"] is False, intruder
    assert checkpoint(conn, "w1", now=NOW + timedelta(seconds=10))["changed"] is True


def test_checkpoint_after_the_task_was_finished_or_released_changes_nothing(one) -> None:
    conn = one
    start(conn, "EURUSD", "5m", "w1")
    assert finish(conn, "EURUSD", "5m", True, cursor=T0)["changed"] is True
    out = unchanged_by(conn, lambda: checkpoint(conn, "w1", cursor=T0 + timedelta(hours=1)))
    assert out["changed"] is False
    start(conn, "EURUSD", "5m", "w1", now=NOW + timedelta(hours=1))
    sql1(conn, "SELECT agg_release('EURUSD', '5m', 'w1', %s)", NOW + timedelta(hours=1))
    assert task(conn, "EURUSD", "5m")["status"] == "idle"
    out = unchanged_by(conn, lambda: checkpoint(conn, "w1", cursor=T0 + timedelta(hours=1)))
    assert out["changed"] is False


def test_checkpoint_many_stores_only_the_tasks_the_worker_still_holds(conn) -> None:
    add_assets(conn, ["AAA", "BBB"])
    sync(conn)
    claim(conn, "w1", timeframes=["5m"])
    later = NOW + timedelta(seconds=400)  # both leases expired; w2 takes BBB over, AAA stays with w1
    assert claim(conn, "w2", now=later, symbols=["BBB"], timeframes=["5m"]) == [("BBB", "5m", "w1")]
    items = [
        {
            "canonical_symbol": s,
            "timeframe": "5m",
            "new_cursor_utc": T0.isoformat(),
            "stats": {"bars_created": 7},
        }
        for s in ("AAA", "BBB")
    ]
    out = sql1(conn, "SELECT agg_checkpoint_many('w1', %s, %s, 300)", Jsonb(items), later)
    assert out == {
        "checkpointed": 1,
        "unchanged": [
            {"canonical_symbol": "BBB", "timeframe": "5m", "reason": "task BBB 5m is not held by w1"}
        ],
    }
    aaa, bbb = task(conn, "AAA", "5m"), task(conn, "BBB", "5m")
    assert (aaa["last_agg_bar_ts_utc"], aaa["total_bars_created"], aaa["lease_owner"]) == (T0, 7, "w1")
    assert (bbb["last_agg_bar_ts_utc"], bbb["total_bars_created"], bbb["lease_owner"]) == (None, 0, "w2")


def test_seed_style_callers_without_worker_id_still_work(one) -> None:
    conn = one
    won = start(conn, "EURUSD", "5m", None)
    assert won["claimed"] is True and won["worker_id"].startswith("session:")
    done = finish(conn, "EURUSD", "5m", True, cursor=T0, stats={"bars_created": 3}, worker=None)
    assert done["changed"] is True
    t = task(conn, "EURUSD", "5m")
    assert (t["status"], t["total_bars_created"], t["lease_owner"]) == ("idle", 3, None)


def test_seed_rows_left_running_without_a_lease_are_recovered(one) -> None:
    conn = one
    conn.execute(
        "UPDATE data_agg_state SET status = 'running', running_started_at_utc = %s, lease_owner = NULL,"
        " lease_expires_at = NULL WHERE timeframe = '5m'",
        (NOW - timedelta(minutes=4),),
    )
    assert claim(conn, "w2", timeframes=["5m"]) == []
    assert claim(conn, "w2", now=NOW + MIN, timeframes=["5m"]) == [("EURUSD", "5m", "(unknown)")]


# ---------------------------------------------------------------------------------------------
# finishing
# ---------------------------------------------------------------------------------------------
def test_success_schedules_the_moment_the_next_window_becomes_final(one) -> None:
    conn = one
    cursor = NOW - timedelta(minutes=2)  # window [cursor, cursor+5m) is final at cursor + 5m + 30s
    start(conn, "EURUSD", "5m")
    out = finish(conn, "EURUSD", "5m", True, cursor=cursor, stats={"windows_processed": 4, "continue": False})
    assert out["changed"] is True
    t = task(conn, "EURUSD", "5m")
    assert t["next_run_at"] == cursor + timedelta(minutes=5, seconds=30)
    assert (t["status"], t["hard_fail_streak"], t["total_runs"], t["lease_owner"]) == ("idle", 0, 1, None)
    assert t["last_successful_at_utc"] == NOW and t["last_run_stats"]["outcome"] == "ok"

    # A backlog remains: due again at once.
    start(conn, "EURUSD", "5m", now=t["next_run_at"])
    finish(conn, "EURUSD", "5m", True, cursor=cursor, stats={"continue": True}, now=t["next_run_at"])
    assert task(conn, "EURUSD", "5m")["next_run_at"] == t["next_run_at"]

    # The next window is final already but could not be built (no data yet): poll in a minute.
    stalled = NOW + timedelta(hours=1)
    start(conn, "EURUSD", "5m", now=stalled)
    finish(conn, "EURUSD", "5m", True, cursor=cursor, stats={"continue": False}, now=stalled)
    assert task(conn, "EURUSD", "5m")["next_run_at"] == stalled + MIN


def test_progress_of_a_source_task_wakes_its_dependents(one) -> None:
    conn = one
    conn.execute(
        "UPDATE data_agg_state SET next_run_at = %s WHERE timeframe = '1h'", (NOW + timedelta(hours=1),)
    )
    conn.execute("UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE timeframe = '5m'", (T0,))
    start(conn, "EURUSD", "5m")
    finish(conn, "EURUSD", "5m", True, cursor=T0, stats={"windows_processed": 0})  # no progress: no wake
    assert task(conn, "EURUSD", "1h")["next_run_at"] == NOW + timedelta(hours=1)
    later = NOW + timedelta(minutes=10)
    start(conn, "EURUSD", "5m", now=later)
    finish(
        conn,
        "EURUSD",
        "5m",
        True,
        cursor=T0 + timedelta(minutes=5),
        stats={"windows_processed": 1},
        now=later,
    )
    assert task(conn, "EURUSD", "1h")["next_run_at"] == later

    # A dependent whose next window is not final yet is not woken: it is scheduled for that moment.
    hour_cursor = later - timedelta(minutes=30)  # window [later-30m, later+30m): final at later+31m
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s, next_run_at = %s WHERE timeframe = '1h'",
        (hour_cursor, later + timedelta(minutes=31)),
    )
    start(conn, "EURUSD", "5m", now=later)
    finish(
        conn,
        "EURUSD",
        "5m",
        True,
        cursor=T0 + timedelta(minutes=10),
        stats={"windows_processed": 1},
        now=later,
    )
    assert task(conn, "EURUSD", "1h")["next_run_at"] == later + timedelta(minutes=31)
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = NULL, next_run_at = NULL WHERE timeframe = '1h'"
    )
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE timeframe = '5m'",
        (T0 + timedelta(minutes=5),),
    )

    # A dependent running while its source advances runs again right after it finishes.
    start(conn, "EURUSD", "1h", "w9", now=later)
    start(conn, "EURUSD", "5m", now=later + MIN)
    finish(
        conn,
        "EURUSD",
        "5m",
        True,
        cursor=T0 + timedelta(minutes=10),
        stats={"windows_processed": 1},
        now=later + MIN,
    )
    assert task(conn, "EURUSD", "1h")["rerun_requested"] is True
    finish(conn, "EURUSD", "1h", True, cursor=T0, stats={}, now=later + 2 * MIN, worker="w9")
    t = task(conn, "EURUSD", "1h")
    assert t["next_run_at"] == later + 2 * MIN and t["rerun_requested"] is False


# ---------------------------------------------------------------------------------------------
# (c) failures, with a fixed clock
# ---------------------------------------------------------------------------------------------
def test_transient_failure_retries_after_a_backoff_and_keeps_the_streak(one) -> None:
    conn = one
    conn.execute("UPDATE data_agg_state SET hard_fail_streak = 1, last_agg_bar_ts_utc = %s", (T0,))
    start(conn, "EURUSD", "5m")
    out = finish(conn, "EURUSD", "5m", False, kind="transient", error="OperationalError: connection lost")
    assert out["changed"] is True
    t = task(conn, "EURUSD", "5m")
    assert (t["status"], t["hard_fail_streak"], t["total_transient_failures"]) == ("idle", 1, 1)
    assert t["last_error"] == "OperationalError: connection lost" and t["next_run_at"] == NOW + MIN
    assert t["last_agg_bar_ts_utc"] == T0, "a failure never moves the cursor"
    assert due(conn, now=NOW + MIN - timedelta(seconds=1)) == [("EURUSD", "1h")]
    assert ("EURUSD", "5m") in due(conn, now=NOW + MIN)


def strike(conn, symbol: str, tf: str, now) -> dict:
    won = start(conn, symbol, tf, now=now)
    assert won["claimed"], won
    return finish(conn, symbol, tf, False, kind="hard", error="boom", now=now)


def test_three_hard_failures_of_a_mandatory_task_make_it_hard_failed_and_still_retried(one) -> None:
    conn = one
    first = strike(conn, "EURUSD", "5m", NOW)
    assert (first["status"], first["hard_fail_streak"]) == ("idle", 1)
    assert task(conn, "EURUSD", "5m")["next_run_at"] == NOW + timedelta(minutes=5)
    second = strike(conn, "EURUSD", "5m", NOW + timedelta(minutes=5))
    assert (second["status"], second["hard_fail_streak"]) == ("idle", 2)
    at = NOW + timedelta(minutes=20)
    third = strike(conn, "EURUSD", "5m", at)
    assert (third["status"], third["hard_fail_streak"]) == ("hard_failed", 3)
    t = task(conn, "EURUSD", "5m")
    assert t["last_error"] == "boom" and t["next_run_at"] == at + timedelta(hours=1) and t["enabled"]
    assert ("EURUSD", "5m") not in due(conn, now=at + timedelta(minutes=59))
    assert ("EURUSD", "5m") in due(conn, now=at + timedelta(hours=1)), "hard_failed is retried"
    # A success clears it.
    start(conn, "EURUSD", "5m", now=at + timedelta(hours=1))
    finish(conn, "EURUSD", "5m", True, cursor=T0, stats={}, now=at + timedelta(hours=1))
    t = task(conn, "EURUSD", "5m")
    assert (t["status"], t["hard_fail_streak"], t["last_error"]) == ("idle", 0, None)


def test_three_hard_failures_disable_an_optional_task_until_sync_re_enables_it(conn) -> None:
    add_assets(conn, ["EURUSD"], calc_4h=True)
    sync(conn)
    at = NOW
    for _ in range(3):
        out = strike(conn, "EURUSD", "4h", at)
        at = at + timedelta(hours=1)
    assert (out["status"], out["hard_fail_streak"]) == ("disabled", 3)
    assert ("EURUSD", "4h") not in due(conn, now=at + timedelta(days=30))
    assert start(conn, "EURUSD", "4h", now=at)["reason"] == "task was disabled after repeated hard failures"

    # The flag is still set: sync leaves the failed task disabled (or the rule would be undone).
    assert sync(conn)["enabled"] == []
    assert task(conn, "EURUSD", "4h")["status"] == "disabled"
    # Clearing and setting the flag again re-enables it, from a clean slate.
    conn.execute("UPDATE core_asset_registry_all SET calc_4h = false")
    assert sync(conn)["disabled"] == ["EURUSD 4h"]
    conn.execute("UPDATE core_asset_registry_all SET calc_4h = true")
    assert sync(conn)["enabled"] == ["EURUSD 4h"]
    t = task(conn, "EURUSD", "4h")
    assert (t["status"], t["enabled"], t["hard_fail_streak"], t["next_run_at"]) == ("idle", True, 0, NOW)
    assert ("EURUSD", "4h") in due(conn)


def test_operator_can_re_enable_a_disabled_task_directly(conn) -> None:
    add_assets(conn, ["EURUSD"], calc_15m=True)
    sync(conn)
    for i in range(3):
        strike(conn, "EURUSD", "15m", NOW + timedelta(hours=i))
    assert sql1(conn, "SELECT agg_reenable_task('EURUSD', '15m', %s)", NOW)["changed"] is True
    assert (task(conn, "EURUSD", "15m")["status"], task(conn, "EURUSD", "15m")["hard_fail_streak"]) == (
        "idle",
        0,
    )


def test_failure_of_a_task_not_held_changes_nothing(one) -> None:
    conn = one
    out = finish(conn, "EURUSD", "5m", False, kind="hard", error="x")
    assert out["changed"] is False and "idle" in out["reason"]
    assert task(conn, "EURUSD", "5m")["hard_fail_streak"] == 0


# ---------------------------------------------------------------------------------------------
# (e) registry sync
# ---------------------------------------------------------------------------------------------
STATE_COLUMNS = (
    "canonical_symbol, timeframe, enabled, status, source_timeframe, is_mandatory, last_agg_bar_ts_utc,"
    " NULLIF(agg_start_utc, '-infinity'), task_priority, run_interval_minutes, aggregation_delay_seconds,"
    " next_run_at, hard_fail_streak"
)


def state(conn) -> list[tuple]:
    return conn.execute(f"SELECT {STATE_COLUMNS} FROM data_agg_state ORDER BY 1, 2").fetchall()


def test_sync_creates_tasks_from_the_registry_flags(conn) -> None:
    add_assets(conn, ["AAA"])
    add_assets(conn, ["BBB"], calc_15m=True, calc_4h=True, calc_1d=True)
    add_assets(conn, ["CCC"], calc_1w=True)
    out = sync(conn)
    assert out["created"] == [
        "AAA 1h", "AAA 5m", "BBB 15m", "BBB 1d", "BBB 1h", "BBB 4h", "BBB 5m",
        "CCC 1d", "CCC 1h", "CCC 1w", "CCC 5m",
    ]  # fmt: skip
    rows = {(r[0], r[1]): r for r in state(conn)}
    # source, mandatory, interval, delay of a new task
    assert rows[("AAA", "5m")][4:6] == ("1m", True) and rows[("AAA", "5m")][9:11] == (5, 30)
    assert rows[("AAA", "1h")][4:6] == ("5m", True) and rows[("AAA", "1h")][9:11] == (60, 60)
    assert rows[("BBB", "15m")][4:6] == ("5m", False)
    assert rows[("BBB", "4h")][4:6] == ("1h", False) and rows[("BBB", "4h")][9] == 240
    assert rows[("BBB", "1d")][4:6] == ("1h", False) and rows[("BBB", "1d")][9] == 1440
    assert rows[("CCC", "1w")][4:6] == ("1d", False) and rows[("CCC", "1w")][9] == 10080


def test_sync_is_idempotent(conn) -> None:
    add_assets(conn, ["AAA", "BBB"], calc_4h=True)
    sync(conn)
    before = state(conn)
    again = sync(conn)
    assert {k: again[k] for k in ("created", "enabled", "disabled", "corrected")} == {
        "created": [],
        "enabled": [],
        "disabled": [],
        "corrected": [],
    }
    assert state(conn) == before


def test_sync_never_touches_cursors_or_operator_settings(conn) -> None:
    add_assets(conn, ["AAA"], calc_4h=True)
    sync(conn)
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s, agg_start_utc = %s, task_priority = 7,"
        " aggregation_delay_seconds = 99, run_interval_minutes = 3, next_run_at = %s",
        (T0 + timedelta(hours=5), T0, NOW + timedelta(hours=2)),
    )
    settings = (
        "last_agg_bar_ts_utc, NULLIF(agg_start_utc, '-infinity'), task_priority, aggregation_delay_seconds,"
        " run_interval_minutes"
    )

    def operator_view() -> list[tuple]:
        return conn.execute(
            f"SELECT canonical_symbol, timeframe, {settings} FROM data_agg_state ORDER BY 1, 2"
        ).fetchall()

    before = operator_view()
    for flags in ("active = false", "active = true", "calc_4h = false", "calc_4h = true, calc_1d = true"):
        conn.execute(f"UPDATE core_asset_registry_all SET {flags}")
        sync(conn)
    assert [r for r in operator_view() if r[1] != "1d"] == before
    assert task(conn, "AAA", "1d")["last_agg_bar_ts_utc"] is None


def test_sync_follows_flags_and_activity(conn) -> None:
    add_assets(conn, ["AAA"], calc_4h=True)
    sync(conn)
    conn.execute("UPDATE core_asset_registry_all SET calc_4h = false")
    assert sync(conn)["disabled"] == ["AAA 4h"]
    conn.execute("UPDATE core_asset_registry_all SET active = false")
    assert sync(conn)["disabled"] == ["AAA 1h", "AAA 5m"]
    assert due(conn) == []
    conn.execute("UPDATE core_asset_registry_all SET active = true, calc_4h = true")
    assert sync(conn)["enabled"] == ["AAA 1h", "AAA 4h", "AAA 5m"]
    # A task whose asset left the registry is disabled, not deleted.
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, is_mandatory)"
        " VALUES ('GONE', '5m', '1m', true)"
    )
    assert sync(conn)["disabled"] == ["GONE 5m"]


def test_sync_uses_active_in_prod_and_test_active_elsewhere(conn) -> None:
    add_assets(conn, ["PRODONLY"], active=True, test_active=False)
    add_assets(conn, ["TESTONLY"], active=False, test_active=True)
    assert sync(conn, "prod")["created"] == ["PRODONLY 1h", "PRODONLY 5m"]
    out = sync(conn, "dev")
    assert out["created"] == ["TESTONLY 1h", "TESTONLY 5m"]
    assert out["disabled"] == ["PRODONLY 1h", "PRODONLY 5m"]
    assert {s for s, _ in due(conn)} == {"TESTONLY"}


def test_sync_corrects_the_source_of_seed_tasks(conn) -> None:
    add_assets(conn, ["AAA"])
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, is_mandatory,"
        " last_agg_bar_ts_utc) VALUES ('AAA', '1h', '1m', false, %s)",
        (T0,),
    )
    out = sync(conn)
    assert out["corrected"] == ["AAA 1h"] and out["created"] == ["AAA 5m"]
    t = task(conn, "AAA", "1h")
    assert (t["source_timeframe"], t["is_mandatory"], t["last_agg_bar_ts_utc"]) == ("5m", True, T0)


# ---------------------------------------------------------------------------------------------
# The task life cycle against a plain model (hypothesis): any sequence of claims, successes,
# failures and clock moves by several workers.
# ---------------------------------------------------------------------------------------------
LEASE = timedelta(seconds=300)
BACKOFF = {1: timedelta(minutes=5), 2: timedelta(minutes=15)}


class TaskModel:
    """DESIGN.md 6 for one 5m task (delay 30 s), written as plainly as possible."""

    def __init__(self, mandatory: bool) -> None:
        self.mandatory = mandatory
        self.status, self.streak, self.owner = "idle", 0, None
        self.lease_end = self.next_run = self.cursor = None

    def due(self, now) -> bool:
        if self.next_run is not None and self.next_run > now:
            return False
        return self.status in ("idle", "hard_failed") or (self.status == "running" and self.lease_end <= now)

    def claim(self, worker: str, now) -> bool:
        if not self.due(now):
            return False
        self.status, self.owner, self.lease_end = "running", worker, now + LEASE
        return True

    def succeed(self, worker: str, now, cursor, backlog: bool) -> bool:
        if self.status != "running" or self.owner != worker:
            return False
        self.status, self.streak, self.owner, self.lease_end, self.cursor = "idle", 0, None, None, cursor
        final = cursor + timedelta(minutes=5, seconds=30)
        self.next_run = now if backlog else (final if final > now else now + timedelta(minutes=1))
        return True

    def fail(self, worker: str, now, kind: str) -> bool:
        if self.status != "running" or self.owner != worker:
            return False
        self.owner = self.lease_end = None
        if kind == "transient":
            self.status = "hard_failed" if self.streak >= 3 and self.mandatory else "idle"
            self.next_run = now + timedelta(minutes=1)
            return True
        self.streak += 1
        if self.streak >= 3:
            self.status = "hard_failed" if self.mandatory else "disabled"
            self.next_run = now + timedelta(hours=1) if self.mandatory else None
        else:
            self.status, self.next_run = "idle", now + BACKOFF[self.streak]
        return True


# One step: move the clock, a worker tries to claim, then that worker (or, sometimes, the other
# one) succeeds, fails or does nothing (it died: its lease will expire).
steps = st.lists(
    st.tuples(
        # seconds to move the clock, or "due": to the moment the model says the task is due
        st.sampled_from(["due", "due", "due", 0, 30, 61, 299, 300, 301, 900, 3600]),
        st.sampled_from(["w1", "w2"]),
        st.sampled_from(["ok", "ok-backlog", "transient", "hard", "hard", "hard", "die"]),
        st.sampled_from(["same", "same", "same", "other"]),
        st.integers(0, 50),
    ),
    max_size=15,
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mandatory=st.booleans(), steps=steps)
def test_task_life_cycle_matches_the_model(conn, mandatory: bool, steps: list[tuple]) -> None:
    conn.execute("DELETE FROM data_agg_state")
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, is_mandatory,"
        " run_interval_minutes, aggregation_delay_seconds) VALUES ('M', '5m', '1m', %s, 5, 30)",
        (mandatory,),
    )
    model, now = TaskModel(mandatory), NOW
    for wait, claimer, action, who, n in steps:
        if wait == "due":
            ends = [t for t in (model.next_run, model.lease_end) if t is not None and t > now]
            now = max(ends) if ends else now
        else:
            now = now + timedelta(seconds=wait)
        assert start(conn, "M", "5m", claimer, now=now)["claimed"] == model.claim(claimer, now), (
            claimer,
            now,
        )
        worker = claimer if who == "same" else ({"w1": "w2", "w2": "w1"}[claimer])
        if action in ("ok", "ok-backlog"):
            cursor = T0 + timedelta(minutes=5 * n)
            backlog = action == "ok-backlog"
            expected = model.succeed(worker, now, cursor, backlog)
            got = finish(
                conn, "M", "5m", True, cursor=cursor, stats={"continue": backlog}, now=now, worker=worker
            )
            assert got["changed"] == expected
        elif action in ("transient", "hard"):
            expected = model.fail(worker, now, action)
            got = finish(conn, "M", "5m", False, kind=action, error="x", now=now, worker=worker)
            assert got["changed"] == expected
        t = task(conn, "M", "5m")
        assert (
            t["status"],
            t["hard_fail_streak"],
            t["lease_owner"],
            t["next_run_at"],
            t["last_agg_bar_ts_utc"],
        ) == (
            model.status,
            model.streak,
            model.owner,
            model.next_run,
            model.cursor,
        ), (wait, claimer, action, who, now)
        assert (t["lease_expires_at"] is not None) == (t["status"] == "running")
