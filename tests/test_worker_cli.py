"""`baragg run --once` and `baragg worker` as real processes: many at once, killed, stopped by signal."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import timedelta

import psycopg
import pytest

from baragg import migrate
from baragg.db import Database
from scheduling_helpers import (
    T0,
    add_assets,
    add_minutes,
    days_ago,
    iso,
    popen_cli,
    run_cli,
    sql1,
    task,
    tasks_from,
)

pytestmark = pytest.mark.slow

DERIVED = (
    "SELECT canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, source_candles,"
    " expected_candles, quality_score FROM derived_data_bars ORDER BY 1, 2, 3"
)
STATE = (
    "SELECT canonical_symbol, timeframe, status, last_agg_bar_ts_utc, total_bars_created FROM data_agg_state"
    " ORDER BY 1, 2"
)


def wait_for(
    conn: psycopg.Connection,
    sql: str,
    *params: object,
    proc: subprocess.Popen | None = None,
    timeout: float = 60,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sql1(conn, sql, *params):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {sql}")


def assert_exactly_once(conn: psycopg.Connection) -> None:
    """Every stored bar was written once: counters equal rows, and no row was ever overwritten."""
    per_task = conn.execute(
        "SELECT s.canonical_symbol, s.timeframe, s.total_bars_created,"
        " (SELECT count(*) FROM derived_data_bars d WHERE d.canonical_symbol = s.canonical_symbol"
        "  AND d.timeframe = s.timeframe) FROM data_agg_state s ORDER BY 1, 2"
    ).fetchall()
    assert [r for r in per_task if r[2] != r[3]] == []
    assert sql1(conn, "SELECT count(*) FROM derived_data_bars WHERE updated_at <> created_at") == 0


# ---------------------------------------------------------------------------------------------
# (a) four run --once processes at once
# ---------------------------------------------------------------------------------------------
def test_four_run_once_processes_aggregate_every_window_exactly_once(db: Database, conn) -> None:
    symbols = [f"SYM{i:02d}" for i in range(40)]
    add_assets(conn, symbols, calc_15m=True, calc_4h=True)
    add_minutes(conn, symbols, T0, T0 + timedelta(days=2))
    now = iso(T0 + timedelta(days=2, hours=1))
    procs = [
        popen_cli("run", "--once", "--now", now, "--batch-size", "7", "--max-windows", "100", url=db.url)
        for _ in range(4)
    ]
    try:
        outs = [p.communicate(timeout=200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-2000:] for o in outs]

    assert sql1(conn, "SELECT count(*) FROM data_agg_state") == 40 * 4
    assert conn.execute("SELECT DISTINCT status FROM data_agg_state").fetchall() == [("idle",)]
    assert (
        sql1(
            conn,
            "SELECT count(*) FROM data_agg_state WHERE last_agg_bar_ts_utc <> %s",
            T0 + timedelta(days=2),
        )
        == 0
    )
    assert_exactly_once(conn)
    expected = {"5m": 576, "15m": 192, "1h": 48, "4h": 12}
    counts = dict(
        conn.execute("SELECT timeframe, count(*) / 40 FROM derived_data_bars GROUP BY 1").fetchall()
    )
    assert counts == expected
    # The work was shared: more than one process ran tasks.
    ran = [int(o[0].split()[0]) for o in outs]
    assert sum(ran) >= 160 and sum(1 for n in ran if n) >= 2, ran


# ---------------------------------------------------------------------------------------------
# (b) kill -9 in the middle of a long catch-up
# ---------------------------------------------------------------------------------------------
def fresh_database(empty_db: Database) -> Database:
    migrate.upgrade(empty_db)
    return empty_db


def test_a_killed_worker_task_is_taken_over_at_once_and_the_result_equals_an_undisturbed_run(
    db: Database, conn, empty_db: Database
) -> None:
    add_assets(conn, ["AAA"], calc_15m=True)
    add_minutes(conn, ["AAA"], T0, T0 + timedelta(days=3))
    now = T0 + timedelta(days=3, hours=1)
    slow = {"BARAGG_TEST_PAUSE_BETWEEN_CALLS": "0.5"}
    victim = popen_cli(
        "run",
        "--once",
        "--now",
        iso(now),
        "--lease-seconds",
        "60",
        "--time-budget",
        "30",
        "--max-windows",
        "40",
        url=db.url,
        env=slow,
    )
    try:
        # Frozen once it has committed some progress on the 5m task (864 windows, 22 calls).
        wait_for(
            conn,
            "SELECT status = 'running' AND last_agg_bar_ts_utc > %s FROM data_agg_state"
            " WHERE canonical_symbol = 'AAA' AND timeframe = '5m'",
            T0 + timedelta(hours=4),
            proc=victim,
        )
        victim.send_signal(signal.SIGSTOP)
        held = task(conn, "AAA", "5m")
        assert held["status"] == "running" and held["last_agg_bar_ts_utc"] < T0 + timedelta(days=3)
        assert held["lease_session"] is not None and held["lease_backend_pid"] is not None

        # A stalled worker whose session is alive keeps its task for the whole lease.
        before = run_cli("run", "--once", "--now", iso(now + timedelta(seconds=59)), url=db.url)
        assert before.returncode == 0, before.stderr
        assert task(conn, "AAA", "5m")["lease_owner"] == held["lease_owner"]
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    # Its session ends with the process (the server notices the closed socket).
    wait_for(
        conn, "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)", held["lease_backend_pid"]
    )

    # The next run takes the task over at once, well inside the lease, and says why.
    after = run_cli("run", "--once", "--now", iso(now), url=db.url)
    assert after.returncode == 0, after.stderr
    rescued = task(conn, "AAA", "5m")
    assert rescued["status"] == "idle" and rescued["total_rescues"] == 1
    assert rescued["last_rescue"].startswith(
        f"the database session of worker {held['lease_owner']} (backend pid {held['lease_backend_pid']}) ended"
    )
    assert "taken over: the database session of worker" in after.stderr
    assert rescued["lease_session"] is None

    # An undisturbed run over the same data gives the same bars and the same task state.
    calm = fresh_database(empty_db)
    with calm.connect(autocommit=True) as other:
        add_assets(other, ["AAA"], calc_15m=True)
        add_minutes(other, ["AAA"], T0, T0 + timedelta(days=3))
        clean = run_cli("run", "--once", "--now", iso(now + timedelta(seconds=61)), url=calm.url)
        assert clean.returncode == 0, clean.stderr
        assert conn.execute(DERIVED).fetchall() == other.execute(DERIVED).fetchall()
        assert conn.execute(STATE).fetchall() == other.execute(STATE).fetchall()
    assert_exactly_once(conn)


# ---------------------------------------------------------------------------------------------
# (f) SIGTERM to the daemon
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_daemon_cleanly(db: Database, conn, sig: signal.Signals) -> None:
    # The daemon runs on the real clock: a day of data that ended a day ago is final.
    start = days_ago(2)
    add_assets(conn, ["AAA", "BBB"])
    add_minutes(conn, ["AAA", "BBB"], start, start + timedelta(days=1))
    tasks_from(conn, start)
    daemon = popen_cli(
        "worker",
        "--interval",
        "0.5",
        "--concurrency",
        "2",
        "--batch-size",
        "1",
        "--max-windows",
        "20",
        url=db.url,
        env={"BARAGG_TEST_PAUSE_BETWEEN_CALLS": "0.3"},
    )
    try:
        wait_for(
            conn,
            "SELECT count(*) > 0 FROM data_agg_state WHERE status = 'running' AND last_agg_bar_ts_utc IS NOT NULL",
            proc=daemon,
        )
        daemon.send_signal(sig)
        _, stderr = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    assert daemon.returncode == 0, stderr
    assert sql1(conn, "SELECT count(*) FROM data_agg_state WHERE status = 'running'") == 0
    assert sql1(conn, "SELECT count(*) FROM data_agg_state WHERE lease_owner IS NOT NULL") == 0
    assert "stopping" in stderr and "worker stopped" in stderr
    assert_exactly_once(conn)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_bad_now_is_exit_2_with_one_line(db: Database) -> None:
    result = run_cli("run", "--once", "--now", "yesterday", url=db.url)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not an ISO-8601 time" in result.stderr


def test_run_without_once_is_a_usage_error(db: Database) -> None:
    result = run_cli("run", url=db.url)
    assert result.returncode == 2 and "--once" in result.stderr


def test_log_json_prints_one_json_event_per_task_run(db: Database, conn) -> None:
    add_assets(conn, ["AAA"])
    add_minutes(conn, ["AAA"], T0, T0 + timedelta(hours=2))
    result = run_cli("run", "--once", "--now", "2026-01-05T03:00:00", "--log-json", url=db.url)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    runs = [e for e in events if e.get("event") == "task_run"]
    assert [(e["symbol"], e["timeframe"], e["bars_created"]) for e in runs] == [
        ("AAA", "5m", 24),
        ("AAA", "1h", 2),
    ]
    assert runs[0]["cursor_after"] == "2026-01-05T02:00:00+00:00" and runs[0]["outcome"] == "ok"
    assert result.stdout.startswith("2 task runs, 26 windows, 26 bars created")


def test_now_without_offset_is_utc_and_distort_env_selects_the_environment(db: Database, conn) -> None:
    add_assets(conn, ["LIVE"], active=True, test_active=False)
    add_assets(conn, ["TRIAL"], active=False, test_active=True)
    add_minutes(conn, ["LIVE", "TRIAL"], T0, T0 + timedelta(hours=1))
    result = run_cli("run", "--once", "--now", "2026-01-05T00:30", url=db.url, env={"DISTORT_ENV": "dev"})
    assert result.returncode == 0, result.stderr
    assert {r[0] for r in conn.execute("SELECT canonical_symbol FROM data_agg_state WHERE enabled")} == {
        "TRIAL"
    }
    # 00:30 UTC: the windows up to 00:25 are final (30 s delay), so 5 bars exist.
    assert sql1(conn, "SELECT count(*) FROM derived_data_bars WHERE timeframe = '5m'") == 5


def test_run_on_a_database_without_the_schema_says_to_upgrade(empty_db: Database) -> None:
    result = run_cli("run", "--once", url=empty_db.url)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "baragg db upgrade" in result.stderr


def test_a_time_budget_longer_than_the_lease_is_refused(db: Database) -> None:
    result = run_cli("run", "--once", "--lease-seconds", "30", "--time-budget", "60", url=db.url)
    assert result.returncode == 2 and "must be shorter than --lease-seconds" in result.stderr
