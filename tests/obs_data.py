"""Test data for the observability tests: registry rows, tasks in every state, and bars.

Written straight into the tables (data_agg_state, derived_data_bars, data_bars), as a worker would
leave them, so the status page and metrics are tested on their own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

NOW = datetime(2024, 11, 22, 15, 7, 30, tzinfo=UTC)  # a Friday afternoon
FIVE_MIN = timedelta(minutes=5)


@dataclass
class Task:
    symbol: str
    timeframe: str
    source_timeframe: str
    cursor: datetime | None
    status: str = "idle"
    enabled: bool = True
    mandatory: bool = True
    streak: int = 0
    last_error: str | None = None
    bars_created: int = 0
    bars_poor: int = 0
    next_run: datetime | None = None


def add_symbols(conn: psycopg.Connection, *symbols: str) -> None:
    for s in symbols:
        conn.execute(
            "INSERT INTO core_asset_registry_all (canonical_symbol, asset_class, active) VALUES (%s, 'test', true)"
            " ON CONFLICT DO NOTHING",
            (s,),
        )


def add_task(conn: psycopg.Connection, t: Task) -> None:
    conn.execute(
        """
        INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, is_mandatory,
            last_agg_bar_ts_utc, status, enabled, hard_fail_streak, last_error, total_bars_created,
            total_bars_quality_poor, next_run_at, agg_start_utc, total_runs)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '2024-01-01', 0)
        """,
        (
            t.symbol,
            t.timeframe,
            t.source_timeframe,
            t.mandatory,
            t.cursor,
            t.status,
            t.enabled,
            t.streak,
            t.last_error,
            t.bars_created,
            t.bars_poor,
            t.next_run,
        ),
    )


def random_walk(
    n: int, seed: int, start_price: float = 100.0
) -> list[tuple[float, float, float, float, float]]:
    """n OHLCV tuples that look like a market (so the screenshot looks like one too)."""
    rng = random.Random(seed)
    price = start_price
    out = []
    for i in range(n):
        drift = 0.00004 * (1 if (i // 600) % 2 == 0 else -1)
        o = price
        c = max(0.01, o * (1 + drift + rng.gauss(0, 0.0016)))
        h = max(o, c) * (1 + abs(rng.gauss(0, 0.0007)))
        low = min(o, c) * (1 - abs(rng.gauss(0, 0.0007)))
        v = round(abs(rng.gauss(800, 300)) * (1 + 3 * abs(c - o) / o * 100))
        out.append((round(o, 2), round(h, 2), round(low, 2), round(c, 2), float(v)))
        price = c
    return out


def quality_of(i: int) -> tuple[int, int]:
    """(quality_score, source_candles) for the i-th 5m bar: mostly complete, some poor ones."""
    if i % 97 == 13:
        return -1, 2  # as a sparse asset stores it (DESIGN.md 3)
    if i % 41 == 7:
        return 0, 3
    if i % 11 == 5:
        return 1, 4
    return 2, 5


def add_derived_bars(
    conn: psycopg.Connection,
    symbol: str,
    timeframe: str,
    start: datetime,
    n: int,
    *,
    step: timedelta,
    seed: int = 1,
    start_price: float = 100.0,
) -> datetime:
    """n consecutive bars from start; returns the start of the bar after the last one."""
    rows = random_walk(n, seed, start_price)
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol,"
            " source_timeframe, source_candles, expected_candles, quality_score, derivation_version) FROM STDIN"
        ) as copy,
    ):
        for i, (o, h, low, c, v) in enumerate(rows):
            q, src = quality_of(i)
            copy.write_row((symbol, timeframe, start + i * step, o, h, low, c, v, "1m", src, 5, q, 1))
    return start + n * step


def add_minute_bars(
    conn: psycopg.Connection, symbol: str, start: datetime, n: int, seed: int = 2, start_price: float = 100.0
) -> datetime:
    rows = random_walk(n, seed, start_price)
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source) FROM STDIN"
        ) as copy,
    ):
        for i, (o, h, low, c, v) in enumerate(rows):
            copy.write_row((symbol, "1m", start + i * timedelta(minutes=1), o, h, low, c, v, "test"))
    return start + n * timedelta(minutes=1)


def standard_fixture(conn: psycopg.Connection, bars: int = 600, now: datetime = NOW) -> dict[str, object]:
    """Three symbols, seven tasks, one hard_failed and one disabled; `bars` 5m bars of ESZ4.

    With the default clock (Friday 15:07:30): ESZ4 5m is caught up (1m data runs through 15:06, the
    window 15:05-15:10 is open); ESZ4 1h lags two hours behind its 5m source; GCZ4 5m is hard_failed;
    CLZ4 15m is disabled. Another `now` shifts every time by the same amount.
    """
    shift = now - NOW
    at = lambda *args: datetime(*args, tzinfo=UTC) + shift  # noqa: E731
    add_symbols(conn, "ESZ4", "GCZ4", "CLZ4")
    end_5m = at(2024, 11, 22, 15, 5)
    start_5m = end_5m - bars * FIVE_MIN
    add_derived_bars(conn, "ESZ4", "5m", start_5m, bars, step=FIVE_MIN, start_price=5950.0)
    add_minute_bars(conn, "ESZ4", end_5m - timedelta(minutes=60), 62, start_price=5950.0)  # through 15:06
    poor = sum(1 for i in range(bars) if quality_of(i)[0] <= 0)
    tasks = [
        Task("ESZ4", "5m", "1m", end_5m, bars_created=bars, bars_poor=poor, next_run=end_5m + 2 * FIVE_MIN),
        Task("ESZ4", "1h", "5m", at(2024, 11, 22, 13), next_run=now, bars_created=1480, bars_poor=3),
        Task("ESZ4", "15m", "5m", at(2024, 11, 22, 15), mandatory=False, next_run=at(2024, 11, 22, 15, 15)),
        Task("GCZ4", "5m", "1m", at(2024, 11, 20), status="hard_failed", streak=4, next_run=now + timedelta(minutes=10),
             last_error="division by zero in catchup_aggregation_range"),
        Task("GCZ4", "1h", "5m", None, next_run=now),
        Task("CLZ4", "5m", "1m", at(2024, 11, 22, 15), status="running", bars_created=8200, bars_poor=41),
        Task("CLZ4", "15m", "5m", at(2024, 11, 1), enabled=False, mandatory=False,
             status="disabled", streak=3, last_error="relation \"derived_data_bars_tmp\" does not exist"),
    ]  # fmt: skip
    for t in tasks:
        add_task(conn, t)
    conn.execute(
        "UPDATE data_agg_state SET lease_owner = 'host-a:4242:ab12cd:0', lease_expires_at = %s,"
        " running_started_at_utc = %s WHERE canonical_symbol = 'CLZ4' AND timeframe = '5m'",
        (now + timedelta(minutes=4), now - timedelta(minutes=1)),
    )
    return {"tasks": tasks, "bars": bars, "end_5m": end_5m, "start_5m": start_5m}
