"""Recompute derived bars independently of the SQL engine and compare them with what is stored.

Written from DESIGN.md section 3 and 4 alone (not from the engine's SQL), with numpy over the source
rows, so that it is a second opinion: after an incident, an operator runs ``baragg verify`` to learn
whether the stored bars are what the source data says they should be; our tests use it the same way.
The database is only asked for rows (source bars, stored bars), never for an aggregate.

Which windows are checked: those of the task's range that the worker has already passed, i.e. window
start ≥ the task's ``agg_start_utc`` and < its cursor (``last_agg_bar_ts_utc``), narrowed by
``--from``/``--to``. Without a task every window in the range is checked.

A symbol on a trading session (DESIGN.md 3b), and every 1mo level, is checked against windows cut here
from the session's stored trading days (``agg_session_days``: the calendar is the input, not the engine):
intraday windows from each session's open, the last clipped at its close, a day per session, weeks and
months of trading dates; rows outside every window belong to none. (Those ranges are read in one piece.)

Streaming: the range is walked in time chunks aligned to the timeframe's windows (a window never
straddles two chunks), each holding at most ``CHUNK_ROWS`` source rows; empty stretches are skipped
by asking for the next row (keyset paging), and each chunk's rows come as one array per column in
PostgreSQL's binary format, read straight into numpy (rows never travel one by one: a Python loop
per row was the cost before). Memory is one chunk, whatever the range (plus the differences listed,
which a caller may cap with ``keep``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg

from baragg.db import Database
from baragg.errors import InvalidInput
from baragg.sql import query

if TYPE_CHECKING:  # pandas only for the DataFrame helpers (tests); the command does not load it
    import pandas as pd


@dataclass(frozen=True)
class Rung:
    """One timeframe of DESIGN.md section 3's table."""

    timeframe: str
    source: str
    interval: timedelta
    expected: int
    source_interval: timedelta

    @property
    def most_source_bars(self) -> int:
        """How many source bars fit in one window (7 days in a week, of which 5 are expected)."""
        return self.interval // self.source_interval


_LADDER = {
    r.timeframe: r
    for r in (
        Rung("5m", "1m", timedelta(minutes=5), 5, timedelta(minutes=1)),
        Rung("15m", "5m", timedelta(minutes=15), 3, timedelta(minutes=5)),
        Rung("1h", "5m", timedelta(hours=1), 12, timedelta(minutes=5)),
        Rung("4h", "1h", timedelta(hours=4), 4, timedelta(hours=1)),
        Rung("1d", "1h", timedelta(days=1), 24, timedelta(hours=1)),
        Rung("1w", "1d", timedelta(weeks=1), 5, timedelta(days=1)),
        # Months are only ever cut from a session's trading days (24x7: every UTC day).
        Rung("1mo", "1d", timedelta(days=31), 21, timedelta(days=1)),
    )
}
# Weeks start on Monday 00:00 UTC; 1970-01-05 was a Monday (the epoch itself was a Thursday).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WEEK_ORIGIN = datetime(1970, 1, 5, tzinfo=UTC)
_US = 1_000_000
_BEGINNING = datetime(1, 1, 1, tzinfo=UTC)
_END = datetime(9999, 1, 1, tzinfo=UTC)

VALUE_COLUMNS = ("open", "high", "low", "close", "vol", "vwap", "trade_count")
META_COLUMNS = ("source_candles", "expected_candles", "quality_score", "source_timeframe")
_FLOATS = ("open", "high", "low", "close", "vol", "vwap")
_INTEGERS = ("trade_count", "source_candles", "expected_candles", "quality_score")

# Source rows per chunk at most (BARAGG_VERIFY_CHUNK_ROWS overrides it; tests use tiny chunks).
CHUNK_ROWS = 200_000


def rung(timeframe: str) -> Rung:
    try:
        return _LADDER[timeframe]
    except KeyError:
        raise InvalidInput(
            f"timeframe {timeframe!r} is not aggregated (one of: {', '.join(_LADDER)})"
        ) from None


def _us(moment: datetime) -> int:
    """Microseconds since the epoch (exact)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _moment(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _origin_us(timeframe: str) -> int:
    return _us(_WEEK_ORIGIN if timeframe == "1w" else _EPOCH)


def _window_us(ts_us: np.ndarray, timeframe: str) -> np.ndarray:
    """The start of the window each timestamp (µs) falls in."""
    step = rung(timeframe).interval // timedelta(microseconds=1)
    origin = _origin_us(timeframe)
    return origin + ((ts_us - origin) // step) * step


def _ceil_to_bucket(moment: datetime, timeframe: str) -> datetime:
    start = int(_window_us(np.array([_us(moment)], dtype=np.int64), timeframe)[0])
    if start < _us(moment):
        start += rung(timeframe).interval // timedelta(microseconds=1)
    return _moment(start)


def quality(source_candles: int, expected: int, sparse: bool) -> int | None:
    """DESIGN.md 3: quality from r = source/expected; None = not stored."""
    scores = _quality(np.array([source_candles]), expected, sparse)
    return None if np.isnan(scores[0]) else int(scores[0])


def _quality(counts: np.ndarray, expected: int | np.ndarray, sparse: bool) -> np.ndarray:
    """DESIGN.md 3 for many windows: r = 1 → 2, ≥ 0.8 → 1, ≥ 0.6 → 0, ≥ 0.55 → −1, below: not stored
    (NaN), except that a sparse asset keeps any window with a source bar at −1. The ratios are
    compared as integers (5n ≥ 4e is r ≥ 0.8), so a ratio on a boundary is never misjudged."""
    n = counts.astype(np.int64)
    return np.select(
        [
            n >= expected,
            5 * n >= 4 * expected,
            5 * n >= 3 * expected,
            20 * n >= 11 * expected,
            sparse & (n >= 1),
        ],
        [2.0, 1.0, 0.0, -1.0, -1.0],
        default=np.nan,
    )


def _aggregate(
    ts_us: np.ndarray,
    values: dict[str, np.ndarray],
    timeframe: str,
    sparse: bool,
    window: np.ndarray | None = None,
    expected: np.ndarray | None = None,
) -> dict[str, Any]:
    """DESIGN.md 3's bar values for the windows of the source rows (``ts_us`` ascending, float64
    columns with NaN for NULL): open of the earliest bar, close of the latest, high max, low min, vol
    and trade_count sums (NULL when all NULL), vwap = Σ(vwap·vol)/Σ(vol) over bars with both."""
    spec = rung(timeframe)
    empty = {"ts": np.empty(0, np.int64), **{c: np.empty(0) for c in (*VALUE_COLUMNS, *_INTEGERS[1:])}}
    if not len(ts_us):
        return empty
    # (a session's windows come with the rows: each row's window start and the window's expected bars)
    window = _window_us(ts_us, timeframe) if window is None else window
    starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    counts = np.diff(np.r_[starts, len(window)])
    position = np.arange(len(window))

    def first_present(column: np.ndarray, last: bool = False) -> np.ndarray:
        present = ~np.isnan(column)
        if last:
            at = np.maximum.reduceat(np.where(present, position, -1), starts)
        else:
            at = np.minimum.reduceat(np.where(present, position, len(column)), starts)
        found = (at >= 0) & (at < len(column))
        return np.where(found, column[np.clip(at, 0, len(column) - 1)], np.nan)

    def total(column: np.ndarray) -> np.ndarray:
        present = ~np.isnan(column)
        sums = np.add.reduceat(np.where(present, column, 0.0), starts)
        return np.where(np.add.reduceat(present, starts) > 0, sums, np.nan)

    vol, vwap = values["vol"], values["vwap"]
    both = ~np.isnan(vol) & ~np.isnan(vwap)
    price_volume = np.add.reduceat(np.where(both, vwap * vol, 0.0), starts)
    volume_with_price = np.add.reduceat(np.where(both, vol, 0.0), starts)
    any_both = np.add.reduceat(both, starts) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        bar_vwap = np.where(any_both & (volume_with_price != 0), price_volume / volume_with_price, np.nan)
    per_window = (
        np.full(len(starts), spec.expected) if expected is None else expected[starts].astype(np.int64)
    )
    scores = _quality(counts, per_window, sparse)
    keep = ~np.isnan(scores)
    bars = {
        "ts": window[starts],
        "open": first_present(values["open"]),
        "high": np.fmax.reduceat(values["high"], starts),
        "low": np.fmin.reduceat(values["low"], starts),
        "close": first_present(values["close"], last=True),
        "vol": total(vol),
        "vwap": bar_vwap,
        "trade_count": total(values["trade_count"]),
        "source_candles": counts.astype(np.float64),
        "expected_candles": per_window.astype(np.float64),
        "quality_score": scores,
    }
    return {name: column[keep] for name, column in bars.items()}


# ---------------------------------------------------------------------------------------------
# DataFrame helpers (tests, notebooks)
# ---------------------------------------------------------------------------------------------
def _series_us(times: pd.Series) -> np.ndarray:
    """Aware timestamps as microseconds since the epoch."""
    import pandas as pd

    utc = pd.to_datetime(times, utc=True).dt.tz_localize(None)
    return utc.astype("datetime64[us]").to_numpy().astype(np.int64)


def bucket_start(ts: pd.Series | pd.DatetimeIndex, timeframe: str) -> pd.Series:
    """The start of the window each timestamp falls in."""
    import pandas as pd

    times = pd.Series(ts)
    return pd.Series(
        pd.to_datetime(_window_us(_series_us(times), timeframe), unit="us", utc=True), index=times.index
    )


def aggregate(source: pd.DataFrame, timeframe: str, *, sparse: bool) -> pd.DataFrame:
    """Bars of ``timeframe`` from source rows (ts_utc, open, high, low, close, vol, vwap, trade_count)."""
    import pandas as pd

    spec = rung(timeframe)
    if source.empty:
        ts, values = np.empty(0, np.int64), {}
    else:
        rows = source.sort_values("ts_utc", kind="stable")
        ts = _series_us(rows["ts_utc"])
        values = {c: rows[c].to_numpy(dtype="float64", na_value=np.nan) for c in (*_FLOATS, "trade_count")}
    bars = _aggregate(ts, values, timeframe, sparse)
    frame = pd.DataFrame({c: bars[c] for c in (*VALUE_COLUMNS, *_INTEGERS[1:])})
    for column in _INTEGERS[1:]:
        frame[column] = frame[column].astype("int64")
    frame["source_timeframe"] = spec.source
    frame.index = pd.DatetimeIndex(pd.to_datetime(bars["ts"], unit="us", utc=True), name="ts_utc")
    return frame[list(VALUE_COLUMNS) + list(META_COLUMNS)]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
@dataclass
class Difference:
    ts_utc: datetime
    columns: dict[str, tuple[Any, Any]]  # column -> (stored, expected)


@dataclass
class VerifyReport:
    """Counts of every outcome; the lists hold every missing, extra and different bar, or the first
    ``keep`` of each when the caller capped them."""

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
    missing_count: int = 0
    extra_count: int = 0
    different_count: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing_count or self.extra_count or self.different_count)

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


def _plain(column: str, value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if column in ("source_candles", "expected_candles", "quality_score"):
        return int(value)
    if column == "source_timeframe":
        return str(value)
    return float(value)


def _differ(column: str, stored: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Where stored and expected values differ; NULL equals only NULL. Prices, volumes and vwap may
    differ in the last bits (sums in another order); anything beyond that is a real difference."""
    if column == "source_timeframe":
        return stored != expected
    null_s, null_e = np.isnan(stored), np.isnan(expected)
    if column in _FLOATS:
        with np.errstate(invalid="ignore"):
            scale = np.maximum(np.abs(stored), np.abs(expected))
            close = np.abs(stored - expected) <= np.maximum(1e-9 * scale, 1e-12)
        return (null_s != null_e) | (~null_s & ~null_e & ~close)
    return (null_s != null_e) | (~null_s & ~null_e & (stored != expected))


# 2000-01-01 in microseconds since the epoch: PostgreSQL's binary timestamps count from there.
_PG_EPOCH_US = 946_684_800_000_000
_SOURCE_COLUMNS = ("ts", *_FLOATS, "trade_count")
_STORED_COLUMNS = (*_SOURCE_COLUMNS, *_INTEGERS[1:])


def _unpack(blob: bytes | None, timestamps: bool = False) -> np.ndarray:
    """A one-dimensional float8[] or timestamptz[] in PostgreSQL's binary format (``array_send``) as a
    numpy array: a header (dimensions, flags, element type, size and lower bound), then per element
    its length (8) and 8 big-endian bytes. The queries send no NULL elements (NaN instead)."""
    kind = ">i8" if timestamps else ">f8"
    if blob is None or int.from_bytes(blob[:4], "big") == 0:  # no rows, or an empty array
        return np.empty(0, dtype=np.int64 if timestamps else np.float64)
    count = int.from_bytes(blob[12:16], "big")
    elements = np.frombuffer(blob, dtype=[("length", ">i4"), ("value", kind)], offset=20, count=count)
    if count and (elements["length"] != 8).any():
        raise ValueError("verify: unexpected NULL in an array of bar values")
    if timestamps:
        return elements["value"].astype(np.int64) + _PG_EPOCH_US
    return elements["value"].astype(np.float64)


def _rows(conn: Any, name: str, params: dict[str, Any], stored: bool) -> dict[str, np.ndarray]:
    """One chunk of rows, a numpy array per column (float64, NaN for NULL; times in µs)."""
    columns = _STORED_COLUMNS if stored else _SOURCE_COLUMNS
    with conn.cursor(binary=True) as cur:
        row = cur.execute(query(name), params).fetchone()
    out = {c: _unpack(blob, timestamps=c == "ts") for c, blob in zip(columns, row, strict=False)}
    if stored:
        out["source_timeframe"] = np.array(row[len(columns)] or [], dtype=object)
    return out


def verify(
    db: Database,
    symbol: str,
    timeframe: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    keep: int | None = None,
) -> VerifyReport:
    """Recompute ``symbol``'s ``timeframe`` bars in [start, end) and diff them against the stored ones.

    ``keep`` caps how many missing, extra and different bars are listed (each); all are counted.
    """
    spec = rung(timeframe)
    with db.connect() as conn:
        # One snapshot for every chunk: a worker writing meanwhile cannot make source and stored bars
        # of different moments look different.
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        asset = conn.execute(query("verify_asset"), {"symbol": symbol}).fetchone()
        if asset is None:
            raise InvalidInput(f"unknown symbol '{symbol}' (not in core_asset_registry_all)")
        sparse = bool(asset[0])
        session = asset[1] or "24x7"
        windows = None
        if session != "24x7" or timeframe == "1mo":
            windows = _session_windows_us(conn, session, timeframe)
        task = conn.execute(query("verify_task"), {"symbol": symbol, "timeframe": timeframe}).fetchone()
        notes = [f"session {session}: windows cut from its trading days"] if windows is not None else []
        lo = start
        hi = end
        if task is None:
            notes.append(f"no task for {symbol} {timeframe}: checking every window in the range")
        else:
            agg_start, cursor = (t.astimezone(UTC) if t is not None else None for t in task)
            if agg_start is not None:  # None: no explicit start, from the first source row
                first = _first_window(agg_start, timeframe, windows)
                lo = max(lo, first) if lo else first
            if cursor is None:
                notes.append("the task has no cursor yet: nothing has been aggregated")
                hi = lo or datetime(1, 1, 1, tzinfo=UTC)
            else:
                hi = min(hi, cursor) if hi else cursor
        horizon = _raw_horizon(conn) if spec.source == "1m" else None
        if horizon is not None and (lo is None or lo < horizon):
            # `baragg retention` dropped the 1m rows before the horizon; the 5m bars built from them
            # stay, and cannot be rebuilt: they are checked from the first window of 1m rows kept.
            lo = _ceil_to_bucket(horizon, timeframe) if windows is None else horizon
            notes.append(
                f"1m rows before {horizon:%Y-%m-%d %H:%M} were dropped by retention: checking from there"
            )
        if lo is not None:
            lo = _first_window(lo, timeframe, windows)
        if hi is not None and lo is not None and hi < lo:
            hi = lo
        report = VerifyReport(symbol, timeframe, lo, hi, notes=notes)
        # Stored bars are read from the user's --from, not from agg_start_utc: a bar before
        # agg_start_utc must not exist, and shows up as extra.
        stored_from = _first_window(start, timeframe, windows) if start else _BEGINNING
        if horizon is not None and lo is not None and stored_from < lo:
            stored_from = lo
        if windows is None:
            chunks = _chunks(conn, symbol, spec, lo or _BEGINNING, hi or _END, stored_from, sparse)
        else:
            chunks = _session_chunks(
                conn, symbol, spec, windows, lo or _BEGINNING, hi or _END, stored_from, sparse
            )
        for expected, stored in chunks:
            _compare(report, expected, stored, spec, keep)
    return report


def _raw_horizon(conn: Any) -> datetime | None:
    """Where the 1m rows begin when retention dropped older months (None: nothing dropped, or a schema
    from before retention)."""
    row = conn.execute(
        "SELECT CASE WHEN to_regclass('public.baragg_retention_log') IS NOT NULL THEN 1 END"
    ).fetchone()
    if not row or row[0] is None:
        return None
    from baragg.partitions import raw_horizon

    found = raw_horizon(conn)
    return found.astimezone(UTC) if found is not None else None


def _first_window(moment: datetime, timeframe: str, windows: SessionWindows | None) -> datetime:
    """The first window that starts at or after ``moment``."""
    if windows is None:
        return _ceil_to_bucket(moment, timeframe)
    at = int(np.searchsorted(windows.starts, _us(moment), side="left"))
    return _moment(int(windows.starts[at])) if at < len(windows.starts) else moment


@dataclass(frozen=True)
class SessionWindows:
    """A level's windows on a session, in µs since the epoch: start, end, expected source bars."""

    starts: np.ndarray
    ends: np.ndarray
    expected: np.ndarray


def session_windows(
    days: list[tuple[date, datetime, datetime]],
    timeframe: str,
    covered: tuple[date | None, date | None],
    *,
    weekdays_only: bool,
) -> SessionWindows:
    """The windows of ``timeframe`` that trading ``days`` (trading date, open, close in UTC; in time
    order) make, as DESIGN.md 3b states them: intraday windows from each open, the last clipped at the
    close, expecting the source windows inside; a day per session, expecting its source windows; weeks
    (ISO weeks of trading dates) and months of sessions, expecting a daily bar per session (24x7:
    Monday-Friday only), only when wholly inside ``covered`` (the dates the days are known for)."""
    spec = rung(timeframe)
    step = spec.source_interval
    starts: list[datetime] = []
    ends: list[datetime] = []
    expected: list[int] = []
    if timeframe in ("1w", "1mo"):
        groups: dict[date, list[tuple[date, datetime, datetime]]] = {}
        for day in days:
            trading = day[0]
            key = trading - timedelta(days=trading.weekday()) if timeframe == "1w" else trading.replace(day=1)
            groups.setdefault(key, []).append(day)
        for key, members in sorted(groups.items()):
            if timeframe == "1w":
                last_date = key + timedelta(days=6)
            else:
                last_date = (key.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
            if covered[0] is None or covered[1] is None or key < covered[0] or last_date > covered[1]:
                continue
            starts.append(min(m[1] for m in members))
            ends.append(max(m[2] for m in members))
            expected.append(sum(1 for m in members if not weekdays_only or m[0].isoweekday() <= 5))
    else:
        for _, opening, closing in days:
            begin = opening
            while begin < closing:
                end = closing if timeframe == "1d" else min(begin + spec.interval, closing)
                starts.append(begin)
                ends.append(end)
                expected.append(-(-(end - begin) // step))  # ceil: a clipped window expects fewer
                begin = end
    return SessionWindows(
        np.array([_us(t) for t in starts], dtype=np.int64),
        np.array([_us(t) for t in ends], dtype=np.int64),
        np.array(expected, dtype=np.int64),
    )


def _session_windows_us(conn: Any, session: str, timeframe: str) -> SessionWindows:
    covered = conn.execute(query("verify_session_range"), {"session": session}).fetchone()
    days = [
        (d, o.astimezone(UTC), c.astimezone(UTC))
        for d, o, c in conn.execute(query("verify_session_days"), {"session": session})
    ]
    return session_windows(
        days,
        timeframe,
        (covered[0], covered[1]) if covered else (None, None),
        weekdays_only=session == "24x7",
    )


def _session_chunks(
    conn: Any,
    symbol: str,
    spec: Rung,
    windows: SessionWindows,
    lo: datetime,
    hi: datetime,
    stored_from: datetime,
    sparse: bool,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(expected bars, stored bars) of the windows in [lo, hi), in one piece: each source row is put in
    the session window that contains it (rows outside every window are left out)."""
    conn.execute(query("verify_session_settings"))
    params: dict[str, Any] = {"symbol": symbol, "timeframe": spec.timeframe, "source_timeframe": spec.source}
    source_query = "verify_source_base" if spec.source == "1m" else "verify_source_derived"
    lo_us, hi_us = _us(max(lo, _BEGINNING)), _us(min(hi, _END))
    inside = (windows.starts >= lo_us) & (windows.ends <= hi_us)
    starts, ends, expected = windows.starts[inside], windows.ends[inside], windows.expected[inside]
    source = _rows(conn, source_query, {**params, "lo": lo, "hi": hi}, stored=False)
    ts = source["ts"]
    at = np.searchsorted(starts, ts, side="right") - 1
    found = (at >= 0) & (ts < ends[np.clip(at, 0, None)] if len(ends) else np.zeros(len(ts), bool))
    rows = {c: v[found] for c, v in source.items()}
    bars = _aggregate(
        rows["ts"], rows, spec.timeframe, sparse, window=starts[at[found]], expected=expected[at[found]]
    )
    stored = _rows(conn, "verify_stored", {**params, "lo": stored_from, "hi": hi}, stored=True)
    # A stored bar at a window start is checked only when its window ends by hi.
    end_of = dict(zip(windows.starts.tolist(), windows.ends.tolist(), strict=True))
    keep = np.array([end_of.get(int(t), int(t)) <= hi_us for t in stored["ts"]], dtype=bool)
    yield bars, {c: v[keep] for c, v in stored.items()}


def _chunks(
    conn: Any, symbol: str, spec: Rung, lo: datetime, hi: datetime, stored_from: datetime, sparse: bool
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(expected bars, stored bars) of successive chunks of windows in time order, each chunk's
    windows ending by ``hi``: expected ones from the source rows at or after ``lo``, stored ones at or
    after ``stored_from``."""
    conn.execute(query("verify_session_settings"))
    rows = int(os.environ.get("BARAGG_VERIFY_CHUNK_ROWS") or CHUNK_ROWS)
    span = spec.interval * max(1, rows // spec.most_source_bars)
    step = spec.interval // timedelta(microseconds=1)
    params: dict[str, Any] = {"symbol": symbol, "timeframe": spec.timeframe, "source_timeframe": spec.source}
    source_query = "verify_source_base" if spec.source == "1m" else "verify_source_derived"
    next_query = "verify_next_base" if spec.source == "1m" else "verify_next_derived"
    position = min(lo, stored_from)
    while position < hi:
        found = conn.execute(
            query(next_query),
            {**params, "source_from": max(position, lo), "stored_from": max(position, stored_from), "hi": hi},
        ).fetchone()[0]
        if found is None:
            return
        chunk_start = _moment(int(_window_us(np.array([_us(found.astimezone(UTC))]), spec.timeframe)[0]))
        chunk_end = hi if hi - chunk_start <= span else chunk_start + span
        source = _rows(
            conn, source_query, {**params, "lo": max(chunk_start, lo), "hi": chunk_end}, stored=False
        )
        stored = _rows(
            conn,
            "verify_stored",
            {**params, "lo": max(chunk_start, stored_from), "hi": chunk_end},
            stored=True,
        )
        expected = _aggregate(source["ts"], source, spec.timeframe, sparse)
        del source
        # A window whose end lies past hi is not complete inside the range: leave it out.
        last_start = _us(hi) - step
        expected = {c: v[expected["ts"] <= last_start] for c, v in expected.items()}
        stored = {c: v[stored["ts"] <= last_start] for c, v in stored.items()}
        yield expected, stored
        position = chunk_end


def _compare(
    report: VerifyReport,
    expected: dict[str, np.ndarray],
    stored: dict[str, np.ndarray],
    spec: Rung,
    keep: int | None,
) -> None:
    """Add one chunk's outcome to the report."""
    expected_ts, stored_ts = expected["ts"], stored["ts"]
    in_stored = np.isin(expected_ts, stored_ts, assume_unique=True)
    in_expected = np.isin(stored_ts, expected_ts, assume_unique=True)
    missing, extra = expected_ts[~in_stored], stored_ts[~in_expected]
    report.checked += len(expected_ts) + len(extra)
    report.missing_count += len(missing)
    report.extra_count += len(extra)
    report.missing.extend(_moment(t) for t in missing[: _room(report.missing, missing, keep)])
    report.extra.extend(_moment(t) for t in extra[: _room(report.extra, extra, keep)])

    want = {c: v[in_stored] for c, v in expected.items()}
    want["source_timeframe"] = np.full(len(want["ts"]), spec.source, dtype=object)
    have = {c: v[in_expected] for c, v in stored.items()}  # same windows, same (ascending) order
    columns = (*VALUE_COLUMNS, *META_COLUMNS)
    differs = {c: _differ(c, have[c], want[c]) for c in columns}
    any_difference = (
        np.logical_or.reduce([differs[c] for c in columns]) if len(want["ts"]) else np.zeros(0, bool)
    )
    rows = np.flatnonzero(any_difference)
    report.equal += len(want["ts"]) - len(rows)
    report.different_count += len(rows)
    rows = rows[: _room(report.different, rows, keep)]
    for row in rows:
        report.different.append(
            Difference(
                _moment(want["ts"][row]),
                {c: (_plain(c, have[c][row]), _plain(c, want[c][row])) for c in columns if differs[c][row]},
            )
        )


def _room(listed: list[Any], new: np.ndarray, keep: int | None) -> int:
    """How many of ``new`` to list: all of them, or up to ``keep`` in the list."""
    return len(new) if keep is None else max(0, keep - len(listed))
