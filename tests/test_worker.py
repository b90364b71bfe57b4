"""The Python worker in-process: run_once end to end, failures, leases, logs, the daemon class."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from baragg import migrate, worker
from baragg.db import Database
from baragg.logs import JsonFormatter
from scheduling_helpers import T0, add_assets, add_minutes, days_ago, sql1, task, tasks_from

ALL_FLAGS = {"calc_15m": True, "calc_4h": True, "calc_1d": True}


def prepare(conn: psycopg.Connection, symbols: list[str], days: float = 1, **flags) -> None:
    add_assets(conn, symbols, **flags)
    add_minutes(conn, symbols, T0, T0 + timedelta(days=days))


def frame(conn: psycopg.Connection, sql: str, *params: object) -> pd.DataFrame:
    cur = conn.execute(sql, params)
    return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description]).set_index("ts_utc")


def derived(conn: psycopg.Connection, symbol: str, tf: str) -> pd.DataFrame:
    return frame(
        conn,
        "SELECT ts_utc, open, high, low, close, vol, vwap, trade_count, source_candles FROM derived_data_bars"
        " WHERE canonical_symbol = %s AND timeframe = %s AND deleted_at IS NULL ORDER BY ts_utc",
        symbol,
        tf,
    )


def recompute(src: pd.DataFrame, rule: str, expected: int) -> pd.DataFrame:
    """An independent statement of DESIGN.md 3 with pandas: OHLCV per bucket, kept when r >= 0.55."""
    g = src.assign(pv=src.vwap * src.vol).resample(rule, origin="epoch", label="left", closed="left")
    out = pd.DataFrame(
        {
            "open": g.open.first(),
            "high": g.high.max(),
            "low": g.low.min(),
            "close": g.close.last(),
            "vol": g.vol.sum(),
            "vwap": g.pv.sum() / g.vol.sum(),
            "trade_count": g.trade_count.sum(),
            "source_candles": g.open.count(),
        }
    )
    return out[out.source_candles / expected >= 0.55]


# ---------------------------------------------------------------------------------------------
# run_once end to end
# ---------------------------------------------------------------------------------------------
def test_run_once_leaves_every_level_at_its_frontier_equal_to_a_recomputation(db: Database, conn) -> None:
    symbols = ["AAA", "BBB", "CCC"]
    prepare(conn, symbols, days=3, **ALL_FLAGS)
    # An outage of four hours on day 2 (a gap, passed over) and one short hour (12 minutes missing).
    conn.execute(
        "DELETE FROM data_bars WHERE (ts_utc >= %s AND ts_utc < %s) OR (ts_utc >= %s AND ts_utc < %s)",
        (
            T0 + timedelta(hours=30),
            T0 + timedelta(hours=34),
            T0 + timedelta(hours=40),
            T0 + timedelta(hours=40, minutes=12),
        ),
    )
    now = T0 + timedelta(days=3, hours=6)
    summary = worker.run_once(db, now=now, max_windows=200)

    frontier = T0 + timedelta(days=3)
    for symbol in symbols:
        for tf in ("5m", "15m", "1h", "4h", "1d"):
            t = task(conn, symbol, tf)
            assert (t["status"], t["last_agg_bar_ts_utc"]) == ("idle", frontier), (symbol, tf)
            stored = sql1(
                conn,
                "SELECT count(*) FROM derived_data_bars WHERE canonical_symbol = %s AND timeframe = %s",
                symbol,
                tf,
            )
            assert t["total_bars_created"] == stored, (symbol, tf)
    assert summary.totals["hard"] == summary.totals["transient"] == 0

    minutes = frame(
        conn,
        "SELECT ts_utc, open, high, low, close, vol, vwap, trade_count FROM data_bars"
        " WHERE canonical_symbol = 'BBB' ORDER BY ts_utc",
    )
    expect = {"5m": recompute(minutes, "5min", 5)}
    five = expect["5m"].drop(columns="source_candles")
    expect["15m"] = recompute(five, "15min", 3)
    expect["1h"] = recompute(five, "1h", 12)
    hour = expect["1h"].drop(columns="source_candles")
    expect["4h"] = recompute(hour, "4h", 4)
    expect["1d"] = recompute(hour, "24h", 24)
    for tf, want in expect.items():
        got = derived(conn, "BBB", tf)
        assert list(got.index) == list(want.index), tf
        pd.testing.assert_frame_equal(
            got, want, check_dtype=False, check_freq=False, check_names=False, rtol=1e-9
        )
    assert (
        sql1(
            conn,
            "SELECT count(*) FROM derived_data_bars WHERE timeframe = '4h' AND ts_utc = %s",
            T0 + timedelta(hours=28),
        )
        == 0
    )


def test_a_second_run_at_the_same_time_does_nothing_and_new_data_is_picked_up(db: Database, conn) -> None:
    prepare(conn, ["AAA"], days=1)
    now = T0 + timedelta(days=1, hours=1)
    worker.run_once(db, now=now)
    again = worker.run_once(db, now=now)
    assert again.totals["bars_created"] == 0
    add_minutes(conn, ["AAA"], T0 + timedelta(days=1), T0 + timedelta(days=1, hours=2))
    later = worker.run_once(db, now=T0 + timedelta(days=1, hours=3))
    assert {(r.timeframe, r.bars_created) for r in later.tasks if r.bars_created} == {("5m", 24), ("1h", 2)}
    assert task(conn, "AAA", "1h")["last_agg_bar_ts_utc"] == T0 + timedelta(days=1, hours=2)


def test_one_claim_catches_a_task_up_in_many_calls(db: Database, conn) -> None:
    prepare(conn, ["AAA"], days=2)
    results: list[worker.TaskResult] = []
    worker.run_once(db, now=T0 + timedelta(days=3), max_windows=50, on_task=results.append)
    five = [r for r in results if r.timeframe == "5m"]
    assert len(five) == 1 and five[0].windows == 576 and five[0].outcome == "ok"
    t = task(conn, "AAA", "5m")
    # 576 windows: the first call takes 50 (--max-windows), later calls grow to fit the time budget
    # left (issue 15), so 2 calls on a fast machine, at most 12 (50 each) on a slow one
    assert 2 <= t["last_run_stats"]["calls"] <= 12 and t["total_runs"] == 1


def test_time_budget_gives_the_task_back_and_the_run_still_finishes(db: Database, conn) -> None:
    prepare(conn, ["AAA"], days=1)
    results: list[worker.TaskResult] = []
    worker.run_once(db, now=T0 + timedelta(days=2), max_windows=20, time_budget=1e-9, on_task=results.append)
    five = [r for r in results if r.timeframe == "5m"]
    assert len(five) == 288 // 20 + 1
    assert [r.outcome for r in five] == ["continue"] * (len(five) - 1) + ["ok"]
    assert task(conn, "AAA", "5m")["last_agg_bar_ts_utc"] == T0 + timedelta(days=1)
    assert task(conn, "AAA", "5m")["total_bars_created"] == 288


def test_symbol_and_timeframe_filters(db: Database, conn) -> None:
    prepare(conn, ["AAA", "BBB"], days=1)
    summary = worker.run_once(db, now=T0 + timedelta(days=2), symbols=["BBB"], timeframes=["5m"])
    assert {(r.symbol, r.timeframe) for r in summary.tasks} == {("BBB", "5m")}
    assert task(conn, "AAA", "5m")["last_agg_bar_ts_utc"] is None


def test_a_task_row_locked_elsewhere_is_passed_over_not_waited_for(db: Database, conn) -> None:
    prepare(conn, ["AAA", "BBB"], days=1)
    conn.execute("SELECT sync_agg_state_from_registry('prod')")
    summaries: list[worker.RunSummary] = []
    with db.connect() as holder:
        holder.execute(
            "SELECT 1 FROM data_agg_state WHERE canonical_symbol = 'BBB' AND timeframe = '5m' FOR UPDATE"
        )
        run = threading.Thread(
            target=lambda: summaries.append(worker.run_once(db, now=T0 + timedelta(days=2)))
        )
        run.start()
        run.join(30)  # about a second when nothing waits
        waited = run.is_alive()
        holder.rollback()  # lets a waiting run finish, so the thread ends either way
        run.join(60)
    assert not waited, "run_once waited for the row another transaction locked"
    assert summaries, "run_once raised (its traceback is above)"
    assert {(r.symbol, r.timeframe, r.outcome) for r in summaries[0].tasks} == {
        ("AAA", "5m", "ok"), ("AAA", "1h", "ok"), ("BBB", "1h", "ok"),
    }  # fmt: skip
    assert task(conn, "AAA", "1h")["last_agg_bar_ts_utc"] == T0 + timedelta(days=1)
    assert (task(conn, "BBB", "5m")["total_runs"], task(conn, "BBB", "1h")["total_bars_created"]) == (0, 0)
    # Once the lock is gone, the next run takes the task.
    worker.run_once(db, now=T0 + timedelta(days=2))
    bbb = task(conn, "BBB", "5m")
    assert (bbb["last_agg_bar_ts_utc"], bbb["total_bars_created"]) == (T0 + timedelta(days=1), 288)


# ---------------------------------------------------------------------------------------------
# failures through the worker (real errors raised by the database)
# ---------------------------------------------------------------------------------------------
def fail_on_insert(conn: psycopg.Connection, symbol: str, errcode: str, message: str) -> None:
    conn.execute(
        f"""
        CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.canonical_symbol = '{symbol}' THEN
                RAISE EXCEPTION '{message}' USING ERRCODE = '{errcode}';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_fail BEFORE INSERT ON derived_data_bars FOR EACH ROW EXECUTE FUNCTION test_fail();
        """
    )


def test_a_hard_failure_is_recorded_against_its_task_only_and_three_make_it_hard_failed(
    db: Database, conn
) -> None:
    prepare(conn, ["AAA", "BAD", "ZZZ"], days=1)
    fail_on_insert(conn, "BAD", "P0001", "bad data for BAD")
    now = T0 + timedelta(days=2)
    summary = worker.run_once(db, now=now)
    outcomes = {(r.symbol, r.timeframe): r.outcome for r in summary.tasks}
    assert outcomes[("BAD", "5m")] == "hard"
    assert outcomes[("AAA", "5m")] == outcomes[("ZZZ", "5m")] == "ok"
    t = task(conn, "BAD", "5m")
    assert (t["status"], t["hard_fail_streak"], t["last_agg_bar_ts_utc"]) == ("idle", 1, None)
    assert "bad data for BAD" in t["last_error"] and t["next_run_at"] == now + timedelta(minutes=5)
    assert task(conn, "AAA", "5m")["total_bars_created"] == 288
    worker.run_once(db, now=now + timedelta(minutes=5))
    worker.run_once(db, now=now + timedelta(minutes=20))
    t = task(conn, "BAD", "5m")
    assert (t["status"], t["hard_fail_streak"], t["enabled"]) == ("hard_failed", 3, True)
    conn.execute("DROP TRIGGER test_fail ON derived_data_bars")
    worker.run_once(db, now=now + timedelta(minutes=80))
    t = task(conn, "BAD", "5m")
    assert (t["status"], t["hard_fail_streak"], t["total_bars_created"]) == ("idle", 0, 288)


def test_a_serialization_failure_is_transient(db: Database, conn) -> None:
    prepare(conn, ["AAA"], days=1)
    fail_on_insert(conn, "AAA", "40001", "could not serialize")
    now = T0 + timedelta(days=2)
    summary = worker.run_once(db, now=now, timeframes=["5m"])
    assert [r.outcome for r in summary.tasks] == ["transient"]
    t = task(conn, "AAA", "5m")
    assert (t["status"], t["hard_fail_streak"], t["total_transient_failures"]) == ("idle", 0, 1)
    assert t["next_run_at"] == now + timedelta(minutes=1) and "could not serialize" in t["last_error"]


def test_a_lost_lease_writes_nothing_and_costs_only_its_own_task(db: Database, conn) -> None:
    """While the worker aggregates, another claimer takes one task: that task's bars roll back, the
    batch is retried task by task, and the other task is stored."""
    prepare(conn, ["AAA", "BBB"], days=1)
    conn.execute(
        """
        CREATE FUNCTION test_steal() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- (qualified: a trigger fired by baragg's functions runs with their search_path, '')
            UPDATE public.data_agg_state SET lease_owner = 'thief' WHERE canonical_symbol = 'BBB' AND timeframe = '5m';
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_steal AFTER INSERT ON derived_data_bars FOR EACH STATEMENT
        EXECUTE FUNCTION test_steal();
        """
    )
    summary = worker.run_once(db, now=T0 + timedelta(days=2), timeframes=["5m"])
    results = {r.symbol: r for r in summary.tasks}
    assert (results["AAA"].outcome, results["AAA"].bars_created) == ("ok", 288)
    assert (results["BBB"].outcome, results["BBB"].bars_created) == ("lease_lost", 0)
    assert "not held by" in results["BBB"].error
    counts = dict(
        conn.execute("SELECT canonical_symbol, count(*) FROM derived_data_bars GROUP BY 1").fetchall()
    )
    assert counts == {"AAA": 288}
    t = task(conn, "BBB", "5m")
    assert (t["last_agg_bar_ts_utc"], t["total_bars_created"], t["lease_owner"]) == (None, 0, "thief")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), "transient"),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), "transient"),
        (psycopg.errors.SerializationFailure("could not serialize access"), "transient"),
        (psycopg.errors.DeadlockDetected("deadlock detected"), "transient"),
        (psycopg.InterfaceError("the connection is closed"), "transient"),
        (TimeoutError(), "transient"),
        (psycopg.errors.ProgramLimitExceeded("statement too complex"), "hard"),
        (psycopg.errors.RaiseException("bad"), "hard"),
        (psycopg.errors.UniqueViolation("dup"), "hard"),
        (ValueError("x"), "hard"),
    ],
)
def test_classify(error: BaseException, kind: str) -> None:
    assert worker.classify(error) == kind


# ---------------------------------------------------------------------------------------------
# logs, environment
# ---------------------------------------------------------------------------------------------
def test_one_structured_log_event_per_task_run(db: Database, conn, caplog) -> None:
    prepare(conn, ["AAA"], days=1)
    caplog.set_level(logging.INFO, logger="baragg")
    worker.run_once(db, now=T0 + timedelta(days=2))
    runs = [r for r in caplog.records if getattr(r, "event", None) == "task_run"]
    assert [(r.symbol, r.timeframe) for r in runs] == [("AAA", "5m"), ("AAA", "1h")]
    five = runs[0]
    assert (five.windows, five.bars_created, five.bars_quality_poor, five.bars_skipped, five.outcome) == (
        288,
        288,
        0,
        0,
        "ok",
    )
    assert five.cursor_after == T0 + timedelta(days=1) and five.seconds >= 0
    assert "AAA 5m ok: 288 windows, 288 bars" in five.getMessage()
    line = json.loads(JsonFormatter().format(five))
    assert line["event"] == "task_run" and line["bars_created"] == 288 and line["symbol"] == "AAA"
    assert line["cursor_after"] == "2026-01-06T00:00:00+00:00" and line["message"] == five.getMessage()


def test_environment_name_resolution(monkeypatch) -> None:
    monkeypatch.delenv("BARAGG_ENV", raising=False)
    monkeypatch.delenv("DISTORT_ENV", raising=False)
    assert worker.resolve_env(None) == "prod"
    monkeypatch.setenv("DISTORT_ENV", "staging")
    assert worker.resolve_env(None) == "staging"
    monkeypatch.setenv("BARAGG_ENV", "dev")
    assert worker.resolve_env(None) == "dev"
    assert worker.resolve_env("prod") == "prod"


def test_run_once_in_a_test_environment_uses_test_active(db: Database, conn) -> None:
    add_assets(conn, ["LIVE"], active=True, test_active=False)
    add_assets(conn, ["TRIAL"], active=False, test_active=True)
    summary = worker.run_once(db, env="dev", now=T0)
    assert {r.symbol for r in summary.tasks} == {"TRIAL"}


# ---------------------------------------------------------------------------------------------
# the daemon class (signals are tested through the CLI)
# ---------------------------------------------------------------------------------------------
def prepare_for_the_daemon(conn: psycopg.Connection, symbols: list[str]) -> datetime:
    """A day of data that ended a day ago, tasks starting there: final on the daemon's real clock."""
    start = days_ago(2)
    add_assets(conn, symbols)
    add_minutes(conn, symbols, start, start + timedelta(days=1))
    tasks_from(conn, start)
    return start


def test_worker_daemon_runs_due_tasks_and_stops_cleanly(db: Database, conn) -> None:
    start = prepare_for_the_daemon(conn, ["AAA", "BBB", "CCC"])
    seen: list[worker.TaskResult] = []
    daemon = worker.Worker(db, interval=0.2, concurrency=2, on_task=seen.append)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = sql1(
                conn,
                "SELECT count(*) FROM data_agg_state WHERE status = 'idle' AND last_agg_bar_ts_utc = %s",
                start + timedelta(days=1),
            )
            if done == 6:
                break
            time.sleep(0.1)
        assert done == 6, f"{done} of 6 tasks at their frontier after 60 s"
    finally:
        daemon.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert sql1(conn, "SELECT count(*) FROM data_agg_state WHERE status = 'running'") == 0
    assert sql1(conn, "SELECT sum(total_bars_created) FROM data_agg_state") == sql1(
        conn, "SELECT count(*) FROM derived_data_bars"
    )
    assert {r.outcome for r in seen} <= {"ok", "continue"}


# ---------------------------------------------------------------------------------------------
# the seed's production database, upgraded
# ---------------------------------------------------------------------------------------------
def test_run_once_on_an_upgraded_seed_database(empty_db: Database) -> None:
    with empty_db.connect(autocommit=True) as conn:
        conn.execute((Path(__file__).parent / "fixtures" / "seed_production.sql").read_text())
    migrate.upgrade(empty_db)
    summary = worker.run_once(empty_db, now=datetime(2026, 1, 13, 12, 5, tzinfo=UTC))
    assert summary.totals["hard"] == summary.totals["transient"] == 0
    with empty_db.connect(autocommit=True) as conn:
        assert conn.execute("SELECT DISTINCT status FROM data_agg_state").fetchall() == [("idle",)]
        noon = datetime(2026, 1, 13, 12, 0, tzinfo=UTC)
        eur = task(conn, "EURUSD", "5m")
        assert eur["last_agg_bar_ts_utc"] == noon and eur["total_bars_created"] == 2 + 22
        # The seed's cursor (10:10) is respected: the two bars before it are not rewritten.
        assert (
            sql1(
                conn,
                "SELECT count(*) FROM derived_data_bars WHERE canonical_symbol = 'EURUSD' AND timeframe = '5m'"
                " AND deleted_at IS NULL AND updated_at = '2026-01-13 10:06+00'",
            )
            == 1
        )
        # USDJPY 5m was left 'running' by the seed's worker, without a lease: rescued.
        jpy = task(conn, "USDJPY", "5m")
        assert jpy["total_rescues"] == 1 and jpy["last_agg_bar_ts_utc"] == noon
        # DXY 5m had no cursor: bootstrapped from its data.
        assert task(conn, "DXY", "5m")["total_bars_created"] == 12
        assert task(conn, "DXY", "1h")["total_bars_created"] == 1
        assert task(conn, "XAUUSD", "5m")["status"] == "idle"  # created by the sync


def test_worker_daemon_wakes_when_a_task_becomes_due_before_the_interval_ends(db: Database, conn) -> None:
    add_assets(conn, ["AAA"])
    conn.execute("SELECT sync_agg_state_from_registry('prod')")
    conn.execute("UPDATE data_agg_state SET next_run_at = now() + interval '1 day' WHERE timeframe = '1h'")
    conn.execute(
        "UPDATE data_agg_state SET next_run_at = now() + interval '2 seconds' WHERE timeframe = '5m'"
    )
    daemon = worker.Worker(db, interval=600)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and task(conn, "AAA", "5m")["total_runs"] == 0:
            time.sleep(0.1)
        assert task(conn, "AAA", "5m")["total_runs"] == 1, "not woken by next_run_at"
    finally:
        daemon.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_worker_daemon_cancels_a_statement_that_outlasts_the_shutdown_timeout(db: Database, conn) -> None:
    prepare_for_the_daemon(conn, ["AAA"])
    conn.execute(
        """
        CREATE FUNCTION test_hang() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$;
        CREATE TRIGGER test_hang AFTER INSERT ON derived_data_bars FOR EACH STATEMENT
        EXECUTE FUNCTION test_hang();
        """
    )
    daemon = worker.Worker(db, interval=0.2, shutdown_timeout=0.5)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not sql1(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%agg_catchup_tasks%%' AND pid <> pg_backend_pid()",
        ):
            assert time.monotonic() < deadline, "the daemon never started a catch-up"
            time.sleep(0.05)
        daemon.stop()
        thread.join(30)
    finally:
        daemon.stop()
        thread.join(30)
    assert not thread.is_alive()
    t = task(conn, "AAA", "5m")
    assert (t["status"], t["total_transient_failures"], t["total_bars_created"]) == ("idle", 1, 0)
    assert "canceling statement" in t["last_error"]
