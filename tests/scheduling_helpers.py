"""Shared setup for the scheduling and worker tests: registry rows, 1m bars, task rows."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

T0 = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)  # a Monday; for tests that pass the clock (now=, --now)


def days_ago(days: int) -> datetime:
    """Midnight UTC ``days`` days before today, on the real clock.

    For the daemon tests: `baragg worker` and worker.Worker run on the real clock, so their data is
    placed before it (a day's windows are final a day later), never at a fixed date that today's date
    may not have passed.
    """
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days)


def hours_ago(hours: int) -> datetime:
    """The start of the hour ``hours`` hours before the current one, on the real clock (see days_ago)."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours)


def add_assets(conn: psycopg.Connection, symbols: list[str], **flags: Any) -> None:
    """Registry rows (active and test_active by default); flags e.g. calc_4h=True."""
    cols = ["canonical_symbol", *flags]
    placeholders = ", ".join(["%s"] * len(cols))
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO core_asset_registry_all ({', '.join(cols)}) VALUES ({placeholders})",
            [(s, *flags.values()) for s in symbols],
        )


def add_minutes(conn: psycopg.Connection, symbols: list[str], start: datetime, end: datetime) -> int:
    """1m bars for every minute in [start, end) of every symbol, deterministic varied prices."""
    cur = conn.execute(
        """
        INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,
                               trade_count, source)
        SELECT sym, '1m', ts, p, p + 0.75, p - 0.5, p + 0.25, 1 + m %% 7, p + 0.1, 1 + m %% 3, 'test'
        FROM unnest(%(symbols)s::text[]) AS sym,
             generate_series(%(start)s::timestamptz, %(end)s::timestamptz - interval '1 minute',
                             interval '1 minute') AS ts,
             LATERAL (SELECT (extract(epoch FROM ts) / 60)::bigint AS m) AS mm,
             LATERAL (SELECT 100 + (m * 7 + length(sym) * 13) %% 29 + (m %% 1440) / 100.0 AS p) AS pp
        """,
        {"symbols": symbols, "start": start, "end": end},
    )
    return cur.rowcount


def set_agg_start(conn: psycopg.Connection, when: datetime) -> None:
    conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (when,))


def tasks_from(conn: psycopg.Connection, start: datetime) -> None:
    """Create the tasks now (the daemon's own sync keeps them) with agg_start_utc at ``start``, so
    data placed relative to the real clock is aggregated whatever the default agg_start_utc."""
    conn.execute("SELECT sync_agg_state_from_registry('prod')")
    set_agg_start(conn, start)


def task(conn: psycopg.Connection, symbol: str, timeframe: str) -> dict[str, Any]:
    """Every column of the task; agg_start_utc '-infinity' (from the first source row), which Python
    cannot hold, reads as None."""
    columns = [
        "NULLIF(agg_start_utc, '-infinity') AS agg_start_utc" if name == "agg_start_utc" else name
        for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'data_agg_state'"
            " ORDER BY ordinal_position"
        )
    ]
    cur = conn.execute(
        f"SELECT {', '.join(columns)} FROM data_agg_state WHERE canonical_symbol = %s AND timeframe = %s",
        (symbol, timeframe),
    )
    row = cur.fetchone()
    assert row is not None, f"no task {symbol} {timeframe}"
    return dict(zip([c.name for c in cur.description], row, strict=True))


def sql1(conn: psycopg.Connection, query: str, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def iso(ts: datetime) -> str:
    return ts.isoformat()


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def run_cli(
    *args: str, url: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run `baragg ARGS`; a command still running after ``timeout`` (default 240 s) fails the test."""
    kw.setdefault("timeout", 240)
    return subprocess.run(
        [sys.executable, "-m", "baragg.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": url, **(env or {})},
        **kw,
    )


def popen_cli(*args: str, url: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "baragg.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DATABASE_URL": url, **(env or {})},
    )
