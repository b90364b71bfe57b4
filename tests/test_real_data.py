"""Real market data (../shared/data/real, see its README.txt) through the engine: 1m -> 5m -> 1h.

1. Gold (OANDA XAUUSD, bid prices as OHLC, no volume): every 5m and 1h window equals pandas'
   resample of the same minutes, with the quality rule deciding which windows are stored.
2. Every 1h bar baragg stores equals the vendor's hourly bar, except the hours the data README
   explains, listed below with the reason.
3. ES futures trades (with volume): all 115 vendor hours are reproduced, OHLC and volume.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import psycopg
import pytest

from baragg.timeframes import LADDER, quality_score
from conftest import REAL_DATA

pytestmark = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real market data not present at {REAL_DATA} (it lives outside the repo)"
)

GOLD_1M = "XAUUSD_oanda_1m_bidask_20140501-20140515_UTC.csv"
GOLD_1H = "XAUUSD_oanda_1h_bidask_reference_20140501-20140515_UTC.csv"
ES_1M = "ES_ESZ13_cme_1m_trade_20131006-20131014_UTC.csv"
ES_1H = "ES_ESZ13_cme_1h_trade_reference_20131006-20131011_UTC.csv"
OHLC = ["open", "high", "low", "close"]

# The README: "The 9 that differ are all the 22:00 UTC daily reopen hour" (the vendor's hour bar for
# the reopen hour is not the aggregate of its minute file). Derived below from the data and checked
# to be exactly these nine.
GOLD_REOPEN_HOURS_THAT_DIFFER = 9


def read_minutes(name: str, columns: dict[str, str]) -> pd.DataFrame:
    frame = pd.read_csv(REAL_DATA / name, parse_dates=["timestamp_utc"])
    frame = frame.rename(columns=columns)
    frame["ts"] = frame["timestamp_utc"].dt.tz_localize(UTC)
    return frame.set_index("ts")[list(columns.values())]


def gold_minutes() -> pd.DataFrame:
    return read_minutes(GOLD_1M, {f"bid_{c}": c for c in OHLC})


def load(conn: psycopg.Connection, symbol: str, frame: pd.DataFrame, sparse: bool) -> None:
    conn.execute(
        "INSERT INTO core_asset_registry_all (canonical_symbol, is_sparse) VALUES (%s, %s)", (symbol, sparse)
    )
    has_vol = "vol" in frame
    with conn.cursor().copy(
        "COPY data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source) FROM STDIN"
    ) as copy:
        for ts, row in frame.iterrows():
            copy.write_row(
                (symbol, "1m", ts.to_pydatetime(), row.open, row.high, row.low, row.close,
                 float(row.vol) if has_vol else None, "vendor")
            )  # fmt: skip
    for tf in ("5m", "1h"):
        conn.execute(
            "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, agg_start_utc)"
            " VALUES (%s, %s, %s, %s)",
            (symbol, tf, LADDER[tf].source, frame.index[0].to_pydatetime()),
        )


def run_chain(conn: psycopg.Connection, symbol: str, now: datetime) -> None:
    """5m then 1h, as the worker does: bootstrap, call until done, store the cursor."""
    for tf in ("5m", "1h"):
        (cursor,) = conn.execute("SELECT agg_bootstrap_cursor(%s, %s, %s)", (symbol, tf, now)).fetchone()
        # Each call but the last fills 500 windows, and a window holds at least one source row.
        (rows,) = conn.execute(
            "SELECT count(*) FROM data_bars WHERE canonical_symbol = %s", (symbol,)
        ).fetchone()
        calls = 0
        while True:
            (result,) = conn.execute(
                "SELECT catchup_aggregation_range(%s, %s, %s, 500, %s)", (symbol, tf, cursor, now)
            ).fetchone()
            cursor = result["cursor_advanced_to"]
            conn.execute(
                "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE canonical_symbol = %s AND timeframe = %s",
                (cursor, symbol, tf),
            )
            if not result["continue"]:
                break
            calls += 1
            assert calls <= rows // 500 + 1, (
                f"{tf}: `continue` still true after {calls} calls (cursor {cursor})"
            )


def stored(conn: psycopg.Connection, symbol: str, tf: str) -> pd.DataFrame:
    rows = conn.execute(
        "SELECT ts_utc, open, high, low, close, vol, source_candles, quality_score FROM derived_data_bars"
        " WHERE canonical_symbol = %s AND timeframe = %s AND deleted_at IS NULL ORDER BY ts_utc",
        (symbol, tf),
    ).fetchall()
    frame = pd.DataFrame(rows, columns=["ts", *OHLC, "vol", "n", "quality"]).set_index("ts")
    frame.index = pd.DatetimeIndex(frame.index).tz_convert(UTC)
    return frame


def pandas_bars(frame: pd.DataFrame, rule: str, expected: int, sparse: bool) -> pd.DataFrame:
    """pandas' resample of ``frame``, keeping the windows the quality rule stores."""
    agg = {"open": "first", "high": "max", "low": "min", "close": "last"}
    if "vol" in frame:
        agg["vol"] = "sum"
    out = frame.resample(rule, label="left", closed="left").agg(agg)
    out["n"] = frame["open"].resample(rule, label="left", closed="left").count()
    out = out[out["n"] > 0].copy()
    out["quality"] = [quality_score(int(n), expected, sparse) for n in out["n"]]
    return out[out["quality"].notna()].astype({"quality": int})


def assert_frames_equal(got: pd.DataFrame, want: pd.DataFrame, columns: list[str]) -> None:
    assert list(got.index) == list(want.index)
    for column in columns:
        assert got[column].tolist() == want[column].tolist(), column


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-rule", "sparse"])
def test_gold_5m_and_1h_equal_pandas_resample(conn: psycopg.Connection, sparse: bool) -> None:
    minutes = gold_minutes()
    load(conn, "XAUUSD", minutes, sparse)
    run_chain(conn, "XAUUSD", datetime(2014, 5, 16, 1, tzinfo=UTC))

    want_5m = pandas_bars(minutes, "5min", 5, sparse)
    got_5m = stored(conn, "XAUUSD", "5m")
    assert_frames_equal(got_5m, want_5m, [*OHLC, "n", "quality"])
    # Which 5m windows the rule drops: those with 1 or 2 minutes (sparse keeps them at -1).
    all_5m = pandas_bars(minutes, "5min", 5, sparse=True)
    assert len(all_5m) - len(want_5m) == (0 if sparse else int((all_5m["n"] <= 2).sum()))
    assert not sparse or (got_5m["quality"] == -1).sum() == int((all_5m["n"] <= 2).sum())

    # 1h from the 5m bars pandas computed (so a wrong 5m bar or a wrong hour both show).
    assert_frames_equal(
        stored(conn, "XAUUSD", "1h"), pandas_bars(want_5m[OHLC], "1h", 12, sparse), [*OHLC, "n", "quality"]
    )


def vendor_hours(name: str, columns: dict[str, str]) -> pd.DataFrame:
    return read_minutes(name, columns)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense-rule"])
def test_gold_hours_equal_the_vendors_except_the_explained_ones(
    conn: psycopg.Connection, sparse: bool
) -> None:
    """Registered sparse, every 5m window is kept and each hour holds all its minutes: the stored
    hours equal the vendor's except the 22:00 reopen hours (the README's nine). Registered with the
    default rule, 5m windows with 1-2 minutes are dropped, and hours containing such a window may
    also differ (README: 'the hour built from 5m bars then lacks their minutes')."""
    minutes = gold_minutes()
    load(conn, "XAUUSD", minutes, sparse)
    run_chain(conn, "XAUUSD", datetime(2014, 5, 16, 1, tzinfo=UTC))
    got = stored(conn, "XAUUSD", "1h")
    vendor = vendor_hours(GOLD_1H, {f"bid_{c}": c for c in OHLC})

    # The vendor's file has no Sunday 22:00 hours (May 4 and 11): baragg stores them, nothing to compare.
    sunday_reopens = {pd.Timestamp("2014-05-04 22:00", tz=UTC), pd.Timestamp("2014-05-11 22:00", tz=UTC)}
    assert set(got.index) - set(vendor.index) <= sunday_reopens
    assert sunday_reopens <= set(got.index)

    five = pandas_bars(minutes, "5min", 5, sparse=True)
    thin_hours = set(five[five["n"] <= 2].index.floor("1h"))
    differing = {
        ts
        for ts in got.index.intersection(vendor.index)
        if got.loc[ts, OHLC].tolist() != vendor.loc[ts, OHLC].tolist()
    }
    reopen = {ts for ts in differing if ts.hour == 22}
    assert len(reopen) == GOLD_REOPEN_HOURS_THAT_DIFFER
    if sparse:
        assert differing == reopen
        assert set(vendor.index) <= set(got.index), "every vendor hour is stored for a sparse asset"
    else:
        # Only two 5m windows of this data are that thin (2014-05-01 19:20, 2014-05-07 21:00), and
        # neither holds its hour's open, high, low or close: in practice the same hours match.
        assert len(thin_hours) == 2
        assert differing - reopen <= thin_hours


def test_es_all_115_vendor_hours_match_with_volume(conn: psycopg.Connection) -> None:
    """ES trades registered sparse (quiet minutes leave 5m windows with 1-2 trades): all 115
    reference hours match exactly, OHLC and volume. The vendor's file has no 21:00 hour (the
    21:00-21:14 minutes before the daily close); baragg stores those hours, with nothing to compare."""
    minutes = read_minutes(ES_1M, {**{c: c for c in OHLC}, "volume": "vol"})
    load(conn, "ES", minutes, sparse=True)
    run_chain(conn, "ES", datetime(2013, 10, 15, 1, tzinfo=UTC))
    got = stored(conn, "ES", "1h")
    vendor = vendor_hours(ES_1H, {**{c: c for c in OHLC}, "volume": "vol"})
    assert len(vendor) == 115
    assert set(vendor.index) <= set(got.index)
    compared = got.loc[vendor.index]
    assert compared[OHLC].values.tolist() == vendor[OHLC].values.tolist()
    assert compared["vol"].tolist() == vendor["vol"].astype(float).tolist()
    in_range = got[got.index <= vendor.index.max()]
    assert {ts.hour for ts in set(in_range.index) - set(vendor.index)} == {21}
    # And 5m equals pandas, volume included.
    assert_frames_equal(
        stored(conn, "ES", "5m"), pandas_bars(minutes, "5min", 5, True), [*OHLC, "vol", "n", "quality"]
    )
