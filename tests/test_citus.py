"""baragg on a real Citus cluster (DESIGN.md 11, issue 15): a coordinator and two workers on one
machine (tests/citus_cluster.py; skipped with the reason where Citus is not installed).

After `db upgrade` + `db distribute`, the CLI's registry, ingest and run build the same bars as on
plain PostgreSQL (the embedded test server), verify agrees, several workers at once build every bar
once, a worker killed with SIGKILL mid-run is taken over, and late data rewrites the bars.
"""

from __future__ import annotations

import csv
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
        conn.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s, next_run_at = NULL"
            " WHERE canonical_symbol = 'CCC' AND timeframe = '5m'",
            (T0,),
        )
        assert conn.execute("SELECT agg_start('CCC', '5m', %s, 'seed')", (NOW,)).fetchone()[0]["claimed"]
        step = conn.execute(
            "SELECT catchup_aggregation_range('CCC', '5m', %s, 1000, %s)", (T0, NOW)
        ).fetchone()[0]
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
