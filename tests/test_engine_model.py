"""Property tests: the set-based SQL catch-up equals the reference model (DESIGN.md 4) on random data.

Each example writes a random world (bars with gaps, holes, partial and soft-deleted rows, NULL
volumes, sparse assets, odd agg_start values, delays, cursors) into one database, cleaned between
examples, then calls the functions the way a worker does and compares every result and every
derived bar with tests/reference_model.py.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from baragg.db import Database
from baragg.timeframes import LADDER
from engine_support import as_dict, assert_same_bars, clean, load, parse_result, sql_catch_up, store_cursor
from reference_model import Bar, Task, World, bootstrap, catch_up, chain_below, reaggregate, source_task_waits

BASE = datetime(2025, 7, 7, tzinfo=UTC)  # a Monday
LADDER_ORDER = ["5m", "15m", "1h", "4h", "1d", "1w"]
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    derandomize=False,
)


@pytest.fixture(scope="module")
def model_db(server_url: str, template_db: str) -> Iterator[psycopg.Connection]:
    """One database for all examples of this module (tables are emptied between examples)."""
    import uuid

    from conftest import create_database, drop_database, url_for

    name = f"baragg_model_{uuid.uuid4().hex[:10]}"
    create_database(server_url, name, template=template_db)
    try:
        with Database(url_for(server_url, name)).connect(autocommit=True) as conn:
            yield conn
    finally:
        drop_database(server_url, name)


def random_bar(rnd: random.Random, ts: datetime, partial_share: float = 0.05) -> Bar:
    open_, close = round(rnd.uniform(1, 2), 6), round(rnd.uniform(1, 2), 6)
    vol = rnd.choice([None, 0.0, round(rnd.uniform(0, 50), 3), round(rnd.uniform(0, 50), 3)])
    return Bar(
        ts=ts,
        open=open_,
        high=round(max(open_, close) + rnd.uniform(0, 0.1), 6),
        low=round(min(open_, close) - rnd.uniform(0, 0.1), 6),
        close=close,
        vol=vol,
        vwap=rnd.choice([None, round(rnd.uniform(1, 2), 6), round(rnd.uniform(1, 2), 6)]),
        trade_count=rnd.choice([None, rnd.randint(0, 40), rnd.randint(0, 40)]),
        is_partial=rnd.random() < partial_share,
    )


@st.composite
def offsets(draw: st.DrawFn, max_blocks: int = 6, max_len: int = 40) -> list[int]:
    """Sorted distinct offsets (in source-bar units): blocks of varying density separated by gaps
    from none to weekend-sized holes."""
    rnd = draw(st.randoms(use_true_random=False))
    out: list[int] = []
    position = draw(st.integers(0, 30))
    for _ in range(draw(st.integers(1, max_blocks))):
        length = draw(st.integers(1, max_len))
        density = draw(st.sampled_from([1.0, 1.0, 0.9, 0.7, 0.4]))
        out += [position + i for i in range(length) if rnd.random() < density]
        position += length + draw(st.sampled_from([0, 1, 2, 7, 13, 61, 600, 3000]))
    return out


minutes = st.integers


def at(minute: int, seconds: int = 0) -> datetime:
    return BASE + timedelta(minutes=minute, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# 5m from 1m: one task, repeated calls as a worker would make them
# ---------------------------------------------------------------------------------------------
@settings(SETTINGS, max_examples=120)
@given(
    data_offsets=offsets(),
    seed=st.integers(0, 2**32 - 1),
    sparse=st.booleans(),
    has_task=st.booleans(),
    delay=st.sampled_from([0, 0, 45, 300, 3600]),
    agg_start=st.tuples(minutes(-120, 400), st.sampled_from([0, 0, 17])),
    cursor=st.one_of(st.none(), st.tuples(minutes(-120, 500), st.sampled_from([0, 0, 0, 30]))),
    nows=st.lists(st.tuples(minutes(0, 9000), st.integers(0, 59)), min_size=1, max_size=3),
    max_windows=st.sampled_from([1, 2, 3, 7, 100, None]),
    ignore_confirmation=st.sampled_from([False, False, False, True]),
)
def test_5m_catch_up_equals_model(
    model_db, data_offsets, seed, sparse, has_task, delay, agg_start, cursor, nows, max_windows,
    ignore_confirmation,
) -> None:  # fmt: skip
    conn = model_db
    clean(conn)
    rnd = random.Random(seed)
    world = World(raw={"AAA": [random_bar(rnd, at(m)) for m in data_offsets]})
    if sparse:
        world.sparse.add("AAA")
    if has_task:
        world.tasks[("AAA", "5m")] = Task(delay_seconds=delay, agg_start=at(*agg_start))
    load(conn, world, ["AAA"])
    run_worker_rounds(conn, world, "AAA", ["5m"], sorted(at(*n) for n in nows), max_windows, cursor,
                      ignore_confirmation)  # fmt: skip
    assert_same_bars(conn, world)


def note(tf: str, result: dict) -> None:
    """Statistics (pytest --hypothesis-show-statistics) showing that the examples reach each rule."""
    for key in ("bars_created", "bars_skipped", "gaps_skipped", "bars_quality_poor"):
        if result[key]:
            event(f"{tf}: {key} > 0")
    if result["continue"]:
        event(f"{tf}: continue")


def run_worker_rounds(
    conn: psycopg.Connection,
    world: World,
    symbol: str,
    timeframes: list[str],
    nows: list[datetime],
    max_windows: int | None,
    first_cursor: tuple[int, int] | None = None,
    ignore_confirmation: bool = False,
) -> None:
    """Each round (a clock value), each timeframe in ladder order: bootstrap if needed, then call
    until `continue` is false, storing the cursor after each call as the worker does."""
    cursors: dict[str, datetime] = {}
    if first_cursor is not None:
        cursors[timeframes[0]] = at(*first_cursor)
    for now in nows:
        for tf in timeframes:
            if tf not in cursors:
                got = conn.execute("SELECT agg_bootstrap_cursor(%s, %s, %s)", (symbol, tf, now)).fetchone()[0]
                assert got == bootstrap(world, symbol, tf, now), f"bootstrap {tf}"
                cursors[tf] = got
            for _ in range(200):
                sql = parse_result(
                    sql_catch_up(conn, symbol, tf, cursors[tf], max_windows, now, ignore_confirmation)
                )
                model = as_dict(
                    catch_up(world, symbol, tf, cursors[tf], max_windows, now, 1, ignore_confirmation)
                )
                assert sql == model, f"{tf} from {cursors[tf]} at {now}"
                note(tf, sql)
                cursors[tf] = sql["cursor_advanced_to"]
                if (symbol, tf) in world.tasks:
                    store_cursor(conn, world, symbol, tf, cursors[tf])
                if not sql["continue"]:
                    break
            else:
                raise AssertionError(f"{tf} at {now}: `continue` still true after 200 calls")


# ---------------------------------------------------------------------------------------------
# One derived timeframe from directly written source bars (partial, soft-deleted), with the
# source task's cursor anywhere (rule 3) and its own source bars at random places.
# ---------------------------------------------------------------------------------------------
@settings(SETTINGS, max_examples=120)
@given(
    tf_name=st.sampled_from(["15m", "1h", "4h", "1d", "1w"]),
    source_offsets=offsets(max_blocks=5, max_len=30),
    sos_offsets=offsets(max_blocks=3, max_len=20),
    seed=st.integers(0, 2**32 - 1),
    sparse=st.booleans(),
    source_task=st.sampled_from(["none", "null_cursor", "cursor"]),
    source_cursor=st.integers(-5, 200),
    delay=st.sampled_from([0, 60, 3600]),
    agg_start=st.integers(-40, 40),
    nows=st.lists(st.integers(0, 400), min_size=1, max_size=3),
    max_windows=st.sampled_from([1, 2, 5, 100, None]),
)
def test_derived_catch_up_equals_model(
    model_db, tf_name, source_offsets, sos_offsets, seed, sparse, source_task, source_cursor, delay,
    agg_start, nows, max_windows,
) -> None:  # fmt: skip
    conn = model_db
    clean(conn)
    rnd = random.Random(seed)
    tf = LADDER[tf_name]
    source_step = tf.interval / tf.max_source_bars  # the source timeframe's interval
    start = tf.bucket_start(BASE) - 3 * tf.interval
    world = World()
    source_bars: dict[datetime, Bar] = {}
    for k in source_offsets:
        bar = random_bar(rnd, start + k * source_step, partial_share=0.08)
        if rnd.random() < 0.08:
            world.deleted.append(("AAA", tf.source, replace(bar, deleted=True)))
            if rnd.random() < 0.5:
                continue  # only a deleted row at this time
        source_bars[bar.ts] = bar
    world.derived[("AAA", tf.source)] = source_bars
    # The source task's own source: 1m bars for 15m/1h, derived bars otherwise.
    sos_tf = LADDER[tf.source].source
    sos_step = timedelta(minutes=1) if sos_tf == "1m" else LADDER[sos_tf].interval
    sos = {start + k * sos_step: random_bar(rnd, start + k * sos_step, 0.1) for k in sos_offsets}
    if sos_tf == "1m":
        world.raw["AAA"] = list(sos.values())
    else:
        world.derived[("AAA", sos_tf)] = sos
    if source_task != "none":
        cursor = None if source_task == "null_cursor" else start + source_cursor * source_step
        world.tasks[("AAA", tf.source)] = Task(cursor=cursor)
    world.tasks[("AAA", tf_name)] = Task(delay_seconds=delay, agg_start=start + agg_start * source_step)
    if sparse:
        world.sparse.add("AAA")
    load(conn, world, ["AAA"])
    clock = sorted(start + n * source_step + timedelta(seconds=7) for n in nows)
    cursors: dict[str, datetime] = {}
    for now in clock:
        if tf_name not in cursors:
            got = conn.execute("SELECT agg_bootstrap_cursor('AAA', %s, %s)", (tf_name, now)).fetchone()[0]
            assert got == bootstrap(world, "AAA", tf_name, now)
            cursors[tf_name] = got
        for _ in range(100):
            sql = parse_result(sql_catch_up(conn, "AAA", tf_name, cursors[tf_name], max_windows, now))
            model = as_dict(catch_up(world, "AAA", tf_name, cursors[tf_name], max_windows, now))
            assert sql == model
            note(tf_name, sql)
            if source_task != "none" and source_task_waits(
                world, "AAA", tf, sql["cursor_advanced_to"] + tf.interval
            ):
                event(f"{tf_name}: stopped waiting on the source task")
            cursors[tf_name] = sql["cursor_advanced_to"]
            store_cursor(conn, world, "AAA", tf_name, cursors[tf_name])
            if not sql["continue"]:
                break
        else:
            raise AssertionError(f"{tf_name} at {now}: `continue` still true after 100 calls")
    assert_same_bars(conn, world)


# ---------------------------------------------------------------------------------------------
# The whole ladder 5m -> 15m/1h -> 4h/1d -> 1w over days of FX-like 1m data, run like a worker
# at several clock values.
# ---------------------------------------------------------------------------------------------
@st.composite
def fx_days(draw: st.DrawFn) -> tuple[int, list[int]]:
    """Minute offsets of 1m bars over a few days: closed Friday 21:00 to Sunday 22:00, random
    dropped minutes, outages of minutes to hours, and a random overall density."""
    first_day = draw(st.integers(-3, 2))
    days = draw(st.integers(2, 10))
    density = draw(st.sampled_from([1.0, 0.95, 0.8, 0.5]))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    outages = [
        (rnd.randrange(days * 1440), rnd.choice([3, 20, 90, 300])) for _ in range(draw(st.integers(0, 4)))
    ]
    out = []
    for m in range(first_day * 1440, (first_day + days) * 1440):
        ts = at(m)
        weekday, minute_of_day = ts.weekday(), ts.hour * 60 + ts.minute
        closed = (
            (weekday == 4 and minute_of_day >= 21 * 60)
            or weekday == 5
            or (weekday == 6 and minute_of_day < 22 * 60)
        )
        if closed or any(s <= m - first_day * 1440 < s + d for s, d in outages):
            continue
        if rnd.random() < density:
            out.append(m)
    return first_day, out


@settings(SETTINGS, max_examples=25)
@given(
    fx=fx_days(),
    seed=st.integers(0, 2**32 - 1),
    sparse=st.booleans(),
    delay=st.sampled_from([0, 30, 120]),
    agg_start=st.tuples(minutes(-4000, 1500), st.sampled_from([0, 0, 11])),
    nows=st.lists(st.integers(0, 16 * 1440), min_size=1, max_size=4),
    max_windows=st.sampled_from([60, 1000, None]),
)
def test_ladder_chain_equals_model(model_db, fx, seed, sparse, delay, agg_start, nows, max_windows) -> None:
    conn = model_db
    clean(conn)
    rnd = random.Random(seed)
    first_day, data_offsets = fx
    world = World(raw={"AAA": [random_bar(rnd, at(m), partial_share=0.002) for m in data_offsets]})
    if sparse:
        world.sparse.add("AAA")
    for tf in LADDER_ORDER:
        world.tasks[("AAA", tf)] = Task(delay_seconds=delay, agg_start=at(*agg_start))
    load(conn, world, ["AAA"])
    clock = sorted(at(first_day * 1440 + n, 5) for n in nows)
    run_worker_rounds(conn, world, "AAA", LADDER_ORDER, clock, max_windows)
    assert_same_bars(conn, world)


# ---------------------------------------------------------------------------------------------
# Many symbols at once: agg_catchup_tasks equals one catchup_aggregation_range per symbol.
# ---------------------------------------------------------------------------------------------
@settings(SETTINGS, max_examples=30)
@given(
    per_symbol=st.lists(
        st.tuples(offsets(max_blocks=4), st.booleans(), st.integers(-20, 200)), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**32 - 1),
    now=st.integers(0, 6000),
    max_windows=st.sampled_from([1, 3, 100, None]),
)
def test_multi_task_equals_model(model_db, per_symbol, seed, now, max_windows) -> None:
    conn = model_db
    clean(conn)
    rnd = random.Random(seed)
    world = World()
    symbols, cursors = [], []
    for i, (data_offsets, sparse, cursor) in enumerate(per_symbol):
        symbol = f"S{i}"
        symbols.append(symbol)
        world.raw[symbol] = [random_bar(rnd, at(m)) for m in data_offsets]
        if sparse:
            world.sparse.add(symbol)
        world.tasks[(symbol, "5m")] = Task(agg_start=at(-30))
        cursors.append(None if cursor < 0 else at(cursor))
    load(conn, world, symbols)
    clock = at(now, 3)
    rows = conn.execute(
        "SELECT canonical_symbol, result FROM agg_catchup_tasks('5m', %s, %s::timestamptz[], %s, %s)",
        (symbols, cursors, max_windows, clock),
    ).fetchall()
    assert [r[0] for r in rows] == symbols
    for (symbol, result), cursor in zip(rows, cursors, strict=True):
        start = cursor if cursor is not None else bootstrap(world, symbol, "5m", clock)
        assert parse_result(result) == as_dict(catch_up(world, symbol, "5m", start, max_windows, clock))
    assert_same_bars(conn, world)


# ---------------------------------------------------------------------------------------------
# Final means final (issue 11): rule 3 recursive down the whole chain, logged windows of the tasks
# below counting as unprocessed input, and the re-aggregation of logged windows obeying finality.
# Every level from the target's source down to the 1m rows gets random bars; every task below the
# target gets a random cursor (or none, or no task row) and random logged windows; the target gets
# logged windows before and after its cursor, and the tasks built from it get cursors (so the
# target's writes are logged for them). catchup_aggregation_range (re-aggregation, then catch-up)
# must equal the model's reaggregate + catch_up: results, bars, and the invalidation log.
# ---------------------------------------------------------------------------------------------
def level_step(tf_name: str) -> timedelta:
    return timedelta(minutes=1) if tf_name == "1m" else LADDER[tf_name].interval


def db_pending(conn: psycopg.Connection) -> set[tuple[str, str, datetime]]:
    return set(
        conn.execute("SELECT canonical_symbol, timeframe, window_start FROM agg_invalidations").fetchall()
    )


def model_pending(world: World) -> set[tuple[str, str, datetime]]:
    return {(s, tf, ws) for (s, tf), windows in world.pending.items() for ws in windows}


@settings(SETTINGS, max_examples=int(os.environ.get("BARAGG_CHAIN_EXAMPLES", "80")))
@given(
    tf_name=st.sampled_from(["15m", "1h", "4h", "1d", "1w"]),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    sparse=st.booleans(),
    delay=st.sampled_from([0, 60, 3600]),
    max_windows=st.sampled_from([1, 3, 100, None]),
)
def test_recursive_rule_3_and_final_logged_windows_equal_model(
    model_db, tf_name, data, seed, sparse, delay, max_windows
) -> None:
    conn = model_db
    clean(conn)
    conn.execute("DELETE FROM agg_invalidations")
    rnd = random.Random(seed)
    tf = LADDER[tf_name]
    start = tf.bucket_start(BASE) - 2 * tf.interval
    world = World()
    # bars of every level below the target, down to the 1m rows
    levels = [tf.source, *chain_below(tf.source), "1m"]
    for level in levels:
        step = level_step(level)
        # rows in units of the level, a little before the target's first window to well after it
        stamps = data.draw(offsets(max_blocks=4, max_len=25), label=f"{level} rows")
        bars = {start + k * step: random_bar(rnd, start + k * step, 0.05) for k in stamps}
        if level == "1m":
            world.raw["AAA"] = list(bars.values())
        else:
            world.derived[("AAA", level)] = bars
    span = 6 * tf.interval
    # the tasks below: no row, a NULL cursor, or a cursor somewhere; logged windows somewhere
    for lower in chain_below(tf_name):
        kind = data.draw(
            st.sampled_from(["none", "null", "cursor", "cursor", "done", "done", "done"]),
            label=f"{lower} task",
        )
        if kind == "none":
            continue
        step = LADDER[lower].interval
        cursor = None
        if kind == "cursor":
            cursor = start + data.draw(st.integers(-2, span // step), label=f"{lower} cursor") * step
        elif kind == "done":  # caught up past every row of the example
            cursor = LADDER[lower].bucket_start(start + 400 * span)
        world.tasks[("AAA", lower)] = Task(cursor=cursor)
        logged = data.draw(st.lists(st.integers(-2, span // step), max_size=2), label=f"{lower} logged")
        if logged and cursor is not None:
            world.pending[("AAA", lower)] = {start + k * step for k in logged}
    # the target: a cursor, logged windows before (and some after) it
    cursor = start + data.draw(st.integers(1, 5), label="cursor") * tf.interval
    world.tasks[("AAA", tf_name)] = Task(cursor=cursor, delay_seconds=delay, agg_start=start)
    logged = data.draw(st.lists(st.integers(-1, 5), min_size=1, max_size=4), label="logged")
    if logged:
        world.pending[("AAA", tf_name)] = {start + k * tf.interval for k in logged}
    # stored bars of the target in some of those windows (what a re-aggregation rewrites or withdraws)
    stored = {}
    for k in data.draw(st.lists(st.integers(-1, 5), max_size=3), label="stored"):
        ws = start + k * tf.interval
        stored[ws] = replace(random_bar(rnd, ws, 0.0), source_candles=1, expected_candles=tf.expected_source_bars,
                             quality_score=-1, source_timeframe=tf.source, derivation_version=1)  # fmt: skip
    world.derived[("AAA", tf_name)] = stored
    # the tasks built from the target, with cursors, so that its writes are logged for them
    for parent in LADDER_ORDER:  # the date_bin ladder (1mo windows come from a session's trading days)
        ptf = LADDER[parent]
        if ptf.source == tf_name:
            world.tasks[("AAA", parent)] = Task(cursor=ptf.bucket_start(start + span))
    if sparse:
        world.sparse.add("AAA")
    load(conn, world, ["AAA"])
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO agg_invalidations (canonical_symbol, timeframe, window_start, reason) VALUES (%s, %s, %s, 'test')",
            sorted(model_pending(world)),
        )
    minutes = (span + 2 * tf.interval) // timedelta(minutes=1)
    now = start + data.draw(st.one_of(st.just(minutes), st.integers(0, minutes)), label="now") * timedelta(
        minutes=1
    )

    (got,) = conn.execute(
        "SELECT catchup_aggregation_range(p_symbol => 'AAA', p_to_tf => %s, p_start_cursor_utc => %s,"
        " p_max_windows => %s, p_now_utc => %s)",
        (tf_name, cursor, max_windows, now),
    ).fetchone()
    late = reaggregate(world, "AAA", tf_name, now)
    model = catch_up(world, "AAA", tf_name, cursor, max_windows, now)
    expected_late = {k: getattr(late, k) for k in (
        "windows", "bars_created", "bars_rewritten", "bars_unchanged", "bars_withdrawn", "bars_quality_poor",
        "bars_reaggregated", "entries_dropped", "entries_waiting")}  # fmt: skip
    assert {k: got["reaggregated"][k] for k in expected_late} == expected_late
    assert parse_result(got) == as_dict(model)
    assert_same_bars(conn, world)
    assert db_pending(conn) == model_pending(world)
    if late.entries_waiting:
        event(f"{tf_name}: logged windows waiting")
    if late.windows:
        event(f"{tf_name}: logged windows re-aggregated")
    if model.bars_created + model.bars_rewritten + model.bars_withdrawn:
        event(f"{tf_name}: catch-up wrote")
    if model.windows_processed == 0 and model.cursor_advanced_to + tf.interval <= now - timedelta(
        seconds=delay
    ):
        event(f"{tf_name}: catch-up held back by the chain")
