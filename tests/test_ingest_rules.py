"""The validation rules (DESIGN.md 8) against a plain statement of them: a row is accepted iff valid."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from baragg.validation import check_bars

KNOWN = {"EURUSD", "XAUUSD"}

prices = st.one_of(
    st.floats(min_value=-5, max_value=5, allow_nan=False).map(lambda x: round(x, 3)),
    st.sampled_from([math.nan, math.inf, -math.inf, None]),
)
counts = st.one_of(st.none(), st.integers(-3, 1000).map(float), st.sampled_from([1.5, math.nan]))
times = st.builds(
    lambda minutes, seconds: datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes, seconds=seconds),
    st.integers(0, 100_000),
    st.sampled_from([0, 0, 0, 30]),
)


def text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


def valid(row: dict) -> bool:
    """DESIGN.md 8, spelled out one rule at a time."""
    if row["canonical_symbol"] not in KNOWN:
        return False
    if row["ts_utc"].second != 0:
        return False
    p = [row[c] for c in ("open", "high", "low", "close")]
    if any(v is None or not math.isfinite(v) for v in p):
        return False
    o, h, lo, c = p
    if not (lo <= min(o, c) and max(o, c) <= h):
        return False
    for name in ("vol", "trade_count"):
        v = row[name]
        if v is not None and (not math.isfinite(v) or v < 0):
            return False
    return not (row["trade_count"] is not None and row["trade_count"] != int(row["trade_count"]))


rows = st.fixed_dictionaries(
    {
        "canonical_symbol": st.sampled_from(["EURUSD", "XAUUSD", "GBPJPY"]),
        "ts_utc": times,
        "open": prices,
        "high": prices,
        "low": prices,
        "close": prices,
        "vol": st.one_of(st.none(), st.floats(-2, 1e6, allow_nan=False), st.just(math.inf)),
        "trade_count": counts,
    }
)


@settings(max_examples=300, deadline=None)
@given(st.lists(rows, min_size=1, max_size=30))
def test_a_row_is_accepted_iff_it_obeys_every_rule(batch: list[dict]) -> None:
    raw = pd.DataFrame(
        {
            "canonical_symbol": [r["canonical_symbol"] for r in batch],
            "ts_utc": [r["ts_utc"].strftime("%Y-%m-%dT%H:%M:%S") for r in batch],
            **{
                c: [text(r[c]) for r in batch] for c in ("open", "high", "low", "close", "vol", "trade_count")
            },
        },
        dtype="string",
    )
    checked = check_bars(raw, known_symbols=KNOWN)
    assert list(checked.ok) == [valid(r) for r in batch]
    # every bad row says which column and why
    assert checked.column[~checked.ok].notna().all() and checked.reason[~checked.ok].str.len().gt(0).all()
    # good rows keep their values exactly
    for i, r in enumerate(batch):
        if valid(r):
            assert checked.bars["ts_utc"].iloc[i] == pd.Timestamp(r["ts_utc"])
            assert checked.bars["high"].iloc[i] == r["high"]


def test_offsets_convert_to_utc_and_naive_means_utc() -> None:
    raw = pd.DataFrame(
        {
            "ts_utc": ["2024-03-10T02:00:00-05:00", "2024-03-10 07:01"],
            "open": ["1", "1"],
            "high": ["1", "1"],
            "low": ["1", "1"],
            "close": ["1", "1"],
        },
        dtype="string",
    )
    checked = check_bars(raw, known_symbols=KNOWN, symbol="EURUSD")
    assert checked.ok.all()
    assert list(checked.bars["ts_utc"]) == [
        pd.Timestamp("2024-03-10 07:00", tz="UTC"),
        pd.Timestamp("2024-03-10 07:01", tz="UTC"),
    ]


def test_an_odd_time_format_does_not_spoil_the_rest_of_the_chunk() -> None:
    raw = pd.DataFrame(
        {
            "ts_utc": ["2024-03-10 07:00", "20240310T0701", "garbage"],
            "open": ["1"] * 3,
            "high": ["1"] * 3,
            "low": ["1"] * 3,
            "close": ["1"] * 3,
        },
        dtype="string",
    )
    checked = check_bars(raw, known_symbols=KNOWN, symbol="EURUSD")
    assert list(checked.ok) == [True, True, False]


def test_symbol_option_and_a_disagreeing_column() -> None:
    raw = pd.DataFrame(
        {
            "canonical_symbol": ["EURUSD", "XAUUSD", None],
            "ts_utc": ["2024-03-10 07:00"] * 3,
            "open": ["1"] * 3,
            "high": ["1"] * 3,
            "low": ["1"] * 3,
            "close": ["1"] * 3,
        },
        dtype="string",
    )
    checked = check_bars(raw, known_symbols=KNOWN, symbol="EURUSD")
    assert list(checked.ok) == [True, False, True]
    assert checked.reason.iloc[1] == "'XAUUSD' but --symbol is 'EURUSD'"
