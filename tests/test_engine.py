"""The aggregation engine's rules, one at a time, on small hand-made data (DESIGN.md 3 and 4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from baragg.timeframes import LADDER, bucket_start, quality_score

FRI = datetime(2025, 7, 11, tzinfo=UTC)  # a Friday
SUN = datetime(2025, 7, 13, tzinfo=UTC)
MON = datetime(2025, 7, 14, tzinfo=UTC)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def add_asset(conn: psycopg.Connection, symbol: str = "EURUSD", sparse: bool = False) -> None:
    conn.execute(
        "INSERT INTO core_asset_registry_all (canonical_symbol, is_sparse) VALUES (%s, %s)", (symbol, sparse)
    )


def add_minutes(
    conn: psycopg.Connection, start: datetime, count: int, symbol: str = "EURUSD", **values
) -> None:
    """``count`` consecutive 1m bars from ``start``; the i-th has open i, close i + 0.5."""
    for i in range(count):
        conn.execute(
            "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
            " trade_count, source) VALUES (%s, '1m', %s, %s, %s, %s, %s, %s, %s, %s, 'test')",
            (symbol, start + timedelta(minutes=i), i, i + 1, i - 1, i + 0.5, values.get("vol", 1.0),
             values.get("vwap", float(i)), values.get("trade_count", 2)),
        )  # fmt: skip


def add_task(
    conn: psycopg.Connection, tf: str, cursor: datetime | None = None, symbol: str = "EURUSD", **cols
) -> None:
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, last_agg_bar_ts_utc,"
        " aggregation_delay_seconds, agg_start_utc) VALUES (%s, %s, %s, %s, %s, %s)",
        (
            symbol,
            tf,
            LADDER[tf].source,
            cursor,
            cols.get("delay", 0),
            cols.get("agg_start", utc("2025-07-01 00:00")),
        ),
    )


def catch_up(conn: psycopg.Connection, tf: str, cursor: datetime, now: datetime, max_windows: int | None = 1000,
             symbol: str = "EURUSD") -> dict:  # fmt: skip
    (result,) = conn.execute(
        "SELECT catchup_aggregation_range(p_symbol => %s, p_to_tf => %s, p_start_cursor_utc => %s,"
        " p_max_windows => %s, p_now_utc => %s)",
        (symbol, tf, cursor, max_windows, now),
    ).fetchone()
    result["cursor_advanced_to"] = datetime.fromisoformat(result["cursor_advanced_to"])
    return result


def bars(conn: psycopg.Connection, tf: str) -> list[tuple]:
    return conn.execute(
        "SELECT ts_utc, open, close, source_candles, quality_score FROM derived_data_bars"
        " WHERE timeframe = %s AND deleted_at IS NULL ORDER BY ts_utc",
        (tf,),
    ).fetchall()


# ---------------------------------------------------------------------------------------------
# The ladder and the quality rule
# ---------------------------------------------------------------------------------------------
def test_timeframes_module_equals_the_ladder_table(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        "SELECT timeframe, bucket_interval, source_timeframe, source_table, expected_source_bars,"
        " max_source_bars, bucket_origin, duration_rank, window_kind FROM agg_timeframes"
    ).fetchall()
    in_db = {r[0]: r[1:] for r in rows}
    in_python = {
        tf.name: (tf.interval, tf.source, tf.source_table, tf.expected_source_bars, tf.max_source_bars, tf.origin,
                  tf.duration_rank, tf.window_kind)
        for tf in LADDER.values()
    }  # fmt: skip
    assert in_db == in_python


def test_weekly_buckets_start_on_monday_and_python_agrees_with_date_bin(conn: psycopg.Connection) -> None:
    for ts in (
        utc("2025-07-10 13:37"),
        utc("2025-07-14 00:00"),
        utc("2025-07-13 23:59"),
        utc("2024-02-29 12:00"),
    ):
        for tf in (t for t in LADDER.values() if t.window_kind != "month"):
            (in_db,) = conn.execute(
                "SELECT date_bin(%s, %s::timestamptz, %s)", (tf.interval, ts, tf.origin)
            ).fetchone()
            assert bucket_start(tf, ts) == in_db
    assert bucket_start(LADDER["1w"], utc("2025-07-10 13:37")) == utc("2025-07-07 00:00")
    assert bucket_start(LADDER["1w"], utc("2025-07-10 13:37")).weekday() == 0


# The seed's tables (spec C.3, C.4): source bars -> quality (None: not stored).
SEED_5M = {5: 2, 4: 1, 3: 0, 2: None, 1: None}
SEED_1H = {12: 2, 11: 1, 10: 1, 9: 0, 8: 0, 7: -1, 6: None, 5: None, 1: None}


@pytest.mark.parametrize(("tf", "table"), [("5m", SEED_5M), ("1h", SEED_1H)])
def test_quality_reproduces_the_seed_tables(conn: psycopg.Connection, tf: str, table: dict) -> None:
    expected = LADDER[tf].expected_source_bars
    for n, quality in table.items():
        assert quality_score(n, expected) == quality
        (in_db,) = conn.execute("SELECT agg_quality_score(%s, %s)", (n, expected)).fetchone()
        assert in_db == quality, (tf, n)


@pytest.mark.parametrize(
    ("count", "stored", "quality"), [(5, True, 2), (4, True, 1), (3, True, 0), (2, False, None)]
)
def test_seed_5m_window_function_stores_by_quality(conn, count, stored, quality) -> None:
    add_asset(conn)
    add_minutes(conn, FRI, count)
    (result,) = conn.execute(
        "SELECT aggregate_1m_to_5m_window(p_symbol => 'EURUSD', p_from_utc => %s, p_to_utc => %s,"
        " p_derivation_version => 3)",
        (FRI, FRI + timedelta(minutes=5)),
    ).fetchone()
    assert result["success"] is True and result["stored"] is stored
    assert result["source_count"] == count and result["quality_score"] == quality
    if not stored:
        assert result["reason"] == "insufficient_source_bars"
    got = conn.execute("SELECT quality_score, derivation_version, source FROM derived_data_bars").fetchall()
    assert got == ([(quality, 3, "agg")] if stored else [])


def test_seed_1h_window_function_counts_12_expected(conn: psycopg.Connection) -> None:
    add_asset(conn)
    for i in range(7):
        conn.execute(
            "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close)"
            " VALUES ('EURUSD', '5m', %s, 1, 2, 0.5, 1.5)",
            (FRI + timedelta(minutes=5 * i),),
        )
    (result,) = conn.execute(
        "SELECT aggregate_5m_to_1h_window(p_symbol => 'EURUSD', p_from_utc => %s, p_to_utc => %s)",
        (FRI, FRI + timedelta(hours=1)),
    ).fetchone()
    assert result == {"success": True, "stored": True, "source_count": 7, "quality_score": -1}
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not one 1h bucket"):
        conn.execute("SELECT aggregate_window('EURUSD', '1h', %s, %s)", (FRI, FRI + timedelta(minutes=30)))


def test_sparse_assets_keep_windows_with_one_bar(conn: psycopg.Connection) -> None:
    add_asset(conn, sparse=True)
    add_minutes(conn, FRI, 1)
    add_minutes(conn, FRI + timedelta(minutes=10), 2)
    result = catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    assert [(b[0], b[3], b[4]) for b in bars(conn, "5m")] == [
        (FRI, 1, -1),
        (FRI + timedelta(minutes=10), 2, -1),
    ]
    assert result["bars_quality_poor"] == 2 and result["gaps_skipped"] == 1


# ---------------------------------------------------------------------------------------------
# Bar values
# ---------------------------------------------------------------------------------------------
def test_bar_values_first_last_extremes_and_weighted_vwap(conn: psycopg.Connection) -> None:
    add_asset(conn)
    rows = [  # ts offset, open, high, low, close, vol, vwap, trade_count (inserted out of order)
        (3, 13.0, 19.0, 12.0, 13.5, 3.0, 10.0, 1),
        (0, 10.0, 11.0, 9.0, 10.5, 1.0, 20.0, None),
        (4, 14.0, 15.0, 8.0, 14.5, None, 99.0, 4),
        (1, 11.0, 12.0, 10.0, 11.5, 0.0, None, 2),
    ]
    for m, o, h, lo, c, v, vw, tc in rows:
        conn.execute(
            "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
            " trade_count, source) VALUES ('EURUSD', '1m', %s, %s, %s, %s, %s, %s, %s, %s, 'test')",
            (FRI + timedelta(minutes=m), o, h, lo, c, v, vw, tc),
        )
    catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    got = conn.execute(
        "SELECT open, high, low, close, vol, vwap, trade_count, source_candles, expected_candles, quality_score,"
        " source_timeframe, source, is_partial FROM derived_data_bars"
    ).fetchone()
    # vwap over rows with both vwap and vol: (20*1 + 10*3) / (1 + 3)
    assert got == (10.0, 19.0, 8.0, 14.5, 4.0, 12.5, 7, 4, 5, 1, "1m", "agg", False)


def test_vwap_is_null_without_weight_and_vol_null_when_all_null(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_minutes(conn, FRI, 5, vol=0.0, vwap=1.5, trade_count=None)
    add_minutes(conn, FRI + timedelta(minutes=5), 5, vol=None, vwap=None, trade_count=None)
    catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    got = conn.execute("SELECT vol, vwap, trade_count FROM derived_data_bars ORDER BY ts_utc").fetchall()
    assert got == [(0.0, None, None), (None, None, None)]


def test_partial_and_soft_deleted_source_rows_are_not_used(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_minutes(conn, FRI, 5)
    conn.execute("UPDATE data_bars SET is_partial = true WHERE ts_utc = %s", (FRI + timedelta(minutes=4),))
    catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    assert bars(conn, "5m") == [(FRI, 0.0, 3.5, 4, 1)]
    conn.execute("UPDATE derived_data_bars SET deleted_at = now()")
    add_task(conn, "5m", FRI + timedelta(minutes=5))
    result = catch_up(conn, "1h", FRI, FRI + timedelta(hours=2))
    assert result["windows_processed"] == 0 and bars(conn, "1h") == []


# ---------------------------------------------------------------------------------------------
# Cursor rules
# ---------------------------------------------------------------------------------------------
def test_weekend_gap_is_passed_over_and_the_frontier_stops(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_minutes(conn, FRI + timedelta(hours=20, minutes=55), 5)  # Fri 20:55-20:59
    add_minutes(conn, SUN + timedelta(hours=22), 10)  # Sun 22:00-22:09
    result = catch_up(conn, "5m", FRI + timedelta(hours=20, minutes=55), MON + timedelta(hours=9))
    assert [b[0] for b in bars(conn, "5m")] == [
        FRI + timedelta(hours=20, minutes=55),
        SUN + timedelta(hours=22),
        SUN + timedelta(hours=22, minutes=5),
    ]
    weekend_windows = (SUN + timedelta(hours=22) - (FRI + timedelta(hours=21))) // timedelta(minutes=5)
    assert result["gaps_skipped"] == weekend_windows
    # The frontier: the first empty window after the last data, although Monday 09:00 is much later.
    assert result["cursor_advanced_to"] == SUN + timedelta(hours=22, minutes=10)
    assert result["continue"] is False and result["windows_processed"] == 3
    again = catch_up(conn, "5m", result["cursor_advanced_to"], MON + timedelta(hours=10))
    assert again["windows_processed"] == 0 and again["cursor_advanced_to"] == result["cursor_advanced_to"]


def test_a_window_is_final_only_after_its_end_plus_the_delay(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_task(conn, "5m", delay=30)
    add_minutes(conn, FRI, 12)
    end = FRI + timedelta(minutes=5)
    assert catch_up(conn, "5m", FRI, end + timedelta(seconds=29))["cursor_advanced_to"] == FRI
    assert catch_up(conn, "5m", FRI, end + timedelta(seconds=30))["cursor_advanced_to"] == end
    result = catch_up(conn, "5m", end, FRI + timedelta(hours=1))
    assert result["cursor_advanced_to"] == FRI + timedelta(minutes=15)  # 10:10 window has 2 bars: skipped
    assert result["bars_skipped"] == 1 and result["bars_created"] == 1


def test_ignore_confirmation_processes_windows_not_yet_final(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_minutes(conn, FRI, 10)
    (result,) = conn.execute(
        "SELECT catchup_aggregation_range(p_symbol => 'EURUSD', p_to_tf => '5m', p_start_cursor_utc => %s,"
        " p_now_utc => %s, p_ignore_confirmation => true)",
        (FRI, FRI),
    ).fetchone()
    assert result["windows_processed"] == 2


def test_max_windows_bounds_non_empty_windows_and_sets_continue(conn: psycopg.Connection) -> None:
    add_asset(conn)
    for day in range(3):
        add_minutes(conn, FRI - timedelta(days=3 - day), 5)
    cursor, calls = FRI - timedelta(days=3), []
    for _ in range(10):  # 4 calls expected; a `continue` that never turns false fails below
        result = catch_up(conn, "5m", cursor, FRI + timedelta(days=1), max_windows=1)
        calls.append((result["windows_processed"], result["gaps_skipped"], result["continue"]))
        cursor = result["cursor_advanced_to"]
        if not result["continue"]:
            break
    per_day = 24 * 12
    assert calls == [(1, 0, True), (1, per_day - 1, True), (1, per_day - 1, True), (0, 0, False)]
    assert cursor == FRI - timedelta(days=1) + timedelta(minutes=5)


def test_agg_start_is_a_floor_and_an_unaligned_start_skips_its_window(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_task(conn, "5m", agg_start=FRI + timedelta(minutes=7))
    add_minutes(conn, FRI, 20)
    (boot,) = conn.execute(
        "SELECT agg_bootstrap_cursor('EURUSD', '5m', %s)", (FRI + timedelta(hours=1),)
    ).fetchone()
    assert boot == FRI + timedelta(minutes=5)  # the window containing agg_start
    result = catch_up(conn, "5m", FRI - timedelta(days=30), FRI + timedelta(hours=1))
    assert [b[0] for b in bars(conn, "5m")] == [FRI + timedelta(minutes=10), FRI + timedelta(minutes=15)]
    assert datetime.fromisoformat(result["agg_start_enforced"]) == FRI + timedelta(minutes=7)
    assert result["gaps_skipped"] == 0 and result["windows_processed"] == 2


def test_bootstrap_without_data_is_the_window_containing_now(conn: psycopg.Connection) -> None:
    """DESIGN.md 4: that window is not final yet, so its rows are future work, never "late data"."""
    add_asset(conn)
    (boot,) = conn.execute(
        "SELECT agg_bootstrap_cursor(p_symbol => 'EURUSD', p_to_tf => '1h', p_now_utc => %s)",
        (FRI + timedelta(minutes=61),),
    ).fetchone()
    assert boot == FRI + timedelta(hours=1)
    (week,) = conn.execute(
        "SELECT agg_bootstrap_cursor('EURUSD', '1w', %s)", (FRI + timedelta(minutes=61),)
    ).fetchone()
    assert week == FRI - timedelta(days=4)  # the Monday of the week containing now


def test_bootstrap_looks_down_the_whole_chain(conn: psycopg.Connection) -> None:
    """A level whose source is not built yet starts where the data below it starts, not at now: a
    1h (or 1d) task run before its 5m task (a backfill's first round) must not put the history behind
    its cursor, where it came back as "late data" and its last windows were built before they closed."""
    add_asset(conn)
    add_minutes(conn, FRI + timedelta(minutes=7), 30)  # only 1m rows: no 5m, 1h bar exists yet
    later = FRI + timedelta(days=3)
    for timeframe, expected in (("1h", FRI), ("1d", FRI), ("15m", FRI)):
        (boot,) = conn.execute("SELECT agg_bootstrap_cursor('EURUSD', %s, %s)", (timeframe, later)).fetchone()
        assert boot == expected, timeframe


def test_an_hour_task_run_before_its_5m_task_builds_nothing_early(conn: psycopg.Connection) -> None:
    """The order a backfill's first round may take: 1h (no cursor yet) before 5m. The hour task must
    wait at the data's start, then build its hours from the 5m bars as an ordinary catch-up."""
    add_asset(conn)
    add_task(conn, "5m")
    add_task(conn, "1h", source_timeframe="5m")
    add_minutes(conn, FRI, 180)  # 00:00-02:59
    now = FRI + timedelta(hours=3)
    (first,) = conn.execute(
        "SELECT result FROM agg_catchup_tasks('1h', ARRAY['EURUSD'], ARRAY[NULL]::timestamptz[], 100, %s)",
        (now,),
    ).fetchone()
    assert first["bars_created"] == 0 and datetime.fromisoformat(first["cursor_advanced_to"]) == FRI
    (five,) = conn.execute(
        "SELECT result FROM agg_catchup_tasks('5m', ARRAY['EURUSD'], ARRAY[NULL]::timestamptz[], 100, %s)",
        (now,),
    ).fetchone()
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE timeframe = '5m'",
        (datetime.fromisoformat(five["cursor_advanced_to"]),),
    )
    (hour,) = conn.execute(
        "SELECT result FROM agg_catchup_tasks('1h', ARRAY['EURUSD'], ARRAY[%s]::timestamptz[], 100, %s)",
        (FRI, now),
    ).fetchone()
    assert hour["bars_created"] == 3
    assert datetime.fromisoformat(hour["cursor_advanced_to"]) == FRI + timedelta(hours=3)


def test_hour_waits_for_the_5m_task_but_fridays_last_hour_is_not_held_until_monday(conn) -> None:
    add_asset(conn)
    add_minutes(conn, FRI + timedelta(hours=20), 60)  # Friday 20:00-20:59, then the weekend
    add_minutes(conn, SUN + timedelta(hours=22), 60)
    add_task(conn, "5m", FRI + timedelta(hours=20))
    add_task(conn, "1h", FRI + timedelta(hours=20))
    saturday = FRI + timedelta(days=1)
    # The 5m task has done nothing yet: the 20:00 hour waits.
    early = catch_up(conn, "1h", FRI + timedelta(hours=20), saturday)
    assert early["cursor_advanced_to"] == FRI + timedelta(hours=20) and early["windows_processed"] == 0
    # Half the hour's 5m bars built: still waits.
    half = catch_up(conn, "5m", FRI + timedelta(hours=20), saturday, max_windows=6)
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE timeframe = '5m'",
        (half["cursor_advanced_to"],),
    )
    assert catch_up(conn, "1h", FRI + timedelta(hours=20), saturday)["windows_processed"] == 0
    # The 5m task finishes Friday and passes the weekend gap up to the clock (Saturday 00:00): the
    # hour is built on Saturday, not held back until the market reopens on Sunday.
    rest = catch_up(conn, "5m", half["cursor_advanced_to"], saturday)
    assert rest["cursor_advanced_to"] == saturday
    conn.execute(
        "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE timeframe = '5m'",
        (rest["cursor_advanced_to"],),
    )
    hour = catch_up(conn, "1h", FRI + timedelta(hours=20), saturday)
    assert bars(conn, "1h") == [(FRI + timedelta(hours=20), 0.0, 59.5, 12, 2)]
    assert hour["cursor_advanced_to"] == FRI + timedelta(hours=21)


def test_weekly_bar_starts_on_monday(conn: psycopg.Connection) -> None:
    add_asset(conn)
    for day in range(5):  # Monday to Friday daily bars
        conn.execute(
            "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol)"
            " VALUES ('EURUSD', '1d', %s, %s, %s, %s, %s, 10)",
            (MON - timedelta(days=7) + timedelta(days=day), day, day + 1, day - 1, day + 0.5),
        )
    add_task(conn, "1w", MON - timedelta(days=14))  # agg_start 2025-07-01, a Tuesday
    result = catch_up(conn, "1w", MON - timedelta(days=14), MON + timedelta(hours=1))
    assert bars(conn, "1w") == [(MON - timedelta(days=7), 0.0, 4.5, 5, 2)]
    # The week of June 30 starts before agg_start (July 1): never built, not counted as a gap.
    assert result["cursor_advanced_to"] == MON and result["gaps_skipped"] == 0


# ---------------------------------------------------------------------------------------------
# Writing and the seed's contract
# ---------------------------------------------------------------------------------------------
def test_recomputing_updates_the_active_row_and_keeps_created_at(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_minutes(conn, FRI, 5)
    catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    conn.execute("UPDATE derived_data_bars SET created_at = '2020-01-01', updated_at = '2020-01-01'")
    conn.execute("UPDATE data_bars SET close = 99 WHERE ts_utc = %s", (FRI + timedelta(minutes=4),))
    result = catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    assert (result["bars_created"], result["bars_rewritten"], result["bars_unchanged"]) == (0, 1, 0)
    rows = conn.execute(
        "SELECT close, created_at, updated_at > '2020-01-02' FROM derived_data_bars"
    ).fetchall()
    assert rows == [(99.0, utc("2020-01-01 00:00"), True)]


def test_an_equal_recomputation_writes_nothing_and_counts_unchanged(conn: psycopg.Connection) -> None:
    """Issue 11: a recompute equal to the stored bar is not a "created" bar and bumps nothing."""
    add_asset(conn)
    add_minutes(conn, FRI, 10)
    first = catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    assert (first["bars_created"], first["bars_rewritten"], first["bars_unchanged"]) == (2, 0, 0)
    conn.execute("UPDATE derived_data_bars SET updated_at = '2020-01-01', ingested_at = '2020-01-01'")
    (xmin_before,) = conn.execute(
        "SELECT array_agg(xmin::text ORDER BY ts_utc) FROM derived_data_bars"
    ).fetchone()
    again = catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    assert (again["bars_created"], again["bars_rewritten"], again["bars_unchanged"]) == (0, 0, 2)
    assert again["windows_processed"] == 2 and again["bars_withdrawn"] == 0
    rows = conn.execute(
        "SELECT updated_at, ingested_at, xmin::text FROM derived_data_bars ORDER BY ts_utc"
    ).fetchall()
    assert [r[:2] for r in rows] == [(utc("2020-01-01 00:00"), utc("2020-01-01 00:00"))] * 2
    assert [r[2] for r in rows] == xmin_before  # no new row version


def test_a_catch_up_over_stored_bars_withdraws_the_windows_that_lost_their_source(conn) -> None:
    """A cursor moved back (backfill --from) over bars whose source rows are gone: soft-deleted."""
    add_asset(conn)
    add_minutes(conn, FRI, 15)
    catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    conn.execute(
        "DELETE FROM data_bars WHERE ts_utc >= %s AND ts_utc < %s",
        (FRI + timedelta(minutes=5), FRI + timedelta(minutes=8)),
    )  # 10:05 keeps 2 of 5 minutes: below the threshold
    again = catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    assert (again["bars_withdrawn"], again["bars_skipped"], again["bars_unchanged"]) == (1, 1, 2)
    rows = conn.execute(
        "SELECT ts_utc, deleted_at IS NOT NULL FROM derived_data_bars ORDER BY ts_utc"
    ).fetchall()
    assert rows == [(FRI, False), (FRI + timedelta(minutes=5), True), (FRI + timedelta(minutes=10), False)]


def test_upsert_derived_bar_has_the_seed_signature_and_result(conn: psycopg.Connection) -> None:
    add_asset(conn)
    call = (
        "SELECT _upsert_derived_bar(p_symbol => 'EURUSD', p_tf => '5m', p_ts => %s, p_open => 1, p_high => 2,"
        " p_low => 0.5, p_close => 1.5, p_vol => 10, p_vwap => 1.2, p_trade_count => 3, p_source => 'agg',"
        " p_source_tf => '1m', p_source_candles => 5, p_expected_candles => 5, p_quality_score => 2,"
        " p_derivation_version => 1, p_raw => NULL)"
    )
    assert conn.execute(call, (FRI,)).fetchone()[0] == {"success": True, "inserted": True, "changed": True}
    # the same values again: nothing written
    assert conn.execute(call, (FRI,)).fetchone()[0] == {"success": True, "inserted": False, "changed": False}
    assert conn.execute(call.replace("p_high => 2", "p_high => 3"), (FRI,)).fetchone()[0] == {
        "success": True, "inserted": False, "changed": True,
    }  # fmt: skip
    assert conn.execute("SELECT count(*), min(raw::text), max(high) FROM derived_data_bars").fetchone() == (
        1, "{}", 3.0,
    )  # fmt: skip


def test_catchup_result_has_the_seed_keys_and_refuses_a_null_cursor(conn: psycopg.Connection) -> None:
    add_asset(conn)
    (result,) = conn.execute(
        "SELECT catchup_aggregation_range(p_symbol => 'EURUSD', p_to_tf => '5m', p_start_cursor_utc => %s)",
        (FRI,),
    ).fetchone()
    assert set(result) == {
        "success", "windows_processed", "cursor_advanced_to", "bars_created", "bars_quality_poor",
        "bars_skipped", "gaps_skipped", "continue", "agg_start_enforced",  # the seed's keys
        "bars_rewritten", "bars_unchanged", "bars_withdrawn", "reaggregated",  # issue 11
    }  # fmt: skip
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="agg_bootstrap_cursor"):
        conn.execute("SELECT catchup_aggregation_range('EURUSD', '5m', NULL)")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown timeframe 2h"):
        conn.execute("SELECT catchup_aggregation_range('EURUSD', '2h', %s)", (FRI,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_max_windows"):
        conn.execute("SELECT catchup_aggregation_range('EURUSD', '5m', %s, 0)", (FRI,))


def test_catchup_tasks_handles_many_symbols_in_one_call(conn: psycopg.Connection) -> None:
    symbols = [f"SYM{i}" for i in range(20)]
    for i, symbol in enumerate(symbols):
        add_asset(conn, symbol)
        add_minutes(conn, FRI, 5 + i % 3, symbol=symbol)
    rows = conn.execute(
        "SELECT canonical_symbol, result FROM agg_catchup_tasks(p_to_tf => '5m', p_symbols => %s,"
        " p_cursors => %s::timestamptz[], p_max_windows => 10, p_now_utc => %s)",
        (symbols, [FRI] * 10 + [None] * 10, FRI + timedelta(hours=1)),
    ).fetchall()
    assert [r[0] for r in rows] == symbols
    assert all(r[1]["windows_processed"] == (1 if i % 3 == 0 else 2) for i, r in enumerate(rows))
    # Each symbol has one full window; the second window (1 or 2 bars) is handled but not stored.
    assert conn.execute("SELECT count(*) FROM derived_data_bars").fetchone() == (20,)


def test_recompute_windows_upserts_and_soft_deletes(conn: psycopg.Connection) -> None:
    add_asset(conn)
    add_minutes(conn, FRI, 10)
    catch_up(conn, "5m", FRI, FRI + timedelta(hours=1))
    # A correction in the first window, and the second loses three of its five minutes.
    conn.execute("UPDATE data_bars SET high = 50 WHERE ts_utc = %s", (FRI + timedelta(minutes=2),))
    conn.execute("DELETE FROM data_bars WHERE ts_utc >= %s", (FRI + timedelta(minutes=7),))
    (result,) = conn.execute(
        "SELECT agg_recompute_windows('EURUSD', '5m', %s::timestamptz[])",
        ([FRI, FRI + timedelta(minutes=5), FRI + timedelta(minutes=20)],),
    ).fetchone()
    assert result == {
        "success": True,
        "windows": 3,
        "bars_written": 1,
        "bars_created": 0,
        "bars_rewritten": 1,
        "bars_unchanged": 0,
        "bars_deleted": 1,
        "bars_quality_poor": 0,
    }
    rows = conn.execute(
        "SELECT ts_utc, high, deleted_at IS NOT NULL FROM derived_data_bars ORDER BY ts_utc, deleted_at"
    ).fetchall()
    assert rows == [(FRI, 50.0, False), (FRI + timedelta(minutes=5), 10.0, True)]


def test_catchup_tasks_refuses_repeated_symbols(conn: psycopg.Connection) -> None:
    add_asset(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="distinct"):
        conn.execute(
            "SELECT * FROM agg_catchup_tasks('5m', ARRAY['EURUSD', 'EURUSD'], ARRAY[%s, %s]::timestamptz[])",
            (FRI, FRI),
        )


@pytest.mark.parametrize(
    "function",
    [
        "agg_catchup_tasks",
        "agg_catchup_session_tasks",
        "agg_reaggregate_tasks",
        "agg_reaggregate_session_tasks",
    ],
)
def test_set_based_calls_are_planned_for_their_arguments_in_every_call(
    conn: psycopg.Connection, function: str
) -> None:
    """A worker makes thousands of these calls in one database session. After five, PL/pgSQL may keep
    a generic plan, and the one it kept read the tasks in another order than their symbols': a
    1M-window call at 1,000 symbols x 30 days took 40-43 s instead of 22-25 s (bench/README.md)."""
    config = conn.execute(
        "SELECT p.proconfig FROM pg_proc p WHERE p.oid = to_regproc(%s)", (f"public.{function}",)
    ).fetchone()
    assert config is not None, f"{function} is missing"
    assert "plan_cache_mode=force_custom_plan" in (config[0] or []), config[0]
