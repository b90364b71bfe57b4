"""pg_cron mode (DESIGN.md 10b): the worker round in SQL (functions/40_round.sql) and `baragg db
schedule`, on a real PostgreSQL (Debian's 15 on these machines) with Debian's pg_cron, in a cluster the
tests start and stop (tests/pg_cluster.py; skipped, with the reason, where the binaries or the extension
are missing).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql as pg_sql

import pg_cluster
from baragg import cli, migrate, pgcron, worker
from baragg.db import Database
from baragg.web import api
from conftest import url_for
from scheduling_helpers import add_assets, add_minutes

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
NOW = T0 + timedelta(days=9, hours=3, minutes=7)  # over a weekend, mid-window


CRON_SETTINGS = {
    "shared_preload_libraries": "pg_cron",
    "cron.database_name": "postgres",
    "cron.host": "127.0.0.1",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[pg_cluster.Cluster]:
    reason = pg_cluster.pg_cron_unavailable_reason()
    if reason:
        pytest.skip(reason)
    running = pg_cluster.Cluster(settings=CRON_SETTINGS)
    try:
        with psycopg.connect(running.url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
            conn.execute("CREATE DATABASE baragg_tpl")
        migrate.upgrade(Database(running.url))  # the cron database holds baragg too (as on Supabase)
        migrate.upgrade(Database(url_for(running.url, "baragg_tpl")))
        yield running
    finally:
        running.destroy()


def fresh(cluster: pg_cluster.Cluster) -> Database:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute(pg_sql.SQL("CREATE DATABASE {} TEMPLATE baragg_tpl").format(pg_sql.Identifier(name)))
    return Database(url_for(cluster.url, name))


def log_tail(cluster: pg_cluster.Cluster, lines: int = 40) -> str:
    log = cluster.root / "server.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def load(db: Database, symbols: int = 3) -> None:
    """Symbols with every optional timeframe, nine days of 1m bars with holes (weekend, missing minutes)."""
    names = [f"S{i:02d}" for i in range(symbols)]
    with db.connect(autocommit=True) as conn:
        add_assets(conn, names, calc_15m=True, calc_4h=True, calc_1d=True, calc_1w=True)
        add_minutes(conn, names, T0, T0 + timedelta(days=5))
        add_minutes(conn, names, T0 + timedelta(days=7), NOW)
        conn.execute("DELETE FROM data_bars WHERE extract(minute FROM ts_utc)::int % 7 = 3")
        conn.execute("SELECT sync_agg_state_from_registry('prod', %s)", (T0,))
        conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (T0,))


def round_sql(db: Database, **kw: Any) -> str:
    """The round's text, as baragg_round_command writes it for cron."""
    with db.connect(autocommit=True) as conn:
        return conn.execute(
            "SELECT baragg_round_command(%(env)s, %(budget)s, %(max_windows)s, 500, 300, %(now)s)",
            {"env": "prod", "budget": 600, "max_windows": 2000, "now": NOW, **kw},
        ).fetchone()[0]


def run_round(db: Database, **kw: Any) -> None:
    command = round_sql(db, **kw)
    with db.connect(autocommit=True) as conn:
        conn.execute(command)


def bars(db: Database) -> list[tuple]:
    with db.connect(autocommit=True) as conn:
        return conn.execute(
            "SELECT canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,"
            " source_candles, expected_candles, quality_score, deleted_at IS NOT NULL"
            " FROM derived_data_bars ORDER BY 1, 2, 3, 14"
        ).fetchall()


def counters(db: Database) -> list[tuple]:
    with db.connect(autocommit=True) as conn:
        return conn.execute(
            "SELECT canonical_symbol, timeframe, status, last_agg_bar_ts_utc, enabled, hard_fail_streak,"
            " total_windows_processed, total_bars_created, total_bars_quality_poor, total_bars_skipped,"
            " total_gaps_skipped, total_bars_reaggregated, total_bars_withdrawn, total_bars_rewritten,"
            " total_bars_unchanged, lease_owner, next_run_at, lease_session IS NULL"
            " FROM data_agg_state ORDER BY 1, 2"
        ).fetchall()


def correct_late(db: Database) -> None:
    """Late data behind the cursors: a changed minute, a removed minute, a new one."""
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "UPDATE data_bars SET high = high + 5 WHERE canonical_symbol = 'S00' AND ts_utc = %s",
            (T0 + timedelta(hours=2, minutes=1),),
        )
        conn.execute(
            "DELETE FROM data_bars WHERE canonical_symbol = 'S01' AND ts_utc = %s", (T0 + timedelta(hours=5),)
        )
        conn.execute(
            "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source)"
            " VALUES ('S02', '1m', %s, 1, 2, 0.5, 1.5, 4, 'late')",
            (T0 + timedelta(days=1, minutes=3),),
        )


# ---------------------------------------------------------------------------------------------
# the round alone
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_windows", [2000, 37])
def test_the_round_builds_what_run_once_builds(cluster: pg_cluster.Cluster, max_windows: int) -> None:
    """Same bars and counters from the SQL round as from `baragg run --once`, also across late data
    (re-aggregation) and with small transactions (checkpoints, several calls per claim)."""
    python, sql = fresh(cluster), fresh(cluster)
    for db in (python, sql):
        load(db)
    worker.run_once(python, now=NOW, max_windows=max_windows)
    run_round(sql, max_windows=max_windows)
    assert len(bars(sql)) > 3 * 9 * 24 * 12 * 0.5
    assert bars(sql) == bars(python)
    assert counters(sql) == counters(python)

    for db in (python, sql):
        correct_late(db)
    worker.run_once(python, now=NOW, max_windows=max_windows)
    run_round(sql, max_windows=max_windows)
    assert bars(sql) == bars(python)
    assert counters(sql) == counters(python)
    with sql.connect(autocommit=True) as conn:
        assert conn.execute("SELECT sum(total_bars_reaggregated) FROM data_agg_state").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM agg_invalidations").fetchone()[0] == 0


def test_the_round_reports_its_totals(cluster: pg_cluster.Cluster) -> None:
    db = fresh(cluster)
    load(db, symbols=2)
    with db.connect(autocommit=True) as conn:
        state = conn.execute("SELECT baragg_round_start('prod', 60, 500, 500, 300, %s)", (NOW,)).fetchone()[0]
        steps = 0
        while state["phase"] != "done" and steps < 1000:
            state = conn.execute(
                "SELECT baragg_round_step(%s)", (psycopg.types.json.Jsonb(state),)
            ).fetchone()[0]
            steps += 1
        created = conn.execute("SELECT sum(total_bars_created) FROM data_agg_state").fetchone()[0]
    assert state["phase"] == "done"
    totals = state["totals"]
    assert totals["bars_created"] == created > 0
    assert totals["hard"] == totals["transient"] == totals["lease_lost"] == 0
    assert totals["task_runs"] == totals["ok"] + totals["continue"] >= 2 * 6


BOOM = """
CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE canonical_symbol = 'S01') THEN
        RAISE EXCEPTION 'boom: S01 may not be written';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER boom AFTER INSERT ON derived_data_bars REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION boom();
"""


def test_a_failing_task_is_recorded_and_the_others_go_on(cluster: pg_cluster.Cluster) -> None:
    """One symbol's writes fail: its batch is retried task by task, as the worker does; the failure is
    a hard strike against that task alone, and the others are built."""
    python, sql = fresh(cluster), fresh(cluster)
    for db in (python, sql):
        load(db)
        with db.connect(autocommit=True) as conn:
            conn.execute(BOOM)
    worker.run_once(python, now=NOW)
    run_round(sql)
    assert counters(sql) == counters(python)
    assert bars(sql) == bars(python)
    with sql.connect(autocommit=True) as conn:
        failed = conn.execute(
            "SELECT canonical_symbol, timeframe, hard_fail_streak, last_error FROM data_agg_state"
            " WHERE hard_fail_streak > 0"
        ).fetchall()
        built = conn.execute("SELECT count(DISTINCT canonical_symbol) FROM derived_data_bars").fetchone()[0]
    assert [(s, tf, n) for s, tf, n, _ in failed] == [("S01", "5m", 1)]
    assert "boom: S01 may not be written" in failed[0][3]
    assert built == 2


# ---------------------------------------------------------------------------------------------
# beside each other: two rounds and a Python worker at once
# ---------------------------------------------------------------------------------------------
def test_two_rounds_and_a_python_worker_do_nothing_twice(cluster: pg_cluster.Cluster) -> None:
    reference, shared = fresh(cluster), fresh(cluster)
    for db in (reference, shared):
        load(db, symbols=12)
    worker.run_once(reference, now=NOW, max_windows=60)

    errors: list[BaseException] = []

    def guarded(target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        return run

    threads = [
        threading.Thread(target=guarded(lambda: run_round(shared, max_windows=60))),
        threading.Thread(target=guarded(lambda: run_round(shared, max_windows=60))),
        threading.Thread(
            target=guarded(lambda: worker.run_once(shared, now=NOW, max_windows=60, batch_size=5))
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    # Whatever was still due when each of them stopped looking (held by another at that moment):
    worker.run_once(shared, now=NOW, max_windows=60)
    assert bars(shared) == bars(reference)
    assert counters(shared) == counters(reference)
    # Which of the three did which task is up to the scheduler (on a busy machine one of them can
    # claim everything before the others start), so it is not asserted: the property is that the
    # bars and counters equal one worker's alone, whoever did the work.


# ---------------------------------------------------------------------------------------------
# baragg db schedule / unschedule, and pg_cron running the round
# ---------------------------------------------------------------------------------------------
def main(url: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["--database-url", url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_schedule_is_idempotent_and_unschedule_removes_it(
    cluster: pg_cluster.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    url = cluster.url
    code, out, err = main(url, "db", "schedule", capsys=capsys)
    assert code == 0, err
    assert out.startswith("pg_cron job baragg (jobid ")
    first = pgcron.job_status(Database(url))
    assert first is not None and first.schedule == "* * * * *" and first.env == "prod"
    code, _, err = main(url, "db", "schedule", "--every", "5 minutes", "--env", "staging", capsys=capsys)
    assert code == 0, err
    second = pgcron.job_status(Database(url))
    assert second is not None
    assert (second.jobid, second.schedule, second.env) == (first.jobid, "*/5 * * * *", "staging")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM cron.job WHERE jobname = 'baragg'").fetchone()[0] == 1
    assert main(url, "db", "unschedule", capsys=capsys)[1].strip() == "removed pg_cron job baragg"
    assert main(url, "db", "unschedule", capsys=capsys)[1].strip() == "no pg_cron job baragg"
    assert pgcron.job_status(Database(url)) is None
    code, _, err = main(url, "db", "schedule", "--every", "90 minutes", capsys=capsys)
    assert code == 2 and err.count("\n") == 1


def test_schedule_without_pg_cron_says_what_to_do(
    cluster: pg_cluster.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    db = fresh(cluster)  # pg_cron lives in the postgres database only
    code, _, err = main(db.url, "db", "schedule", capsys=capsys)
    assert code == 1
    assert err.startswith(
        "baragg: error: pg_cron is not installed in this database: CREATE EXTENSION pg_cron"
    )
    assert err.count("\n") == 1
    code, out, _ = main(db.url, "status", capsys=capsys)
    assert code == 0 and "pg_cron" not in out


def test_pg_cron_runs_the_round(cluster: pg_cluster.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    """The job fires at the next minute (waited for, at most ~75 s), runs a whole round, and `status`
    shows its runs and failures."""
    url = cluster.url
    db = Database(url)
    start = datetime(2020, 3, 2, tzinfo=UTC)  # long past: every window is final under the real clock
    with db.connect(autocommit=True) as conn:
        add_assets(conn, ["CRON"], calc_4h=True)
        add_minutes(conn, ["CRON"], start, start + timedelta(days=2))
        conn.execute("SELECT sync_agg_state_from_registry('prod')")
        conn.execute("UPDATE data_agg_state SET agg_start_utc = %s WHERE canonical_symbol = 'CRON'", (start,))
    assert main(url, "db", "schedule", capsys=capsys)[0] == 0
    try:
        deadline = time.monotonic() + 75
        job = None
        while time.monotonic() < deadline:
            job = pgcron.job_status(db)
            if job and any(r.status in ("succeeded", "failed") for r in job.runs):
                break
            time.sleep(1)
        assert job is not None and job.runs, f"pg_cron did not run the job in 75 s:\n{log_tail(cluster)}"
        assert job.runs[0].status == "succeeded", job.runs[0].message
        with db.connect(autocommit=True) as conn:
            built = dict(
                conn.execute(
                    "SELECT timeframe, count(*) FROM derived_data_bars WHERE canonical_symbol = 'CRON' GROUP BY 1"
                ).fetchall()
            )
            # pg_cron records a failure like this one (a round that raised):
            conn.execute(
                "INSERT INTO cron.job_run_details (jobid, runid, database, username, command, status,"
                " return_message, start_time, end_time)"
                " SELECT jobid, nextval('cron.runid_seq'), database, username, command, 'failed',"
                " 'ERROR:  canceling statement due to statement timeout', now(), now()"
                " FROM cron.job WHERE jobname = 'baragg'"
            )
        assert built == {"5m": 2 * 288, "1h": 48, "4h": 12}
        code, out, _ = main(url, "status", capsys=capsys)
        assert code == 0
        assert "pg_cron job baragg (* * * * *, env prod, as postgres, active)" in out
        with psycopg.connect(url) as conn:
            page = api.cron(conn)["job"]  # what the status page shows
        assert (page["schedule"], page["env"], page["runs"][0]["status"]) == ("* * * * *", "prod", "failed")
        assert page["runs"][1]["status"] == "succeeded" and page["runs"][1]["start_time"].endswith("Z")
        assert "succeeded" in out
        assert "failed" in out and "statement timeout" in out
    finally:
        main(url, "db", "unschedule", capsys=capsys)


def test_schedule_stores_session_days_years_ahead_and_status_warns_when_they_run_short(
    cluster: pg_cluster.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """The round runs in SQL and cannot compute trading days (exchange calendars are Python): a
    session symbol run only by pg_cron would stop at the end of the stored days, silently."""
    url = cluster.url
    assert main(url, "session", "add", "CRONFX", "--tz", "America/New_York", "--open", "17:00",
                "--days", "sun-fri", capsys=capsys)[0] == 0  # fmt: skip
    assert main(url, "registry", "add", "CRONGBP", "--session", "CRONFX", capsys=capsys)[0] == 0
    try:
        assert main(url, "db", "schedule", capsys=capsys)[0] == 0
        today = datetime.now(UTC).date()
        with psycopg.connect(url) as conn:
            (days_to,) = conn.execute("SELECT days_to FROM agg_sessions WHERE name = 'CRONFX'").fetchone()
        assert days_to >= today + timedelta(days=4 * 365)
        code, out, _ = main(url, "status", capsys=capsys)
        assert code == 0 and "CRONFX" not in out
        with psycopg.connect(url) as conn:
            conn.execute(
                "UPDATE agg_sessions SET days_to = %s WHERE name = 'CRONFX'", (today + timedelta(days=10),)
            )
        code, out, _ = main(url, "status", capsys=capsys)
        assert code == 0
        assert f"session CRONFX: trading days stored only to {today + timedelta(days=10)}" in out
        assert "`baragg db schedule` again" in out
    finally:
        main(url, "db", "unschedule", capsys=capsys)
        with psycopg.connect(url) as conn:
            conn.execute("DELETE FROM data_agg_state WHERE canonical_symbol = 'CRONGBP'")
            conn.execute("DELETE FROM core_asset_registry_all WHERE canonical_symbol = 'CRONGBP'")
