"""The catch-up rules of DESIGN.md 3 and 4 as a plain Python loop: the executable statement of them.

One window at a time, in time order, exactly as the rules are written; no cleverness, no speed.
Tests run the set-based SQL and this model on the same data and require the same derived bars, the
same cursors and the same result counts. Used only by tests.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from baragg.timeframes import LADDER, Timeframe, bucket_start, quality_score

# A task without an explicit start (the column's default '-infinity', and a missing task row): no lower
# bound, the task starts at its first source row.
DEFAULT_AGG_START: datetime | None = None


@dataclass(frozen=True)
class Bar:
    """A source or derived bar. Derived bars also carry the aggregation metadata."""

    ts: datetime
    open: float
    high: float
    low: float
    close: float
    vol: float | None = None
    vwap: float | None = None
    trade_count: int | None = None
    is_partial: bool = False
    deleted: bool = False
    source_candles: int | None = None
    expected_candles: int | None = None
    quality_score: int | None = None
    source_timeframe: str | None = None
    derivation_version: int | None = None
    source: str = "agg"


@dataclass
class Task:
    cursor: datetime | None = None
    delay_seconds: int = 0
    agg_start: datetime | None = DEFAULT_AGG_START  # None: no lower bound ('-infinity')


@dataclass
class World:
    """What the database holds, as far as the rules care."""

    raw: dict[str, list[Bar]] = field(default_factory=dict)  # symbol -> 1m bars (data_bars)
    # (symbol, timeframe) -> active derived bars by ts; soft-deleted ones are kept apart, never used.
    derived: dict[tuple[str, str], dict[datetime, Bar]] = field(default_factory=dict)
    deleted: list[tuple[str, str, Bar]] = field(default_factory=list)
    tasks: dict[tuple[str, str], Task] = field(default_factory=dict)
    sparse: set[str] = field(default_factory=set)

    def source_rows(self, symbol: str, tf_name: str) -> list[Bar]:
        """Usable bars of a timeframe, sorted by time: not partial, not soft-deleted."""
        if tf_name == "1m":
            rows = self.raw.get(symbol, [])
        else:
            rows = list(self.derived.get((symbol, tf_name), {}).values())
        return sorted((r for r in rows if not r.is_partial and not r.deleted), key=lambda r: r.ts)

    def task(self, symbol: str, tf_name: str) -> Task:
        return self.tasks.get((symbol, tf_name), Task())


@dataclass
class Result:
    windows_processed: int = 0
    cursor_advanced_to: datetime | None = None
    bars_created: int = 0
    bars_quality_poor: int = 0
    bars_skipped: int = 0
    gaps_skipped: int = 0
    continue_: bool = False
    agg_start_enforced: datetime | None = None


def aggregate(rows: list[Bar]) -> Bar:
    """One bar from the source bars of a window (sorted by time)."""
    vols = [r.vol for r in rows if r.vol is not None]
    weighted = [(r.vwap, r.vol) for r in rows if r.vwap is not None and r.vol is not None]
    weight = sum(v for _, v in weighted)
    counts = [r.trade_count for r in rows if r.trade_count is not None]
    return Bar(
        ts=rows[0].ts,
        open=rows[0].open,
        high=max(r.high for r in rows),
        low=min(r.low for r in rows),
        close=rows[-1].close,
        vol=sum(vols) if vols else None,
        vwap=sum(p * v for p, v in weighted) / weight if weighted and weight != 0 else None,
        trade_count=sum(counts) if counts else None,
    )


def first_window_at_or_after(tf: Timeframe, ts: datetime) -> datetime:
    start = bucket_start(tf, ts)
    return start if start == ts else start + tf.interval


def bootstrap(world: World, symbol: str, tf_name: str, now: datetime) -> datetime:
    """Rule 'Bootstrap' of DESIGN.md 4."""
    tf = LADDER[tf_name]
    agg_start = world.task(symbol, tf_name).agg_start
    later = [r.ts for r in world.source_rows(symbol, tf.source) if agg_start is None or r.ts >= agg_start]
    if not later:
        return bucket_start(tf, now) + tf.interval
    return bucket_start(tf, min(later) if agg_start is None else max(agg_start, min(later)))


def source_task_waits(
    world: World, symbol: str, tf: Timeframe, window_end: datetime, own_source: list[datetime]
) -> bool:
    """Rule 3: the source task's cursor is before the window end and its own source (sorted
    ``own_source`` timestamps) has rows between that cursor and the window end."""
    if not tf.derived_source or (symbol, tf.source) not in world.tasks:
        return False
    source_cursor = world.tasks[(symbol, tf.source)].cursor
    if source_cursor is not None and source_cursor >= window_end:
        return False
    first = 0 if source_cursor is None else bisect.bisect_left(own_source, source_cursor)
    return first < len(own_source) and own_source[first] < window_end


def catch_up(
    world: World,
    symbol: str,
    tf_name: str,
    cursor: datetime,
    max_windows: int | None = 100,
    now: datetime | None = None,
    derivation_version: int = 1,
    ignore_confirmation: bool = False,
) -> Result:
    """catchup_aggregation_range, one window at a time. Writes derived bars into ``world``."""
    tf = LADDER[tf_name]
    now = now or datetime.now(UTC)
    task = world.task(symbol, tf_name)
    sparse = symbol in world.sparse
    rows = world.source_rows(symbol, tf.source)
    stamps = [r.ts for r in rows]
    # The source task's own source (rule 3): not written by this call, so read once.
    own_source = (
        [r.ts for r in world.source_rows(symbol, LADDER[tf.source].source)] if tf.derived_source else []
    )
    result = Result(agg_start_enforced=task.agg_start)

    # Rule 1: never a window starting before agg_start (the one containing an unaligned agg_start
    # is skipped too). An unaligned cursor counts from the start of its window.
    window_start = bucket_start(tf, cursor)
    if task.agg_start is not None:
        window_start = max(window_start, first_window_at_or_after(tf, task.agg_start))
    while True:
        if max_windows is not None and result.windows_processed >= max_windows:
            result.continue_ = True  # rule 6
            break
        window_end = window_start + tf.interval
        if not ignore_confirmation and now < window_end + timedelta(seconds=task.delay_seconds):
            break  # rule 2: not final
        if source_task_waits(world, symbol, tf, window_end, own_source):
            break  # rule 3
        inside = rows[bisect.bisect_left(stamps, window_start) : bisect.bisect_left(stamps, window_end)]
        if inside:  # rule 4
            result.windows_processed += 1
            quality = quality_score(len(inside), tf.expected_source_bars, sparse)
            if quality is None:
                result.bars_skipped += 1
            else:
                bar = replace(
                    aggregate(inside),
                    ts=window_start,
                    source_candles=len(inside),
                    expected_candles=tf.expected_source_bars,
                    quality_score=quality,
                    source_timeframe=tf.source,
                    derivation_version=derivation_version,
                )
                world.derived.setdefault((symbol, tf_name), {})[window_start] = bar
                result.bars_created += 1
                result.bars_quality_poor += quality <= 0
        elif stamps and stamps[-1] >= window_end:  # rule 5: a gap
            result.gaps_skipped += 1
        else:  # rule 5: the frontier
            break
        window_start = window_end
    result.cursor_advanced_to = window_start
    return result
