"""`baragg demo`: the whole system on a private embedded database, in seconds.

Registers three symbols, generates three weeks of realistic 1m bars (a random walk; FX/metal hours,
closed from Friday 21:00 to Sunday 22:00 UTC; missing minutes; a thin, sparse market), loads them
through the real ingest path, runs the real worker with a fixed clock at the end of the data, applies
a late correction to one 1m bar and runs again, then shows the task table, sample bars and an
independent verification. It never touches your own database: it uses its own data directory
(default: the user data dir's ``demo/``), unless ``--database-url`` is given to the demo itself.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import platformdirs
import psycopg
from psycopg import sql as pg_sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from baragg import ingest, migrate, registry, status, verify
from baragg.db import Database, open_database, start_embedded
from baragg.errors import redact

# Three weeks of trading: from the Sunday open to the Friday close, three weeks later.
START = datetime(2025, 9, 7, 22, 0, tzinfo=UTC)
END = datetime(2025, 9, 26, 21, 0, tzinfo=UTC)
NOW = END + timedelta(minutes=10)
CORRECTION = ("EURUSD", datetime(2025, 9, 17, 14, 32, tzinfo=UTC))


@dataclass(frozen=True)
class Market:
    symbol: str
    price: float
    volatility: float  # per-minute log-return standard deviation
    presence: float  # share of minutes that have a bar
    flags: tuple[str, ...]
    sparse: bool = False


MARKETS = (
    Market("EURUSD", 1.0850, 0.00012, 0.995, ("calc_15m", "calc_4h", "calc_1d")),
    Market("XAUUSD", 2520.0, 0.00025, 0.98, ("calc_15m", "calc_4h", "calc_1d", "calc_1w")),
    Market("XPTUSD", 980.0, 0.00040, 0.30, ("calc_1d",), sparse=True),
)


def default_data_dir() -> Path:
    return platformdirs.user_data_path("baragg") / "demo"


def trading_minutes(start: datetime, end: datetime) -> pd.DatetimeIndex:
    """Every minute the market is open: closed from Friday 21:00 to Sunday 22:00 UTC."""
    minutes = pd.date_range(start, end, freq="min", inclusive="left")
    weekday, hour = minutes.weekday, minutes.hour
    closed = ((weekday == 4) & (hour >= 21)) | (weekday == 5) | ((weekday == 6) & (hour < 22))
    return minutes[~closed]


def generate(market: Market, rng: np.random.Generator) -> pd.DataFrame:
    """Realistic-looking 1m bars: a random walk with intraminute range, volume and missing minutes."""
    minutes = trading_minutes(START, END)
    n = len(minutes)
    returns = rng.normal(0.0, market.volatility, n)
    close = market.price * np.exp(np.cumsum(returns))
    open_ = np.concatenate([[market.price], close[:-1]])
    spread = np.abs(rng.normal(0.0, market.volatility * 0.8, (2, n))) * close
    high = np.maximum(open_, close) + spread[0]
    low = np.minimum(open_, close) - spread[1]
    digits = 5 if market.price < 10 else 2
    bars = pd.DataFrame(
        {
            "canonical_symbol": market.symbol,
            "ts_utc": minutes,
            "open": open_.round(digits),
            "high": high.round(digits),
            "low": low.round(digits),
            "close": close.round(digits),
        }
    )
    # Rounding can push open/close a hair outside [low, high]: keep the bar consistent.
    bars["high"] = bars[["open", "high", "close"]].max(axis=1)
    bars["low"] = bars[["open", "low", "close"]].min(axis=1)
    bars["vol"] = rng.lognormal(3.0, 0.8, n).round(0)
    bars["vwap"] = ((bars["high"] + bars["low"] + 2 * bars["close"]) / 4).round(digits + 1)
    bars["trade_count"] = rng.poisson(bars["vol"] / 4 + 1).astype(int)
    keep = rng.random(n) < market.presence
    return bars[keep].reset_index(drop=True)


def _reset(url: str) -> None:
    """Drop and recreate the demo's database, so that every demo run starts the same."""
    name = conninfo_to_dict(url).get("dbname") or "baragg"
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(pg_sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pg_sql.Identifier(name)))
        conn.execute(pg_sql.SQL("CREATE DATABASE {}").format(pg_sql.Identifier(name)))


def run(
    console: Any,
    *,
    data_dir: Path | None = None,
    database_url: str | None = None,
    seed: int = 7,
) -> Database:
    """The demo, printing as it goes to ``console`` (a rich Console). Returns the database used."""
    from baragg import worker

    started = time.monotonic()

    def step(text: str) -> None:
        console.print(f"[bold cyan]▸[/] {text} [dim]({time.monotonic() - started:.1f}s)[/]")

    if database_url:
        db = open_database(database_url)
        where = "the database given with --database-url"
        dir_flag = f"--database-url '{redact(database_url)}'"  # the password is never printed
    else:
        data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        step(f"starting the embedded PostgreSQL in {data_dir}")
        # Not open_database(): that would prefer $DATABASE_URL, which the demo must never touch.
        db = Database(url=start_embedded(data_dir), embedded=True)
        _reset(db.url)
        where = f"the embedded server in {data_dir}"
        dir_flag = f"--data-dir {data_dir}"
    migrate.upgrade(db)
    step(f"schema ready on {where}")

    for market in MARKETS:
        flags = {name: True for name in market.flags}
        registry.add(db, market.symbol, asset_class="demo", is_sparse=market.sparse, **flags)
    names = ", ".join(f"{m.symbol}{' (sparse)' if m.sparse else ''}" for m in MARKETS)
    step(f"registered {names}")

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="baragg-demo-") as tmp:
        path = Path(tmp) / "demo_bars.csv"
        frames = [generate(m, rng) for m in MARKETS]
        bars = pd.concat(frames, ignore_index=True)
        bars["ts_utc"] = bars["ts_utc"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        bars.to_csv(path, index=False)
        report = ingest.ingest_file(db, path, source="demo")
        step(
            f"ingested {report.inserted:,} 1m bars ({START:%a %Y-%m-%d %H:%M} → {END:%a %Y-%m-%d %H:%M} UTC, "
            "weekends closed, missing minutes)"
        )

        summary = worker.run_once(db, now=NOW)
        totals = summary.totals
        step(
            f"worker run (--now {NOW:%Y-%m-%dT%H:%M}Z): {totals['task_runs']} task runs, "
            f"{totals['windows']:,} windows, {totals['bars_created']:,} bars created"
        )

        symbol, moment = CORRECTION
        with db.connect() as conn:
            row = conn.execute(
                "SELECT open, high, low, close, vol, vwap, trade_count FROM data_bars"
                " WHERE canonical_symbol = %s AND timeframe = '1m' AND ts_utc = %s",
                (symbol, moment),
            ).fetchone()
        if row is not None:
            o, h, lo, c, v, vw, tc = row
            corrected = Path(tmp) / "correction.csv"
            corrected.write_text(
                "canonical_symbol,ts_utc,open,high,low,close,vol,vwap,trade_count\n"
                f"{symbol},{moment:%Y-%m-%dT%H:%MZ},{o},{round(h + 0.0025, 5)},{lo},{c},{v},{vw},{tc}\n"
            )
            fix = ingest.ingest_file(db, corrected, source="demo-correction")
            step(
                f"late correction: {symbol} {moment:%Y-%m-%d %H:%M} high {h} → {round(h + 0.0025, 5)} "
                f"(updated {fix.updated} bar)"
            )
            again = worker.run_once(db, now=NOW).totals
            step(
                f"worker run again: {again.get('bars_reaggregated', 0):,} bars re-aggregated over the corrected "
                f"minute (its 5m, 15m, 1h, 4h and 1d bars), {again['bars_created']:,} new"
            )

    console.print()
    status.render(status.task_status(db, now=NOW), console=console, now=NOW)
    console.print()
    _show_samples(db, console)
    console.print()
    _show_verification(db, console)
    console.print()
    console.print(f"[bold]Done in {time.monotonic() - started:.1f}s.[/] Try next:")
    for command, why in (
        (f"baragg {dir_flag} status", "the task table"),
        (f"baragg {dir_flag} verify EURUSD 1h", "recompute the hours independently and compare"),
        (f"baragg {dir_flag} registry list", "the registered symbols"),
        (f"baragg {dir_flag} registry add GBPUSD --calc-4h", "add a symbol, then ingest its bars:"),
        (f"baragg {dir_flag} ingest bars.csv --symbol GBPUSD", "load a CSV/Parquet of 1m bars"),
        (f"baragg {dir_flag} run --once --now {NOW:%Y-%m-%dT%H:%M}Z", "aggregate what is due"),
    ):
        console.print(f"  [green]{command}[/]  [dim]# {why}[/]")
    return db


def _show_samples(db: Database, console: Any) -> None:
    from rich.table import Table

    table = Table(title="the newest bars per timeframe", header_style="bold", box=None)
    for name in ("symbol", "tf", "ts_utc", "open", "high", "low", "close", "vol", "n", "quality"):
        table.add_column(name, justify="left" if name in ("symbol", "tf", "ts_utc") else "right")
    with db.connect() as conn:
        for symbol, timeframe in (
            ("EURUSD", "5m"),
            ("EURUSD", "15m"),
            ("EURUSD", "1h"),
            ("EURUSD", "4h"),
            ("EURUSD", "1d"),
            ("XAUUSD", "1w"),
            ("XPTUSD", "5m"),
        ):
            rows = conn.execute(
                "SELECT ts_utc, open, high, low, close, vol, source_candles, expected_candles, quality_score"
                " FROM derived_data_bars WHERE canonical_symbol = %s AND timeframe = %s AND deleted_at IS NULL"
                " ORDER BY ts_utc DESC LIMIT 2",
                (symbol, timeframe),
            ).fetchall()
            for ts, o, h, lo, c, v, n, expected, q in reversed(rows):
                table.add_row(
                    symbol,
                    timeframe,
                    f"{ts.astimezone(UTC):%Y-%m-%d %H:%M}",
                    f"{o:g}",
                    f"{h:g}",
                    f"{lo:g}",
                    f"{c:g}",
                    f"{v:,.0f}" if v is not None else "-",
                    f"{n}/{expected}",
                    str(q),
                )
    console.print(table)


def _show_verification(db: Database, console: Any) -> None:
    """Independent recomputation of every EURUSD timeframe (what `baragg verify` does)."""
    symbol, moment = CORRECTION
    console.print("[bold]verify[/] (pandas recomputation from the source rows, independent of the SQL):")
    all_equal = True
    for timeframe in ("5m", "15m", "1h", "4h", "1d"):
        report = verify.verify(db, symbol, timeframe)
        all_equal = all_equal and report.ok
        if report.ok:
            console.print(f"  {symbol} {timeframe}: {report.equal:,} bars equal")
        else:
            times = [d.ts_utc for d in report.different] + report.missing + report.extra
            listed = ", ".join(f"{t:%m-%d %H:%M}" for t in sorted(times)[:3])
            console.print(
                f"  [yellow]{symbol} {timeframe}: {len(report.different)} different, {len(report.missing)} "
                f"missing, {len(report.extra)} extra[/] ({listed})"
            )
    if all_equal:
        console.print(f"  [dim](including the bars over the corrected minute {moment:%m-%d %H:%M})[/]")
    else:
        console.print(
            f"  [yellow]a difference at the corrected minute {moment:%m-%d %H:%M} means the late correction "
            "was not re-aggregated[/]"
        )
