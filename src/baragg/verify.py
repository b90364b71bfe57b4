"""Recompute derived bars independently of the SQL engine and compare them with what is stored.

Written from DESIGN.md section 3 and 4 alone (not from the engine's SQL), with pandas over the source
rows, so that it is a second opinion: after an incident, an operator runs ``baragg verify`` to learn
whether the stored bars are what the source data says they should be; our tests use it the same way.

Which windows are checked: those of the task's range that the worker has already passed, i.e. window
start ≥ the task's ``agg_start_utc`` and < its cursor (``last_agg_bar_ts_utc``), narrowed by
``--from``/``--to``. Without a task every window in the range is checked.

A symbol on a trading session (DESIGN.md 3b), and every 1mo level, is checked against windows cut here
from the session's stored trading days (``agg_session_days``: the calendar is the input, not the engine):
intraday windows from each session's open, the last clipped at its close, a day per session, weeks and
months of trading dates; rows outside every window belong to none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from baragg.db import Database
from baragg.errors import InvalidInput
from baragg.sql import query


@dataclass(frozen=True)
class Rung:
    """One timeframe of DESIGN.md section 3's table."""

    timeframe: str
    source: str
    interval: timedelta
    expected: int


_LADDER = {
    r.timeframe: r
    for r in (
        Rung("5m", "1m", timedelta(minutes=5), 5),
        Rung("15m", "5m", timedelta(minutes=15), 3),
        Rung("1h", "5m", timedelta(hours=1), 12),
        Rung("4h", "1h", timedelta(hours=4), 4),
        Rung("1d", "1h", timedelta(days=1), 24),
        Rung("1w", "1d", timedelta(weeks=1), 5),
        # Months are only ever cut from a session's trading days (24x7: every UTC day).
        Rung("1mo", "1d", timedelta(days=31), 21),
    )
}
_SOURCE_STEP = {"1m": timedelta(minutes=1), "5m": timedelta(minutes=5), "1h": timedelta(hours=1)}
# Weeks start on Monday 00:00 UTC; 1970-01-05 was a Monday (the epoch itself was a Thursday).
_WEEK_ORIGIN = pd.Timestamp("1970-01-05", tz="UTC")
_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")

VALUE_COLUMNS = ("open", "high", "low", "close", "vol", "vwap", "trade_count")
META_COLUMNS = ("source_candles", "expected_candles", "quality_score", "source_timeframe")


def rung(timeframe: str) -> Rung:
    try:
        return _LADDER[timeframe]
    except KeyError:
        raise InvalidInput(
            f"timeframe {timeframe!r} is not aggregated (one of: {', '.join(_LADDER)})"
        ) from None


def bucket_start(ts: pd.Series | pd.DatetimeIndex, timeframe: str) -> pd.Series:
    """The start of the window each timestamp falls in."""
    step = rung(timeframe).interval
    origin = _WEEK_ORIGIN if timeframe == "1w" else _EPOCH
    ts = pd.Series(ts)
    return origin + ((ts - origin) // step) * step


def _ceil_to_bucket(moment: datetime, timeframe: str) -> datetime:
    start = bucket_start(pd.Series([pd.Timestamp(moment)]), timeframe).iloc[0]
    if start < pd.Timestamp(moment):
        start += rung(timeframe).interval
    return start.to_pydatetime()


def quality(source_candles: int, expected: int, sparse: bool) -> int | None:
    """DESIGN.md 3: quality from r = source/expected; None = not stored."""
    r = source_candles / expected
    if r >= 1:
        return 2
    if r >= 0.8:
        return 1
    if r >= 0.6:
        return 0
    if r >= 0.55:
        return -1
    return -1 if sparse and source_candles >= 1 else None


def aggregate(source: pd.DataFrame, timeframe: str, *, sparse: bool) -> pd.DataFrame:
    """Bars of ``timeframe`` from source rows (ts_utc, open, high, low, close, vol, vwap, trade_count)."""
    spec = rung(timeframe)
    columns = ["ts_utc", *VALUE_COLUMNS, *META_COLUMNS]
    if source.empty:
        return pd.DataFrame(columns=columns).set_index("ts_utc")
    rows = source.sort_values("ts_utc").copy()
    rows["window"] = bucket_start(rows["ts_utc"], timeframe).to_numpy()
    both = rows["vwap"].notna() & rows["vol"].notna()
    rows["pv"] = (rows["vwap"] * rows["vol"]).where(both)
    rows["pv_vol"] = rows["vol"].where(both)
    groups = rows.groupby("window", sort=True)
    bars = pd.DataFrame(
        {
            "open": groups["open"].first(),
            "high": groups["high"].max(),
            "low": groups["low"].min(),
            "close": groups["close"].last(),
            "vol": groups["vol"].sum(min_count=1),
            "trade_count": groups["trade_count"].sum(min_count=1),
            "source_candles": groups.size(),
        }
    )
    pv = groups["pv"].sum(min_count=1)
    pv_vol = groups["pv_vol"].sum(min_count=1)
    bars["vwap"] = (pv / pv_vol).where(pv_vol.notna() & (pv_vol != 0))
    bars["expected_candles"] = spec.expected
    bars["quality_score"] = [quality(int(n), spec.expected, sparse) for n in bars["source_candles"]]
    bars["source_timeframe"] = spec.source
    bars = bars[bars["quality_score"].notna()]
    bars.index = pd.DatetimeIndex(bars.index, tz="UTC").rename("ts_utc")
    return bars[list(VALUE_COLUMNS) + list(META_COLUMNS)]


def session_windows(
    days: pd.DataFrame, timeframe: str, covered: tuple[Any, Any], *, weekdays_only: bool
) -> pd.DataFrame:
    """The windows (start, end, expected) of ``timeframe`` that trading ``days`` (trading_date, open,
    close; UTC) make: DESIGN.md 3b. Weeks and months only when wholly inside ``covered`` (the dates the
    days are known for)."""
    spec = rung(timeframe)
    step = _SOURCE_STEP[spec.source] if spec.source in _SOURCE_STEP else rung(spec.source).interval
    columns = ["start", "end", "expected"]
    if days.empty:
        return pd.DataFrame(columns=columns)
    if timeframe == "1d":
        out = pd.DataFrame({"start": days["open"], "end": days["close"]})
        out["expected"] = [math.ceil((e - b) / step) for b, e in zip(out["start"], out["end"], strict=True)]
        return out[columns].reset_index(drop=True)
    if timeframe in ("1w", "1mo"):
        dates = pd.to_datetime(days["trading_date"])
        freq = "W-SUN" if timeframe == "1w" else "M"
        period = dates.dt.to_period(freq)
        counted = (dates.dt.dayofweek < 5) if weekdays_only else pd.Series(True, index=days.index)
        frame = pd.DataFrame(
            {"period": period, "open": days["open"], "close": days["close"], "counted": counted}
        )
        grouped = frame.groupby("period", sort=True).agg(
            start=("open", "min"), end=("close", "max"), expected=("counted", "sum")
        )
        first, last = pd.Timestamp(covered[0]), pd.Timestamp(covered[1])
        inside = [p.start_time >= first and p.end_time.normalize() <= last for p in grouped.index]
        out = grouped[inside].reset_index(drop=True)
        out["expected"] = out["expected"].astype(int)
        return out[columns]
    starts, ends = [], []
    for opening, closing in zip(days["open"], days["close"], strict=True):
        for start in pd.date_range(opening, closing, freq=spec.interval, inclusive="left"):
            starts.append(start)
            ends.append(min(start + spec.interval, closing))
    out = pd.DataFrame({"start": starts, "end": ends})
    out["expected"] = [math.ceil((e - b) / step) for b, e in zip(out["start"], out["end"], strict=True)]
    return out[columns]


def aggregate_windows(
    source: pd.DataFrame, timeframe: str, windows: pd.DataFrame, *, sparse: bool
) -> pd.DataFrame:
    """Bars of ``timeframe`` from source rows over explicit ``windows`` (start, end, expected); rows in
    no window are ignored."""
    spec = rung(timeframe)
    columns = ["ts_utc", *VALUE_COLUMNS, *META_COLUMNS]
    if source.empty or windows.empty:
        return pd.DataFrame(columns=columns).set_index("ts_utc")
    rows = source.sort_values("ts_utc").copy()
    index = pd.IntervalIndex.from_arrays(
        pd.DatetimeIndex(windows["start"]), pd.DatetimeIndex(windows["end"]), closed="left"
    )
    position = index.get_indexer(pd.DatetimeIndex(rows["ts_utc"]))
    rows = rows[position >= 0]
    rows["window"] = pd.DatetimeIndex(windows["start"])[position[position >= 0]]
    expected_of = dict(zip(pd.DatetimeIndex(windows["start"]), windows["expected"], strict=True))
    if rows.empty:
        return pd.DataFrame(columns=columns).set_index("ts_utc")
    both = rows["vwap"].notna() & rows["vol"].notna()
    rows["pv"] = (rows["vwap"] * rows["vol"]).where(both)
    rows["pv_vol"] = rows["vol"].where(both)
    groups = rows.groupby("window", sort=True)
    bars = pd.DataFrame(
        {
            "open": groups["open"].first(),
            "high": groups["high"].max(),
            "low": groups["low"].min(),
            "close": groups["close"].last(),
            "vol": groups["vol"].sum(min_count=1),
            "trade_count": groups["trade_count"].sum(min_count=1),
            "source_candles": groups.size(),
        }
    )
    pv = groups["pv"].sum(min_count=1)
    pv_vol = groups["pv_vol"].sum(min_count=1)
    bars["vwap"] = (pv / pv_vol).where(pv_vol.notna() & (pv_vol != 0))
    bars["expected_candles"] = [int(expected_of[w]) for w in bars.index]
    bars["quality_score"] = [
        quality(int(n), int(e), sparse)
        for n, e in zip(bars["source_candles"], bars["expected_candles"], strict=True)
    ]
    bars["source_timeframe"] = spec.source
    bars = bars[bars["quality_score"].notna()]
    bars.index = pd.DatetimeIndex(bars.index).tz_convert("UTC").rename("ts_utc")
    return bars[list(VALUE_COLUMNS) + list(META_COLUMNS)]


@dataclass
class Difference:
    ts_utc: datetime
    columns: dict[str, tuple[Any, Any]]  # column -> (stored, expected)


@dataclass
class VerifyReport:
    symbol: str
    timeframe: str
    window_from: datetime | None
    window_to: datetime | None
    checked: int = 0  # windows with an expected or a stored bar
    equal: int = 0
    missing: list[datetime] = field(default_factory=list)
    extra: list[datetime] = field(default_factory=list)
    different: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def as_dict(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "from": self.window_from,
            "to": self.window_to,
            "ok": self.ok,
            "checked": self.checked,
            "equal": self.equal,
            "missing": self.missing,
            "extra": self.extra,
            "different": [
                {
                    "ts_utc": d.ts_utc,
                    "columns": {c: {"stored": s, "expected": e} for c, (s, e) in d.columns.items()},
                }
                for d in self.different
            ],
            "notes": self.notes,
        }


def _same(stored: Any, expected: Any, column: str) -> bool:
    missing_s = stored is None or (isinstance(stored, float) and math.isnan(stored))
    missing_e = expected is None or (isinstance(expected, float) and math.isnan(expected))
    if missing_s or missing_e:
        return missing_s and missing_e
    if column in ("open", "high", "low", "close", "vol", "vwap"):
        # Sums in a different order differ in the last bits; anything beyond that is a real difference.
        return math.isclose(float(stored), float(expected), rel_tol=1e-9, abs_tol=1e-12)
    if column == "source_timeframe":
        return str(stored) == str(expected)
    return int(stored) == int(expected)


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def verify(
    db: Database,
    symbol: str,
    timeframe: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> VerifyReport:
    """Recompute ``symbol``'s ``timeframe`` bars in [start, end) and diff them against the stored ones."""
    spec = rung(timeframe)
    with db.connect() as conn:
        asset = conn.execute(query("verify_asset"), {"symbol": symbol}).fetchone()
        if asset is None:
            raise InvalidInput(f"unknown symbol '{symbol}' (not in core_asset_registry_all)")
        sparse, session = bool(asset[0]), asset[1] or "24x7"
        on_session = session != "24x7" or timeframe == "1mo"
        windows = None
        if on_session:
            days, covered = _session_days(conn, session)
            windows = session_windows(days, timeframe, covered, weekdays_only=session == "24x7")
        task = conn.execute(query("verify_task"), {"symbol": symbol, "timeframe": timeframe}).fetchone()
        notes = [f"session {session}: windows cut from its trading days"] if on_session else []
        lo = start
        hi = end
        if task is None:
            notes.append(f"no task for {symbol} {timeframe}: checking every window in the range")
        else:
            agg_start, cursor = (t.astimezone(UTC) if t is not None else None for t in task)
            first = _first_window(agg_start, timeframe, windows)
            lo = max(lo, first) if lo else first
            if cursor is None:
                notes.append("the task has no cursor yet: nothing has been aggregated")
                hi = lo
            else:
                hi = min(hi, cursor) if hi else cursor
        if lo is not None:
            lo = _first_window(lo, timeframe, windows)
        if hi is not None and lo is not None and hi < lo:
            hi = lo
        bounds = {
            "symbol": symbol,
            "timeframe": timeframe,
            "source_timeframe": spec.source,
            "lo": lo or datetime(1, 1, 1, tzinfo=UTC),
            "hi": hi or datetime(9999, 1, 1, tzinfo=UTC),
        }
        source_query = "verify_source_base" if spec.source == "1m" else "verify_source_derived"
        source = _frame(conn.execute(query(source_query), bounds))
        # Stored bars are read from the user's --from, not from agg_start_utc: a bar before
        # agg_start_utc must not exist, and shows up as extra.
        stored_from = _first_window(start, timeframe, windows) if start else datetime(1, 1, 1, tzinfo=UTC)
        stored = _frame(conn.execute(query("verify_stored"), {**bounds, "lo": stored_from}))

    if windows is not None:
        inside = windows
        if lo is not None:
            inside = inside[inside["start"] >= pd.Timestamp(lo)]
        if hi is not None:
            inside = inside[inside["end"] <= pd.Timestamp(hi)]
        expected = aggregate_windows(source, timeframe, inside, sparse=sparse)
        if hi is not None and not stored.empty:
            # A stored bar whose window is not complete before hi is not checked (nor one in no window
            # that starts at or after hi).
            ends = dict(
                zip(pd.DatetimeIndex(windows["start"]), pd.DatetimeIndex(windows["end"]), strict=True)
            )
            keep = [ends.get(ts, ts) <= pd.Timestamp(hi) for ts in stored["ts_utc"]]
            stored = stored[keep]
    else:
        expected = aggregate(source, timeframe, sparse=sparse)
        # A window whose end lies past hi is not complete inside the range: leave it out.
        if hi is not None and not expected.empty:
            expected = expected[expected.index + spec.interval <= pd.Timestamp(hi)]
            stored = (
                stored[stored["ts_utc"] + spec.interval <= pd.Timestamp(hi)] if not stored.empty else stored
            )
    stored = stored.set_index("ts_utc") if not stored.empty else stored

    report = VerifyReport(symbol, timeframe, lo, hi, notes=notes)
    stored_times = set(stored.index) if not stored.empty else set()
    expected_times = set(expected.index)
    report.missing = sorted(t.to_pydatetime() for t in expected_times - stored_times)
    report.extra = sorted(t.to_pydatetime() for t in stored_times - expected_times)
    report.checked = len(stored_times | expected_times)
    for ts in sorted(expected_times & stored_times):
        want = expected.loc[ts]
        have = stored.loc[ts]
        diff = {
            column: (_plain(have[column]), _plain(want[column]))
            for column in (*VALUE_COLUMNS, *META_COLUMNS)
            if not _same(_plain(have[column]), _plain(want[column]), column)
        }
        if diff:
            report.different.append(Difference(ts.to_pydatetime(), diff))
        else:
            report.equal += 1
    return report


def _first_window(moment: datetime, timeframe: str, windows: pd.DataFrame | None) -> datetime:
    """The first window that starts at or after ``moment``."""
    if windows is None:
        return _ceil_to_bucket(moment, timeframe)
    later = windows["start"][windows["start"] >= pd.Timestamp(moment)]
    return later.min().to_pydatetime() if not later.empty else moment


def _session_days(conn: Any, session: str) -> tuple[pd.DataFrame, tuple[Any, Any]]:
    """Every stored trading day of ``session`` and the dates they are known for."""
    covered = conn.execute(query("verify_session_range"), {"session": session}).fetchone()
    rows = conn.execute(query("verify_session_days"), {"session": session}).fetchall()
    days = pd.DataFrame(rows, columns=["trading_date", "open", "close"])
    for column in ("open", "close"):
        days[column] = pd.to_datetime(days[column], utc=True)
    return days, (covered[0], covered[1]) if covered else (None, None)


def _frame(cursor: Any) -> pd.DataFrame:
    names = [d.name for d in cursor.description]
    frame = pd.DataFrame(cursor.fetchall(), columns=names)
    if "ts_utc" in frame:
        frame["ts_utc"] = pd.to_datetime(frame["ts_utc"], utc=True)
    for column in ("open", "high", "low", "close", "vol", "vwap"):
        if column in frame:
            frame[column] = frame[column].astype("float64")
    if "trade_count" in frame:
        frame["trade_count"] = frame["trade_count"].astype("float64")
    return frame
