"""Backfill benchmark: N symbols x one year of FX-like 1m bars caught up to 5m/15m/1h/4h/1d through the
real path (the worker's run_once, as `baragg run --once --now <end>`), compared in the same run with

  (a) the ceiling: one hand-written INSERT ... SELECT ... GROUP BY per level (same bars, same table);
  (b) the seed's design (bench/seed_design.sql): one PL/pgSQL call per window, 100 windows per call,
      one call per task per run, stop at the first empty window;
  (c) pandas: read the 1m rows from the database, resample to 5m, write the bars back (COPY).

    .venv/bin/python bench/bench_backfill.py [--symbols 10] [--runs 3] [--days 365] [--no-pandas]
                                             [--no-cli] [--no-seed]

--symbols 100 is the large size (about 37 million rows; one run takes most of an hour on 2 cores).
Uses $DATABASE_URL's server if set (a scratch database is created and dropped), else an embedded server
in a temporary directory. Prints Markdown tables for bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import psycopg

from _common import (
    BENCH_DIR,
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
    timed,
)
from baragg import worker
from baragg.db import Database

START = "2024-01-01 00:00:00+00"
NOW = datetime(2025, 1, 2, tzinfo=UTC)  # well after the data: every window is final
TFS = [level[0] for level in LADDER]


def reset(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE derived_data_bars")
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = NULL, status = 'idle', next_run_at = NULL,"
        " lease_owner = NULL, lease_expires_at = NULL, rerun_requested = false, hard_fail_streak = 0"
    )
    conn.commit()
    conn.execute("CHECKPOINT")
    conn.commit()


# ---------------------------------------------------------------------------------------------
# (a) the ceiling, level by level
# ---------------------------------------------------------------------------------------------
def run_ceiling(conn: psycopg.Connection) -> dict[str, float]:
    out = {}
    for tf in TFS:
        out[tf] = timed(lambda tf=tf: (conn.execute(ceiling_insert(tf)), conn.commit()))
    return out


# ---------------------------------------------------------------------------------------------
# baragg: the worker's run_once, in process (seconds per timeframe from its task results)
# ---------------------------------------------------------------------------------------------
def run_baragg(db: Database) -> tuple[float, dict[str, float], dict]:
    per_tf: dict[str, float] = defaultdict(float)

    def on_task(r: worker.TaskResult) -> None:
        per_tf[r.timeframe] += r.seconds

    t0 = time.perf_counter()
    summary = worker.run_once(db, now=NOW, on_task=on_task)
    total = time.perf_counter() - t0
    totals = summary.totals
    assert totals["transient"] + totals["hard"] == 0, totals
    return total, dict(per_tf), totals


def run_cli(db: Database) -> tuple[float, int, str]:
    """`baragg run --once --now <end>` as a process under /usr/bin/time -v: wall seconds, peak RSS."""
    env = {**os.environ, "DATABASE_URL": db.url}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            "/usr/bin/time",
            "-v",
            sys.executable,
            "-m",
            "baragg.cli",
            "run",
            "--once",
            "--now",
            NOW.isoformat(),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    wall = time.perf_counter() - t0
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    totals = json.loads(proc.stdout)["totals"]
    return wall, rss_kb, f"{totals['task_runs']} task runs, {totals['bars_created']:,} bars"


# ---------------------------------------------------------------------------------------------
# (c) pandas: read, resample to 5m, write back
# ---------------------------------------------------------------------------------------------
PANDAS_READ = """COPY (SELECT canonical_symbol, extract(epoch FROM ts_utc)::bigint, open, high, low, close,
    vol, vwap, trade_count FROM data_bars WHERE timeframe = '1m' AND NOT is_partial) TO STDOUT (FORMAT csv)"""
PANDAS_COLS = ["sym", "epoch", "open", "high", "low", "close", "vol", "vwap", "trade_count"]
PANDAS_WRITE = """COPY derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,
    trade_count, source_timeframe, source_candles, expected_candles, quality_score, derivation_version)
    FROM STDIN (FORMAT csv)"""


def pandas_read(conn: psycopg.Connection) -> pd.DataFrame:
    buf = io.BytesIO()
    with conn.cursor().copy(PANDAS_READ) as copy:
        for data in copy:
            buf.write(data)
    buf.seek(0)
    df = pd.read_csv(buf, names=PANDAS_COLS, dtype={"sym": "category"})
    df["ts"] = pd.to_datetime(df.pop("epoch"), unit="s", utc=True)
    return df


def pandas_resample(df: pd.DataFrame) -> pd.DataFrame:
    df = df.assign(pv=df["vwap"] * df["vol"], n=1)
    out = (
        df.set_index("ts")
        .groupby("sym", observed=True)
        .resample("5min")
        .agg(
            {
                "open": "first",
                "high": "max",
                "low": "min",
                "close": "last",
                "vol": "sum",
                "pv": "sum",
                "trade_count": "sum",
                "n": "sum",
            }
        )
    )
    out = out[out["n"] >= 3].reset_index()  # quality: 5 -> 2, 4 -> 1, 3 -> 0, fewer: not stored
    out["vwap"] = out["pv"] / out["vol"]
    out["quality"] = np.select([out["n"] >= 5, out["n"] == 4], [2, 1], 0)
    return out


def pandas_write(conn: psycopg.Connection, out: pd.DataFrame) -> None:
    frame = pd.DataFrame(
        {
            "sym": out["sym"],
            "tf": "5m",
            "ts": out["ts"].dt.strftime("%Y-%m-%d %H:%M:%S+00"),
            "open": out["open"],
            "high": out["high"],
            "low": out["low"],
            "close": out["close"],
            "vol": out["vol"],
            "vwap": out["vwap"],
            "trade_count": out["trade_count"].astype("int64"),
            "src": "1m",
            "n": out["n"].astype("int64"),
            "expected": 5,
            "quality": out["quality"],
            "dv": 1,
        }
    )
    data = frame.to_csv(index=False, header=False, float_format="%.17g")
    with conn.cursor().copy(PANDAS_WRITE) as copy:
        copy.write(data)
    conn.commit()


def run_pandas(conn: psycopg.Connection) -> tuple[dict[str, float], int]:
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    df = pandas_read(conn)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pandas_resample(df)
    t["aggregate"] = time.perf_counter() - t0
    del df
    t0 = time.perf_counter()
    pandas_write(conn, out)
    t["write"] = time.perf_counter() - t0
    t["total"] = t["read"] + t["aggregate"] + t["write"]
    return t, len(out)


# ---------------------------------------------------------------------------------------------
# (b) the seed's design, back to back: one call (<= 100 windows) per task per round
# ---------------------------------------------------------------------------------------------
def run_seed(conn: psycopg.Connection, symbols: list[str], tf: str) -> dict:
    cursors = dict.fromkeys(symbols, datetime.fromisoformat(START))
    calls = windows = 0
    t0 = time.perf_counter()
    moving = True
    while moving:
        moving = False
        for sym in symbols:  # the seed's worker: one RPC per task, its own transaction
            (res,) = conn.execute(
                "SELECT seed_design.catchup_aggregation_range(%s, %s, %s, 100, %s)",
                (sym, tf, cursors[sym], NOW),
            ).fetchone()
            conn.execute(
                "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE canonical_symbol = %s AND timeframe = %s",
                (res["cursor_advanced_to"], sym, tf),
            )
            conn.commit()
            calls += 1
            windows += res["windows_processed"]
            new = datetime.fromisoformat(res["cursor_advanced_to"])
            moving = moving or new != cursors[sym]
            cursors[sym] = new
    seconds = time.perf_counter() - t0
    src_table, src_tf = ("data_bars", "1m") if tf == "5m" else ("derived_data_bars", "5m")
    consumed, left = conn.execute(
        f"SELECT count(*) FILTER (WHERE b.ts_utc < c.cur), count(*) FILTER (WHERE b.ts_utc >= c.cur)"
        f" FROM {src_table} b JOIN unnest(%s::text[], %s::timestamptz[]) c(sym, cur) ON c.sym = b.canonical_symbol"
        f" WHERE b.timeframe = %s",
        (list(cursors), list(cursors.values()), src_tf),
    ).fetchone()
    return {
        "seconds": seconds,
        "calls": calls,
        "windows": windows,
        "rows": consumed,
        "rows_left": left,
        "stalled_at": sorted({c.isoformat() for c in cursors.values()}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--no-pandas", action="store_true")
    parser.add_argument("--no-seed", action="store_true")
    parser.add_argument("--no-cli", action="store_true", help="skip the `baragg run --once` process run")
    args = parser.parse_args()

    load_at_start = load()
    with scratch_database() as db, db.connect() as conn:
        symbols = [f"FX{i:03d}" for i in range(args.symbols)]
        add_symbols(conn, symbols)
        conn.execute("SELECT sync_agg_state_from_registry('prod')")
        conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (START,))
        conn.execute((BENCH_DIR / "seed_design.sql").read_text())
        conn.commit()
        t0 = time.perf_counter()
        rows = generate_year(conn, symbols, START, args.days)
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE data_bars")
        conn.autocommit = False
        print(
            f"generated {rows:,} 1m rows for {args.symbols} symbols in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )

        res: dict[str, list] = defaultdict(list)
        expected = None
        for run in range(args.runs):
            reset(conn)
            ceiling = run_ceiling(conn)
            expected = bars(conn)
            for tf in TFS:
                res[f"ceiling {tf}"].append(ceiling[tf])
            res["ceiling ladder"].append(sum(ceiling.values()))

            reset(conn)
            total, per_tf, totals = run_baragg(db)
            got = bars(conn)
            assert got == expected, (got, expected)
            res["baragg ladder"].append(total)
            for tf in TFS:
                res[f"baragg {tf}"].append(per_tf.get(tf, 0.0))
            line = (
                f"run {run + 1} (load {load():.1f}): ceiling {sum(ceiling.values()):.1f}s"
                f" (5m {ceiling['5m']:.1f}s), baragg {total:.1f}s (5m {per_tf['5m']:.1f}s,"
                f" {totals['task_runs']} task runs)"
            )

            if not args.no_pandas:
                reset(conn)
                pt, n = run_pandas(conn)
                assert n == expected["5m"][0], (n, expected["5m"])
                for k, v in pt.items():
                    res[f"pandas {k}"].append(v)
                line += f", pandas {pt['total']:.1f}s (aggregate {pt['aggregate']:.1f}s)"

            if not args.no_seed:
                reset(conn)
                seed = run_seed(conn, symbols, "5m")
                seed_1h = run_seed(conn, symbols, "1h")
                res["seed 5m"].append(seed["seconds"])
                res["seed 5m rows"].append(seed["rows"])
                res["seed 1h"].append(seed_1h["seconds"])
                res["seed 1h rows"].append(seed_1h["rows"])
                line += (
                    f", seed 5m {seed['rows'] / seed['seconds']:,.0f} rows/s ({seed['calls']} calls,"
                    f" {seed['windows']} windows, stalled at {seed['stalled_at']} with"
                    f" {seed['rows_left']:,} rows left)"
                )
            print(line, flush=True)

        cli = None
        if not args.no_cli:
            reset(conn)
            cli = run_cli(db)
            assert bars(conn) == expected
            print(f"baragg run --once process: {cli[0]:.1f}s, peak RSS {cli[1] / 1024:.0f} MB, {cli[2]}")

        m = {k: med(v) for k, v in res.items()}
        n_bars = {tf: expected[tf][0] for tf in TFS}
        src_rows = {
            tf: rows if tf == "5m" else expected[LADDER[[x[0] for x in LADDER].index(tf)][2]][3] for tf in TFS
        }
        print()
        print(header(conn, load_at_start))
        print(
            f"{args.symbols} symbols, {rows:,} 1m rows, bars: "
            + ", ".join(f"{n_bars[tf]:,} {tf}" for tf in TFS)
            + f"; median of {args.runs} runs"
        )
        print()
        print("| step | seconds | source rows/s | baragg vs ceiling |")
        print("|---|---|---|---|")
        for tf in TFS:
            src = rows if tf == "5m" else n_bars[LADDER[[x[0] for x in LADDER].index(tf)][2]]
            print(f"| ceiling {tf} | {m[f'ceiling {tf}']:.2f} | {fmt_rate(src, m[f'ceiling {tf}'])} | |")
            print(
                f"| baragg {tf} | {m[f'baragg {tf}']:.2f} | {fmt_rate(src, m[f'baragg {tf}'])} |"
                f" {m[f'ceiling {tf}'] / m[f'baragg {tf}']:.0%} |"
            )
        print(
            f"| ceiling, sum of the 5 statements | {m['ceiling ladder']:.2f} | {fmt_rate(rows, m['ceiling ladder'])} | |"
        )
        print(
            f"| baragg whole ladder (run_once) | {m['baragg ladder']:.2f} | {fmt_rate(rows, m['baragg ladder'])} |"
            f" {m['ceiling ladder'] / m['baragg ladder']:.0%} |"
        )
        if cli:
            print(
                f"| baragg run --once (process), once | {cli[0]:.2f} | {fmt_rate(rows, cli[0])} | peak RSS {cli[1] / 1024:.0f} MB |"
            )
        if not args.no_pandas:
            for k in ("read", "aggregate", "write", "total"):
                print(f"| pandas 5m: {k} | {m[f'pandas {k}']:.2f} | {fmt_rate(rows, m[f'pandas {k}'])} | |")
        if not args.no_seed:
            r5 = med(res["seed 5m rows"])
            r1 = med(res["seed 1h rows"])
            print(
                f"| seed design 5m, back to back (until it stalls) | {m['seed 5m']:.2f} | {fmt_rate(r5, m['seed 5m'])} | |"
            )
            print(
                f"| seed design 1h, back to back (until it stalls) | {m['seed 1h']:.2f} | {fmt_rate(r1, m['seed 1h'])} | |"
            )
            windows = sum(n_bars.values())
            runs_needed = -(-windows // 1000)
            print()
            print(
                f"Seed schedule: {windows:,} non-empty windows on the ladder; at 10 tasks x 100 windows per"
                f" 5-minute run that is at least {runs_needed:,} runs = {runs_needed * 5 / 60:,.1f} hours"
                f" ({runs_needed * 5 / 1440:,.1f} days) -- if it did not stop at the first weekend, which it does."
            )
        del src_rows


if __name__ == "__main__":
    main()
