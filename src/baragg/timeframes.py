"""The timeframe ladder: intervals, sources, alignment and the quality rule (DESIGN.md 3).

This mirrors the ``agg_timeframes`` table that migration 0002 fills and every database function
reads; a test checks that the two are equal. Python uses it for ordering, display, verification and
the tests' reference model; the aggregation itself runs in PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MONDAY_EPOCH = datetime(1970, 1, 5, tzinfo=UTC)  # the epoch was a Thursday


@dataclass(frozen=True)
class Timeframe:
    """One rung of the ladder: bars of ``name`` are built from bars of ``source``."""

    name: str
    interval: timedelta
    source: str
    source_table: str  # 'data_bars' (raw 1m bars) or 'derived_data_bars'
    expected_source_bars: int  # denominator of the quality ratio
    max_source_bars: int  # how many source bars fit in one window (7 for 1w, of which 5 expected)
    origin: datetime  # buckets are aligned to this instant
    duration_rank: int
    # How a session cuts the windows: 'interval' (open + k * interval, clipped at the close), 'session'
    # (one trading session), 'week' (a trading week), 'month' (a calendar month of trading dates).
    window_kind: str = "interval"

    def bucket_start(self, ts: datetime) -> datetime:
        """Start of the window containing ``ts`` (PostgreSQL's date_bin with the ladder's origin)."""
        return bucket_start(self, ts)

    @property
    def derived_source(self) -> bool:
        """Whether the source bars are themselves built by a task (rule 3 of DESIGN.md 4 applies)."""
        return self.source_table == "derived_data_bars"


_KINDS = {"1d": "session", "1w": "week", "1mo": "month"}


def _tf(name: str, minutes: int, source: str, expected: int, max_bars: int, rank: int) -> Timeframe:
    return Timeframe(
        name=name,
        interval=timedelta(minutes=minutes),
        source=source,
        source_table="data_bars" if source == "1m" else "derived_data_bars",
        expected_source_bars=expected,
        max_source_bars=max_bars,
        origin=MONDAY_EPOCH if name == "1w" else EPOCH,
        duration_rank=rank,
        window_kind=_KINDS.get(name, "interval"),
    )


LADDER: dict[str, Timeframe] = {
    tf.name: tf
    for tf in (
        _tf("5m", 5, "1m", 5, 5, 1),
        _tf("15m", 15, "5m", 3, 3, 2),
        _tf("1h", 60, "5m", 12, 12, 3),
        _tf("4h", 240, "1h", 4, 4, 4),
        _tf("1d", 1440, "1h", 24, 24, 5),
        _tf("1w", 10080, "1d", 5, 7, 6),
        # Months are never date_bin buckets: the interval (31 days) only bounds a window's span, and the
        # expected 21 is nominal (a month expects the trading days its session has).
        _tf("1mo", 744 * 60, "1d", 21, 31, 7),
    )
}

# Every timeframe a bar can have: the raw one plus the ladder, shortest first.
ALL_TIMEFRAMES: tuple[str, ...] = ("1m", *sorted(LADDER, key=lambda n: LADDER[n].duration_rank))


def timeframe(name: str) -> Timeframe:
    """The ladder entry for ``name``; a ValueError names the valid ones."""
    try:
        return LADDER[name]
    except KeyError:
        raise ValueError(f"unknown timeframe {name!r}: expected one of {', '.join(LADDER)}") from None


def bucket_start(tf: Timeframe, ts: datetime) -> datetime:
    """Start of the ``tf`` window containing ``ts`` (an aware datetime) on the 24x7 session's date_bin
    grid; months have no such grid (baragg.sessions cuts them)."""
    if tf.window_kind == "month":
        raise ValueError("1mo windows are calendar months of trading dates, not fixed buckets")
    return ts - (ts - tf.origin) % tf.interval


def quality_score(source_candles: int, expected_candles: int, is_sparse: bool = False) -> int | None:
    """Quality of a window from r = source_candles / expected_candles; None: not stored.

    r >= 1 -> 2, r >= 0.8 -> 1, r >= 0.6 -> 0, r >= 0.55 -> -1, below: None (insufficient), except
    that sparse assets keep any window with a source bar, at -1. Integer comparisons, so a ratio
    exactly on a boundary is never misjudged by float rounding (same as agg_quality_score in SQL).
    """
    n, e = source_candles, expected_candles
    if n >= e:
        return 2
    if 5 * n >= 4 * e:
        return 1
    if 5 * n >= 3 * e:
        return 0
    if 20 * n >= 11 * e:
        return -1
    if is_sparse and n >= 1:
        return -1
    return None
