"""`baragg verify`: an independent recomputation (DESIGN.md 3) and its diff against stored bars."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pandas as pd
import psycopg
import pytest

from baragg.db import Database
from baragg.verify import aggregate, bucket_start, quality
from conftest import REAL_DATA
from ops_helpers import baragg
from rss_helpers import baragg_peak_rss

T0 = datetime(2024, 1, 2, 10, 0, tzinfo=UTC)  # a Tuesday


def minutes(n: int, start: datetime = T0, step: int = 1, skip: set[int] = frozenset()) -> pd.DataFrame:
    rows = []
    for i in range(n):
        if i in skip:
            continue
        price = 100 + i
        rows.append(
            {
                "ts_utc": pd.Timestamp(start + timedelta(minutes=i * step)),
                "open": price,
                "high": price + 2.0,
                "low": price - 1.0,
                "close": price + 1.0,
                "vol": float(i + 1),
                "vwap": price + 0.5,
                "trade_count": float(i + 10),
            }
        )
    return pd.DataFrame(rows)


def test_bar_values_follow_the_design() -> None:
    bars = aggregate(minutes(5), "5m", sparse=False)
    assert len(bars) == 1
    bar = bars.iloc[0]
    assert (bar["open"], bar["high"], bar["low"], bar["close"]) == (100, 106, 99, 105)
    assert bar["vol"] == 15 and bar["trade_count"] == 60
    assert bar["vwap"] == pytest.approx(sum((100 + i + 0.5) * (i + 1) for i in range(5)) / 15)
    assert (bar["source_candles"], bar["expected_candles"], bar["quality_score"]) == (5, 5, 2)


def test_vwap_uses_only_rows_with_both_and_vol_is_null_when_all_null() -> None:
    rows = minutes(5)
    rows.loc[0, "vwap"] = None
    rows.loc[1, "vol"] = None
    bar = aggregate(rows, "5m", sparse=False).iloc[0]
    used = [2, 3, 4]
    assert bar["vwap"] == pytest.approx(
        sum((100 + i + 0.5) * (i + 1) for i in used) / sum(i + 1 for i in used)
    )
    rows["vol"] = None
    bar = aggregate(rows, "5m", sparse=False).iloc[0]
    assert pd.isna(bar["vol"]) and pd.isna(bar["vwap"])


@pytest.mark.parametrize(
    ("n", "expected", "sparse", "score"),
    [
        (5, 5, False, 2),
        (4, 5, False, 1),
        (3, 5, False, 0),
        (2, 5, False, None),
        (1, 5, True, -1),
        (12, 12, False, 2),
        (10, 12, False, 1),
        (8, 12, False, 0),
        (7, 12, False, -1),
        (6, 12, False, None),
        (6, 12, True, -1),
        (7, 5, False, 2),
    ],
)
def test_quality_table(n: int, expected: int, sparse: bool, score: int | None) -> None:
    assert quality(n, expected, sparse) == score


def test_weeks_start_on_monday_and_four_hours_on_midnight() -> None:
    thursday = pd.Series([pd.Timestamp("2024-01-04 13:00", tz="UTC")])
    assert bucket_start(thursday, "1w").iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")  # a Monday
    assert bucket_start(thursday, "4h").iloc[0] == pd.Timestamp("2024-01-04 12:00", tz="UTC")
    assert bucket_start(thursday, "1d").iloc[0] == pd.Timestamp("2024-01-04", tz="UTC")


def test_sparse_windows_are_kept_only_for_sparse_assets() -> None:
    rows = minutes(2, step=5)  # one 1m bar in each of two 5m windows
    assert aggregate(rows, "5m", sparse=False).empty
    assert len(aggregate(rows, "5m", sparse=True)) == 2


# --- the command, against a database -------------------------------------------------------------


def store(conn: psycopg.Connection, bars: pd.DataFrame, timeframe: str) -> None:
    for ts, bar in bars.iterrows():
        conn.execute(
            "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol,"
            " vwap, trade_count, source_timeframe, source_candles, expected_candles, quality_score,"
            " derivation_version) VALUES ('EURUSD', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1)",
            (
                timeframe,
                ts.to_pydatetime(),
                *(
                    None if pd.isna(bar[c]) else bar[c]
                    for c in ("open", "high", "low", "close", "vol", "vwap")
                ),
                int(bar["trade_count"]),
                bar["source_timeframe"],
                int(bar["source_candles"]),
                int(bar["expected_candles"]),
                int(bar["quality_score"]),
            ),
        )


@pytest.fixture
def world(db: Database, conn: psycopg.Connection) -> Database:
    """EURUSD with 30 minutes of 1m bars (minute 7 missing), a 5m task whose cursor is at 10:25."""
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('EURUSD')")
    source = minutes(30, skip={7})
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
            " trade_count, source) VALUES ('EURUSD', '1m', %s, %s, %s, %s, %s, %s, %s, %s, 'test')",
            [
                (r.ts_utc.to_pydatetime(), r.open, r.high, r.low, r.close, r.vol, r.vwap, int(r.trade_count))
                for r in source.itertuples()
            ],
        )
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, agg_start_utc,"
        " last_agg_bar_ts_utc) VALUES ('EURUSD', '5m', '1m', %s, %s)",
        (T0, T0 + timedelta(minutes=25)),
    )
    # the windows before the cursor, as the engine should have stored them
    store(
        conn,
        aggregate(source[source.ts_utc < pd.Timestamp(T0 + timedelta(minutes=25))], "5m", sparse=False),
        "5m",
    )
    return db


def test_equal_bars_exit_0(world: Database) -> None:
    done = baragg(world, "verify", "EURUSD", "5m")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 bars checked: 5 equal, 0 missing, 0 extra, 0 different" in done.stdout


def test_missing_extra_and_different_bars_are_reported(world: Database, conn: psycopg.Connection) -> None:
    conn.execute(
        "UPDATE derived_data_bars SET high = high + 1, vol = 0 WHERE ts_utc = %s",
        (T0 + timedelta(minutes=5),),
    )
    conn.execute("DELETE FROM derived_data_bars WHERE ts_utc = %s", (T0 + timedelta(minutes=10),))
    conn.execute(
        "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close)"
        " VALUES ('EURUSD', '5m', '2024-01-02 09:00+00', 1, 1, 1, 1)"
    )
    done = baragg(world, "verify", "EURUSD", "5m", "--from", "2024-01-02T08:00:00Z", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["missing"] == ["2024-01-02 10:10:00+00:00"]
    assert report["extra"] == ["2024-01-02 09:00:00+00:00"]
    [diff] = report["different"]
    assert diff["ts_utc"] == "2024-01-02 10:05:00+00:00"
    assert set(diff["columns"]) == {"high", "vol"}
    human = baragg(world, "verify", "EURUSD", "5m", "--from", "2024-01-02T08:00:00Z")
    assert human.returncode == 1
    assert (
        "missing    2024-01-02 10:10" in human.stdout
        and "different  2024-01-02 10:05: high stored" in human.stdout
    )


def test_windows_at_or_after_the_cursor_are_not_checked(world: Database, conn: psycopg.Connection) -> None:
    # the 10:25 window has source rows but the worker has not reached it yet: not "missing"
    done = baragg(world, "verify", "EURUSD", "5m", "--json")
    report = json.loads(done.stdout)
    assert report["to"] == "2024-01-02 10:25:00+00:00" and report["missing"] == []


def test_a_changed_source_bar_shows_as_different(world: Database, conn: psycopg.Connection) -> None:
    conn.execute("UPDATE data_bars SET low = 50 WHERE ts_utc = %s", (T0 + timedelta(minutes=12),))
    done = baragg(world, "verify", "EURUSD", "5m", "--json")
    assert done.returncode == 1
    [diff] = json.loads(done.stdout)["different"]
    assert diff["columns"] == {"low": {"stored": 109.0, "expected": 50.0}}


def test_changed_quality_and_count_columns_show_as_different(
    world: Database, conn: psycopg.Connection
) -> None:
    """Not only prices: a stored bar whose quality or counts disagree with its source is wrong too."""
    tampered = {  # window minute: (column, stored value, the value the source gives)
        0: ("quality_score", 0, 2),
        5: ("source_candles", 5, 4),  # minute 7 is missing
        10: ("expected_candles", 6, 5),
        15: ("source_timeframe", "5m", "1m"),
    }
    for minute, (column, value, _) in tampered.items():
        conn.execute(
            f"UPDATE derived_data_bars SET {column} = %s WHERE ts_utc = %s",
            (value, T0 + timedelta(minutes=minute)),
        )
    done = baragg(world, "verify", "EURUSD", "5m", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["equal"], report["missing"], report["extra"]) == (1, [], [])
    got = {d["ts_utc"]: d["columns"] for d in report["different"]}
    assert got == {
        f"{T0 + timedelta(minutes=minute):%Y-%m-%d %H:%M:%S+00:00}": {
            column: {"stored": stored, "expected": expected}
        }
        for minute, (column, stored, expected) in tampered.items()
    }
    human = baragg(world, "verify", "EURUSD", "5m")
    assert human.returncode == 1
    assert "different  2024-01-02 10:00: quality_score stored 0 expected 2" in human.stdout, human.stdout


def test_bad_arguments_exit_2(world: Database) -> None:
    done = baragg(world, "verify", "NOPE", "5m")
    assert done.returncode == 2
    assert done.stderr == "baragg: error: unknown symbol 'NOPE' (not in core_asset_registry_all)\n"
    done = baragg(world, "verify", "EURUSD", "2m")
    assert done.returncode == 2
    assert done.stderr.startswith("baragg: error: baragg verify: argument TIMEFRAME: invalid choice: '2m'")
    done = baragg(world, "verify", "EURUSD", "5m", "--from", "yesterday")
    assert done.returncode == 2 and "--from" in done.stderr


# --- real market data, the real worker, then verify every timeframe ------------------------------


@pytest.mark.skipif(not REAL_DATA.exists(), reason=f"real data not found at {REAL_DATA}")
def test_real_data_through_the_worker_verifies_equal(db: Database, tmp_path) -> None:
    es = pd.read_csv(REAL_DATA / "ES_ESZ13_cme_1m_trade_20131006-20131014_UTC.csv")
    es = es.rename(columns={"timestamp_utc": "ts_utc", "volume": "vol"}).assign(canonical_symbol="ES")
    xau = pd.read_csv(REAL_DATA / "XAUUSD_oanda_1m_bidask_20140501-20140515_UTC.csv")
    xau = xau.rename(
        columns={"timestamp_utc": "ts_utc", **{f"bid_{c}": c for c in ("open", "high", "low", "close")}}
    )
    xau = xau[["ts_utc", "open", "high", "low", "close"]].assign(canonical_symbol="XAUUSD")
    path = tmp_path / "real.csv"
    pd.concat([es, xau]).to_csv(path, index=False)
    flags = ["--calc-15m", "--calc-4h", "--calc-1d", "--calc-1w"]
    assert baragg(db, "registry", "add", "ES", *flags).returncode == 0
    assert baragg(db, "registry", "add", "XAUUSD", "--sparse", *flags).returncode == 0
    loaded = baragg(db, "ingest", path, "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["inserted"] == 8198 + 15222
    # --from also restarts the tasks from a given time
    done = baragg(db, "backfill", "--now", "2014-06-01T00:00:00Z", "--from", "2013-01-01", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bars_created"] > 5_000
    for symbol in ("ES", "XAUUSD"):
        for timeframe in ("5m", "15m", "1h", "4h", "1d", "1w"):
            check = baragg(db, "verify", symbol, timeframe, "--json")
            report = json.loads(check.stdout)
            assert check.returncode == 0, (
                symbol,
                timeframe,
                report["missing"][:3],
                report["extra"][:3],
                report["different"][:3],
            )
            assert report["equal"] > 0 or timeframe == "1w"


def test_metadata_columns_are_compared_too(world: Database, conn: psycopg.Connection) -> None:
    conn.execute(
        "UPDATE derived_data_bars SET quality_score = 1, source_candles = 4 WHERE ts_utc = %s",
        (T0 + timedelta(minutes=10),),
    )
    conn.execute(
        "UPDATE derived_data_bars SET expected_candles = 6, source_timeframe = '5m' WHERE ts_utc = %s",
        (T0 + timedelta(minutes=15),),
    )
    done = baragg(world, "verify", "EURUSD", "5m", "--json")
    assert done.returncode == 1
    different = {d["ts_utc"][11:16]: d["columns"] for d in json.loads(done.stdout)["different"]}
    assert different == {
        "10:10": {
            "source_candles": {"stored": 4, "expected": 5},
            "quality_score": {"stored": 1, "expected": 2},
        },
        "10:15": {
            "expected_candles": {"stored": 6, "expected": 5},
            "source_timeframe": {"stored": "5m", "expected": "1m"},
        },
    }


def test_small_chunks_give_the_same_report(world: Database, conn: psycopg.Connection) -> None:
    """Chunks are aligned to windows: one window per chunk finds exactly what one chunk finds."""
    conn.execute(
        "UPDATE derived_data_bars SET high = high + 1 WHERE ts_utc = %s", (T0 + timedelta(minutes=5),)
    )
    conn.execute("DELETE FROM derived_data_bars WHERE ts_utc = %s", (T0 + timedelta(minutes=10),))
    conn.execute(
        "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close)"
        " VALUES ('EURUSD', '5m', '2024-01-02 09:00+00', 1, 1, 1, 1), ('EURUSD', '5m', '2024-01-02 10:03+00', 1, 1, 1, 1)"
    )
    args = ("verify", "EURUSD", "5m", "--from", "2024-01-02T08:00:00Z", "--json")
    whole = baragg(world, *args)
    tiny = baragg(world, *args, env={"BARAGG_VERIFY_CHUNK_ROWS": "1"})
    assert whole.returncode == tiny.returncode == 1
    assert json.loads(tiny.stdout) == json.loads(whole.stdout)
    assert json.loads(whole.stdout)["extra"] == ["2024-01-02 09:00:00+00:00", "2024-01-02 10:03:00+00:00"]


def test_a_long_range_is_streamed_in_bounded_memory(db: Database, conn: psycopg.Connection) -> None:
    """300,000 1m rows and their 60,000 5m bars: the recomputation reads them chunk by chunk (before,
    all of them at once into pandas: ~860 MB for 200,000 5m bars)."""
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('EURUSD')")
    conn.execute(
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
        " trade_count, source)"
        " SELECT 'EURUSD', '1m', %s::timestamptz + i * interval '1 minute', p, p + 0.002, p - 0.001, p + 0.001,"
        "        1 + i %% 5, p + 0.0005, 1 + i %% 3, 'test'"
        " FROM generate_series(0, 299999) i, LATERAL (SELECT 1 + (i %% 97) * 0.001 AS p) price",
        (T0,),
    )
    conn.execute(
        "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
        " trade_count, source_timeframe, source_candles, expected_candles, quality_score)"
        " SELECT 'EURUSD', '5m', date_bin('5 minutes', ts_utc, 'epoch'), (array_agg(open ORDER BY ts_utc))[1],"
        "        max(high), min(low), (array_agg(close ORDER BY ts_utc DESC))[1], sum(vol),"
        "        sum(vwap * vol) / sum(vol), sum(trade_count), '1m', count(*), 5, 2"
        " FROM data_bars GROUP BY 3"
    )
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, agg_start_utc,"
        " last_agg_bar_ts_utc) VALUES ('EURUSD', '5m', '1m', %s, %s)",
        (T0, T0 + timedelta(minutes=300_000)),
    )
    done, peak = baragg_peak_rss(db, "verify", "EURUSD", "5m")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "60000 bars checked: 60000 equal, 0 missing, 0 extra, 0 different" in done.stdout
    assert peak < 200, f"peak RSS {peak:.0f} MiB"
