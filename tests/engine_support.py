"""Shared by the engine tests: load a reference-model World into PostgreSQL, call the SQL functions
the way a worker does, and compare the database with the model."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import psycopg

from reference_model import Bar, Result, World

FLOAT_TOLERANCE = 1e-9

CLEAN_TABLES = ("derived_data_bars", "data_bars", "data_agg_state", "core_asset_registry_all")


def clean(conn: psycopg.Connection) -> None:
    """Empty the tables between hypothesis examples (cheaper than a new database each time)."""
    for table in CLEAN_TABLES:
        conn.execute(f"DELETE FROM {table}")


def load(conn: psycopg.Connection, world: World, symbols: list[str]) -> None:
    """Write the world's registry, raw bars, derived bars and tasks."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO core_asset_registry_all (canonical_symbol, is_sparse) VALUES (%s, %s)",
            [(s, s in world.sparse) for s in symbols],
        )
        with cur.copy(
            "COPY data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
            " trade_count, is_partial, source) FROM STDIN"
        ) as copy:
            for symbol, bars in world.raw.items():
                for b in bars:
                    copy.write_row(
                        (symbol, "1m", b.ts, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count,
                         b.is_partial, "test")
                    )  # fmt: skip
        with cur.copy(
            "COPY derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol,"
            " vwap, trade_count, is_partial, source, source_timeframe, source_candles, expected_candles,"
            " quality_score, derivation_version, deleted_at) FROM STDIN"
        ) as copy:
            rows = [(s, tf, b) for (s, tf), bars in world.derived.items() for b in bars.values()]
            rows += world.deleted
            for symbol, tf, b in rows:
                copy.write_row(
                    (symbol, tf, b.ts, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count,
                     b.is_partial, b.source, b.source_timeframe, b.source_candles, b.expected_candles,
                     b.quality_score, b.derivation_version, "2025-01-01T00:00:00Z" if b.deleted else None)
                )  # fmt: skip
        cur.executemany(
            "INSERT INTO data_agg_state (canonical_symbol, timeframe, last_agg_bar_ts_utc,"
            " aggregation_delay_seconds, agg_start_utc) VALUES (%s, %s, %s, %s, %s)",
            [
                (s, tf, t.cursor, t.delay_seconds, "-infinity" if t.agg_start is None else t.agg_start)
                for (s, tf), t in world.tasks.items()
            ],
        )


def sql_catch_up(
    conn: psycopg.Connection,
    symbol: str,
    tf: str,
    cursor: datetime,
    max_windows: int | None,
    now: datetime,
    ignore_confirmation: bool = False,
) -> dict[str, Any]:
    row = conn.execute(
        "SELECT catchup_aggregation_range(p_symbol => %s, p_to_tf => %s, p_start_cursor_utc => %s,"
        " p_max_windows => %s, p_now_utc => %s, p_ignore_confirmation => %s)",
        (symbol, tf, cursor, max_windows, now, ignore_confirmation),
    ).fetchone()
    assert row is not None
    return row[0]


def as_dict(result: Result) -> dict[str, Any]:
    """The model's result in catchup_aggregation_range's JSON shape (timestamps as datetimes)."""
    return {
        "success": True,
        "windows_processed": result.windows_processed,
        "cursor_advanced_to": result.cursor_advanced_to,
        "bars_created": result.bars_created,
        "bars_rewritten": result.bars_rewritten,
        "bars_unchanged": result.bars_unchanged,
        "bars_withdrawn": result.bars_withdrawn,
        "bars_quality_poor": result.bars_quality_poor,
        "bars_skipped": result.bars_skipped,
        "gaps_skipped": result.gaps_skipped,
        "continue": result.continue_,
        "agg_start_enforced": result.agg_start_enforced,
    }


def parse_result(result: dict[str, Any]) -> dict[str, Any]:
    """The catch-up part of catchup_aggregation_range's answer (its "reaggregated" part, the logged
    windows it re-aggregated first, is compared separately where a test logs windows)."""
    out = dict(result)
    out.pop("reaggregated", None)
    for key in ("cursor_advanced_to", "agg_start_enforced"):
        out[key] = None if out[key] == "-infinity" else datetime.fromisoformat(out[key])
    return out


def store_cursor(conn: psycopg.Connection, world: World, symbol: str, tf: str, cursor: datetime) -> None:
    """What the worker does after a successful call: the cursor goes into data_agg_state."""
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE canonical_symbol = %s AND timeframe = %s",
        (cursor, symbol, tf),
    )
    world.tasks[(symbol, tf)].cursor = cursor


Row = tuple[Any, ...]


def _row(b: Bar) -> Row:
    return (b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count, b.is_partial, b.source,
            b.source_timeframe, b.source_candles, b.expected_candles, b.quality_score,
            b.derivation_version)  # fmt: skip


def db_derived(conn: psycopg.Connection) -> tuple[dict[tuple[str, str, datetime], Row], int]:
    rows = conn.execute(
        "SELECT canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,"
        " is_partial, source, source_timeframe, source_candles, expected_candles, quality_score,"
        " derivation_version FROM derived_data_bars WHERE deleted_at IS NULL"
    ).fetchall()
    (deleted,) = conn.execute(
        "SELECT count(*) FROM derived_data_bars WHERE deleted_at IS NOT NULL"
    ).fetchone()
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in rows}, deleted


def model_derived(world: World) -> dict[tuple[str, str, datetime], Row]:
    return {(s, tf, ts): _row(b) for (s, tf), bars in world.derived.items() for ts, b in bars.items()}


# vol and vwap are sums, added up in another order by PostgreSQL: equal within 1e-9. Everything else
# (open/high/low/close are picked, not computed) must be exactly equal.
SUMMED = {4, 5}


def _same(position: int, a: Any, b: Any) -> bool:
    if position in SUMMED and isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
    return a == b


def assert_same_bars(conn: psycopg.Connection, world: World) -> None:
    """Every active derived bar equal (floats from sums within 1e-9), and the same soft-deleted count."""
    got, deleted = db_derived(conn)
    want = model_derived(world)
    assert sorted(got) == sorted(want), (
        f"bars only in SQL: {sorted(set(got) - set(want))[:5]}; only in model: {sorted(set(want) - set(got))[:5]}"
    )
    for key, row in want.items():
        assert all(_same(i, x, y) for i, (x, y) in enumerate(zip(got[key], row, strict=True))), (
            key,
            got[key],
            row,
        )
    assert deleted == len(world.deleted)
