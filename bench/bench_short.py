"""Short histories and many symbols (issue 15, part 3): `baragg run --once` as a process (start-up
included) vs the hand-written ceiling, 1m rows aggregated to 5m and 1h.

For each run, on an empty derived_data_bars with every cursor reset:

  ceiling: one hand-written INSERT ... SELECT ... GROUP BY per level (5m from the 1m rows, then 1h from
           those 5m bars), the same bars into the same table (bench/_common.py);
  baragg:  `baragg run --once --now <end>` as a child process (python start-up, schema check, registry
           sync, claims, catch-up, finish), wall time measured around the process.

The two alternate (ceiling, baragg, ceiling, baragg, ...) because the machine is shared; the bars must
be equal (count and checksums per level) after every baragg run. Prints each run, the medians, the
ratio of the medians and the range of the per-pair ratios.

    python bench/bench_short.py --symbols 100 --days 14 --runs 5     # 1.43M rows
    python bench/bench_short.py --symbols 1000 --days 30 --runs 3    # ~30M rows
    python bench/bench_short.py --symbols 100 --days 365 --runs 2    # ~37M rows

Uses $DATABASE_URL's server if set (a scratch database is created and dropped), else an embedded server
in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import psycopg
from psycopg.conninfo import make_conninfo

from _common import (
    LADDER,
    add_symbols,
    bars,
    ceiling_insert,
    fmt_rate,
    generate_year,
    header,
    load,
    med,
    scratch_database,
)
from baragg import migrate, partitions
from baragg.db import Database

START = "2024-01-01 00:00:00+00"


def reset(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE derived_data_bars, agg_invalidations")
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = NULL, status = 'idle', next_run_at = NULL,"
        " lease_owner = NULL, lease_expires_at = NULL, rerun_requested = false, hard_fail_streak = 0,"
        " last_run_stats = NULL"
    )
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM data_agg_state")
    conn.execute("CHECKPOINT")
    conn.autocommit = False


COPY_TABLE = "bench_ceiling_copy"


def ceiling(tf: str, table: str) -> str:
    """_common.ceiling_insert with the quality score written out: agg_quality_score pins its
    search_path (issue 13), so PostgreSQL calls it per bar instead of inlining it, which a hand-written
    statement would not do (about 2 x 10 us per bar here)."""
    _, _, _, expected = next(level for level in LADDER if level[0] == tf)
    score = (
        f"CASE WHEN g.n >= {expected} THEN 2 WHEN 5 * g.n >= 4 * {expected} THEN 1"
        f" WHEN 5 * g.n >= 3 * {expected} THEN 0 WHEN 20 * g.n >= 11 * {expected} THEN -1 END"
    )
    sql = ceiling_insert(tf, table).replace(f"agg_quality_score(g.n, {expected})", score)
    assert "agg_quality_score" not in sql
    return sql


def run_ceiling(conn: psycopg.Connection, table: str) -> float:
    """The 5m and 1h statements into `table`: derived_data_bars itself (its foreign key and late-data
    triggers fire, as for baragg), or a copy made with LIKE ... INCLUDING ALL (same columns, defaults,
    checks and indexes; no foreign key, no trigger: the issue's "copy of the same table")."""
    conn.execute(f"TRUNCATE {table}")
    conn.commit()
    t0 = time.perf_counter()
    for tf in ("5m", "1h"):
        sql = ceiling(tf, table)
        if table != "derived_data_bars":
            sql = sql.replace("FROM derived_data_bars b", f"FROM {table} b")
        conn.execute(sql)
        conn.commit()
    seconds = time.perf_counter() - t0
    if table != "derived_data_bars":
        conn.execute(f"TRUNCATE {table}")
        conn.commit()
    return seconds


def run_cli(url: str, now: datetime) -> tuple[float, dict]:
    env = {**os.environ, "DATABASE_URL": url}
    cmd = [sys.executable, "-m", "baragg.cli", "run", "--once", "--now", now.isoformat(), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"baragg run --once failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall, json.loads(proc.stdout)["totals"]


@contextlib.contextmanager
def _database(name: str | None, keep: bool) -> Iterator[Database]:
    """A scratch database (dropped afterwards), or the named one on $DATABASE_URL's server."""
    if not name:
        with scratch_database() as db:
            yield db
        return
    url = os.environ["DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as c:
        exists = c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            c.execute(f"CREATE DATABASE {name}")
    db = Database(make_conninfo(url, dbname=name))
    migrate.upgrade(db)
    yield db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--runs", type=int, default=5, help="pairs (ceiling, baragg), alternated")
    parser.add_argument(
        "--reuse",
        metavar="DBNAME",
        help="a database on $DATABASE_URL's server that already holds this dataset (built by an earlier"
        " run with --keep): upgraded, not generated, not dropped",
    )
    parser.add_argument(
        "--ceilings",
        default="table,copy",
        help="which ceilings to alternate with baragg: table (into derived_data_bars), copy (a copy)",
    )
    parser.add_argument("--keep", metavar="DBNAME", help="build the dataset into this database and keep it")
    args = parser.parse_args()

    load_at_start = load()
    now = datetime.fromisoformat(START) + timedelta(days=args.days + 1)  # every window final
    with _database(args.reuse or args.keep, keep=bool(args.reuse or args.keep)) as db, db.connect() as conn:
        if args.reuse:
            rows = conn.execute("SELECT count(*) FROM data_bars").fetchone()[0]
        else:
            symbols = [f"FX{i:04d}" for i in range(args.symbols)]
            add_symbols(conn, symbols, all_levels=False)  # 5m and 1h
            conn.execute("SELECT sync_agg_state_from_registry('prod')")
            conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (START,))
            conn.commit()
            t0 = time.perf_counter()
            # A new install is partitioned by month, and rows written by SQL into a month without a
            # partition land in the default partition, which the worker's first sync empties into
            # its months (a one-time move, not aggregation): the months are made first, as ingest
            # does before writing.
            first = datetime.fromisoformat(START)
            months = partitions.months(first, first + timedelta(days=args.days))
            for table in partitions.TABLES:
                partitions.ensure_months(db, table, months)
            chunk = max(1, 3_000_000 // (args.days * 1440))
            rows = generate_year(conn, symbols, START, args.days, chunk=chunk)
            conn.commit()
            partitions.maintain(conn)
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE data_bars")
            conn.autocommit = False
            print(
                f"generated {rows:,} 1m rows for {args.symbols} symbols x {args.days} days"
                f" in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )

        conn.execute(f"DROP TABLE IF EXISTS {COPY_TABLE}")
        conn.execute(f"CREATE TABLE {COPY_TABLE} (LIKE derived_data_bars INCLUDING ALL)")
        conn.commit()
        ceilings = args.ceilings.split(",")
        times: dict[str, list[float]] = {c: [] for c in [*ceilings, "baragg"]}
        expected = None
        try:
            for run in range(args.runs):
                line = []
                for c in ceilings:
                    reset(conn)
                    times[c].append(run_ceiling(conn, "derived_data_bars" if c == "table" else COPY_TABLE))
                    line.append(f"ceiling into the {c} {times[c][-1]:.2f} s")
                    if c == "table":
                        got = bars(conn)
                        assert expected is None or got == expected, (got, expected)
                        expected = got
                reset(conn)
                wall, totals = run_cli(db.url, now)
                times["baragg"].append(wall)
                got = bars(conn)
                assert expected is None or got == expected, (got, expected)
                expected = got
                ratios = ", ".join(f"{c} {times[c][-1] / wall:.0%}" for c in ceilings)
                print(
                    f"run {run + 1} (load {load():.1f}): {', '.join(line)}, baragg run --once {wall:.2f} s"
                    f" ({totals['task_runs']} task runs); ratio {ratios}",
                    flush=True,
                )
        finally:
            conn.rollback()
            conn.execute(f"DROP TABLE IF EXISTS {COPY_TABLE}")
            conn.commit()

        print()
        print(header(conn, load_at_start))
        print(
            f"{args.symbols} symbols x {args.days} days, {rows:,} 1m rows -> {expected['5m'][0]:,} 5m,"
            f" {expected['1h'][0]:,} 1h bars; {args.runs} alternated rounds"
        )
        print()
        print("| what | median s | min-max s | source rows/s | ceiling / baragg (median; per round) |")
        print("|---|---|---|---|---|")
        b = times["baragg"]
        for c in ceilings:
            t = times[c]
            per = ", ".join(f"{x / y:.0%}" for x, y in zip(t, b, strict=True))
            name = "derived_data_bars (FK, triggers)" if c == "table" else "a copy (no FK, no trigger)"
            print(
                f"| ceiling into {name} | {med(t):.2f} | {min(t):.2f}-{max(t):.2f} | {fmt_rate(rows, med(t))}"
                f" | **{med(t) / med(b):.0%}**; {per} |"
            )
        print(
            f"| `baragg run --once` (process) | {med(b):.2f} | {min(b):.2f}-{max(b):.2f}"
            f" | {fmt_rate(rows, med(b))} | |"
        )


if __name__ == "__main__":
    main()
