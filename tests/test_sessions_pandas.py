"""Property test: session bars equal pandas on tz-aware indexes across daylight-saving changes.

Random minutes around the March and November (Sydney: April and October) changes of New York, London
and Sydney, on sessions that open at local midnight (23- and 25-hour days: pandas' calendar-day
resample in the zone), on the half hour, or at the quarter hour. The symbol is sparse, so every window
with a minute is stored at every level, and each level's OHLC must equal pandas' aggregation of the
minutes: hours and 4-hour windows resampled per local trading day from the day's open, days by pandas
calendar day in the zone (midnight sessions) or by trading day, weeks and months by pandas' local
calendar periods.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta

import pandas as pd
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baragg import sessions
from baragg.db import Database
from engine_support import clean
from test_sessions_model import SETTINGS

# name -> (zone, open, close, weekdays)
SESSIONS = {
    "ny_mid": ("America/New_York", time(0), time(0), (1, 2, 3, 4, 5, 6, 7)),
    "lon_mid": ("Europe/London", time(0), time(0), (1, 2, 3, 4, 5, 6, 7)),
    "syd_mid": ("Australia/Sydney", time(0), time(0), (1, 2, 3, 4, 5, 6, 7)),
    "ny_930": ("America/New_York", time(9, 30), time(16, 0), (1, 2, 3, 4, 5)),
    "syd_1030": ("Australia/Sydney", time(10, 30), time(16, 15), (1, 2, 3, 4, 5)),
    "lon_0815": ("Europe/London", time(8, 15), time(16, 30), (1, 2, 3, 4, 5)),
}
CHANGES = {
    "America/New_York": [date(2024, 3, 10), date(2024, 11, 3)],
    "Europe/London": [date(2024, 3, 31), date(2024, 10, 27)],
    "Australia/Sydney": [date(2024, 4, 7), date(2024, 10, 6)],
}
LEVELS = ("5m", "1h", "4h", "1d", "1w", "1mo")
OHLC = ["open", "high", "low", "close"]
AGG = {"open": "first", "high": "max", "low": "min", "close": "last"}


@pytest.fixture(scope="module")
def pandas_db(server_url: str, template_db: str) -> Iterator[psycopg.Connection]:
    from conftest import create_database, drop_database, url_for

    name = f"baragg_pandas_{uuid.uuid4().hex[:10]}"
    create_database(server_url, name, template=template_db)
    try:
        with Database(url_for(server_url, name)).connect(autocommit=True) as conn:
            for sname, (zone, opening, closing, weekdays) in SESSIONS.items():
                conn.execute(
                    "INSERT INTO agg_sessions (name, tz, open_time, close_time, weekdays) VALUES (%s, %s, %s, %s, %s)",
                    (sname, zone, opening, closing, list(weekdays)),
                )
                sessions.ensure_days(conn, sname, date(2024, 1, 1), date(2024, 12, 31))
            yield conn
    finally:
        drop_database(server_url, name)


def pandas_levels(minutes: pd.DataFrame, zone: str, opening: time, closing: time, weekdays: tuple) -> dict:
    """The expected bars (OHLC, indexed by window start in UTC) of every level, with pandas."""
    local = minutes.tz_convert(zone)
    midnight = opening == closing == time(0)
    if midnight:
        in_session = local
        day_start = local.index.normalize()  # local midnight: pandas handles 23/25-hour days
    else:
        wall = local.index.tz_localize(None)
        opens = (wall.normalize() + pd.Timedelta(hours=opening.hour, minutes=opening.minute)).tz_localize(
            zone
        )
        closes = (wall.normalize() + pd.Timedelta(hours=closing.hour, minutes=closing.minute)).tz_localize(
            zone
        )
        keep = (
            (local.index >= opens)
            & (local.index < closes)
            & local.index.day_of_week.isin([d - 1 for d in weekdays])
        )
        in_session = local[keep]
        day_start = opens[keep]
    out: dict[str, pd.DataFrame] = {}
    for level, rule in (("5m", "5min"), ("1h", "1h"), ("4h", "4h")):
        parts = [
            group.resample(rule, origin=start, closed="left", label="left").agg(AGG).dropna()
            for start, group in in_session.groupby(day_start)
        ]
        out[level] = pd.concat(parts) if parts else pd.DataFrame(columns=OHLC)
    if midnight:
        out["1d"] = in_session.resample("D").agg(AGG).dropna()
        out["1w"] = in_session.resample("W-MON", closed="left", label="left").agg(AGG).dropna()
        out["1mo"] = in_session.resample("MS").agg(AGG).dropna()
    else:
        out["1d"] = in_session.groupby(day_start).agg(AGG)
    for level, frame in out.items():
        frame = frame[OHLC].astype(float)
        frame.index = _utc_index(frame.index)
        out[level] = frame.sort_index()
    return out


def _utc_index(index: pd.Index) -> pd.DatetimeIndex:
    if len(index) == 0:
        return pd.DatetimeIndex([], tz=UTC)
    return pd.DatetimeIndex(index).tz_convert(UTC)


@settings(SETTINGS, max_examples=40)
@given(
    name=st.sampled_from(sorted(SESSIONS)),
    which=st.integers(0, 1),
    days_before=st.integers(1, 5),
    blocks=st.lists(
        st.tuples(st.integers(0, 10 * 1440), st.sampled_from([60, 600, 3000])), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_session_bars_equal_pandas_on_tz_aware_indexes(
    pandas_db, name, which, days_before, blocks, seed
) -> None:
    conn = pandas_db
    clean(conn)
    zone, opening, closing, weekdays = SESSIONS[name]
    change = CHANGES[zone][which]
    base = datetime.combine(change - timedelta(days=days_before), time(0), tzinfo=UTC)
    rnd = random.Random(seed)
    stamps = sorted(
        {base + timedelta(minutes=s + i) for s, n in blocks for i in range(n) if rnd.random() < 0.7}
    )
    price = [round(100 + rnd.uniform(-1, 1), 4) for _ in stamps]
    minutes = pd.DataFrame(
        {
            "open": price,
            "high": [p + 0.5 for p in price],
            "low": [p - 0.5 for p in price],
            "close": [p + 0.1 for p in price],
        },
        index=pd.DatetimeIndex(stamps),
    )
    conn.execute(
        "INSERT INTO core_asset_registry_all (canonical_symbol, is_sparse, session) VALUES ('AAA', true, %s)",
        (name,),
    )
    with conn.cursor().copy(
        "COPY data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, source) FROM STDIN"
    ) as copy:
        for ts, row in minutes.iterrows():
            copy.write_row(("AAA", "1m", ts.to_pydatetime(), row.open, row.high, row.low, row.close, "test"))
    source = {"5m": "1m", "1h": "5m", "4h": "1h", "1d": "1h", "1w": "1d", "1mo": "1d"}
    for level in LEVELS:
        conn.execute(
            "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, agg_start_utc) VALUES ('AAA', %s, %s, %s)",
            (level, source[level], base - timedelta(days=40)),
        )
    now = datetime(2025, 6, 1, tzinfo=UTC)
    for level in LEVELS:
        (cursor,) = conn.execute("SELECT agg_bootstrap_cursor('AAA', %s, %s)", (level, now)).fetchone()
        if cursor is None:
            continue  # no source rows and "now" lies past the stored days: nothing to build
        (result,) = conn.execute(
            "SELECT catchup_aggregation_range('AAA', %s, %s, NULL, %s)", (level, cursor, now)
        ).fetchone()
        conn.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE canonical_symbol = 'AAA' AND timeframe = %s",
            (result["cursor_advanced_to"], level),
        )
    want = pandas_levels(minutes, zone, opening, closing, weekdays)
    for level, expected in want.items():
        rows = conn.execute(
            "SELECT ts_utc, open, high, low, close FROM derived_data_bars WHERE timeframe = %s AND deleted_at IS NULL ORDER BY ts_utc",
            (level,),
        ).fetchall()
        got = pd.DataFrame(rows, columns=["ts", *OHLC]).set_index("ts")
        got.index = _utc_index(got.index)
        assert list(got.index) == list(expected.index), (name, level)
        assert got.values.tolist() == expected.values.tolist(), (name, level)
