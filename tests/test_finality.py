"""Final means final (issue 11, DESIGN.md 4 and 5): no derived bar before its window is final, for
every caller, step size and start, and every path ends equal to a from-scratch aggregation.

* A property test: random interleavings of 1m deliveries (on time, late, corrected, withdrawn),
  clock steps and callers (baragg's worker with small --max-windows, with a zero time budget, two
  workers at once, one level at a time from the top, and the seed's own RPC loop), checked after
  every step (finality_support).
* The three reproductions of the issue, as plain tests (the first through the real CLI).
* A live replay: symbols registered before any data, rows delivered a few minutes at a time with
  some minutes late, `run --once --now T` after each delivery; never a bar for an open window, and
  `verify` agrees at the end.
"""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from baragg import verify, worker
from baragg.db import Database
from finality_support import Checker, pending, seed_cron_run, snapshot
from ops_helpers import baragg, write_csv

SYMBOL = "S"
T0 = datetime(2025, 7, 10, 22, 10, 20, tzinfo=UTC)  # a Thursday evening; the week ends 4 days later
CLEAN = ("agg_invalidations", "derived_data_bars", "data_bars", "data_agg_state", "core_asset_registry_all")


@pytest.fixture(scope="module")
def shared(server_url: str, template_db: str) -> Iterator[tuple[Database, psycopg.Connection]]:
    """One database for every example of the property test (emptied between examples)."""
    from conftest import create_database, drop_database, url_for

    name = f"baragg_final_{uuid.uuid4().hex[:10]}"
    create_database(server_url, name, template=template_db)
    db = Database(url_for(server_url, name))
    try:
        with db.connect(autocommit=True) as conn:
            yield db, conn
    finally:
        drop_database(server_url, name)


def add_symbol(conn: psycopg.Connection, symbol: str = SYMBOL, sparse: bool = False) -> None:
    """A symbol with every timeframe (5m, 15m, 1h, 4h, 1d, 1w)."""
    conn.execute(
        "INSERT INTO core_asset_registry_all (canonical_symbol, is_sparse, calc_15m, calc_4h, calc_1d, calc_1w)"
        " VALUES (%s, %s, true, true, true, true)",
        (symbol, sparse),
    )


def bar_values(ts: datetime, bump: float = 0.0) -> tuple:
    i = int(ts.timestamp() // 60)
    base = 100.0 + (i % 89) * 0.25 + bump
    close = base + ((i % 7) - 3) * 0.1
    return (base, max(base, close) + 0.5 + (i % 5) * 0.1, min(base, close) - 0.5, close, float(1 + i % 13),
            (base + close) / 2, 1 + i % 9)  # fmt: skip


def deliver(conn: psycopg.Connection, rows: list[tuple[datetime, float]], symbol: str = SYMBOL) -> None:
    """Upsert 1m rows as `baragg ingest` does: new ones inserted, changed ones updated, equal ones left."""
    if not rows:
        return
    # As ingest does: the months' partitions first (rows moved out of a default partition later by the
    # worker's housekeeping would be new row versions, which this test counts as rewrites).
    for table in ("data_bars", "derived_data_bars"):
        conn.execute("SELECT baragg_partitions_ensure(%s, %s)", (table, [ts for ts, _ in rows]))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO data_bars AS d (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap,"
            " trade_count, source) VALUES (%s, '1m', %s, %s, %s, %s, %s, %s, %s, %s, 'test')"
            " ON CONFLICT (canonical_symbol, timeframe, ts_utc) DO UPDATE SET open = excluded.open,"
            " high = excluded.high, low = excluded.low, close = excluded.close, vol = excluded.vol,"
            " vwap = excluded.vwap, trade_count = excluded.trade_count"
            " WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count) IS DISTINCT FROM"
            " (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,"
            " excluded.trade_count)",
            [(symbol, ts, *bar_values(ts, bump)) for ts, bump in rows],
        )


def withdraw(conn: psycopg.Connection, stamps: list[datetime], symbol: str = SYMBOL) -> None:
    if stamps:
        conn.execute(
            "DELETE FROM data_bars WHERE canonical_symbol = %s AND ts_utc = ANY (%s)", (symbol, stamps)
        )


def run_worker(db: Database, now: datetime, **options) -> None:
    summary = worker.run_once(db, now=now, **options)
    failed = [t for t in summary.tasks if t.outcome not in ("ok", "continue")]
    assert not failed, failed


def run_two_workers(db: Database, now: datetime, max_windows: int) -> None:
    """Two workers at once, each claiming one task at a time."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            run_worker(db, now, max_windows=max_windows, batch_size=1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker did not finish"
    assert not errors, errors


# ---------------------------------------------------------------------------------------------
# The property test
# ---------------------------------------------------------------------------------------------
CALLERS = ("worker", "worker_small", "budget", "two_workers", "top_down", "seed", "seed_mid")
TOP_DOWN = ("1w", "1d", "4h", "1h", "15m", "5m")  # every level before the ones it is built from
STEPS = [timedelta(seconds=s) for s in (20, 60, 130, 300, 780, 3660, 4 * 3600, 86400)]
LATENESS = [timedelta(seconds=s) for s in (5, 5, 5, 40, 150, 420, 3900, 26 * 3600)]
AFTERWARDS = [timedelta(seconds=s) for s in (50, 600, 4200, 5 * 3600, 30 * 3600)]

block = st.tuples(
    st.integers(-180, 4 * 1440),  # first minute, relative to T0 (before T0: history delivered late)
    st.integers(1, 40),  # length in minutes
    st.sampled_from([1.0, 0.8, 0.5, 0.2]),  # share of minutes that have a row
    st.sampled_from(range(len(LATENESS))),  # how late the block's rows arrive after their minute ends
)


def minute(offset: int) -> datetime:
    return T0.replace(second=0) + timedelta(minutes=offset)


@settings(
    max_examples=int(os.environ.get("BARAGG_FINALITY_EXAMPLES", "8")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sparse=st.booleans(),
    blocks=st.lists(block, min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(st.tuples(st.sampled_from(STEPS), st.sampled_from(CALLERS)), min_size=3, max_size=14),
    first_caller=st.sampled_from(CALLERS),
    drain=st.sampled_from(["worker", "seed"]),
    history=st.sampled_from([timedelta(0), timedelta(hours=5), timedelta(days=2)]),
)
def test_no_bar_before_its_window_is_final_whatever_the_caller(
    shared, sparse, blocks, seed, steps, first_caller, drain, history
) -> None:
    db, conn = shared
    for table in CLEAN:
        conn.execute(f"DELETE FROM {table}")
    rnd = random.Random(seed)
    # The feed: (delivery time, kind, minute, bump). Rows arrive after their minute ends, some late;
    # some are corrected or withdrawn later.
    events: list[tuple[datetime, str, datetime, float]] = []
    for first, length, density, late in blocks:
        for k in range(length):
            if rnd.random() >= density:
                continue
            ts = minute(first + k)
            arrives = ts + timedelta(minutes=1) + LATENESS[late] + timedelta(seconds=rnd.randrange(30))
            events.append((arrives, "row", ts, 0.0))
            roll = rnd.random()
            if roll < 0.12:  # corrected later, usually after its bars were built
                events.append((arrives + rnd.choice(AFTERWARDS), "row", ts, rnd.choice([-3.0, 0.5, 7.0])))
            elif roll < 0.2:  # withdrawn later
                events.append((arrives + rnd.choice(AFTERWARDS), "withdraw", ts, 0.0))
    events.sort(key=lambda e: e[0])

    add_symbol(conn, sparse=sparse)  # registered before any data ...
    check = Checker(conn, SYMBOL, sparse)
    now = T0 + history
    # ... and first run either before any data, or after some history arrived (every task then
    # bootstraps with 1m rows present and no derived bar built yet: each level must start at the data
    # below it, whatever order the caller runs the levels in).
    delivered = feed(conn, events, 0, now) if history else 0
    call(db, conn, first_caller, now, rnd)
    check.check_step(now, first_caller)
    if not history:
        assert snapshot(conn, SYMBOL) == {}
    for step, caller in steps:
        now += step
        if caller == "seed_mid":
            # the seed's loop, with this step's rows delivered between one task's catch-up and its
            # agg_finish (each call is its own transaction)
            at = rnd.randrange(6)
            fed = [delivered]

            def between(i: int, at: int = at, fed: list[int] = fed, now: datetime = now) -> None:
                if i == at:
                    check.check_step(now, "the first part of the seed's loop")
                    fed[0] = feed(conn, events, fed[0], now)
                    check.check_step(now, "a delivery inside the seed's loop")

            seed_cron_run(conn, now, between=between)
            check.check_step(now, caller)
            delivered = feed(conn, events, fed[0], now)
            check.check_step(now, "a delivery")
            continue
        delivered = feed(conn, events, delivered, now)
        check.check_step(now, "a delivery")
        call(db, conn, caller, now, rnd)
        check.check_step(now, caller)

    # Everything delivered, every window final: the callers drain the work, and the result is what a
    # from-scratch aggregation of the same rows gives.
    now = max(now, events[-1][0] if events else now) + timedelta(days=8)
    feed(conn, events, delivered, now)
    check.check_step(now, "the last delivery")
    if drain == "worker":
        call(db, conn, "worker", now, rnd)
        check.check_step(now, "the final worker run")
    else:
        idle = 0
        for _ in range(80):  # the seed's cron, every 5 minutes
            done = seed_cron_run(conn, now)
            check.check_step(now, "the seed's loop")
            idle = idle + 1 if done["windows"] == 0 and done["reaggregated"] == 0 else 0
            if idle == 2:
                break
            now += timedelta(minutes=5)
        assert idle == 2, "the seed's loop did not finish in 80 runs"
    assert pending(conn) == []
    check.assert_equals_from_scratch()
    # what the examples reach (pytest --hypothesis-show-statistics)
    event(
        f"bars written or withdrawn along the way: {'0' if not check.written else '1-99' if check.written < 100 else '100+'}"
    )
    totals = conn.execute(
        "SELECT sum(total_bars_rewritten), sum(total_bars_withdrawn), sum(total_bars_reaggregated) FROM data_agg_state"
    ).fetchone()
    for name, n in zip(("rewritten", "withdrawn", "built through the late-data path"), totals, strict=True):
        if n:
            event(f"bars {name}")


def feed(conn: psycopg.Connection, events: list, done: int, now: datetime) -> int:
    """Apply every event due by ``now`` (in order); returns how many have been applied."""
    while done < len(events) and events[done][0] <= now:
        _, kind, ts, bump = events[done]
        if kind == "row":
            deliver(conn, [(ts, bump)])
        else:
            withdraw(conn, [ts])
        done += 1
    return done


def call(db: Database, conn: psycopg.Connection, caller: str, now: datetime, rnd: random.Random) -> None:
    if caller == "worker":
        run_worker(db, now)
    elif caller == "worker_small":
        run_worker(db, now, max_windows=rnd.choice([1, 2, 7]))
    elif caller == "budget":  # every claim hands its task back after one call
        run_worker(db, now, max_windows=rnd.choice([3, 12, 40]), time_budget=0.0)
    elif caller == "two_workers":
        run_two_workers(db, now, rnd.choice([2, 2000]))
    elif caller == "top_down":  # one level at a time, highest first (a task before its source's)
        for timeframe in TOP_DOWN:
            run_worker(db, now, timeframes=[timeframe], max_windows=rnd.choice([2, 2000]))
    else:  # seed, seed_mid (only as the first caller: nothing to deliver yet)
        seed_cron_run(conn, now)


# ---------------------------------------------------------------------------------------------
# The reproductions of issue 11
# ---------------------------------------------------------------------------------------------
def test_repro_1_a_task_started_at_the_live_edge_does_not_build_the_open_window(
    db: Database, tmp_path: Path
) -> None:
    """registry add; backfill --from 10:00 --now 10:00:30; ingest 10:00-10:03; run --once --now
    10:04:30: no 5m bar for 10:00 (it was built from 4 minutes). The bar appears once the window
    is final, from all 5 minutes, written once."""
    start = datetime(2018, 4, 5, 10, 0, tzinfo=UTC)
    done = baragg(db, "registry", "add", "BTCUSD", "--calc-15m", "--calc-4h", "--calc-1d", "--calc-1w")
    assert done.returncode == 0, done.stderr
    done = baragg(db, "backfill", "--from", "2018-04-05T10:00Z", "--now", "2018-04-05T10:00:30Z")
    assert done.returncode == 0, done.stderr
    header = "ts_utc,open,high,low,close,vol"

    def minutes(first: int, last: int) -> list[str]:
        return [
            f"2018-04-05T10:{m:02d}:00Z,{100 + m},{101 + m},{99 + m},{100.5 + m},{m + 1}"
            for m in range(first, last)
        ]

    assert (
        baragg(
            db, "ingest", write_csv(tmp_path / "a.csv", header, *minutes(0, 4)), "--symbol", "BTCUSD"
        ).returncode
        == 0
    )
    done = baragg(db, "run", "--once", "--now", "2018-04-05T10:04:30Z")
    assert done.returncode == 0, done.stderr
    assert "0 bars created" in done.stdout
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()[0] == 0
        assert pending(conn) == []

    assert (
        baragg(
            db, "ingest", write_csv(tmp_path / "b.csv", header, *minutes(4, 6)), "--symbol", "BTCUSD"
        ).returncode
        == 0
    )
    done = baragg(db, "run", "--once", "--now", "2018-04-05T10:05:31Z")
    assert done.returncode == 0, done.stderr
    assert "1 bars created, 0 rewritten, 0 withdrawn, 0 unchanged" in done.stdout
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT timeframe, ts_utc, open, close, source_candles, quality_score, updated_at = created_at"
            " FROM derived_data_bars"
        ).fetchall()
    assert rows == [("5m", start, 100.0, 104.5, 5, 2, True)]


def test_backfill_from_over_unchanged_data_rewrites_nothing(db: Database, tmp_path: Path) -> None:
    """Issue 11: a `backfill --from` over data that did not change "created" every bar again and bumped
    updated_at. Now it writes nothing and says so; a bar whose source changed is rewritten, one whose
    source vanished is withdrawn."""
    day = datetime(2025, 7, 8, tzinfo=UTC)
    with db.connect(autocommit=True) as conn:
        add_symbol(conn, "X")
        deliver(conn, [(ts, 0.0) for ts in fx_minutes(day, 1)], symbol="X")
    now = "2025-07-20T00:00:00Z"
    first = baragg(db, "backfill", "--now", now, "--json")
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout)["bars_created"]
    assert created == 288 + 96 + 24 + 6 + 1  # 5m, 15m, 1h, 4h, 1d (the week has one day: below 0.55)
    with db.connect(autocommit=True) as conn:
        conn.execute("UPDATE derived_data_bars SET updated_at = '2020-01-01'")
    again = baragg(db, "backfill", "--from", "2025-07-01", "--now", now)
    assert again.returncode == 0, again.stderr
    assert f"0 bars created, 0 rewritten, 0 withdrawn, {created:,} unchanged" in again.stdout
    with db.connect(autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM derived_data_bars WHERE updated_at > '2020-01-01'"
        ).fetchone() == (0,)
        # one minute corrected, the 5m window 10:05 loses its source rows (the changes land at or after
        # the reset cursors: the catch-up itself rewrites and withdraws)
        conn.execute(
            "UPDATE data_bars SET high = high + 100 WHERE ts_utc = %s", (day + timedelta(hours=3, minutes=1),)
        )
        conn.execute(
            "DELETE FROM data_bars WHERE ts_utc >= %s AND ts_utc < %s",
            (day + timedelta(hours=10, minutes=5), day + timedelta(hours=10, minutes=10)),
        )
    third = baragg(db, "backfill", "--from", "2025-07-01", "--now", now, "--json")
    assert third.returncode == 0, third.stderr
    report = json.loads(third.stdout)
    # rewritten: 03:00's 5m, 15m, 1h and 4h (00:00) bars, the day, and 10:00's 15m, 1h and 4h (08:00)
    # bars, which lose a source bar; withdrawn: the 5m bar at 10:05
    assert (report["bars_created"], report["bars_withdrawn"]) == (0, 1)
    assert report["bars_rewritten"] == 8 and report["bars_unchanged"] == created - 1 - 8
    with db.connect(autocommit=True) as conn:
        (stored,) = conn.execute("SELECT count(*) FROM derived_data_bars WHERE deleted_at IS NULL").fetchone()
        (balance,) = conn.execute(
            "SELECT sum(total_bars_created - total_bars_withdrawn) FROM data_agg_state"
        ).fetchone()
    assert stored == balance == created - 1


def test_a_row_delivered_between_the_seeds_catch_up_and_its_finish_is_not_lost(db: Database) -> None:
    """The seed's loop stores the cursor in agg_finish, a transaction after the bars. A late row for a
    window the catch-up just passed over (a gap then) used to land at or after the stored cursor: not
    logged, and passed over for good when agg_finish moved the cursor. catchup_aggregation_range now
    stores the cursor of a claimed task with its bars, so the row is logged and its window built."""
    ten = datetime(2025, 7, 8, 10, 0, tzinfo=UTC)
    with db.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('X')")
        seed_cron_run(conn, ten + timedelta(seconds=10))  # bootstraps 5m at 10:00 (no data yet)
        deliver(
            conn, [(ten + timedelta(minutes=m), 0.0) for m in range(5, 10)], symbol="X"
        )  # 10:00-10:04 late

        def late_rows(i: int) -> None:
            if i == 0:  # after the 5m task's catch-up (10:00 passed over as a gap), before agg_finish
                deliver(conn, [(ten + timedelta(minutes=m), 0.0) for m in range(5)], symbol="X")

        seed_cron_run(conn, ten + timedelta(minutes=10, seconds=40), between=late_rows)
        assert pending(conn) == [("X", "5m", ten)]
        seed_cron_run(conn, ten + timedelta(minutes=15))
        rows = conn.execute(
            "SELECT ts_utc, source_candles FROM derived_data_bars WHERE timeframe = '5m' AND deleted_at IS NULL"
            " ORDER BY ts_utc"
        ).fetchall()
    assert rows == [(ten, 5), (ten + timedelta(minutes=5), 5)]


def fx_minutes(first_day: datetime, days: int, skip: set[datetime] | None = None) -> list[datetime]:
    """1m stamps of an FX-like market: closed Friday 21:00 to Sunday 22:00 UTC."""
    out = []
    for m in range(days * 1440):
        ts = first_day + timedelta(minutes=m)
        weekday, hour = ts.weekday(), ts.hour
        if (weekday == 4 and hour >= 21) or weekday == 5 or (weekday == 6 and hour < 22):
            continue
        if skip and ts in skip:
            continue
        out.append(ts)
    return out


def test_repro_2_a_day_is_not_built_from_hours_whose_5m_bars_are_missing(db: Database) -> None:
    """Bounded steps (--max-windows 96, a zero time budget) stop the 5m and the 1h tasks on the same
    hour boundary; rule 3 looked one level down, so the day was built from those 8 hours (and
    rewritten twice). Recursive, the day waits until every hour below it is built."""
    day = datetime(2025, 7, 8, tzinfo=UTC)  # a Tuesday
    with db.connect(autocommit=True) as conn:
        add_symbol(conn, "X", sparse=True)
        deliver(conn, [(ts, 0.0) for ts in fx_minutes(day, 1)], symbol="X")
        seen: list[tuple] = []

        def watch(result: worker.TaskResult) -> None:
            seen.extend(conn.execute(
                "SELECT timeframe, ts_utc, source_candles FROM derived_data_bars"
                " WHERE timeframe IN ('4h', '1d') AND deleted_at IS NULL"
            ).fetchall())  # fmt: skip

        worker.run_once(
            db, now=day + timedelta(days=1, minutes=5), max_windows=96, time_budget=0.0, on_task=watch
        )
        partial = sorted({s for s in seen if (s[0] == "1d" and s[2] < 24) or (s[0] == "4h" and s[2] < 4)})
        assert partial == [], f"bars built from incomplete sources: {partial}"
        state = {tf: (created, rewritten) for tf, created, rewritten in conn.execute(
            "SELECT timeframe, total_bars_created, total_bars_rewritten FROM data_agg_state"
        )}  # fmt: skip
        assert state["1d"] == (1, 0) and state["4h"] == (6, 0)
        assert conn.execute(
            "SELECT source_candles FROM derived_data_bars WHERE timeframe = '1d' AND deleted_at IS NULL"
        ).fetchall() == [(24,)]


def test_repro_3_the_seeds_rpc_loop_ends_equal_to_a_from_scratch_aggregation(db: Database) -> None:
    """The seed's worker (10 tasks x 100 windows every 5 minutes) over a week and a half of FX data
    with weekends and an outage delivered late: the logged windows are re-aggregated on that path too,
    and nothing is built early. Before: 4h and 1d bars missing for good."""
    first = datetime(2025, 7, 3, tzinfo=UTC)  # a Thursday
    outage = {first + timedelta(days=5, hours=9, minutes=m) for m in range(130)}  # Tuesday 09:00-11:09
    with db.connect(autocommit=True) as conn:
        add_symbol(conn, "FX")
        deliver(conn, [(ts, 0.0) for ts in fx_minutes(first, 11, skip=outage)], symbol="FX")
        check = Checker(conn, "FX", sparse=False)
        now = first + timedelta(days=11, minutes=1)
        for run in range(60):
            done = seed_cron_run(conn, now)
            check.check_step(now, "the seed's loop")
            if done["windows"] == 0 and done["reaggregated"] == 0 and run > 0:
                break
            now += timedelta(minutes=5)
        deliver(conn, [(ts, 0.0) for ts in sorted(outage)], symbol="FX")  # the outage, late
        assert {tf for _, tf, _ in pending(conn)} == {"5m"}
        for _ in range(20):
            now += timedelta(minutes=5)
            done = seed_cron_run(conn, now)
            check.check_step(now, "the seed's loop")
            if not pending(conn) and done["windows"] == 0 and done["reaggregated"] == 0:
                break
        assert pending(conn) == []
        check.assert_equals_from_scratch()
        # the 1d bar of the outage day has all its 24 hours
        assert conn.execute(
            "SELECT source_candles FROM derived_data_bars WHERE timeframe = '1d' AND ts_utc = %s"
            " AND deleted_at IS NULL",
            (first + timedelta(days=5),),
        ).fetchone() == (24,)


# ---------------------------------------------------------------------------------------------
# A live replay
# ---------------------------------------------------------------------------------------------
def test_live_replay_never_shows_an_open_window_and_ends_equal_to_verify(db: Database) -> None:
    """Two symbols registered before any data (one sparse, so that its days and week are stored too);
    the feed delivers a few minutes at a time (every 1 to 4 minutes of clock) from the Sunday open,
    with some minutes held back and delivered late, some corrected; `run --once --now T` (run_once,
    the code behind it) after each delivery, across the end of a week."""
    rnd = random.Random(11)
    start = datetime(2025, 7, 13, 21, 50, 10, tzinfo=UTC)  # Sunday, ten minutes before the open
    symbols = {"EURUSD": False, "XAUUSD": True}  # symbol -> sparse
    feed_rows: dict[str, list[tuple[datetime, datetime, float]]] = {}  # symbol -> (arrives, minute, bump)
    for symbol in symbols:
        rows = []
        for ts in fx_minutes(start.replace(second=0), 1):
            if rnd.random() < 0.03:
                continue  # never delivered
            lag = timedelta(seconds=rnd.randrange(2, 40))
            if rnd.random() < 0.05:
                lag += timedelta(minutes=rnd.choice([3, 9, 47, 180]))  # late
            rows.append((ts + timedelta(minutes=1) + lag, ts, 0.0))
            if rnd.random() < 0.02:  # corrected later
                rows.append(
                    (ts + timedelta(minutes=1) + lag + timedelta(minutes=rnd.choice([2, 30])), ts, 1.5)
                )
        feed_rows[symbol] = sorted(rows)
    with db.connect(autocommit=True) as conn:
        for symbol, sparse in symbols.items():
            add_symbol(conn, symbol, sparse=sparse)
        checks = {symbol: Checker(conn, symbol, sparse) for symbol, sparse in symbols.items()}
        now = start
        end = start + timedelta(hours=5)
        taken = dict.fromkeys(symbols, 0)
        steps = 0
        while now < end and steps < 400:
            steps += 1
            for symbol in symbols:
                rows = feed_rows[symbol]
                batch = []
                while taken[symbol] < len(rows) and rows[taken[symbol]][0] <= now:
                    batch.append(rows[taken[symbol]][1:])
                    taken[symbol] += 1
                deliver(conn, batch, symbol=symbol)
            run_worker(db, now)
            for check in checks.values():
                check.check_step(now, "run --once")
            now += timedelta(minutes=rnd.choice([1, 2, 3, 4]))
        assert now >= end
        # the rest of the day's feed, then a run once every window is final
        now = start + timedelta(days=8)
        for symbol in symbols:
            deliver(conn, [r[1:] for r in feed_rows[symbol][taken[symbol] :]], symbol=symbol)
        run_worker(db, now)
        for check in checks.values():
            check.check_step(now, "the last run")
            check.assert_equals_from_scratch()
        assert pending(conn) == []
        assert sum(c.written for c in checks.values()) > 500
    for symbol, sparse in symbols.items():
        for tf in ("5m", "15m", "1h", "4h", "1d", "1w"):
            report = verify.verify(db, symbol, tf)
            assert report.ok, (symbol, tf, report.as_dict())
            assert report.equal > 0 or not sparse, (symbol, tf, report.as_dict())
