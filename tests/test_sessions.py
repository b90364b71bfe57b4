"""Trading sessions end to end (DESIGN.md 3b), through the real registry, ingest, worker and verify.

- A US equity with only regular-session minutes on XNYS (no --sparse): a complete quality-2 daily bar
  for every full trading day, a shorter one for the early close, nothing for the holiday (a gap).
- FX on `fx`: 17:00 New York days and Sunday-open weeks on both sides of a daylight-saving change,
  equal to pandas' grouping of the same minutes by New York trading date.
- A fixed UTC-5 broker (`session add ... --tz Etc/GMT+5`): days 05:00Z-05:00Z, equal to pandas.
- Changing a symbol's session or --sparse rebuilds its bars from the stored sources; verify agrees.
- 24x7 stays what it was: the session engine on 24x7 equals the date_bin engine, and re-running the
  session migration and the function files changes no stored bar, byte for byte.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import psycopg
import pytest

from baragg import backfill, ingest, migrate, registry, sessions, status, verify, worker
from baragg.db import Database
from ops_helpers import baragg

NY = ZoneInfo("America/New_York")
LEVELS = ("5m", "15m", "1h", "4h", "1d", "1w", "1mo")


def minute_frame(stamps: list[datetime], seed: int = 7) -> pd.DataFrame:
    """A random walk of 1m bars at the given instants (UTC)."""
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 0.05, len(stamps)))
    opening = np.concatenate([[100.0], close[:-1]])
    spread = np.abs(rng.normal(0, 0.03, len(stamps)))
    return pd.DataFrame(
        {
            "ts_utc": pd.DatetimeIndex(stamps).tz_convert(UTC),
            "open": opening.round(6),
            "high": (np.maximum(opening, close) + spread).round(6),
            "low": (np.minimum(opening, close) - spread).round(6),
            "close": close.round(6),
            "vol": rng.integers(1, 100, len(stamps)).astype(float),
        }
    )


def ingest_frame(db: Database, tmp_path: Path, symbol: str, frame: pd.DataFrame) -> None:
    path = tmp_path / f"{symbol}.csv"
    out = frame.copy()
    out["ts_utc"] = out["ts_utc"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    out.to_csv(path, index=False)
    report = ingest.ingest_file(db, path, symbol=symbol)
    assert report.inserted == len(frame)


def bars(conn: psycopg.Connection, symbol: str, tf: str) -> pd.DataFrame:
    rows = conn.execute(
        "SELECT ts_utc, open, high, low, close, vol, source_candles, expected_candles, quality_score"
        " FROM derived_data_bars WHERE canonical_symbol = %s AND timeframe = %s AND deleted_at IS NULL"
        " ORDER BY ts_utc",
        (symbol, tf),
    ).fetchall()
    frame = pd.DataFrame(
        rows, columns=["ts", "open", "high", "low", "close", "vol", "n", "expected", "quality"]
    )
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame.set_index("ts")


def assert_verified(db: Database, symbol: str, levels: tuple[str, ...], *, some: bool = True) -> None:
    for tf in levels:
        report = verify.verify(db, symbol, tf)
        assert report.ok, (tf, report.as_dict())
        assert report.equal > 0 or not some, tf


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# XNYS: regular-session minutes only, no --sparse
# ---------------------------------------------------------------------------------------------
def regular_minutes(days: dict[date, time]) -> list[datetime]:
    """Every minute 09:30 to the close (New York) of each date."""
    out = []
    for day, closing in days.items():
        t = datetime.combine(day, time(9, 30), tzinfo=NY)
        end = datetime.combine(day, closing, tzinfo=NY)
        while t < end:
            out.append(t.astimezone(UTC))
            t += timedelta(minutes=1)
    return out


# Thanksgiving week 2013: Thursday 28 closed, Friday 29 closes at 13:00.
XNYS_DAYS = {
    date(2013, 11, 25): time(16),
    date(2013, 11, 26): time(16),
    date(2013, 11, 27): time(16),
    date(2013, 11, 29): time(13),
    **{date(2013, 12, d): time(16) for d in (2, 3, 4, 5, 6)},
}


def test_us_equity_on_xnys_complete_days_early_close_and_holiday(db: Database, tmp_path: Path) -> None:
    registry.add(db, "AAPL", session="XNYS", calc_15m=True, calc_4h=True, calc_1d=True, calc_1w=True)
    ingest_frame(db, tmp_path, "AAPL", minute_frame(regular_minutes(XNYS_DAYS)))
    report = backfill.backfill(db, start=utc("2013-11-01"), now=utc("2013-12-09 12:00"))
    assert not report.failures
    with db.connect() as conn:
        days = bars(conn, "AAPL", "1d")
        # One bar per trading day, stamped at the open (14:30Z in winter), none for Thanksgiving.
        assert [ts.date() for ts in days.index] == list(XNYS_DAYS)
        assert {ts.time() for ts in days.index} == {time(14, 30)}
        assert (days["quality"] == 2).all()
        assert (days["n"] == days["expected"]).all()
        early = days.loc[pd.Timestamp("2013-11-29 14:30", tz=UTC)]
        assert (early["n"], early["expected"]) == (4, 4)  # 09:30, 10:30, 11:30, 12:30-13:00
        assert set(days.drop(early.name)["expected"]) == {7}  # 09:30 ... 15:30-16:00
        hours = bars(conn, "AAPL", "1h")
        last = hours.loc[pd.Timestamp("2013-11-27 20:30", tz=UTC)]  # 15:30-16:00 New York, clipped
        assert (last["n"], last["expected"], last["quality"]) == (6, 6, 2)
        assert (hours["quality"] == 2).all()
        four = bars(conn, "AAPL", "4h").loc["2013-11-26"]
        assert [(ts.time(), e) for ts, e in four["expected"].items()] == [
            (time(14, 30), 4),
            (time(18, 30), 3),
        ]
        weeks = bars(conn, "AAPL", "1w")
        assert list(weeks.index) == [
            pd.Timestamp("2013-11-25 14:30", tz=UTC),
            pd.Timestamp("2013-12-02 14:30", tz=UTC),
        ]
        assert weeks["expected"].tolist() == [4, 5] and (weeks["quality"] == 2).all()
        # The holiday is a gap, not a missing bar: the 1d task is at its frontier.
        (cursor,) = conn.execute(
            "SELECT last_agg_bar_ts_utc FROM data_agg_state WHERE canonical_symbol = 'AAPL' AND timeframe = '1d'"
        ).fetchone()
        assert cursor == utc("2013-12-09 14:30")
    # status: every task caught up with its data (lag 0 behind the frontier), on session XNYS.
    tasks = status.task_status(db, now=utc("2013-12-09 12:00"), symbols=["AAPL"])
    assert {t.session for t in tasks} == {"XNYS"}
    assert {t.timeframe: t.lag_frontier_seconds for t in tasks} == dict.fromkeys(
        ("5m", "15m", "1h", "4h", "1d", "1w"), 0.0
    )
    assert_verified(db, "AAPL", ("5m", "15m", "1h", "4h", "1d", "1w"))


def test_without_a_session_the_same_minutes_give_no_daily_bar(db: Database, tmp_path: Path) -> None:
    """The issue's starting point: on 24x7 (UTC days) 6.5 of 24 hours is below the quality threshold."""
    registry.add(db, "AAPL", calc_1d=True)
    ingest_frame(db, tmp_path, "AAPL", minute_frame(regular_minutes(XNYS_DAYS)))
    backfill.backfill(db, start=utc("2013-11-01"), now=utc("2013-12-09 12:00"))
    with db.connect() as conn:
        assert bars(conn, "AAPL", "1d").empty


# ---------------------------------------------------------------------------------------------
# FX: 17:00 New York days and Sunday-open weeks across the March change
# ---------------------------------------------------------------------------------------------
def fx_minutes(first: datetime, last: datetime) -> list[datetime]:
    """Every minute from Sunday 17:00 to Friday 17:00 New York."""
    out = []
    t = first
    while t < last:
        local = t.astimezone(NY)
        weekday, hour = local.weekday(), local.hour
        closed = (weekday == 4 and hour >= 17) or weekday == 5 or (weekday == 6 and hour < 17)
        if not closed:
            out.append(t)
        t += timedelta(minutes=1)
    return out


def pandas_trading_days(frame: pd.DataFrame, zone: str, opening_hour: int) -> pd.DataFrame:
    """pandas on a tz-aware index: a row belongs to the trading date whose session (opening at
    ``opening_hour`` local the day before) contains it; the bar is stamped at that open."""
    local = frame.set_index(frame["ts_utc"].dt.tz_convert(zone))
    wall = local.index.tz_localize(None)
    trading_date = (wall - pd.Timedelta(hours=opening_hour)).normalize() + pd.Timedelta(days=1)
    opens = (trading_date - pd.Timedelta(days=1) + pd.Timedelta(hours=opening_hour)).tz_localize(zone)
    grouped = local.groupby(opens.tz_convert(UTC))
    out = grouped.agg(
        open=("open", "first"), high=("high", "max"), low=("low", "min"), close=("close", "last")
    )
    out["n_minutes"] = grouped.size()
    return out


def test_fx_days_and_weeks_on_both_sides_of_the_march_change(db: Database, tmp_path: Path) -> None:
    registry.add(db, "EURUSD", session="fx", calc_4h=True, calc_1d=True, calc_1w=True)
    frame = minute_frame(fx_minutes(utc("2024-03-03 22:00"), utc("2024-03-15 21:00")))
    ingest_frame(db, tmp_path, "EURUSD", frame)
    assert not backfill.backfill(db, start=utc("2024-03-01"), now=utc("2024-03-18")).failures
    with db.connect() as conn:
        days = bars(conn, "EURUSD", "1d")
        # 17:00 New York: 22:00Z before the change (EST), 21:00Z after (EDT); one bar per trading date.
        assert [ts.strftime("%a %d %H:%M") for ts in days.index] == [
            "Sun 03 22:00", "Mon 04 22:00", "Tue 05 22:00", "Wed 06 22:00", "Thu 07 22:00",
            "Sun 10 21:00", "Mon 11 21:00", "Tue 12 21:00", "Wed 13 21:00", "Thu 14 21:00",
        ]  # fmt: skip
        assert (days["quality"] == 2).all() and (days["expected"] == 24).all()
        want = pandas_trading_days(frame, "America/New_York", 17)
        assert list(want.index) == list(days.index)
        for column in ("open", "high", "low", "close"):
            assert days[column].tolist() == want[column].tolist(), column
        weeks = bars(conn, "EURUSD", "1w")
        assert list(weeks.index) == [utc("2024-03-03 22:00"), utc("2024-03-10 21:00")]  # Sunday opens
        assert (weeks["quality"] == 2).all() and weeks["expected"].tolist() == [5, 5]
        # 4h windows from the open: 17:00, 21:00, 01:00 ... New York.
        four = bars(conn, "EURUSD", "4h").loc["2024-03-11 21:00":"2024-03-12 21:00"]
        assert [ts.tz_convert(NY).hour for ts in four.index] == [17, 21, 1, 5, 9, 13, 17]
    assert_verified(db, "EURUSD", ("5m", "1h", "4h", "1d", "1w"))


def test_fx_weeks_across_the_november_change(db: Database, tmp_path: Path) -> None:
    registry.add(db, "EURUSD", session="fx", calc_1w=True)
    frame = minute_frame(fx_minutes(utc("2024-10-27 21:00"), utc("2024-11-08 22:00")))
    ingest_frame(db, tmp_path, "EURUSD", frame)
    backfill.backfill(db, start=utc("2024-10-01"), now=utc("2024-11-12"))
    with db.connect() as conn:
        assert list(bars(conn, "EURUSD", "1w").index) == [utc("2024-10-27 21:00"), utc("2024-11-03 22:00")]
        days = bars(conn, "EURUSD", "1d")
        assert len(days) == 10 and (days["quality"] == 2).all()
    assert_verified(db, "EURUSD", ("1d", "1w"))


# ---------------------------------------------------------------------------------------------
# A fixed UTC-5 broker, added with the command
# ---------------------------------------------------------------------------------------------
def test_custom_gmt_minus_5_session_reproduces_the_brokers_days(db: Database, tmp_path: Path) -> None:
    done = baragg(db, "session", "add", "FXCM", "--tz", "Etc/GMT+5", "--open", "00:00", "--days", "sun-fri")
    assert done.returncode == 0, done.stderr
    assert "FXCM: Etc/GMT+5 00:00-00:00 sun-fri" in done.stdout
    assert baragg(db, "registry", "add", "GBPUSD", "--session", "FXCM", "--calc-1d").returncode == 0
    frame = minute_frame(fx_minutes(utc("2024-03-03 22:00"), utc("2024-03-15 21:00")), seed=3)
    ingest_frame(db, tmp_path, "GBPUSD", frame)
    backfill.backfill(db, start=utc("2024-03-01"), now=utc("2024-03-18"))
    # The broker's day: 05:00Z to 05:00Z, whatever New York's clocks do (pandas on a UTC index).
    naive = frame.set_index(frame["ts_utc"].dt.tz_localize(None))
    want = naive.resample("1D", offset="5h", label="left", closed="left").agg(
        {"open": "first", "high": "max", "low": "min", "close": "last"}
    )
    want["n"] = naive["open"].resample("1D", offset="5h").count()
    want = want[want["n"] > 0]
    with db.connect() as conn:
        days = bars(conn, "GBPUSD", "1d")
    assert [ts.tz_localize(None) for ts in days.index] == [
        ts for ts, n in want["n"].items() if n >= 0.55 * 24 * 60
    ]
    for ts in days.index:
        assert (
            days.loc[ts, ["open", "high", "low", "close"]].tolist()
            == want.loc[ts.tz_localize(None), ["open", "high", "low", "close"]].tolist()
        )
    listed = json.loads(baragg(db, "session", "list", "--json").stdout)
    assert {s["name"] for s in listed} >= {"24x7", "fx", "FXCM"}


def test_session_add_refuses_bad_input_with_one_line(db: Database) -> None:
    for args, needle in (
        (["session", "add", "X", "--tz", "Mars/Olympus", "--open", "09:30"], "IANA time zone"),
        (["session", "add", "X", "--tz", "UTC", "--open", "25:00"], "--open"),
        (["session", "add", "X", "--tz", "UTC", "--open", "09:00", "--days", "mon-funday"], "--days"),
        (["session", "add", "X", "--calendar", "XNYS", "--tz", "UTC"], "--calendar"),
        (["session", "add", "fx", "--tz", "UTC", "--open", "00:00"], "exists already"),
        (["registry", "add", "AAA", "--session", "NOPE"], "unknown session"),
    ):
        done = baragg(db, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM agg_sessions WHERE name = 'X'").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM core_asset_registry_all").fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------
# Changing the session or --sparse rebuilds from the stored sources
# ---------------------------------------------------------------------------------------------
def test_changing_the_session_rebuilds_and_verify_agrees(db: Database, tmp_path: Path) -> None:
    registry.add(db, "EURUSD", calc_4h=True, calc_1d=True, calc_1w=True)
    frame = minute_frame(fx_minutes(utc("2024-03-03 22:00"), utc("2024-03-15 21:00")))
    ingest_frame(db, tmp_path, "EURUSD", frame)
    backfill.backfill(db, start=utc("2024-03-01"), now=utc("2024-03-18"))
    with db.connect() as conn:
        utc_days = bars(conn, "EURUSD", "1d")
        assert {ts.hour for ts in utc_days.index} == {0}
        (before,) = conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()
    change = registry.set_fields(db, "EURUSD", session="fx")
    assert change.rebuilt is not None and change.rebuilt["session"] == "fx"
    # Right after the change (no worker run yet) every level is consistent with the new session.
    assert_verified(db, "EURUSD", ("5m", "1h", "4h", "1d", "1w"))
    with db.connect() as conn:
        days = bars(conn, "EURUSD", "1d")
        assert {ts.hour for ts in days.index} == {21, 22}
        # Nothing is hard-deleted: the UTC-day bars are soft-deleted.
        (deleted,) = conn.execute(
            "SELECT count(*) FROM derived_data_bars WHERE timeframe = '1d' AND deleted_at IS NOT NULL"
        ).fetchone()
        assert deleted >= len(utc_days)
        (total,) = conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()
        assert total >= before
        # 5m windows are the same on fx as on 24x7 (the open is on a whole hour): not rewritten.
        assert change.rebuilt["levels"]["5m"] == {"written": 0, "withdrawn": 0}
    # The worker then finds nothing to redo, and verify still agrees.
    worker.run_once(db, now=utc("2024-03-18"))
    assert_verified(db, "EURUSD", ("5m", "1h", "4h", "1d", "1w"))


def test_changing_sparse_rebuilds_the_thin_windows(db: Database, tmp_path: Path) -> None:
    registry.add(db, "XPT")
    stamps = [utc("2024-03-04 10:00") + timedelta(minutes=m) for m in range(0, 600, 3)]  # 1-2 per 5m
    ingest_frame(db, tmp_path, "XPT", minute_frame(stamps))
    backfill.backfill(db, start=utc("2024-03-01"), now=utc("2024-03-06"))
    with db.connect() as conn:
        assert bars(conn, "XPT", "5m").empty
    change = registry.set_fields(db, "XPT", is_sparse=True)
    assert change.rebuilt["levels"]["5m"]["written"] == 120
    with db.connect() as conn:
        assert (bars(conn, "XPT", "5m")["quality"] == -1).all()
    # The 1h task waited at the data's start (no 5m bar existed): its hours are ordinary catch-up now.
    worker.run_once(db, now=utc("2024-03-06"))
    assert_verified(db, "XPT", ("5m", "1h"))
    registry.set_fields(db, "XPT", is_sparse=False)
    with db.connect() as conn:
        assert bars(conn, "XPT", "5m").empty and bars(conn, "XPT", "1h").empty
    assert_verified(db, "XPT", ("5m", "1h"), some=False)


# ---------------------------------------------------------------------------------------------
# 24x7 stays exactly what it was
# ---------------------------------------------------------------------------------------------
def dump(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT d::text FROM derived_data_bars d ORDER BY id")]


def test_24x7_bars_are_untouched_by_the_session_schema_and_equal_the_session_engine(
    db: Database, tmp_path: Path
) -> None:
    registry.add(db, "EURUSD", calc_15m=True, calc_4h=True, calc_1d=True, calc_1w=True)
    frame = minute_frame(fx_minutes(utc("2024-03-03 22:00"), utc("2024-03-15 21:00")))
    ingest_frame(db, tmp_path, "EURUSD", frame)
    backfill.backfill(db, start=utc("2024-03-01"), now=utc("2024-03-18"))
    with db.connect(autocommit=True) as conn:
        first = dump(conn)
        assert len(first) > 3000
        # Upgrading again: the session migration re-run and every function file re-applied.
        conn.execute(next(m for m in migrate.discover() if m.name == "0009_sessions.sql").sql)
        conn.execute("UPDATE baragg_schema_repeatables SET checksum = 'old'")
    migrate.upgrade(db)
    worker.run_once(db, now=utc("2024-03-18"))
    with db.connect(autocommit=True) as conn:
        assert dump(conn) == first
        # The session engine, run on the 24x7 session, cuts exactly the date_bin windows.
        sessions.ensure_days(conn, "24x7", date(2024, 2, 1), date(2024, 3, 31))
        for tf in ("5m", "15m", "1h", "4h", "1d", "1w"):
            (cursor,) = conn.execute(
                "SELECT last_agg_bar_ts_utc FROM data_agg_state WHERE canonical_symbol = 'EURUSD' AND timeframe = %s",
                (tf,),
            ).fetchone()
            want = conn.execute(
                "SELECT ts_utc, open, high, low, close, vol, source_candles, expected_candles, quality_score"
                " FROM derived_data_bars WHERE canonical_symbol = 'EURUSD' AND timeframe = %s AND deleted_at IS NULL"
                " ORDER BY ts_utc",
                (tf,),
            ).fetchall()
            got = conn.execute(
                "SELECT ts_utc, open, high, low, close, vol, source_candles, expected_candles, quality_score"
                " FROM _agg_session_window_bars(%s, 'EURUSD', '24x7', '2024-02-26', %s, false)"
                " WHERE quality_score IS NOT NULL ORDER BY ts_utc",
                (tf, cursor),
            ).fetchall()
            assert got == want, tf


def test_late_corrections_on_a_session_climb_the_ladder(db: Database, tmp_path: Path) -> None:
    """A corrected minute inside a session re-aggregates its session windows (5m ... 1w); a late minute
    outside every session records nothing."""
    registry.add(db, "AAPL", session="XNYS", calc_4h=True, calc_1d=True, calc_1w=True)
    ingest_frame(db, tmp_path, "AAPL", minute_frame(regular_minutes(XNYS_DAYS)))
    backfill.backfill(db, start=utc("2013-11-01"), now=utc("2013-12-09 12:00"))
    with db.connect() as conn:
        conn.execute(
            "UPDATE data_bars SET high = 1000 WHERE canonical_symbol = 'AAPL' AND ts_utc = '2013-11-26 20:59Z'"
        )
        conn.execute(
            "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, source)"
            " VALUES ('AAPL', '1m', '2013-11-26 22:00Z', 1, 2000, 1, 1, 'late')"  # 17:00 New York: after the close
        )
        logged = conn.execute(
            "SELECT timeframe, window_start FROM agg_invalidations WHERE canonical_symbol = 'AAPL' ORDER BY 1"
        ).fetchall()
        conn.commit()
    assert [(tf, ws.astimezone(UTC)) for tf, ws in logged] == [("5m", utc("2013-11-26 20:55"))]
    worker.run_once(db, now=utc("2013-12-09 12:00"))
    with db.connect() as conn:
        for tf, start in (("5m", "2013-11-26 20:55"), ("1h", "2013-11-26 20:30"), ("4h", "2013-11-26 18:30"),
                          ("1d", "2013-11-26 14:30"), ("1w", "2013-11-25 14:30")):  # fmt: skip
            assert bars(conn, "AAPL", tf).loc[pd.Timestamp(start, tz=UTC), "high"] == 1000, tf
        assert bars(conn, "AAPL", "1d")["high"].max() == 1000  # the 17:00 minute is in no window
    assert_verified(db, "AAPL", ("5m", "1h", "4h", "1d", "1w"))


def test_seed_window_functions_take_session_windows(db: Database, tmp_path: Path) -> None:
    """aggregate_window / aggregate_5m_to_1h_window (the seed's API) and agg_recompute_windows accept a
    session's windows for a symbol on a session, and refuse a UTC bucket that is not one."""
    registry.add(db, "AAPL", session="XNYS")
    ingest_frame(db, tmp_path, "AAPL", minute_frame(regular_minutes({date(2013, 11, 26): time(16)})))
    with db.connect(autocommit=True) as conn:
        (five,) = conn.execute(
            "SELECT aggregate_window('AAPL', '5m', '2013-11-26 20:55Z', '2013-11-26 21:00Z')"
        ).fetchone()
        assert five == {"success": True, "stored": True, "source_count": 5, "quality_score": 2}
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not one 1h window of session XNYS"):
            conn.execute("SELECT aggregate_5m_to_1h_window('AAPL', '2013-11-26 20:00Z', '2013-11-26 21:00Z')")
        (done,) = conn.execute(
            "SELECT agg_recompute_windows('AAPL', '5m', ARRAY['2013-11-26 14:31Z', '2013-11-26 22:00Z']::timestamptz[])"
        ).fetchone()
        assert (done["windows"], done["bars_written"]) == (1, 1)  # 22:00Z (17:00 New York) is in no window
