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
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg

from _common import add_symbols, ceiling_insert, fmt_rate, generate_year, header, load, med, scratch_database

START = "2024-01-01 00:00:00+00"
CHECK = """
SELECT timeframe, count(*), round(sum(open + high + low + close)::numeric, 4), sum(vol), sum(source_candles)
FROM derived_data_bars WHERE deleted_at IS NULL GROUP BY timeframe ORDER BY timeframe"""


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


def bars(conn: psycopg.Connection) -> dict[str, tuple]:
    return {r[0]: tuple(r[1:]) for r in conn.execute(CHECK).fetchall()}


def run_ceiling(conn: psycopg.Connection) -> float:
    t0 = time.perf_counter()
    for tf in ("5m", "1h"):
        conn.execute(ceiling_insert(tf))
        conn.commit()
    return time.perf_counter() - t0


def run_cli(url: str, now: datetime) -> tuple[float, dict]:
    env = {**os.environ, "DATABASE_URL": url}
    cmd = [sys.executable, "-m", "baragg.cli", "run", "--once", "--now", now.isoformat(), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"baragg run --once failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall, json.loads(proc.stdout)["totals"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--runs", type=int, default=5, help="pairs (ceiling, baragg), alternated")
    args = parser.parse_args()

    load_at_start = load()
    now = datetime.fromisoformat(START) + timedelta(days=args.days + 1)  # every window final
    with scratch_database() as db, db.connect() as conn:
        symbols = [f"FX{i:04d}" for i in range(args.symbols)]
        add_symbols(conn, symbols, all_levels=False)  # 5m and 1h
        conn.execute("SELECT sync_agg_state_from_registry('prod')")
        conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (START,))
        conn.commit()
        t0 = time.perf_counter()
        rows = generate_year(conn, symbols, START, args.days, chunk=max(1, 3_000_000 // (args.days * 1440)))
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE data_bars")
        conn.autocommit = False
        print(f"generated {rows:,} 1m rows for {args.symbols} symbols x {args.days} days"
              f" in {time.perf_counter() - t0:.0f} s", flush=True)

        ceil_s: list[float] = []
        cli_s: list[float] = []
        expected = None
        for run in range(args.runs):
            reset(conn)
            ceil_s.append(run_ceiling(conn))
            got = bars(conn)
            assert expected is None or got == expected, (got, expected)
            expected = got
            reset(conn)
            wall, totals = run_cli(db.url, now)
            cli_s.append(wall)
            got = bars(conn)
            assert got == expected, (got, expected)
            print(
                f"run {run + 1} (load {load():.1f}): ceiling {ceil_s[-1]:.2f} s, baragg run --once"
                f" {wall:.2f} s ({totals['task_runs']} task runs), ratio {ceil_s[-1] / wall:.0%}",
                flush=True,
            )

        ratios = [c / b for c, b in zip(ceil_s, cli_s, strict=True)]
        print()
        print(header(conn, load_at_start))
        print(
            f"{args.symbols} symbols x {args.days} days, {rows:,} 1m rows -> {expected['5m'][0]:,} 5m,"
            f" {expected['1h'][0]:,} 1h bars; {args.runs} alternated pairs"
        )
        print()
        print("| what | median s | min-max s | source rows/s |")
        print("|---|---|---|---|")
        print(f"| ceiling (5m + 1h statements) | {med(ceil_s):.2f} | {min(ceil_s):.2f}-{max(ceil_s):.2f}"
              f" | {fmt_rate(rows, med(ceil_s))} |")
        print(f"| `baragg run --once` (process) | {med(cli_s):.2f} | {min(cli_s):.2f}-{max(cli_s):.2f}"
              f" | {fmt_rate(rows, med(cli_s))} |")
        print()
        print(
            f"ratio of the medians: **{med(ceil_s) / med(cli_s):.0%}**; per pair:"
            f" {', '.join(f'{r:.0%}' for r in ratios)} (median {med(ratios):.0%})"
        )


if __name__ == "__main__":
    main()
