"""Late and corrected data (DESIGN.md 5): derived bars stay equal to their sources, at every level.

A change to a source row behind a task's cursor is logged by a trigger; the worker re-aggregates
the logged windows before catching up, and the rewrite climbs the ladder (1m -> 5m -> 15m/1h ->
4h/1d -> 1w) within one run. The oracle everywhere is a from-scratch aggregation of the final source
rows: cursors reset, derived rows removed, one run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baragg.db import Database
from baragg.sql import query
from baragg.worker import run_once
from ops_helpers import baragg

SYMBOL = "AAA"
MONDAY = datetime(2025, 7, 7, tzinfo=UTC)
NOW = datetime(2025, 7, 28, tzinfo=UTC)  # every window of the data below is final
ALL_TFS = ("5m", "15m", "1h", "4h", "1d", "1w")
VALUE_COLUMNS = (
    "open, high, low, close, vol, vwap, trade_count, source_candles, expected_candles, quality_score, "
    "source_timeframe"
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def add_asset(conn: psycopg.Connection, symbol: str = SYMBOL) -> None:
    """An asset with every timeframe (5m, 15m, 1h, 4h, 1d, 1w)."""
    conn.execute(
        "INSERT INTO core_asset_registry_all (canonical_symbol, calc_15m, calc_4h, calc_1d, calc_1w)"
        " VALUES (%s, true, true, true, true)",
        (symbol,),
    )


def minute_bar(ts: datetime, bump: float = 0.0) -> tuple:
    """A valid 1m bar whose values depend on its minute (so every window has distinct values)."""
    i = int((ts - MONDAY).total_seconds() // 60)
    base = 100.0 + (i % 97) * 0.25 + bump
    open_, close = base, base + ((i % 7) - 3) * 0.1
    return (
        ts,
        open_,
        max(open_, close) + 0.5 + (i % 5) * 0.1,
        min(open_, close) - 0.5,
        close,
        float(10 + i % 13),
        (open_ + close) / 2,
        1 + i % 9,
    )


def minutes(start: datetime, count: int) -> list[datetime]:
    return [start + timedelta(minutes=k) for k in range(count)]


def insert_bars(conn: psycopg.Connection, stamps: list[datetime], symbol: str = SYMBOL, bump: float = 0.0):
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
            " trade_count, source) FROM STDIN"
        ) as copy,
    ):
        for ts in stamps:
            copy.write_row((symbol, "1m", *minute_bar(ts, bump), "test"))


def run(db: Database, now: datetime = NOW):
    return run_once(db, now=now)


def active_bars(conn: psycopg.Connection, timeframe: str | None = None) -> dict[tuple, tuple]:
    rows = conn.execute(
        f"SELECT canonical_symbol, timeframe, ts_utc, {VALUE_COLUMNS} FROM derived_data_bars"
        " WHERE deleted_at IS NULL AND (%(tf)s::text IS NULL OR timeframe = %(tf)s)"
        " ORDER BY 1, 2, 3",
        {"tf": timeframe},
    ).fetchall()
    return {r[:3]: r[3:] for r in rows}


def bar(conn: psycopg.Connection, timeframe: str, ts: datetime) -> tuple | None:
    return active_bars(conn, timeframe).get((SYMBOL, timeframe, ts))


def pending(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT canonical_symbol, timeframe, window_start, reason FROM agg_invalidations ORDER BY 1, 2, 3"
    ).fetchall()


def from_scratch(db: Database, conn: psycopg.Connection, now: datetime = NOW) -> dict[tuple, tuple]:
    """The derived bars a clean aggregation of the current source rows produces."""
    conn.execute("UPDATE data_agg_state SET last_agg_bar_ts_utc = NULL, next_run_at = NULL")
    conn.execute("DELETE FROM derived_data_bars")
    assert pending(conn) == []
    run(db, now)
    return active_bars(conn)


def same_bars(left: dict[tuple, tuple], right: dict[tuple, tuple]) -> bool:
    """Equal keys and values; floats to 1e-9 relative (sums may run in another order)."""
    if left.keys() != right.keys():
        return False
    for key, a in left.items():
        for x, y in zip(a, right[key], strict=True):
            if isinstance(x, float) and isinstance(y, float):
                if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif x != y:
                return False
    return True


def assert_matches_scratch(db: Database, conn: psycopg.Connection) -> None:
    incremental = active_bars(conn)
    assert pending(conn) == [], "a run must leave no pending invalidations"
    scratch = from_scratch(db, conn)
    missing = sorted(set(scratch) - set(incremental))[:5]
    extra = sorted(set(incremental) - set(scratch))[:5]
    assert same_bars(incremental, scratch), f"missing {missing}, extra {extra}"


@pytest.fixture
def week(db: Database, conn: psycopg.Connection) -> psycopg.Connection:
    """Monday to Thursday of 1m bars, aggregated at every level."""
    add_asset(conn)
    insert_bars(conn, minutes(MONDAY, 4 * 1440))
    run(db)
    assert bar(conn, "1w", MONDAY) is not None
    assert pending(conn) == []
    return conn


# ---------------------------------------------------------------------------------------------
# the cases of issue 6
# ---------------------------------------------------------------------------------------------
def test_corrected_bar_deep_in_history_fixes_every_level_in_one_run(
    db: Database, week, caplog: pytest.LogCaptureFixture
) -> None:
    conn = week
    ts = MONDAY + timedelta(days=1, hours=10, minutes=7)  # Tuesday 10:07
    conn.execute("UPDATE data_bars SET high = 1000 WHERE canonical_symbol = %s AND ts_utc = %s", (SYMBOL, ts))
    assert pending(conn) == [(SYMBOL, "5m", ts - timedelta(minutes=2), "update")]

    with caplog.at_level(logging.INFO, logger="baragg.worker"):
        summary = run(db)

    tuesday = MONDAY + timedelta(days=1)
    windows = {
        "5m": ts - timedelta(minutes=2),
        "15m": tuesday + timedelta(hours=10),
        "1h": tuesday + timedelta(hours=10),
        "4h": tuesday + timedelta(hours=8),
        "1d": tuesday,
        "1w": MONDAY,
    }
    for tf, ws in windows.items():
        high = bar(conn, tf, ws)[1]
        assert high == 1000, f"{tf} bar at {ws} was not re-aggregated"
    assert pending(conn) == []
    assert summary.totals["bars_reaggregated"] == 6
    assert summary.totals["bars_withdrawn"] == 0
    assert {t.timeframe for t in summary.tasks if t.bars_reaggregated} == set(ALL_TFS)
    # the run's log event and each task's event carry the counts
    finished = [r for r in caplog.records if getattr(r, "event", None) == "run_finished"]
    assert [(r.bars_reaggregated, r.bars_withdrawn) for r in finished] == [(6, 0)]
    task_events = [r for r in caplog.records if getattr(r, "event", None) == "task_run"]
    assert sum(r.bars_reaggregated for r in task_events) == 6
    totals = dict(conn.execute("SELECT timeframe, total_bars_reaggregated FROM data_agg_state").fetchall())
    assert totals == dict.fromkeys(ALL_TFS, 1)
    assert_matches_scratch(db, conn)


def test_late_bars_fill_an_outage_at_every_level(db: Database, conn: psycopg.Connection) -> None:
    add_asset(conn)
    outage_start = MONDAY + timedelta(days=1, hours=11)  # Tuesday 11:00-12:59 missing
    outage = minutes(outage_start, 2 * 60)
    missing = set(outage)
    insert_bars(conn, [ts for ts in minutes(MONDAY, 4 * 1440) if ts not in missing])
    run(db)
    assert bar(conn, "1h", outage_start) is None  # a gap, passed over
    assert bar(conn, "4h", MONDAY + timedelta(days=1, hours=8))[7] == 3  # 3 of 4 hours
    assert bar(conn, "4h", MONDAY + timedelta(days=1, hours=12))[7] == 3

    insert_bars(conn, outage)  # the provider delivers the outage late
    assert {(tf, n) for tf, n in conn.execute(
        "SELECT timeframe, count(*) FROM agg_invalidations GROUP BY 1")} == {("5m", 24)}  # fmt: skip
    summary = run(db)

    for k in range(24):
        assert bar(conn, "5m", outage_start + timedelta(minutes=5 * k)) is not None
    for k in range(8):
        assert bar(conn, "15m", outage_start + timedelta(minutes=15 * k)) is not None
    for k in range(2):
        assert bar(conn, "1h", outage_start + timedelta(hours=k)) is not None
    assert bar(conn, "4h", MONDAY + timedelta(days=1, hours=8))[7] == 4
    assert bar(conn, "4h", MONDAY + timedelta(days=1, hours=12))[7] == 4
    assert bar(conn, "1d", MONDAY + timedelta(days=1))[7] == 24
    assert summary.totals["bars_reaggregated"] == 24 + 8 + 2 + 2 + 1 + 1
    assert_matches_scratch(db, conn)


def test_withdrawn_window_soft_deletes_and_recomputes_parents(db: Database, week) -> None:
    conn = week
    tuesday = MONDAY + timedelta(days=1)
    ten = tuesday + timedelta(hours=10)
    rows_before = conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()[0]

    # every 1m bar of the 5m window 10:05 is withdrawn by the provider
    conn.execute(
        "DELETE FROM data_bars WHERE ts_utc >= %s AND ts_utc < %s",
        (ten + timedelta(minutes=5), ten + timedelta(minutes=10)),
    )
    summary = run(db)
    gone = conn.execute(
        "SELECT deleted_at IS NOT NULL FROM derived_data_bars WHERE timeframe = '5m' AND ts_utc = %s",
        (ten + timedelta(minutes=5),),
    ).fetchall()
    assert gone == [(True,)]  # soft-deleted, not removed
    hour = bar(conn, "1h", ten)
    assert hour[7:10] == (11, 12, 1)  # one fewer source candle, quality 1
    assert bar(conn, "15m", ten)[7:10] == (2, 3, 0)
    assert summary.totals["bars_withdrawn"] == 1

    # the rest of the first 40 minutes goes too: the hour falls below 0.55 and is withdrawn
    conn.execute(
        "DELETE FROM data_bars WHERE ts_utc >= %s AND ts_utc < %s",
        (ten, ten + timedelta(minutes=40)),
    )
    summary = run(db)
    assert bar(conn, "1h", ten) is None
    assert bar(conn, "15m", ten) is None and bar(conn, "15m", ten + timedelta(minutes=30)) is None
    assert bar(conn, "15m", ten + timedelta(minutes=45)) is not None
    assert bar(conn, "4h", tuesday + timedelta(hours=8))[7] == 3
    assert bar(conn, "1d", tuesday)[7] == 23
    # 5m: 7 more; 15m: 10:00 (1 of 3 left), 10:15, 10:30; 1h: 10:00
    assert summary.totals["bars_withdrawn"] == 7 + 3 + 1
    rows_after = conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()[0]
    assert rows_after == rows_before  # nothing hard-deleted
    assert_matches_scratch(db, conn)


def test_changes_at_or_after_the_cursor_are_future_work(db: Database, conn: psycopg.Connection) -> None:
    add_asset(conn)
    insert_bars(conn, minutes(MONDAY, 2 * 1440))
    midday = MONDAY + timedelta(hours=12)
    run(db, now=midday)  # every task stops at the first window not final at 12:00
    cursor = conn.execute("SELECT last_agg_bar_ts_utc FROM data_agg_state WHERE timeframe = '5m'").fetchone()[
        0
    ]
    assert MONDAY < cursor <= midday

    conn.execute("UPDATE data_bars SET close = close + 1 WHERE ts_utc >= %s", (cursor,))
    conn.execute(
        "DELETE FROM data_bars WHERE ts_utc >= %s AND ts_utc < %s", (cursor, cursor + timedelta(hours=1))
    )
    insert_bars(conn, minutes(MONDAY + timedelta(days=2), 60))
    assert pending(conn) == []

    # the last minute before the cursor is history: its window is invalidated
    conn.execute("UPDATE data_bars SET close = close + 1 WHERE ts_utc = %s", (cursor - timedelta(minutes=1),))
    assert pending(conn) == [(SYMBOL, "5m", cursor - timedelta(minutes=5), "update")]

    run(db)
    assert_matches_scratch(db, conn)


def test_identical_rewrites_record_nothing(db: Database, week) -> None:
    conn = week
    before = conn.execute(
        "SELECT canonical_symbol, timeframe, next_run_at FROM data_agg_state ORDER BY 1, 2"
    ).fetchall()
    conn.execute("UPDATE data_bars SET open = open, close = close")
    conn.execute("UPDATE data_bars SET raw = '{\"provider\": \"again\"}', ingested_at = now(), source = 'x'")
    # a re-ingest: the same rows upserted again
    conn.execute(
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
        " trade_count, source)"
        " SELECT canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, 'file'"
        " FROM data_bars"
        " ON CONFLICT (canonical_symbol, timeframe, ts_utc) DO UPDATE SET open = excluded.open,"
        " high = excluded.high, low = excluded.low, close = excluded.close, vol = excluded.vol,"
        " vwap = excluded.vwap, trade_count = excluded.trade_count, source = excluded.source"
    )
    # and the derived bars rewritten with the values they hold
    conn.execute("UPDATE derived_data_bars SET high = high, updated_at = now()")
    assert pending(conn) == []
    after = conn.execute(
        "SELECT canonical_symbol, timeframe, next_run_at FROM data_agg_state ORDER BY 1, 2"
    ).fetchall()
    assert after == before  # nobody woken


def test_eligibility_changes_count(db: Database, week) -> None:
    conn = week
    ts = MONDAY + timedelta(hours=3, minutes=31)
    conn.execute("UPDATE data_bars SET is_partial = true WHERE ts_utc = %s", (ts,))
    assert [p[1:] for p in pending(conn)] == [("5m", ts - timedelta(minutes=1), "update")]
    run(db)
    assert bar(conn, "5m", ts - timedelta(minutes=1))[7] == 4
    # a derived bar soft-deleted by hand invalidates its parents
    conn.execute(
        "UPDATE derived_data_bars SET deleted_at = now() WHERE timeframe = '1h' AND ts_utc = %s",
        (MONDAY + timedelta(hours=5),),
    )
    assert {p[1] for p in pending(conn)} == {"4h", "1d"}
    run(db)
    assert bar(conn, "4h", MONDAY + timedelta(hours=4))[7] == 3


def test_bars_before_agg_start_and_disabled_tasks(db: Database, week) -> None:
    conn = week
    conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (MONDAY + timedelta(days=1),))
    conn.execute("UPDATE data_bars SET high = high + 5 WHERE ts_utc < %s", (MONDAY + timedelta(days=1),))
    assert pending(conn) == []  # before agg_start: no derived bar may exist there

    conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (MONDAY,))
    conn.execute("UPDATE core_asset_registry_all SET calc_1w = false")  # the sync disables 1w
    conn.execute("UPDATE data_bars SET low = low - 50 WHERE ts_utc = %s", (MONDAY + timedelta(days=2),))
    run(db)
    # the disabled task keeps its entry until it is enabled again
    assert [p[1] for p in pending(conn)] == ["1w"]
    rows = {r[1]: r[2] for r in conn.execute(query("pending_invalidations"))}
    assert rows["1w"] == 1 and rows["5m"] == 0
    conn.execute("UPDATE core_asset_registry_all SET calc_1w = true")
    run(db)
    assert pending(conn) == []
    assert bar(conn, "1w", MONDAY)[2] == bar(conn, "1d", MONDAY + timedelta(days=2))[2]


def test_status_shows_pending_invalidations(db: Database, week) -> None:
    conn = week
    conn.execute("DELETE FROM data_bars WHERE ts_utc >= %s AND ts_utc < %s",
                 (MONDAY + timedelta(hours=1), MONDAY + timedelta(hours=1, minutes=5)))  # fmt: skip
    rows = conn.execute(query("pending_invalidations")).fetchall()
    assert [(r[1], r[2], r[3]) for r in rows if r[2]] == [("5m", 1, MONDAY + timedelta(hours=1))]
    done = baragg(db, "status", "--json")
    assert done.returncode == 0, done.stderr
    pending_by_task = {t["timeframe"]: t["pending_invalidations"] for t in json.loads(done.stdout)}
    assert pending_by_task == {"5m": 1, "15m": 0, "1h": 0, "4h": 0, "1d": 0, "1w": 0}
    human = baragg(db, "status")
    assert human.returncode == 0 and "late" in " ".join(human.stdout.splitlines()[:2])  # two-line header


# ---------------------------------------------------------------------------------------------
# any sequence of changes and runs ends equal to a from-scratch aggregation
# ---------------------------------------------------------------------------------------------
DAYS = 6  # Monday to Saturday: enough for a 1w bar
SPAN = DAYS * 1440

minute_index = st.integers(min_value=0, max_value=SPAN - 1)
block = st.tuples(minute_index, st.sampled_from([1, 3, 5, 17, 60, 300]))
operation = st.one_of(
    st.tuples(st.just("update"), block, st.floats(min_value=-20, max_value=20, allow_nan=False)),
    st.tuples(st.just("delete"), block, st.just(0.0)),
    st.tuples(st.just("insert"), block, st.floats(min_value=-20, max_value=20, allow_nan=False)),
    st.tuples(st.just("partial"), block, st.just(0.0)),
    st.tuples(st.just("run"), st.just((0, 0)), st.just(0.0)),
)


def apply(conn: psycopg.Connection, op: str, start: int, length: int, bump: float) -> None:
    lo = MONDAY + timedelta(minutes=start)
    hi = lo + timedelta(minutes=length)
    if op == "update":
        conn.execute(
            "UPDATE data_bars SET open = open + %(b)s, high = high + %(b)s + 1, low = low + %(b)s,"
            " close = close + %(b)s, vol = vol * 2 WHERE ts_utc >= %(lo)s AND ts_utc < %(hi)s",
            {"b": bump, "lo": lo, "hi": hi},
        )
    elif op == "delete":
        conn.execute("DELETE FROM data_bars WHERE ts_utc >= %s AND ts_utc < %s", (lo, hi))
    elif op == "partial":
        conn.execute(
            "UPDATE data_bars SET is_partial = NOT is_partial WHERE ts_utc >= %s AND ts_utc < %s", (lo, hi)
        )
    elif op == "insert":
        # late bars: the missing minutes of the block arrive (existing ones are corrected)
        rows = [
            (SYMBOL, "1m", *minute_bar(ts, bump), "late")
            for ts in minutes(lo, length)
            if ts < MONDAY + timedelta(minutes=SPAN)
        ]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol,"
                " vwap, trade_count, source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (canonical_symbol, timeframe, ts_utc) DO UPDATE SET open = excluded.open,"
                " high = excluded.high, low = excluded.low, close = excluded.close, vol = excluded.vol,"
                " vwap = excluded.vwap, trade_count = excluded.trade_count",
                rows,
            )


@settings(
    max_examples=int(os.environ.get("BARAGG_LATE_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    outages=st.lists(block, max_size=3),
    ops=st.lists(operation, min_size=1, max_size=8),
)
def test_any_changes_end_equal_to_from_scratch(db: Database, conn: psycopg.Connection, outages, ops) -> None:
    conn.execute("DELETE FROM agg_invalidations")
    conn.execute("DELETE FROM derived_data_bars")
    conn.execute("DELETE FROM data_agg_state")
    conn.execute("DELETE FROM data_bars")
    conn.execute("DELETE FROM core_asset_registry_all")
    add_asset(conn)
    missing = {MONDAY + timedelta(minutes=s + k) for s, n in outages for k in range(n)}
    insert_bars(conn, [ts for ts in minutes(MONDAY, SPAN) if ts not in missing])
    run(db)
    for op, (start, length), bump in ops:
        if op == "run":
            run(db)
        else:
            apply(conn, op, start, length, bump)
    run(db)
    assert_matches_scratch(db, conn)


def test_a_running_task_runs_again_after_its_finish(db: Database, week) -> None:
    """A correction logged while another worker holds the task is not lost to that worker's finish."""
    conn = week
    conn.execute("UPDATE data_agg_state SET next_run_at = NULL WHERE timeframe = '5m'")
    claimed = conn.execute(
        "SELECT count(*) FROM agg_claim_tasks('other', 10, 300, %s, ARRAY[%s], ARRAY['5m'])", (NOW, SYMBOL)
    ).fetchone()[0]
    assert claimed == 1
    last_minute = MONDAY + timedelta(hours=2, minutes=4)  # the close of the 5m bar at 02:00
    conn.execute("UPDATE data_bars SET close = close + 1 WHERE ts_utc = %s", (last_minute,))
    state = conn.execute(
        "SELECT status, rerun_requested FROM data_agg_state WHERE timeframe = '5m'"
    ).fetchone()
    assert state == ("running", True)
    finish = conn.execute(
        "SELECT agg_finish(%s, '5m', true, NULL, '{}'::jsonb, NULL, NULL, %s, 'other')", (SYMBOL, NOW)
    ).fetchone()[0]
    assert finish["next_run_at"] is not None
    run(db)
    assert pending(conn) == []
    assert bar(conn, "5m", MONDAY + timedelta(hours=2))[3] == minute_bar(last_minute)[4] + 1
    assert_matches_scratch(db, conn)


def test_bars_built_through_the_late_data_path_show_in_text_output(db: Database, week) -> None:
    """Issue 11: "0 bars created" while bars were rebuilt. The run's line, `status` and its JSON say
    what happened: rewritten bars, late windows."""
    conn = week
    ts = MONDAY + timedelta(days=2, hours=7, minutes=31)
    conn.execute(
        "UPDATE data_bars SET low = low - 50 WHERE canonical_symbol = %s AND ts_utc = %s", (SYMBOL, ts)
    )
    done = baragg(db, "run", "--once", "--now", NOW.isoformat())
    assert done.returncode == 0, done.stderr
    assert (
        "0 bars created, 6 rewritten, 0 withdrawn, 0 unchanged (6 late windows re-aggregated)" in done.stdout
    )
    table = baragg(db, "status")
    assert table.returncode == 0, table.stderr
    # Count columns appear when some task has a count: here only bars rewritten (second header line).
    lines = table.stdout.splitlines()
    header = lines[1].split()
    assert header[header.index("bars") :] == ["bars", "rewritten"]
    assert all(line.split()[-1] == "1" for line in lines[2 : 2 + len(ALL_TFS)])  # one rewritten per task
    rows = json.loads(baragg(db, "status", "--json").stdout)
    assert {(t["timeframe"], t["bars_rewritten"], t["bars_unchanged"]) for t in rows} == {
        (tf, 1, 0) for tf in ALL_TFS
    }
