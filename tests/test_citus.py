"""baragg on a real Citus cluster (DESIGN.md 11, issue 15): a coordinator and two workers on one
machine (tests/citus_cluster.py; skipped with the reason where Citus is not installed).

After `db upgrade` + `db distribute`, the CLI's registry, ingest and run build the same bars as on
plain PostgreSQL (the embedded test server), verify agrees, several workers at once build every bar
once, a worker killed with SIGKILL mid-run is taken over, and late data rewrites the bars. Symbols on a
trading session (an XNYS equity, FX on 17:00 New York) and the 1mo level, added to a distributed
database, build the same bars as on plain PostgreSQL, late data and a session change included.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

import citus_cluster
from baragg import registry
from baragg.db import Database
from conftest import create_database, drop_database, url_for
from scheduling_helpers import popen_cli, run_cli

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
NOW = "2024-01-02T00:10:00+00:00"  # a day of data, every window final
SYMBOLS = {"AAA": ["--calc-15m", "--calc-4h", "--calc-1d"], "BBB": ["--calc-1d"], "CCC": []}
_P = 100 + (607 % 50) / 10  # AAA at 10:07 (minute 607) in minutes.csv, as the fixture writes it
ORIGINAL_LATE_ROW = (_P, _P + 0.5, _P - 0.5, _P + 0.1, 1 + 607 % 13)
LATE = "canonical_symbol,ts_utc,open,high,low,close,vol\nAAA,2024-01-01T10:07:00+00:00,100,999,1,100,5\n"

BAR_COLUMNS = (
    "canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, source_candles,"
    " expected_candles, quality_score, deleted_at IS NOT NULL"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[citus_cluster.CitusCluster]:
    reason = citus_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    running = citus_cluster.CitusCluster(workers=2)
    try:
        yield running
    finally:
        running.destroy()


@pytest.fixture(scope="module")
def minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A day of 1m bars for three symbols, every seventh minute missing."""
    path = tmp_path_factory.mktemp("citus") / "minutes.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["canonical_symbol", "ts_utc", "open", "high", "low", "close", "vol"])
        for n, symbol in enumerate(SYMBOLS):
            for m in range(24 * 60):
                if m % 7 == 3:
                    continue
                price = 100 + n + (m % 50) / 10
                ts = (T0 + timedelta(minutes=m)).isoformat()
                out.writerow([symbol, ts, price, price + 0.5, price - 0.5, price + 0.1, 1 + m % 13])
    return path


def cli(url: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = run_cli(*args, url=url, timeout=180)
    if ok:
        assert done.returncode == 0, f"baragg {' '.join(args)}: {done.stderr[-3000:]}"
    return done


def load(url: str, minutes: Path) -> None:
    """The same registry and data through the CLI, on either kind of database."""
    for symbol, flags in SYMBOLS.items():
        cli(url, "registry", "add", symbol, "--agg-start", T0.isoformat(), *flags)
    cli(url, "ingest", str(minutes))


def bars(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT {BAR_COLUMNS} FROM derived_data_bars ORDER BY 1, 2, 3, 14").fetchall()


def sql(url: str, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def plain(
    server_url: str, template_db: str, minutes: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """The reference: the same load and runs on plain PostgreSQL (the embedded test server)."""
    name = f"baragg_t_{uuid.uuid4().hex[:12]}"
    create_database(server_url, name, template=template_db)
    url = url_for(server_url, name)
    try:
        load(url, minutes)
        cli(url, "run", "--once", "--now", NOW)
        first = bars(url)
        late = tmp_path_factory.mktemp("late") / "late.csv"
        late.write_text(LATE)
        cli(url, "ingest", str(late))
        cli(url, "run", "--once", "--now", NOW)
        yield {"bars": first, "after_late": bars(url), "late_file": late}
    finally:
        drop_database(server_url, name)


@pytest.fixture(scope="module")
def prepared(cluster: citus_cluster.CitusCluster, minutes: Path) -> str:
    """A database on the cluster, upgraded, loaded and distributed once for the module."""
    url = cluster.new_database(f"t_{uuid.uuid4().hex[:10]}")
    cli(url, "db", "upgrade")
    load(url, minutes)
    cli(url, "db", "distribute")
    return url


@pytest.fixture
def distributed(prepared: str) -> str:
    """The module's distributed database with no derived bars and every task at its start (the data,
    the registry and the distribution stay: building them is most of the cost)."""
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute("TRUNCATE derived_data_bars")
        conn.execute("TRUNCATE agg_invalidations")
        conn.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = NULL, status = 'idle', next_run_at = NULL,"
            " lease_owner = NULL, lease_expires_at = NULL, lease_session = NULL, lease_backend_pid = NULL,"
            " rerun_requested = false, hard_fail_streak = 0, last_error = NULL, last_rescue = NULL,"
            " last_run_stats = NULL, total_rescues = 0, total_bars_created = 0, total_runs = 0"
        )
        # (the late test's corrected minute, back to what the file holds; no task has a cursor now,
        # so nothing is logged)
        conn.execute(
            "UPDATE data_bars SET open = %s, high = %s, low = %s, close = %s, vol = %s"
            " WHERE canonical_symbol = 'AAA' AND ts_utc = %s",
            (*ORIGINAL_LATE_ROW, T0 + timedelta(hours=10, minutes=7)),
        )
    return prepared


def test_distribute_places_the_tables_once_and_refuses_where_it_cannot(
    cluster: citus_cluster.CitusCluster, db: object
) -> None:
    url = cluster.new_database(f"t_{uuid.uuid4().hex[:10]}")
    done = cli(url, "db", "distribute", ok=False)
    assert done.returncode == 1 and "run `baragg db upgrade`" in done.stderr, done.stderr
    cli(url, "db", "upgrade")
    cli(url, "registry", "add", "AAA")
    sql(
        url,
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, source)"
        " SELECT 'AAA', '1m', %s + g * interval '1 minute', 1, 2, 0.5, 1.5, 'test'"
        " FROM generate_series(0, 99) g RETURNING 1",
        T0,
    )
    rows_before = sql(url, "SELECT count(*) FROM data_bars")[0][0]
    assert rows_before == 100

    # A running worker (its session's worker lock) makes it refuse, and nothing changes.
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(1650553447, 7)")
        done = cli(url, "db", "distribute", ok=False)
    assert done.returncode == 1 and "baragg workers are running" in done.stderr, done.stderr
    assert (
        sql(url, "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'data_bars'::regclass")[0][0]
        == 0
    )

    done = cli(url, "db", "distribute")
    assert "distributed data_agg_state, agg_invalidations, data_bars, derived_data_bars" in done.stdout
    kinds = dict(
        sql(
            url,
            "SELECT logicalrelid::regclass::text, partmethod::text || coalesce(':' || column_to_column_name(logicalrelid,"
            " partkey), '') FROM pg_dist_partition",
        )
    )
    for table in ("data_bars", "derived_data_bars", "data_agg_state", "agg_invalidations"):
        assert kinds[table] == "h:canonical_symbol", kinds
    for table in ("core_asset_registry_all", "agg_timeframes", "agg_sessions", "agg_session_days"):
        assert kinds[table] == "n", kinds
    groups = sql(
        url,
        "SELECT count(DISTINCT colocationid) FROM pg_dist_partition WHERE logicalrelid::regclass::text"
        " IN ('data_bars', 'derived_data_bars', 'data_agg_state', 'agg_invalidations')",
    )
    assert groups == [(1,)]  # co-located
    assert sql(url, "SELECT count(*) FROM data_bars")[0][0] == rows_before
    # The invalidation triggers are on the shards, on both worker nodes.
    for node in cluster.workers:
        node_url = citus_cluster._with_db(node.url, url.rsplit("/", 1)[1])
        shard_triggers = sql(
            node_url,
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'agg_invalidate_%%'"
            " AND tgrelid::regclass::text ~ '^(data_bars|derived_data_bars)_[0-9]+$'",
        )[0][0]
        assert shard_triggers > 0
        done = cli(node_url, "db", "distribute", ok=False)
        assert done.returncode == 1 and "not the Citus coordinator" in done.stderr, done.stderr

    again = cli(url, "db", "distribute")
    assert "nothing to do" in again.stdout
    assert cli(url, "db", "status").returncode == 0

    # Plain PostgreSQL: one line saying what is missing.
    done = cli(db.url, "db", "distribute", ok=False)  # type: ignore[attr-defined]
    assert done.returncode == 1 and "Citus is not installed" in done.stderr, done.stderr


def seed_step_from_t0(conn: psycopg.Connection) -> dict:
    """The seed's RPC loop over CCC's 5m task moved back to T0: agg_start (claimed), then one
    catchup_aggregation_range step; its result (agg_finish is the caller's)."""
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s, next_run_at = NULL"
        " WHERE canonical_symbol = 'CCC' AND timeframe = '5m'",
        (T0,),
    )
    assert conn.execute("SELECT agg_start('CCC', '5m', %s, 'seed')", (NOW,)).fetchone()[0]["claimed"]
    row = conn.execute("SELECT catchup_aggregation_range('CCC', '5m', %s, 1000, %s)", (T0, NOW)).fetchone()
    return row[0]


def test_bars_equal_plain_postgresql_and_late_data_rewrites_them(distributed: str, plain: dict) -> None:
    url = distributed
    cli(url, "run", "--once", "--now", NOW)
    got = bars(url)
    assert len(got) == len(plain["bars"]) > 500
    assert got == plain["bars"]
    for symbol, tf in (("AAA", "5m"), ("AAA", "4h"), ("BBB", "1d"), ("CCC", "1h")):
        done = cli(url, "verify", symbol, tf)
        assert " 0 missing, 0 extra, 0 different" in done.stdout, done.stdout

    # The seed's RPC loop (agg_start -> catchup_aggregation_range -> agg_finish) over a task moved back:
    # every window recomputed equal, nothing written.
    with psycopg.connect(url, autocommit=True) as conn:
        step = seed_step_from_t0(conn)
        assert step["success"] and step["bars_created"] == 0 and step["bars_unchanged"] == 288, step
        done = conn.execute(
            "SELECT agg_finish('CCC', '5m', true, %s, NULL, NULL, NULL, %s, 'seed')",
            (step["cursor_advanced_to"], NOW),
        ).fetchone()[0]
        assert done["changed"], done
    assert bars(url) == plain["bars"]

    # Late data: a corrected minute behind every cursor is logged on its shard and rewrites the
    # 5m bar and the levels built from it.
    cli(url, "ingest", str(plain["late_file"]))
    assert sql(url, "SELECT canonical_symbol, timeframe, window_start FROM agg_invalidations") == [
        ("AAA", "5m", T0 + timedelta(hours=10, minutes=5))
    ]
    cli(url, "run", "--once", "--now", NOW)
    after = bars(url)
    assert after == plain["after_late"] != plain["bars"]
    assert sql(url, "SELECT count(*) FROM agg_invalidations") == [(0,)]


def test_a_task_moved_back_withdraws_the_bar_of_a_window_that_lost_its_rows(distributed: str) -> None:
    """The catch-up's withdrawal on Citus (a cursor moved back over stored bars, as `backfill --from`
    does): a window whose 1m rows are no longer eligible loses its bar (soft-deleted), the others are
    recomputed equal."""
    url = distributed
    cli(url, "run", "--once", "--now", NOW)
    window = T0 + timedelta(hours=10)  # CCC has all five minutes of 10:00-10:05
    gone = "canonical_symbol = 'CCC' AND timeframe = '1m' AND ts_utc >= %s AND ts_utc < %s"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f"UPDATE data_bars SET is_partial = true WHERE {gone}",
                (window, window + timedelta(minutes=5)),
            )
            conn.execute("TRUNCATE agg_invalidations")  # the catch-up, not the late-data path, handles it
            step = seed_step_from_t0(conn)
        assert step["success"] and step["bars_withdrawn"] == 1 and step["bars_unchanged"] == 287, step
        assert sql(
            url,
            "SELECT ts_utc FROM derived_data_bars WHERE canonical_symbol = 'CCC' AND timeframe = '5m'"
            " AND deleted_at IS NOT NULL",
        ) == [(window,)]
    finally:
        sql(
            url,
            f"UPDATE data_bars SET is_partial = false WHERE {gone} RETURNING 1",
            window,
            window + timedelta(minutes=5),
        )


def test_three_workers_at_once_build_every_bar_once(distributed: str, plain: dict) -> None:
    url = distributed
    procs = [popen_cli("run", "--once", "--now", NOW, "--batch-size", "2", url=url) for _ in range(3)]
    for p in procs:
        _out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    assert bars(url) == plain["bars"]
    # every bar written once: no soft-deleted copies, and the tasks' counters add up to the bars
    assert sql(url, "SELECT count(*) FROM derived_data_bars WHERE deleted_at IS NOT NULL") == [(0,)]
    created, total = sql(
        url,
        "SELECT (SELECT sum(total_bars_created) FROM data_agg_state), (SELECT count(*) FROM derived_data_bars)",
    )[0]
    assert created == total
    assert sql(
        url, "SELECT count(*) FROM data_agg_state WHERE status <> 'idle' OR last_error IS NOT NULL"
    ) == [(0,)]


def test_a_worker_killed_mid_run_is_taken_over_and_the_bars_end_equal(distributed: str, plain: dict) -> None:
    url = distributed
    victim = popen_cli(
        "run", "--once", "--now", NOW, "--max-windows", "20", url=url,
        env={"BARAGG_TEST_PAUSE_BETWEEN_CALLS": "0.3"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:  # until it has committed part of a task's work
            moved = sql(
                url,
                "SELECT count(*) FROM data_agg_state WHERE status = 'running' AND last_agg_bar_ts_utc > %s",
                T0 + timedelta(hours=2),
            )[0][0]
            if moved:
                break
            assert victim.poll() is None, victim.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the victim made no progress"
            time.sleep(0.1)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(30)
    assert sql(url, "SELECT count(*) FROM data_agg_state WHERE status = 'running'")[0][0] >= 1
    cli(url, "run", "--once", "--now", NOW)
    assert bars(url) == plain["bars"]
    rescued = sql(url, "SELECT count(*) FROM data_agg_state WHERE total_rescues > 0")[0][0]
    assert rescued >= 1


# ---------------------------------------------------------------------------------------------
# Trading sessions and 1mo on Citus
# ---------------------------------------------------------------------------------------------
SESSION_NOW = "2024-03-18T00:00:00+00:00"
SESSION_SYMBOLS: dict[str, dict] = {
    # XNYS: February 2024, 09:30-16:00 New York (14:30-21:00Z), Presidents' Day (19th) closed
    "EQ": {
        "session": "XNYS",
        "calc_1d": True,
        "calc_1w": True,
        "calc_1mo": True,
        "agg_start_utc": "2024-01-29",
    },
    # fx: 17:00 New York days on both sides of the March change (22:00Z, then 21:00Z)
    "FXS": {"session": "fx", "calc_4h": True, "calc_1d": True, "agg_start_utc": "2024-03-01"},
    # 24x7, sparse: 1mo windows are session windows too
    "SPR": {"is_sparse": True, "calc_1d": True, "calc_1mo": True, "agg_start_utc": "2024-01-01"},
}
SESSION_LATE = (
    "canonical_symbol,ts_utc,open,high,low,close,vol\n"
    "EQ,2024-02-14T15:07:00+00:00,100,999,1,100,5\n"  # inside the session: 5m ... 1mo rewritten
    "EQ,2024-02-14T22:00:00+00:00,100,999,1,100,5\n"  # after the close: in no window, nothing logged
    "FXS,2024-03-11T02:00:00+00:00,100,999,1,100,5\n"  # a missing FX minute arrives late
)


@pytest.fixture(scope="module")
def session_minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1m bars of the three session symbols (every 11th EQ and 9th FXS minute missing)."""
    path = tmp_path_factory.mktemp("citus_sessions") / "sessions.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["canonical_symbol", "ts_utc", "open", "high", "low", "close", "vol"])

        def row(symbol: str, ts: datetime, k: int) -> None:
            price = 100 + (k % 97) / 10
            out.writerow([symbol, ts.isoformat(), price, price + 0.5, price - 0.5, price + 0.1, 1 + k % 13])

        k = 0
        for day in range(1, 30):
            open_ = datetime(2024, 2, day, 14, 30, tzinfo=UTC)
            if open_.weekday() >= 5 or day == 19:
                continue
            for m in range(390):
                k += 1
                if k % 11 != 5:
                    row("EQ", open_ + timedelta(minutes=m), k)
        # Wednesday 6 March 17:00 New York (22:00Z) to Wednesday 13 March 17:00 (21:00Z): the week
        # end (Friday 17:00 to Sunday 17:00 New York) is closed.
        ts = datetime(2024, 3, 6, 22, tzinfo=UTC)
        while ts < datetime(2024, 3, 13, 21, tzinfo=UTC):
            closed = (ts >= datetime(2024, 3, 8, 22, tzinfo=UTC)) and ts < datetime(
                2024, 3, 10, 21, tzinfo=UTC
            )
            k += 1
            if not closed and k % 9 != 2 and ts != datetime(2024, 3, 11, 2, tzinfo=UTC):
                row("FXS", ts, k)
            ts += timedelta(minutes=1)
        ts = datetime(2024, 1, 1, tzinfo=UTC)
        while ts < datetime(2024, 2, 1, tzinfo=UTC):
            k += 1
            row("SPR", ts, k)
            ts += timedelta(hours=3)
    return path


def load_sessions(url: str, session_minutes: Path) -> None:
    """Registered in this process (`registry add` without the command's start-up: the XNYS calendar
    is built once), then ingested by the command."""
    for symbol, settings in SESSION_SYMBOLS.items():
        start = datetime.fromisoformat(settings["agg_start_utc"]).replace(tzinfo=UTC)
        registry.add(Database(url), symbol, **{**settings, "agg_start_utc": start})
    cli(url, "ingest", str(session_minutes))


@pytest.fixture(scope="module")
def plain_sessions(
    server_url: str, template_db: str, session_minutes: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """The reference for the session symbols: the same commands on plain PostgreSQL."""
    name = f"baragg_t_{uuid.uuid4().hex[:12]}"
    create_database(server_url, name, template=template_db)
    url = url_for(server_url, name)
    try:
        load_sessions(url, session_minutes)
        cli(url, "run", "--once", "--now", SESSION_NOW)
        first = bars(url)
        late = tmp_path_factory.mktemp("late_sessions") / "late.csv"
        late.write_text(SESSION_LATE)
        cli(url, "ingest", str(late))
        logged = sql(
            url, "SELECT canonical_symbol, timeframe, window_start FROM agg_invalidations ORDER BY 1, 2, 3"
        )
        cli(url, "run", "--once", "--now", SESSION_NOW)
        after_late = bars(url)
        cli(url, "registry", "set", "FXS", "--session", "24x7")
        yield {
            "bars": first,
            "logged": logged,
            "after_late": after_late,
            "after_change": bars(url),
            "late_file": late,
        }
    finally:
        drop_database(server_url, name)


def test_sessions_and_1mo_on_citus_equal_plain_postgresql_with_late_data_and_a_session_change(
    cluster: citus_cluster.CitusCluster, session_minutes: Path, plain_sessions: dict
) -> None:
    # Distributed first, then the symbols added: registry, session days, ingest and the worker's
    # extension of the trading days all run on the distributed database.
    url = cluster.new_database(f"t_{uuid.uuid4().hex[:10]}")
    cli(url, "db", "upgrade")
    cli(url, "db", "distribute")
    load_sessions(url, session_minutes)
    # (smaller calls than the plain run: the bounded scan and the cursor between calls are exercised)
    done = cli(url, "run", "--once", "--now", SESSION_NOW, "--max-windows", "700")
    assert "could not extend" not in done.stderr, done.stderr[-3000:]
    assert sql(url, "SELECT count(*) FROM data_agg_state WHERE last_error IS NOT NULL") == [(0,)]
    got = bars(url)
    assert got == plain_sessions["bars"]
    levels = {(r[0], r[1]) for r in got}
    assert {("EQ", "1d"), ("EQ", "1w"), ("EQ", "1mo"), ("FXS", "4h"), ("FXS", "1d"), ("SPR", "1mo")} <= levels
    eq_days = [r[2] for r in got if r[:2] == ("EQ", "1d")]
    assert len(eq_days) == 20 and {t.astimezone(UTC).time() for t in eq_days} == {
        datetime(2024, 1, 1, 14, 30).time()
    }
    fx_days = [r[2].astimezone(UTC).hour for r in got if r[:2] == ("FXS", "1d")]
    assert fx_days == [22, 22, 21, 21, 21]  # Thursday 7th, Friday 8th (EST); Monday 11th ... (EDT)
    done = cli(url, "verify", "EQ", "1d")
    assert " 0 missing, 0 extra, 0 different" in done.stdout, done.stdout
    # status reads the session frontiers on Citus too: every task caught up with its data
    done = cli(url, "status", "--json", "--symbol", "EQ", "--symbol", "FXS", "--now", SESSION_NOW)
    tasks = json.loads(done.stdout)
    assert {(t["symbol"], t["session"]) for t in tasks} == {("EQ", "XNYS"), ("FXS", "fx")}
    assert {t["lag_frontier_seconds"] for t in tasks} == {0.0} and len(tasks) == 9, tasks

    # Late data: logged in session windows on the shards, re-aggregated up to 1mo as on plain.
    cli(url, "ingest", str(plain_sessions["late_file"]))
    logged = sql(
        url, "SELECT canonical_symbol, timeframe, window_start FROM agg_invalidations ORDER BY 1, 2, 3"
    )
    assert logged == plain_sessions["logged"]
    assert {(s, tf) for s, tf, _ in logged} == {("EQ", "5m"), ("FXS", "5m")}
    cli(url, "run", "--once", "--now", SESSION_NOW)
    after = bars(url)
    assert after == plain_sessions["after_late"] != plain_sessions["bars"]
    # the corrected minute's high reached the month (column 4: high)
    assert [r[4] for r in after if r[:2] == ("EQ", "1mo")] == [999]
    assert sql(url, "SELECT count(*) FROM agg_invalidations") == [(0,)]
    assert sql(url, "SELECT count(*) FROM data_agg_state WHERE last_error IS NOT NULL") == [(0,)]

    # A session change rebuilds the symbol's bars from the stored sources, as on plain PostgreSQL.
    done = cli(url, "registry", "set", "FXS", "--session", "24x7")
    assert "rebuilt FXS" in done.stdout, done.stdout
    assert bars(url) == plain_sessions["after_change"] != plain_sessions["after_late"]
