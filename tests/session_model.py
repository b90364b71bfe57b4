"""The catch-up rules of DESIGN.md 4 over a trading session's windows (DESIGN.md 3b), as a plain loop.

The windows come from baragg.sessions.windows (pure Python, cut from the materialised trading days);
the rules are the reference model's, one window at a time: windows are no longer contiguous, so "the
next window" is the next one in the list, rows outside every window belong to none, and at the end of
the known windows the cursor waits at the last one's end. Used only by tests.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from datetime import datetime, timedelta

from baragg.sessions import Window
from baragg.timeframes import LADDER, quality_score
from reference_model import Result, World, aggregate


def first_window(wins: list[Window], cursor: datetime, agg_start: datetime) -> int | None:
    """Rule 1 with an unaligned cursor: the first window ending after the cursor that does not start
    before agg_start."""
    return next((i for i, w in enumerate(wins) if w.end > cursor and w.start >= agg_start), None)


def bootstrap(world: World, symbol: str, tf_name: str, wins: list[Window], now: datetime) -> datetime | None:
    """The window containing the first row at or after agg_start anywhere down the chain (or the
    next one); without any, the window containing now (or the next one)."""
    agg_start = world.task(symbol, tf_name).agg_start
    levels, level = [], tf_name
    while level in LADDER:
        level = LADDER[level].source
        levels.append(level)
    later = [r.ts for lv in levels for r in world.source_rows(symbol, lv) if r.ts >= agg_start]
    moment = min(later) if later else now
    return next((w.start for w in wins if w.end > moment), None)


def source_task_waits(world: World, symbol: str, tf_name: str, window_end: datetime) -> bool:
    """Rule 3 (as the reference model states it): the source task's cursor is before the window end
    and its own source has rows between that cursor and the window end."""
    tf = LADDER[tf_name]
    if not tf.derived_source or (symbol, tf.source) not in world.tasks:
        return False
    source_cursor = world.tasks[(symbol, tf.source)].cursor
    if source_cursor is not None and source_cursor >= window_end:
        return False
    own = [r.ts for r in world.source_rows(symbol, LADDER[tf.source].source)]
    first = 0 if source_cursor is None else bisect.bisect_left(own, source_cursor)
    return first < len(own) and own[first] < window_end


def catch_up(
    world: World,
    symbol: str,
    tf_name: str,
    cursor: datetime,
    wins: list[Window],
    now: datetime,
    derivation_version: int = 1,
    ignore_confirmation: bool = False,
) -> Result:
    """Catch one task up to where the rules stop it (no bound on the number of windows)."""
    tf = LADDER[tf_name]
    task = world.task(symbol, tf_name)
    sparse = symbol in world.sparse
    rows = world.source_rows(symbol, tf.source)
    stamps = [r.ts for r in rows]
    result = Result(agg_start_enforced=task.agg_start)
    i = first_window(wins, cursor, task.agg_start)
    if i is None:
        result.cursor_advanced_to = cursor
        return result
    while i < len(wins):
        w = wins[i]
        if not ignore_confirmation and now < w.end + timedelta(seconds=task.delay_seconds):
            break  # rule 2
        if source_task_waits(world, symbol, tf_name, w.end):
            break  # rule 3
        inside = rows[bisect.bisect_left(stamps, w.start) : bisect.bisect_left(stamps, w.end)]
        if inside:  # rule 4
            result.windows_processed += 1
            quality = quality_score(len(inside), w.expected, sparse)
            if quality is None:
                result.bars_skipped += 1
            else:
                world.derived.setdefault((symbol, tf_name), {})[w.start] = replace(
                    aggregate(inside),
                    ts=w.start,
                    source_candles=len(inside),
                    expected_candles=w.expected,
                    quality_score=quality,
                    source_timeframe=tf.source,
                    derivation_version=derivation_version,
                )
                result.bars_created += 1
                result.bars_quality_poor += quality <= 0
        elif stamps and stamps[-1] >= w.end:  # rule 5: a gap
            result.gaps_skipped += 1
        else:  # rule 5: the frontier
            break
        i += 1
    result.cursor_advanced_to = wins[i].start if i < len(wins) else wins[-1].end
    return result
