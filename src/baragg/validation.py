"""The rules a 1-minute bar must pass before it is stored (DESIGN.md section 8), in one place.

``check_bars`` takes a chunk of rows as read from a file (strings from a CSV, typed columns from a
Parquet file) and returns them parsed, with the first broken rule of each bad row. The rules are
vectorised (pandas), so a chunk of a few hundred thousand rows is checked in milliseconds, and they
are listed in the order a reader would check a bar by hand: is it there, does it parse, does it make
sense. Duplicates across the whole file cannot be seen chunk by chunk; ``baragg.ingest`` finds those in
its staging table.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from baragg.errors import InvalidInput, shown

PRICES = ("open", "high", "low", "close")
OPTIONAL = ("vol", "vwap", "trade_count")
REQUIRED = ("ts_utc", *PRICES)
COLUMNS = ("canonical_symbol", *REQUIRED, *OPTIONAL)

# trade_count is stored as integer; larger counts would not fit.
_INT32_MAX = 2**31 - 1

# Header names accepted for each column, besides the column's own name (any case, spaces around
# ignored). Chosen from what data vendors and pandas exports write; a name that is none of these is
# refused rather than dropped (``--ignore-column`` to drop it on purpose).
ALIASES: dict[str, tuple[str, ...]] = {
    "canonical_symbol": ("symbol", "ticker"),
    "ts_utc": ("timestamp", "timestamp_utc", "time", "time_utc", "datetime", "datetime_utc", "date", "ts"),
    "open": ("o",),
    "high": ("h",),
    "low": ("l",),
    "close": ("c",),
    "vol": ("volume", "v"),
    "vwap": ("vw",),
    "trade_count": ("trades", "num_trades", "n_trades", "trade_counts"),
}
_NAME_OF = {alias: column for column, aliases in ALIASES.items() for alias in (column, *aliases)}


def column_names(header: list[str], *, ignore: Collection[str] = ()) -> dict[int, str]:
    """Which column of the file (by position) is which of ``COLUMNS``; raises InvalidInput for a
    header name that is neither a column, an alias nor in ``ignore``, and for two names of one column.

    A dropped column could be data the user meant to load (``volume`` for ``vol``): only the ones the
    user names in ``ignore`` are left out.
    """
    ignored = {name.strip().lower() for name in ignore}
    found: dict[int, str] = {}
    unknown: list[str] = []
    nameless: list[int] = []
    for position, name in enumerate(header):
        key = name.strip().lower()
        if key in ignored:
            continue
        column = _NAME_OF.get(key)
        if column is None:
            unknown.append(name)
            if not key:
                nameless.append(position + 1)
            continue
        twice = [header[p] for p, c in found.items() if c == column]
        if twice:
            raise InvalidInput(
                f"columns {shown(twice[0])!r} and {shown(name)!r} both mean {column}: keep one "
                f"(or drop one with --ignore-column {shown(name)!r})"
            )
        found[position] = column
    if unknown:
        named = [n for n in unknown if n.strip()]
        described = [repr(shown(n)) for n in named[:5]] + [f"'' (column {p}, no name)" for p in nameless[:1]]
        fix = shlex.quote(",".join([shown(n.strip()) for n in named[:5]] + ([""] if nameless else [])))
        raise InvalidInput(
            f"unknown column{'s' if len(unknown) > 1 else ''} {', '.join(described)}"
            f"{' ...' if len(named) > 5 else ''}: rename to one of {', '.join(COLUMNS)} (aliases such as "
            f"volume, timestamp, symbol are accepted), or drop with --ignore-column {fix}"
        )
    return found


@dataclass
class Checked:
    """A chunk after the rules: parsed values, and for each row the first rule it breaks (or None)."""

    bars: (
        pd.DataFrame
    )  # canonical_symbol, ts_utc (UTC), open..close, vol, vwap (float64), trade_count (Int64)
    column: pd.Series  # the column a bad row is wrong in; None for good rows
    reason: pd.Series  # why, in words, with the offending values; None for good rows

    @property
    def ok(self) -> pd.Series:
        return self.reason.isna()


def _text(series: pd.Series) -> pd.Series:
    """Values as the user wrote them, for messages: control characters escaped, long ones cut."""
    return series.astype("string").fillna("").map(shown).astype("object")


def _fmt(value: object) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _parse_number(raw: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(values as float64, missing mask, not-a-number mask) for a column of text or numbers."""
    if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype):
        # Typed input (Parquet): null is missing; with Arrow-backed columns NaN stays a value.
        missing = raw.isna().astype(bool)
        values = pd.Series(raw.to_numpy(dtype="float64", na_value=np.nan), index=raw.index)
        return values, missing, pd.Series(False, index=raw.index)
    try:
        # Fast path: every value is a number, "nan"/"inf", or null (Arrow's parser, in C++).
        parsed = pa.array(raw.astype("string[pyarrow]"), type=pa.string()).cast(pa.float64())
        missing = pd.Series(parsed.is_null().to_numpy(zero_copy_only=False), index=raw.index)
        values = pd.Series(parsed.to_numpy(zero_copy_only=False), index=raw.index, dtype="float64")
        return values, missing, pd.Series(False, index=raw.index)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    text = raw.astype("string").str.strip()
    missing = text.isna() | (text == "")
    values = pd.to_numeric(text.where(~missing), errors="coerce").astype("float64")
    # "nan" and "inf" parse (and are caught as not finite); anything else that gave NaN is not a number.
    spelled_nan = text.str.lower().isin(["nan", "+nan", "-nan"])
    not_a_number = values.isna() & ~missing & ~spelled_nan
    return values, missing.fillna(True).astype(bool), not_a_number.fillna(False).astype(bool)


def _parse_time(raw: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(UTC timestamps, missing mask, unparsable mask). A time without an offset is UTC."""
    if isinstance(raw.dtype, pd.ArrowDtype) and pa.types.is_timestamp(raw.dtype.pyarrow_dtype):
        return _arrow_times(raw)
    if pd.api.types.is_datetime64_any_dtype(raw.dtype):
        missing = raw.isna()
        times = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        return times, missing, pd.Series(False, index=raw.index)
    text = raw.astype("string").str.strip()
    missing = (text.isna() | (text == "")).astype(bool)
    # Each value on its own: offsets are converted, a value without one is UTC, one bad value does not
    # spoil the others.
    times = pd.to_datetime(text.where(~missing), format="ISO8601", utc=True, errors="coerce")
    unparsable = times.isna() & ~missing
    return times, missing, unparsable


# The largest magnitude of a time in seconds / milliseconds that microseconds (int64) still hold.
_US_LIMIT = {"s": (2**63 - 1) // 10**6, "ms": (2**63 - 1) // 10**3}


def _arrow_times(raw: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """``_parse_time`` for Arrow timestamps (a CSV parsed by Arrow, a Parquet column): converted by
    Arrow in C++ to numpy ``datetime64[us, UTC]`` (pandas' ``astype`` builds one Python object per
    row: 4 of the 5 seconds that checking a million rows took). A time without a zone is UTC (Arrow
    keeps both as the same count); nanoseconds are cut to microseconds (PostgreSQL's precision), and
    a time microseconds cannot hold (beyond year 294,000) is unparsable instead of wrapping around."""
    values = pa.array(raw.array)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    missing = pd.Series(values.is_null().to_numpy(zero_copy_only=False), index=raw.index)
    unparsable = np.zeros(len(values), dtype=bool)
    limit = _US_LIMIT.get(values.type.unit)
    if limit is not None:
        counts = pc.fill_null(values.cast(pa.int64()), 0).to_numpy()
        unparsable = (counts > limit) | (counts < -limit)
        if unparsable.any():
            values = pc.if_else(pa.array(unparsable), pa.scalar(None, values.type), values)
    times = values.cast(pa.timestamp("us", tz="UTC"), safe=False).to_pandas().set_axis(raw.index)
    return times, missing, pd.Series(unparsable, index=raw.index)


Rule = tuple[str, pd.Series, Callable[[pd.DataFrame], pd.Series]]


def check_bars(raw: pd.DataFrame, *, known_symbols: Collection[str], symbol: str | None = None) -> Checked:
    """Parse and check one chunk of rows; the first rule a row breaks is its reason.

    ``raw`` has the file's columns (any of ``COLUMNS``; optional ones may be absent). With ``symbol``
    (``--symbol``) every row belongs to that symbol and a ``canonical_symbol`` column, if present,
    must agree with it.
    """
    index = raw.index
    n = len(raw)
    bars = pd.DataFrame(index=index)
    rules: list[Rule] = []

    def rule(column: str, mask: pd.Series, why: Callable[[pd.DataFrame], pd.Series]) -> None:
        rules.append((column, mask.fillna(False).astype(bool), why))

    def const(text: str) -> Callable[[pd.DataFrame], pd.Series]:
        return lambda rows: pd.Series(text, index=rows.index, dtype="object")

    # --- symbol -----------------------------------------------------------------------------
    if "canonical_symbol" in raw:
        file_symbol = raw["canonical_symbol"].astype("string").str.strip()
    else:
        file_symbol = pd.Series(pd.NA, index=index, dtype="string")
    if symbol is not None:
        bars["canonical_symbol"] = pd.Series(symbol, index=index, dtype="string")
        differs = file_symbol.notna() & (file_symbol != "") & (file_symbol != symbol)
        rule(
            "canonical_symbol",
            differs,
            lambda rows: "'" + _text(file_symbol[rows.index]) + f"' but --symbol is '{symbol}'",
        )
    else:
        bars["canonical_symbol"] = file_symbol
        rule("canonical_symbol", file_symbol.isna() | (file_symbol == ""), const("missing"))
    known = set(known_symbols)
    sym = bars["canonical_symbol"]
    rule(
        "canonical_symbol",
        sym.notna() & (sym != "") & ~sym.isin(known),
        lambda rows: "unknown symbol '" + _text(rows["canonical_symbol"]) + "'",
    )

    # --- time ---------------------------------------------------------------------------------
    ts_raw = raw["ts_utc"] if "ts_utc" in raw else pd.Series(pd.NA, index=index, dtype="string")
    times, missing, unparsable = _parse_time(ts_raw)
    bars["ts_utc"] = times
    rule("ts_utc", missing, const("missing"))
    rule("ts_utc", unparsable, lambda rows: "cannot parse '" + _text(ts_raw[rows.index]) + "' as a time")
    off_minute = times.notna() & (times != times.dt.floor("min"))
    rule(
        "ts_utc",
        off_minute,
        lambda rows: (
            "not on a minute ("
            + rows["ts_utc"].dt.strftime("%Y-%m-%d %H:%M:%S.%f").str.rstrip("0").str.rstrip(".")
            + ")"
        ),
    )

    # --- numbers ------------------------------------------------------------------------------
    for column in (*PRICES, *OPTIONAL):
        present = column in raw
        col_raw = raw[column] if present else pd.Series(pd.NA, index=index, dtype="string")
        values, missing, not_a_number = _parse_number(col_raw)
        bars[column] = values
        if column in PRICES:
            rule(column, missing, const("missing"))
        rule(column, not_a_number, lambda rows, c=col_raw: "not a number: '" + _text(c[rows.index]) + "'")
        rule(
            column,
            ~missing & ~not_a_number & ~np.isfinite(values.fillna(0.0).where(values.notna(), np.nan)),
            lambda rows, c=column: "not finite (" + rows[c].map(_fmt) + ")",
        )

    # --- sense --------------------------------------------------------------------------------
    def compare(a: str, word: str, b: str) -> Callable[[pd.DataFrame], pd.Series]:
        return lambda rows: f"{a} " + rows[a].map(_fmt) + f" {word} {b} " + rows[b].map(_fmt)

    rule("high", bars["high"] < bars["low"], compare("high", "below", "low"))
    for price in ("open", "close"):
        rule(price, bars[price] < bars["low"], compare(price, "below", "low"))
        rule(price, bars[price] > bars["high"], compare(price, "above", "high"))
    rule("vol", bars["vol"] < 0, lambda rows: "negative (" + rows["vol"].map(_fmt) + ")")
    count = bars["trade_count"]
    rule("trade_count", count < 0, lambda rows: "negative (" + rows["trade_count"].map(_fmt) + ")")
    rule(
        "trade_count",
        count.notna() & np.isfinite(count.fillna(0.0)) & (count != count.round()),
        lambda rows: "not a whole number (" + rows["trade_count"].map(_fmt) + ")",
    )
    rule(
        "trade_count",
        count > _INT32_MAX,
        lambda rows: "too large (" + rows["trade_count"].map(_fmt) + f" > {_INT32_MAX})",
    )

    # --- first broken rule per row ------------------------------------------------------------
    # Plain arrays here: a pandas isna() on an object column per rule cost more than all the rules.
    column_of = np.full(n, None, dtype="object")
    reason_of = np.full(n, None, dtype="object")
    taken = np.zeros(n, dtype=bool)
    for name, mask, why in rules:
        new = mask.to_numpy(dtype=bool) & ~taken
        if new.any():
            column_of[new] = name
            reason_of[new] = why(bars[new]).astype("object").to_numpy()
            taken |= new
    column = pd.Series(column_of, index=index, dtype="object")
    reason = pd.Series(reason_of, index=index, dtype="object")
    good_count = count.where(~taken & count.notna())
    bars["trade_count"] = good_count.round().astype("Int64") if n else good_count.astype("Int64")
    return Checked(bars=bars, column=column, reason=reason)
