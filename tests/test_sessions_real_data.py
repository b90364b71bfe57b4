"""Real market data (../shared/data/real, see its README.txt) on trading sessions (DESIGN.md 3b).

1. ES futures (CME Globex trades) on the exchange calendar CMES (17:00-17:00 Chicago): every one of the
   vendor's 115 hourly bars is reproduced (the session's hours start on the hour in UTC), and each daily
   bar is the Chicago trading day: 22:00Z to 22:00Z in October (CDT), equal to pandas on the minutes.
2. Gold (OANDA) on `fx` (17:00 New York): the hours equal the vendor's except the nine reopen hours the
   data README explains, and each day runs 21:00Z to 21:00Z in May (EDT), equal to pandas.
3. The same gold minutes on a fixed UTC-5 broker session reproduce that broker's 05:00Z days.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from baragg import backfill, registry, sessions
from baragg.db import Database
from conftest import REAL_DATA
from test_real_data import ES_1H, ES_1M, GOLD_1H, GOLD_1M, GOLD_REOPEN_HOURS_THAT_DIFFER, OHLC, read_minutes
from test_sessions import bars, ingest_frame

pytestmark = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real market data not present at {REAL_DATA} (it lives outside the repo)"
)


def minutes_frame(name: str, columns: dict[str, str]) -> pd.DataFrame:
    frame = read_minutes(name, columns).reset_index().rename(columns={"ts": "ts_utc"})
    return frame


def pandas_days(frame: pd.DataFrame, offset_hours: int) -> pd.DataFrame:
    """Days from ``offset_hours`` UTC to the same hour next day (pandas on a naive UTC index)."""
    naive = frame.set_index(frame["ts_utc"].dt.tz_localize(None))
    agg = {"open": "first", "high": "max", "low": "min", "close": "last"}
    if "vol" in naive:
        agg["vol"] = "sum"
    out = naive.resample("1D", offset=f"{offset_hours}h", label="left", closed="left").agg(agg)
    out["n"] = naive["open"].resample("1D", offset=f"{offset_hours}h").count()
    out = out[out["n"] > 0]
    out.index = out.index.tz_localize(UTC)
    return out


def run(db: Database, symbol: str, start: str, now: str) -> None:
    report = backfill.backfill(
        db, symbols=[symbol], start=datetime.fromisoformat(start), now=datetime.fromisoformat(now)
    )
    assert not report.failures, report.failures


def test_es_on_cmes_hours_equal_the_vendors_and_days_are_chicago_sessions(
    db: Database, tmp_path: Path
) -> None:
    registry.add(db, "ES", session="CMES", is_sparse=True, calc_1d=True)
    minutes = minutes_frame(ES_1M, {**{c: c for c in OHLC}, "volume": "vol"})
    ingest_frame(db, tmp_path, "ES", minutes)
    run(db, "ES", "2013-10-01T00:00:00+00:00", "2013-10-16T00:00:00+00:00")
    vendor = read_minutes(ES_1H, {**{c: c for c in OHLC}, "volume": "vol"})
    with db.connect() as conn:
        hours = bars(conn, "ES", "1h")
        days = bars(conn, "ES", "1d")
        opens = [
            o.astimezone(UTC)
            for (o,) in conn.execute(
                "SELECT open_utc FROM agg_session_days WHERE session = 'CMES'"
                " AND open_utc BETWEEN '2013-10-05' AND '2013-10-15' ORDER BY 1"
            )
        ]
    assert len(vendor) == 115
    compared = hours.loc[vendor.index]
    assert compared[OHLC].values.tolist() == vendor[OHLC].values.tolist()
    assert compared["vol"].tolist() == vendor["vol"].astype(float).tolist()
    # Each day is one CMES session, 17:00 Chicago (22:00Z in October) to the next.
    assert {ts.hour for ts in days.index} == {22} and set(days.index) <= set(opens)
    want = pandas_days(minutes, 22).loc[days.index]
    assert days[[*OHLC, "vol"]].values.tolist() == want[[*OHLC, "vol"]].values.tolist()
    assert (days["expected"] == 24).all()
    # The session opening Sunday 2013-10-13 22:00Z lacks its first two hours (the source has no file
    # for that Sunday): 22 of 24 hours.
    assert days.loc[pd.Timestamp("2013-10-13 22:00", tz=UTC), "n"] == 22


def test_gold_on_fx_hours_and_new_york_days(db: Database, tmp_path: Path) -> None:
    registry.add(db, "XAUUSD", session="fx", is_sparse=True, calc_1d=True)
    minutes = minutes_frame(GOLD_1M, {f"bid_{c}": c for c in OHLC})
    ingest_frame(db, tmp_path, "XAUUSD", minutes)
    run(db, "XAUUSD", "2014-04-27T00:00:00+00:00", "2014-05-17T00:00:00+00:00")
    vendor = read_minutes(GOLD_1H, {f"bid_{c}": c for c in OHLC})
    with db.connect() as conn:
        hours = bars(conn, "XAUUSD", "1h")
        days = bars(conn, "XAUUSD", "1d")
    # fx hours start at 17:00 New York = 21:00Z in May: on the hour, as the vendor's.
    common = hours.index.intersection(vendor.index)
    differing = {ts for ts in common if hours.loc[ts, OHLC].tolist() != vendor.loc[ts, OHLC].tolist()}
    assert len(differing) == GOLD_REOPEN_HOURS_THAT_DIFFER and {ts.hour for ts in differing} == {22}
    assert set(vendor.index) <= set(hours.index)
    # Days 17:00 New York to 17:00 New York; the last minutes of each Friday close the week's last day.
    assert {ts.hour for ts in days.index} == {21}
    want = pandas_days(minutes, 21).loc[days.index]
    assert days[OHLC].values.tolist() == want[OHLC].values.tolist()
    # Trading dates Thursday May 1 to Friday May 16, each opening the evening before; the first lacks
    # 21:00-24:00Z of April 30 and the last has its first three hours only (the file's ends); Sunday
    # sessions open at 22:00Z, after their first hour (the weekend reopen).
    assert [ts.strftime("%a %d") for ts in days.index] == [
        "Wed 30", "Thu 01", "Sun 04", "Mon 05", "Tue 06", "Wed 07", "Thu 08",
        "Sun 11", "Mon 12", "Tue 13", "Wed 14", "Thu 15",
    ]  # fmt: skip
    assert days["n"].tolist() == [21, 24, 23, 24, 24, 24, 24, 23, 24, 24, 24, 3]


def test_gold_on_a_fixed_utc_minus_5_broker_session(db: Database, tmp_path: Path) -> None:
    sessions.add_session(db, "FXCM", tz="Etc/GMT+5", open_="00:00", days="sun-fri")
    registry.add(db, "XAUUSD", session="FXCM", is_sparse=True, calc_1d=True)
    minutes = minutes_frame(GOLD_1M, {f"bid_{c}": c for c in OHLC})
    ingest_frame(db, tmp_path, "XAUUSD", minutes)
    run(db, "XAUUSD", "2014-04-27T00:00:00+00:00", "2014-05-17T00:00:00+00:00")
    with db.connect() as conn:
        days = bars(conn, "XAUUSD", "1d")
    want = pandas_days(minutes, 5)
    # Every broker day that has minutes (sparse: all stored) and nothing else.
    assert list(days.index) == list(want.index)
    assert days[OHLC].values.tolist() == want[OHLC].values.tolist()
