"""Citus benchmark (issue 15): backfill of N symbols x D days of FX-like 1m bars up the whole ladder
(5m/15m/1h/4h/1d) on a 3-node Citus cluster (coordinator + 2 workers on this machine, after
`baragg db distribute`) vs one plain PostgreSQL node, same binaries (PostgreSQL 15), same settings.

    .venv/bin/python bench/bench_citus.py [--symbols 10] [--days 365] [--workers 1,3]

--days 365 is the issue's size (10 x 1 year: about 5.3 million 1m rows). Needs Citus installed
(../shared/vendor/citus/build.sh) and the server binaries under /usr/lib/postgresql/15; run as root
or as a user that can run initdb (tests/pg_cluster.py). `--workers 1,3` times one `baragg run --once`
and three at once. Prints a Markdown table for bench/README.md and checks that both databases hold
the same bars.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import citus_cluster
import pg_cluster
from _common import BARS_CHECKSUM, add_symbols, generate_year, header, load
from baragg import citus, migrate
from baragg.db import Database

START = "2024-01-01 00:00:00+00"


def prepare(url: str, symbols: list[str], days: int, *, distribute: bool) -> tuple[Database, int]:
    db = Database(url)
    migrate.upgrade(db)
    with psycopg.connect(url) as conn:
        add_symbols(conn, symbols)
        conn.commit()
    if distribute:  # before the data: the rows are then written to the shards directly
        citus.distribute(db)
    with psycopg.connect(url) as conn:
        rows = generate_year(conn, symbols, START, days)
        conn.execute("SELECT sync_agg_state_from_registry('prod', %s)", (START,))
        conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (START,))
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return db, rows


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE derived_data_bars")
        conn.execute("TRUNCATE agg_invalidations")
        conn.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = NULL, status = 'idle', next_run_at = NULL,"
            " lease_owner = NULL, lease_expires_at = NULL, lease_session = NULL, rerun_requested = false,"
            " hard_fail_streak = 0, total_bars_created = 0"
        )


def run(url: str, now: datetime, processes: int) -> float:
    """Wall seconds of `processes` concurrent `baragg run --once --now <end>` until all exit."""
    env = {"DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "baragg.cli", "run", "--once", "--now", now.isoformat()],
            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for p in procs:
        _, err = p.communicate(timeout=7200)
        if p.returncode != 0:
            raise SystemExit(f"run --once failed: {err[-2000:]}")
    return time.perf_counter() - t0


def bars(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(BARS_CHECKSUM).fetchall()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--symbols", type=int, default=10)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--workers", default="1,3", help="comma-separated process counts to time")
    args = ap.parse_args()
    reason = citus_cluster.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    symbols = [f"SYM{i:03d}" for i in range(args.symbols)]
    now = datetime.fromisoformat(START) + timedelta(days=args.days + 2)
    counts = [int(x) for x in args.workers.split(",")]
    load_at_start = load()
    single = pg_cluster.Cluster()
    cluster = citus_cluster.CitusCluster(workers=2)
    try:
        plain_url = single.url
        citus_url = cluster.new_database("bench")
        t0 = time.perf_counter()
        _, rows = prepare(plain_url, symbols, args.days, distribute=False)
        load_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(citus_url, symbols, args.days, distribute=True)
        load_citus = time.perf_counter() - t0
        results: dict[tuple[str, int], float] = {}
        for n in counts:
            for name, url in (("one node", plain_url), ("Citus 3 nodes", citus_url)):
                reset(url)
                results[(name, n)] = run(url, now, n)
        same = bars(plain_url) == bars(citus_url)
        with psycopg.connect(single.url) as conn:
            head = header(conn, load_at_start)
    finally:
        cluster.destroy()
        single.destroy()
    print(f"\n{head}\n")
    print(f"{args.symbols} symbols x {args.days} days: {rows:,} 1m rows; bars equal on both: {same}\n")
    print(f"load (generate + sync): one node {load_plain:.1f} s, Citus {load_citus:.1f} s\n")
    print("| backfill, whole ladder | " + " | ".join(f"{n} run --once" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in ("one node", "Citus 3 nodes"):
        cells = [f"{results[(name, n)]:.1f} s ({rows / results[(name, n)]:,.0f} rows/s)" for n in counts]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if not same:
        raise SystemExit("the bars differ between the two databases")


if __name__ == "__main__":
    main()
