"""The rules of DESIGN.md 3, 4 and 5 as plain Python loops: the executable statement of them.

One window at a time, in time order, exactly as the rules are written; no cleverness, no speed.
Tests run the set-based SQL and this model on the same data and require the same derived bars, the
same cursors, the same logged windows and the same result counts. Used only by tests.

What it covers:
- ``bootstrap``: a task's first cursor (with no source data: the window containing now);
- ``catch_up``: catchup_aggregation_range, rules 1-6, with rule 3 recursive down the chain
  (``chain_waits``) and the honest counts (created, rewritten, unchanged, withdrawn);
- ``reaggregate``: the re-aggregation of logged windows (agg_reaggregate_tasks), which obeys the same
  finality (``window_final``): a logged window that is not final stays logged;
- the invalidation triggers: every change of a bar behind a dependent task's cursor logs the
  dependent's window (``World.pending``), as the SQL triggers do;
- ``from_scratch``: every bar the current raw rows give, the oracle of the finality tests.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from baragg.timeframes import LADDER as FULL_LADDER
from baragg.timeframes import Timeframe, bucket_start, quality_score

# This model states the rules on the 24x7 session's date_bin grid: 5m ... 1w. Monthly windows exist
# only as calendar months of a session's trading dates (tests/test_sessions.py models those).
LADDER = {name: tf for name, tf in FULL_LADDER.items() if tf.window_kind != "month"}

# A task without an explicit start (the column's default '-infinity', and a missing task row): no lower
# bound, the task starts at its first source row.
DEFAULT_AGG_START: datetime | None = None
# The columns a recomputation compares with the stored bar: equal ones are not rewritten.
VALUE_FIELDS = (
    "open", "high", "low", "close", "vol", "vwap", "trade_count", "is_partial", "source_timeframe",
    "source_candles", "expected_candles", "quality_score", "derivation_version",
)  # fmt: skip


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
    # (symbol, timeframe) -> logged windows waiting for re-aggregation (agg_invalidations)
    pending: dict[tuple[str, str], set[datetime]] = field(default_factory=dict)

    def source_rows(self, symbol: str, tf_name: str) -> list[Bar]:
        """Usable bars of a timeframe, sorted by time: not partial, not soft-deleted."""
        if tf_name == "1m":
            rows = self.raw.get(symbol, [])
        else:
            rows = list(self.derived.get((symbol, tf_name), {}).values())
        return sorted((r for r in rows if not r.is_partial and not r.deleted), key=lambda r: r.ts)

    def task(self, symbol: str, tf_name: str) -> Task:
        return self.tasks.get((symbol, tf_name), Task())

    # -- the invalidation triggers (DESIGN.md 5) ------------------------------------------------
    def changed(self, symbol: str, tf_name: str, ts: datetime) -> None:
        """A bar of ``tf_name`` at ``ts`` changed what aggregation reads (inserted, new values,
        withdrawn): log the window of every task built from it whose cursor is past that window
        (and which starts at or after its agg_start). Changes at or after a cursor are future work."""
        for (sym, dependent), task in self.tasks.items():
            tf = LADDER[dependent]
            if sym != symbol or tf.source != tf_name or task.cursor is None or ts >= task.cursor:
                continue
            window = bucket_start(tf, ts)
            if window < bucket_start(tf, task.cursor) and (
                task.agg_start is None or window >= task.agg_start
            ):
                self.pending.setdefault((symbol, dependent), set()).add(window)

    def put_raw(self, symbol: str, bar: Bar) -> None:
        """Insert or correct a 1m bar (a delivery, on time or late); logs what a trigger logs."""
        rows = self.raw.setdefault(symbol, [])
        old = next((r for r in rows if r.ts == bar.ts), None)
        if old == bar:
            return  # identical values: nothing changes, nothing is logged
        if old is not None:
            rows.remove(old)
        rows.append(bar)
        rows.sort(key=lambda r: r.ts)
        if (old is not None and not old.is_partial) or not bar.is_partial:
            self.changed(symbol, "1m", bar.ts)

    def remove_raw(self, symbol: str, ts: datetime) -> None:
        """A 1m bar withdrawn by its provider (deleted from data_bars)."""
        rows = self.raw.get(symbol, [])
        old = next((r for r in rows if r.ts == ts), None)
        if old is not None:
            rows.remove(old)
            if not old.is_partial:
                self.changed(symbol, "1m", ts)


@dataclass
class Result:
    windows_processed: int = 0
    cursor_advanced_to: datetime | None = None
    bars_created: int = 0
    bars_rewritten: int = 0
    bars_unchanged: int = 0
    bars_withdrawn: int = 0
    bars_quality_poor: int = 0
    bars_skipped: int = 0
    gaps_skipped: int = 0
    continue_: bool = False
    agg_start_enforced: datetime | None = None


@dataclass
class Reaggregated:
    """agg_reaggregate_tasks' counts for one task."""

    windows: int = 0
    bars_created: int = 0
    bars_rewritten: int = 0
    bars_unchanged: int = 0
    bars_withdrawn: int = 0
    bars_quality_poor: int = 0
    entries_dropped: int = 0
    entries_waiting: int = 0

    @property
    def bars_reaggregated(self) -> int:
        return self.bars_created + self.bars_rewritten


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


def window_bar(
    tf: Timeframe, window_start: datetime, inside: list[Bar], sparse: bool, derivation_version: int = 1
) -> Bar | None:
    """The bar a window's source rows give, or None when its quality is too low to store it."""
    quality = quality_score(len(inside), tf.expected_source_bars, sparse) if inside else None
    if quality is None:
        return None
    return replace(
        aggregate(inside),
        ts=window_start,
        source_candles=len(inside),
        expected_candles=tf.expected_source_bars,
        quality_score=quality,
        source_timeframe=tf.source,
        derivation_version=derivation_version,
    )


def same_values(a: Bar, b: Bar) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in VALUE_FIELDS)


def store(world: World, symbol: str, tf_name: str, bar: Bar) -> str:
    """Upsert a bar: 'created', 'rewritten' or 'unchanged' (an equal bar is not written)."""
    bars = world.derived.setdefault((symbol, tf_name), {})
    old = bars.get(bar.ts)
    if old is not None and same_values(old, bar):
        return "unchanged"
    bars[bar.ts] = bar
    world.changed(symbol, tf_name, bar.ts)
    return "created" if old is None else "rewritten"


def withdraw(world: World, symbol: str, tf_name: str, ts: datetime) -> bool:
    """Soft-delete the active bar at ts, if any."""
    old = world.derived.get((symbol, tf_name), {}).pop(ts, None)
    if old is None:
        return False
    world.deleted.append((symbol, tf_name, replace(old, deleted=True)))
    world.changed(symbol, tf_name, ts)
    return True


def first_window_at_or_after(tf: Timeframe, ts: datetime) -> datetime:
    start = bucket_start(tf, ts)
    return start if start == ts else start + tf.interval


def bootstrap(world: World, symbol: str, tf_name: str, now: datetime) -> datetime:
    """Rule 'Bootstrap' of DESIGN.md 4: the window of the first row at or after agg_start anywhere
    down the chain (the source bars, their source's, ... the 1m bars: a level whose source is not
    built yet starts where the data below it starts); with none, the window containing now (not
    final yet, so nothing is built early)."""
    tf = LADDER[tf_name]
    agg_start = world.task(symbol, tf_name).agg_start
    levels = [tf.source] + [LADDER[below].source for below in chain_below(tf_name)]
    later = [
        r.ts
        for level in levels
        for r in world.source_rows(symbol, level)
        if agg_start is None or r.ts >= agg_start
    ]
    if not later:
        return bucket_start(tf, now)
    return bucket_start(tf, min(later) if agg_start is None else max(agg_start, min(later)))


def chain_below(tf_name: str) -> list[str]:
    """The tasks a timeframe is built from, nearest first: 1w -> [1d, 1h, 5m]; 5m -> []."""
    out = []
    source = LADDER[tf_name].source
    while source in LADDER:
        out.append(source)
        source = LADDER[source].source
    return out


@dataclass
class _Level:
    """One task below in the chain, as rule 3 reads it (read once per call: the call writes none)."""

    cursor: datetime | None
    source_times: list[datetime]
    pending: set[datetime]


def _chain(world: World, symbol: str, tf_name: str) -> list[_Level]:
    return [
        _Level(
            cursor=world.tasks[(symbol, lower)].cursor,
            source_times=[r.ts for r in world.source_rows(symbol, LADDER[lower].source)],
            pending=set(world.pending.get((symbol, lower), set())),
        )
        for lower in chain_below(tf_name)
        if (symbol, lower) in world.tasks
    ]


def chain_waits(levels: list[_Level], window_end: datetime) -> bool:
    """Rule 3, recursive: some task below in the chain still has unprocessed input before the window
    end: its cursor is before the window end and its own source has rows between that cursor and
    the window end, or it has a logged window starting before the window end."""
    for level in levels:
        if level.cursor is None or level.cursor < window_end:
            first = 0 if level.cursor is None else bisect.bisect_left(level.source_times, level.cursor)
            if first < len(level.source_times) and level.source_times[first] < window_end:
                return True
        if any(ws < window_end for ws in level.pending):
            return True
    return False


def source_task_waits(world: World, symbol: str, tf: Timeframe, window_end: datetime) -> bool:
    """Rule 3 for one window of ``tf`` (the whole chain below it)."""
    return chain_waits(_chain(world, symbol, tf.name), window_end)


def catch_up(
    world: World,
    symbol: str,
    tf_name: str,
    cursor: datetime,
    max_windows: int | None,
    now: datetime,
    derivation_version: int = 1,
    ignore_confirmation: bool = False,
) -> Result:
    """The catch-up of catchup_aggregation_range, one window at a time. Writes into ``world``."""
    tf = LADDER[tf_name]
    task = world.task(symbol, tf_name)
    sparse = symbol in world.sparse
    rows = world.source_rows(symbol, tf.source)
    stamps = [r.ts for r in rows]
    levels = _chain(world, symbol, tf_name)
    result = Result(agg_start_enforced=task.agg_start)
    storable: set[datetime] = set()

    # Rule 1: never a window starting before agg_start (the one containing an unaligned agg_start
    # is skipped too). An unaligned cursor counts from the start of its window.
    start = bucket_start(tf, cursor)
    if task.agg_start is not None:
        start = max(start, first_window_at_or_after(tf, task.agg_start))
    window_start = start
    # Ends: each pass moves one window on, and a pass that does not stop needs a source row at or
    # after the window's end (rules 4 and 5), so there are at most len(rows) + gaps passes.
    while True:
        if max_windows is not None and result.windows_processed >= max_windows:
            result.continue_ = True  # rule 6
            break
        window_end = window_start + tf.interval
        if not ignore_confirmation and now < window_end + timedelta(seconds=task.delay_seconds):
            break  # rule 2: not final
        if chain_waits(levels, window_end):
            break  # rule 3
        inside = rows[bisect.bisect_left(stamps, window_start) : bisect.bisect_left(stamps, window_end)]
        if inside:  # rule 4
            result.windows_processed += 1
            bar = window_bar(tf, window_start, inside, sparse, derivation_version)
            if bar is None:
                result.bars_skipped += 1
            else:
                storable.add(window_start)
                outcome = store(world, symbol, tf_name, bar)
                setattr(result, f"bars_{outcome}", getattr(result, f"bars_{outcome}") + 1)
                result.bars_quality_poor += outcome != "unchanged" and bar.quality_score <= 0
        elif stamps and stamps[-1] >= window_end:  # rule 5: a gap
            result.gaps_skipped += 1
        else:  # rule 5: the frontier
            break
        window_start = window_end
    result.cursor_advanced_to = window_start
    # Stored bars of the windows passed over that have no storable bar now (a cursor moved back over
    # bars whose source changed) are withdrawn.
    for ts in sorted(world.derived.get((symbol, tf_name), {})):
        if start <= ts < window_start and ts not in storable:
            result.bars_withdrawn += withdraw(world, symbol, tf_name, ts)
    return result


def window_final(world: World, symbol: str, tf_name: str, window_start: datetime, now: datetime) -> bool:
    """Rules 2 and 3: the window's end plus the delay has passed and nothing below it is pending."""
    tf = LADDER[tf_name]
    end = window_start + tf.interval
    if now < end + timedelta(seconds=world.task(symbol, tf_name).delay_seconds):
        return False
    return not chain_waits(_chain(world, symbol, tf_name), end)


def reaggregate(
    world: World, symbol: str, tf_name: str, now: datetime, derivation_version: int = 1
) -> Reaggregated:
    """agg_reaggregate_tasks for one task: each logged window outside [agg_start, cursor) is dropped,
    each final one is recomputed (created, rewritten, unchanged or withdrawn) and dropped, the others
    stay logged. Windows are judged against the state before this call (one SQL statement)."""
    tf = LADDER[tf_name]
    out = Reaggregated()
    logged = world.pending.get((symbol, tf_name), set())
    if not logged:
        return out
    task = world.task(symbol, tf_name)
    sparse = symbol in world.sparse
    rows = world.source_rows(symbol, tf.source)
    stamps = [r.ts for r in rows]
    in_range = {
        ws
        for ws in logged
        if task.cursor is not None
        and (task.agg_start is None or task.agg_start <= ws)
        and ws < bucket_start(tf, task.cursor)
        and (symbol, tf_name) in world.tasks
    }
    final = {ws for ws in in_range if window_final(world, symbol, tf_name, ws, now)}
    taken = (logged - in_range) | final
    out.entries_dropped = len(logged - in_range)
    out.entries_waiting = len(logged) - len(taken)
    world.pending[(symbol, tf_name)] = logged - taken
    for ws in sorted(final):
        out.windows += 1
        inside = rows[bisect.bisect_left(stamps, ws) : bisect.bisect_left(stamps, ws + tf.interval)]
        bar = window_bar(tf, ws, inside, sparse, derivation_version)
        if bar is None:
            out.bars_withdrawn += withdraw(world, symbol, tf_name, ws)
            continue
        outcome = store(world, symbol, tf_name, bar)
        setattr(out, f"bars_{outcome}", getattr(out, f"bars_{outcome}") + 1)
        out.bars_quality_poor += outcome != "unchanged" and bar.quality_score <= 0
    return out


def from_scratch(
    raw: list[Bar], agg_start: dict[str, datetime], sparse: bool = False, symbol: str = "S"
) -> dict[tuple[str, datetime], Bar]:
    """Every derived bar the raw 1m rows give (every window final, every level complete): what a
    clean aggregation ends with. Keys (timeframe, window start)."""
    world = World(raw={symbol: list(raw)})
    if sparse:
        world.sparse.add(symbol)
    far = max((r.ts for r in raw), default=datetime(2025, 7, 1, tzinfo=UTC)) + timedelta(days=30)
    for tf_name in sorted(LADDER, key=lambda n: LADDER[n].duration_rank):
        world.tasks[(symbol, tf_name)] = Task(agg_start=agg_start.get(tf_name, DEFAULT_AGG_START))
    for tf_name in sorted(LADDER, key=lambda n: LADDER[n].duration_rank):
        cursor = bootstrap(world, symbol, tf_name, far)
        world.tasks[(symbol, tf_name)].cursor = catch_up(
            world, symbol, tf_name, cursor, None, far
        ).cursor_advanced_to
    return {(tf, ts): bar for (_, tf), bars in world.derived.items() for ts, bar in bars.items()}
