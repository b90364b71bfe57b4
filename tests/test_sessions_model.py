"""Property tests: the session engine (15_sessions.sql) equals the session model (tests/session_model.py)
on random data around the daylight-saving changes of New York, London and Sydney.

Sessions: FX (17:00 New York), a NYSE-like 09:30-16:00, London midnight-to-midnight days (23 and 25
hours), Sydney day and overnight sessions, Kolkata (a half-hour zone, a quarter-past open), a fixed
UTC-5 day, opens at 02:30 New York and 01:30 London (times that do not exist, or exist twice, on the
change days), and 24x7 (whose windows the session model cuts from days, while SQL keeps date_bin: the
two must agree). Every level 5m -> 15m/1h -> 4h/1d -> 1w/1mo is run like a worker: at each clock
value, each level in ladder order is bootstrapped, then called until `continue` is false.

A call bounded by p_max_windows may stop earlier on a session than the model's one-window-at-a-time
loop would (rows outside the session count towards the scan bound; documented in docs/decisions.md),
so calls are compared drained: the summed counts, the cursor where the task stops, and every bar.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from baragg import sessions
from baragg.db import Database
from baragg.timeframes import LADDER
from engine_support import assert_same_bars, clean, load, parse_result, sql_catch_up, store_cursor
from reference_model import Task, World
from session_model import bootstrap, catch_up
from test_engine_model import random_bar

LEVELS = ["5m", "15m", "1h", "4h", "1d", "1w", "1mo"]
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    # (the explain phase re-runs a failing example hundreds of times: minutes here)
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)

# name -> (zone, open, close, weekdays)
RULES = {
    "nyse_rule": ("America/New_York", time(9, 30), time(16, 0), (1, 2, 3, 4, 5)),
    "lon_day": ("Europe/London", time(0), time(0), (1, 2, 3, 4, 5, 6, 7)),
    "syd_day": ("Australia/Sydney", time(10), time(16), (1, 2, 3, 4, 5)),
    "syd_clock": ("Australia/Sydney", time(17), time(17), (1, 2, 3, 4, 7)),
    "kolkata": ("Asia/Kolkata", time(9, 15), time(15, 30), (1, 2, 3, 4, 5)),
    "gmt5": ("Etc/GMT+5", time(0), time(0), (1, 2, 3, 4, 5)),
    "ny_0230": ("America/New_York", time(2, 30), time(2, 30), (1, 2, 3, 4, 5, 6, 7)),
    "lon_0130": ("Europe/London", time(1, 30), time(1, 30), (1, 2, 3, 4, 5, 6, 7)),
}
SESSIONS = ["fx", "24x7", *RULES]
# The 2024 changes: US March 10 / November 3, UK March 31 / October 27, Sydney April 7 / October 6.
DST_DAYS = [date(2024, 3, 10), date(2024, 11, 3), date(2024, 3, 31), date(2024, 10, 27), date(2024, 4, 7),
            date(2024, 10, 6)]  # fmt: skip
COVERED = (date(2023, 12, 1), date(2025, 1, 31))


# (session, level) -> the windows the Python model cuts from the stored days (module-wide, not a
# fixture value: hypothesis prints fixture values with a failing example)
WINDOWS: dict[tuple[str, str], list[sessions.Window]] = {}


@pytest.fixture(scope="module")
def session_db(server_url: str, template_db: str) -> Iterator[psycopg.Connection]:
    """One database for all examples, with every session's days over 2024 (and WINDOWS filled)."""
    from conftest import create_database, drop_database, url_for

    name = f"baragg_sessions_{uuid.uuid4().hex[:10]}"
    create_database(server_url, name, template=template_db)
    try:
        with Database(url_for(server_url, name)).connect(autocommit=True) as conn:
            for sname, (tz, opening, closing, weekdays) in RULES.items():
                conn.execute(
                    "INSERT INTO agg_sessions (name, tz, open_time, close_time, weekdays) VALUES (%s, %s, %s, %s, %s)",
                    (sname, tz, opening, closing, list(weekdays)),
                )
            for sname in SESSIONS:
                sessions.ensure_days(conn, sname, *COVERED)
                row = sessions.get_session(conn, sname)
                assert row is not None and row.days_from is not None and row.days_to is not None
                days = sessions.stored_days(
                    conn, sname, datetime(2023, 11, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)
                )
                for tf in LEVELS:
                    WINDOWS[(sname, tf)] = sessions.windows(
                        days, LADDER[tf], covered=(row.days_from, row.days_to), weekdays_only=sname == "24x7"
                    )
            yield conn
    finally:
        drop_database(server_url, name)


@st.composite
def minute_blocks(draw: st.DrawFn, span_minutes: int) -> list[int]:
    """Sorted distinct minute offsets: a few blocks of varying density, anywhere in the span."""
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    out: set[int] = set()
    for _ in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, span_minutes - 1))
        length = draw(st.sampled_from([5, 30, 90, 400, 1500]))
        density = draw(st.sampled_from([1.0, 1.0, 0.9, 0.6, 0.2]))
        out.update(m for m in range(start, min(span_minutes, start + length)) if rnd.random() < density)
    return sorted(out)


SPAN_DAYS = 9


@settings(SETTINGS, max_examples=60)
@given(
    session=st.sampled_from(SESSIONS),
    dst_day=st.sampled_from(DST_DAYS),
    days_before=st.integers(0, 6),
    data=minute_blocks(SPAN_DAYS * 1440),
    seed=st.integers(0, 2**32 - 1),
    sparse=st.sampled_from([False, True, True]),
    delay=st.sampled_from([0, 30, 120]),
    agg_start=st.tuples(
        st.one_of(st.integers(-3000, 4000), st.just(-40 * 1440)), st.sampled_from([0, 0, 17])
    ),
    nows=st.lists(st.integers(0, 45 * 1440), min_size=1, max_size=3),
    max_windows=st.sampled_from([1, 3, 50, None]),
)
def test_session_ladder_equals_model(
    session_db, session, dst_day, days_before, data, seed, sparse, delay, agg_start, nows, max_windows
) -> None:
    conn = session_db
    clean(conn)
    rnd = random.Random(seed)
    base = datetime.combine(dst_day - timedelta(days=days_before), time(0), tzinfo=UTC)
    world = World(
        raw={"AAA": [random_bar(rnd, base + timedelta(minutes=m), partial_share=0.01) for m in data]}
    )
    if sparse:
        world.sparse.add("AAA")
    start = base + timedelta(minutes=agg_start[0], seconds=agg_start[1])
    for tf in LEVELS:
        world.tasks[("AAA", tf)] = Task(delay_seconds=delay, agg_start=start)
    load(conn, world, ["AAA"])
    conn.execute("UPDATE core_asset_registry_all SET session = %s", (session,))
    cursors: dict[str, datetime | None] = {}
    for now in sorted(base + timedelta(minutes=n, seconds=5) for n in nows):
        for tf in LEVELS:
            wins = WINDOWS[(session, tf)]
            if cursors.get(tf) is None:
                got = conn.execute("SELECT agg_bootstrap_cursor('AAA', %s, %s)", (tf, now)).fetchone()[0]
                assert got == bootstrap(world, "AAA", tf, wins, now), f"bootstrap {tf} at {now}"
                cursors[tf] = got
            if cursors[tf] is None:
                continue
            totals = drain(conn, tf, cursors[tf], max_windows, now)
            model = catch_up(world, "AAA", tf, cursors[tf], wins, now)
            want = {
                "windows_processed": model.windows_processed,
                "bars_created": model.bars_created,
                "bars_quality_poor": model.bars_quality_poor,
                "bars_skipped": model.bars_skipped,
                "gaps_skipped": model.gaps_skipped,
                "cursor_advanced_to": model.cursor_advanced_to,
            }
            assert totals == want, f"{session} {tf} from {cursors[tf]} at {now}"
            for key in ("bars_created", "bars_skipped", "gaps_skipped", "bars_quality_poor"):
                if totals[key]:
                    event(f"{tf}: {key} > 0")
            cursors[tf] = totals["cursor_advanced_to"]
            store_cursor(conn, world, "AAA", tf, cursors[tf])
    assert_same_bars(conn, world)


def drain(
    conn: psycopg.Connection, tf: str, cursor: datetime, max_windows: int | None, now: datetime
) -> dict:
    """Call catchup_aggregation_range until `continue` is false; the summed counts and the last cursor."""
    keys = ("windows_processed", "bars_created", "bars_quality_poor", "bars_skipped", "gaps_skipped")
    totals = dict.fromkeys(keys, 0)
    for _ in range(10_000):
        result = parse_result(sql_catch_up(conn, "AAA", tf, cursor, max_windows, now))
        for key in keys:
            totals[key] += result[key]
        assert result["cursor_advanced_to"] >= cursor
        cursor = result["cursor_advanced_to"]
        conn.execute(
            "UPDATE data_agg_state SET last_agg_bar_ts_utc = %s WHERE canonical_symbol = 'AAA' AND timeframe = %s",
            (cursor, tf),
        )
        if not result["continue"]:
            break
    else:
        pytest.fail("the catch-up never stopped")
    return {**totals, "cursor_advanced_to": cursor}
