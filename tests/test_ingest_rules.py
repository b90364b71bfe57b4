"""The validation rules (DESIGN.md 8): every rule, one broken at a time, must be the one that fires.

Rows are generated valid, then at most one thing is made wrong (a mutation that knows which rule it
breaks and the exact reason text the user will read). A batch mixes valid and broken rows, so a rule
that misfires on its neighbours, a rule that is missing (the row then fails a later rule, or none) and
a reason that names the wrong column all fail here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from baragg.validation import check_bars

KNOWN = {"EURUSD", "XAUUSD"}
INT32_MAX = 2**31 - 1
COLUMNS = ("canonical_symbol", "ts_utc", "open", "high", "low", "close", "vol", "vwap", "trade_count")
PRICES = ("open", "high", "low", "close")


def fmt(value: float) -> str:
    """A number as the reasons print it: whole numbers without '.0'."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


@dataclass
class Case:
    """One row as text (what a CSV holds), its valid values, and the rule it should break (if any)."""

    text: dict[str, str | None]
    values: dict[str, object] = field(default_factory=dict)
    kind: str | None = None  # the mutation, for messages
    column: str | None = None
    reason: str | None = None


@st.composite
def valid_rows(draw: st.DrawFn) -> Case:
    """A row that obeys every rule. Prices in thousandths, so their order is exact in floats."""
    low = draw(st.integers(-5_000, 5_000))
    high = low + draw(st.integers(0, 3_000))
    open_, close = (draw(st.integers(low, high)) for _ in range(2))
    prices = dict(zip(PRICES, (open_ / 1000, high / 1000, low / 1000, close / 1000), strict=True))
    ts = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=draw(st.integers(0, 1_000_000)))
    vol = draw(st.one_of(st.none(), st.integers(0, 10**8).map(lambda n: n / 100)))
    vwap = draw(st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)))
    count = draw(st.one_of(st.none(), st.integers(0, INT32_MAX).map(float)))
    values = {
        "canonical_symbol": draw(st.sampled_from(sorted(KNOWN))),
        "ts_utc": ts,
        **prices,
        "vol": vol,
        "vwap": vwap,
        "trade_count": count,
    }
    text = {c: None if v is None else str(v) for c, v in values.items()}
    text["ts_utc"] = ts.strftime(
        draw(st.sampled_from(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%MZ"]))
    )
    return Case(text=text, values=values)


# A mutation breaks exactly one rule of a valid row: it changes the row's text and returns the
# column and reason check_bars must report.
Mutation = Callable[[Case, st.DrawFn], tuple[str, str]]
MUTATIONS: dict[str, Mutation] = {}


def mutation(name: str) -> Callable[[Mutation], Mutation]:
    def register(fn: Mutation) -> Mutation:
        MUTATIONS[name] = fn
        return fn

    return register


@mutation("unknown symbol")
def _unknown_symbol(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    symbol = draw(st.sampled_from(["GBPJPY", "eurusd", "XAU", "EURUSD."]))
    case.text["canonical_symbol"] = symbol
    return "canonical_symbol", f"unknown symbol '{symbol}'"


@mutation("missing symbol")
def _missing_symbol(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    case.text["canonical_symbol"] = draw(st.sampled_from([None, "", "  "]))
    return "canonical_symbol", "missing"


@mutation("missing time")
def _missing_time(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    case.text["ts_utc"] = draw(st.sampled_from([None, "", " "]))
    return "ts_utc", "missing"


@mutation("unparsable time")
def _unparsable_time(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    raw = draw(st.sampled_from(["garbage", "2024-13-01 00:00", "2024-02-30 10:00", "10:00", "1e3"]))
    case.text["ts_utc"] = raw
    return "ts_utc", f"cannot parse '{raw}' as a time"


@mutation("time with seconds")
def _seconds(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    ts = case.values["ts_utc"] + timedelta(seconds=draw(st.integers(1, 59)))
    case.text["ts_utc"] = ts.strftime("%Y-%m-%dT%H:%M:%S")
    return "ts_utc", f"not on a minute ({ts:%Y-%m-%d %H:%M:%S})"


@mutation("time with a fraction of a second")
def _fraction(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    ts = case.values["ts_utc"] + timedelta(milliseconds=draw(st.integers(1, 999)))
    case.text["ts_utc"] = ts.strftime("%Y-%m-%dT%H:%M:%S.%f")
    shown = f"{ts:%Y-%m-%d %H:%M:%S.%f}".rstrip("0")
    return "ts_utc", f"not on a minute ({shown})"


def _number_mutations(column: str, required: bool) -> None:
    if required:

        @mutation(f"missing {column}")
        def _missing(case: Case, draw: st.DrawFn) -> tuple[str, str]:
            case.text[column] = draw(st.sampled_from([None, "", "  "]))
            return column, "missing"

    @mutation(f"{column} not a number")
    def _not_a_number(case: Case, draw: st.DrawFn) -> tuple[str, str]:
        raw = draw(st.sampled_from(["abc", "1,5", "0x10", "--1", "1.2.3"]))
        case.text[column] = raw
        return column, f"not a number: '{raw}'"

    @mutation(f"{column} not finite")
    def _not_finite(case: Case, draw: st.DrawFn) -> tuple[str, str]:
        raw = draw(st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity"]))
        case.text[column] = raw
        return column, f"not finite ({fmt(float(raw))})"


for _column in (*PRICES, "vol", "vwap", "trade_count"):
    _number_mutations(_column, required=_column in PRICES)


def _set(case: Case, column: str, value: float) -> str:
    case.text[column] = str(value)
    return fmt(value)


@mutation("high below low")
def _high_below_low(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    low = case.values["low"]
    high = _set(case, "high", (round(low * 1000) - draw(st.integers(1, 3_000))) / 1000)
    return "high", f"high {high} below low {fmt(low)}"


def _outside_mutations(price: str) -> None:
    @mutation(f"{price} below low")
    def _below(case: Case, draw: st.DrawFn) -> tuple[str, str]:
        low = case.values["low"]
        value = _set(case, price, (round(low * 1000) - draw(st.integers(1, 3_000))) / 1000)
        return price, f"{price} {value} below low {fmt(low)}"

    @mutation(f"{price} above high")
    def _above(case: Case, draw: st.DrawFn) -> tuple[str, str]:
        high = case.values["high"]
        value = _set(case, price, (round(high * 1000) + draw(st.integers(1, 3_000))) / 1000)
        return price, f"{price} {value} above high {fmt(high)}"


for _price in ("open", "close"):
    _outside_mutations(_price)


@mutation("negative vol")
def _negative_vol(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    return "vol", f"negative ({_set(case, 'vol', -draw(st.integers(1, 10**6)) / 100)})"


@mutation("negative trade_count")
def _negative_count(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    return "trade_count", f"negative ({_set(case, 'trade_count', float(-draw(st.integers(1, 10**6))))})"


@mutation("fractional trade_count")
def _fractional_count(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    value = draw(st.integers(0, 10**6)) + draw(st.sampled_from([0.5, 0.25, 0.001]))
    return "trade_count", f"not a whole number ({_set(case, 'trade_count', value)})"


@mutation("trade_count too large")
def _large_count(case: Case, draw: st.DrawFn) -> tuple[str, str]:
    value = float(draw(st.integers(INT32_MAX + 1, 10**12)))
    return "trade_count", f"too large ({_set(case, 'trade_count', value)} > {INT32_MAX})"


@st.composite
def cases(draw: st.DrawFn, kind: str | None = None) -> Case:
    """A valid row, broken by mutation ``kind`` (any or none when not given)."""
    case = draw(valid_rows())
    if kind is None:
        kind = draw(st.one_of(st.none(), st.sampled_from(sorted(MUTATIONS))))
    if kind is not None:
        case.kind = kind
        case.column, case.reason = MUTATIONS[kind](case, draw)
    return case


def check(batch: list[Case]) -> None:
    raw = pd.DataFrame({c: [case.text[c] for case in batch] for c in COLUMNS}, dtype="string")
    checked = check_bars(raw, known_symbols=KNOWN)
    got = [
        (c, r) if isinstance(r, str) else (None, None)
        for c, r in zip(checked.column, checked.reason, strict=True)
    ]
    wrong = [
        (i, case.kind or "valid", (case.column, case.reason), found)
        for i, (case, found) in enumerate(zip(batch, got, strict=True))
        if found != (case.column, case.reason)
    ]
    assert wrong == [], "(row, mutation, expected (column, reason), reported)"
    # good rows keep their values exactly
    for i, case in enumerate(batch):
        if case.reason is None:
            bar = checked.bars.iloc[i]
            assert bar["ts_utc"] == pd.Timestamp(case.values["ts_utc"])
            assert bar["canonical_symbol"] == case.values["canonical_symbol"]
            for c in (*PRICES, "vol", "vwap", "trade_count"):
                want = case.values[c]
                assert pd.isna(bar[c]) if want is None else bar[c] == want, (c, bar[c], want)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_rule_fires_with_its_reason_and_spares_the_other_rows(data: st.DataObject) -> None:
    """Every rule in every example: one row per mutation, shuffled among valid rows, each names its
    column and why; the valid rows pass untouched."""
    broken = [data.draw(cases(kind=kind), label=kind) for kind in sorted(MUTATIONS)]
    valid = data.draw(st.lists(valid_rows(), min_size=1, max_size=10), label="valid rows")
    check(data.draw(st.permutations(broken + valid), label="batch"))


@settings(max_examples=100, deadline=None)
@given(st.lists(cases(), min_size=1, max_size=20))
def test_a_mixed_batch_reports_exactly_the_broken_rule_of_each_row(batch: list[Case]) -> None:
    """About half the rows valid, the others broken one way each."""
    check(batch)


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
