"""Shared by the finality tests (issue 11): the seed's RPC loop, snapshots of the derived bars, and
the two checks every step must pass.

* ``seed_cron_run`` drives baragg exactly as the seed's TypeScript worker does (seed E.3): sync,
  ``agg_get_due_tasks(p_env_name, p_limit => 10)``, then per task ``agg_start``,
  ``agg_bootstrap_cursor`` when the cursor is NULL, ``catchup_aggregation_range(..., p_max_windows
  => 100, p_derivation_version => 1)`` and ``agg_finish(p_success, p_new_cursor_utc, p_stats)``, each
  call its own transaction (autocommit, as each RPC is). The one difference: every call gets
  ``p_now_utc`` (the seed's calls take the database clock), so that the tests replay a fixed clock.
* ``check_step`` after every step: no derived bar for a window that is not final yet (its end plus
  the task's delay has not passed), and every bar written (inserted or changed) or withdrawn during
  the step equals what a from-scratch aggregation of the 1m rows stored at that moment gives. A bar
  built before the levels below it were complete (rule 3) would differ; so would one rewritten
  although its sources did not change (that also shows as a new row version with equal values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from baragg.timeframes import LADDER
from reference_model import Bar, from_scratch

SNAPSHOT = """
SELECT timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, source_candles, expected_candles,
       quality_score, xmin::text
FROM derived_data_bars
WHERE canonical_symbol = %s AND deleted_at IS NULL
"""
VALUES = slice(0, 10)  # open .. quality_score (the row version is the last column)


def seed_cron_run(
    conn: psycopg.Connection,
    now: datetime,
    env: str = "prod",
    between: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """One run of the seed's worker (seed E.3) at the clock ``now``; what it did, summed.
    ``between(i)`` runs after the i-th task's catch-up and before its agg_finish (another
    transaction, as with RPC): a test delivers rows there."""
    conn.execute("SELECT sync_agg_state_from_registry(p_env_name => %s, p_now_utc => %s)", (env, now))
    tasks = conn.execute(
        "SELECT canonical_symbol, timeframe, last_agg_bar_ts_utc"
        " FROM agg_get_due_tasks(p_env_name => %s, p_limit => 10, p_now_utc => %s)",
        (env, now),
    ).fetchall()
    done = {"tasks": 0, "windows": 0, "reaggregated": 0, "failed": 0}
    for symbol, timeframe, cursor in tasks:
        try:
            conn.execute(
                "SELECT agg_start(p_symbol => %s, p_to_tf => %s, p_now_utc => %s)", (symbol, timeframe, now)
            )
            if cursor is None:
                (cursor,) = conn.execute(
                    "SELECT agg_bootstrap_cursor(p_symbol => %s, p_to_tf => %s, p_now_utc => %s)",
                    (symbol, timeframe, now),
                ).fetchone()
            (result,) = conn.execute(
                "SELECT catchup_aggregation_range(p_symbol => %s, p_to_tf => %s, p_start_cursor_utc => %s,"
                " p_max_windows => 100, p_now_utc => %s, p_derivation_version => 1)",
                (symbol, timeframe, cursor, now),
            ).fetchone()
            if between is not None:
                between(done["tasks"] + done["failed"])
            conn.execute(
                "SELECT agg_finish(p_symbol => %s, p_to_tf => %s, p_success => true, p_new_cursor_utc => %s,"
                " p_stats => %s, p_now_utc => %s)",
                (
                    symbol,
                    timeframe,
                    result["cursor_advanced_to"],
                    Jsonb({k: result[k] for k in ("windows_processed", "bars_created", "bars_quality_poor")}),
                    now,
                ),
            )
        except psycopg.Error as exc:  # the seed records the failure and goes on
            done["failed"] += 1
            conn.execute(
                "SELECT agg_finish(p_symbol => %s, p_to_tf => %s, p_success => false, p_fail_kind => 'hard',"
                " p_error => %s, p_now_utc => %s)",
                (symbol, timeframe, str(exc), now),
            )
            continue
        done["tasks"] += 1
        done["windows"] += result["windows_processed"]
        done["reaggregated"] += result.get("reaggregated", {}).get("windows", 0)
    return done


def raw_rows(conn: psycopg.Connection, symbol: str) -> list[Bar]:
    rows = conn.execute(
        "SELECT ts_utc, open, high, low, close, vol, vwap, trade_count, is_partial FROM data_bars"
        " WHERE canonical_symbol = %s AND timeframe = '1m' ORDER BY ts_utc",
        (symbol,),
    ).fetchall()
    return [Bar(*r) for r in rows]


def snapshot(conn: psycopg.Connection, symbol: str) -> dict[tuple[str, datetime], tuple]:
    return {(r[0], r[1]): tuple(r[2:]) for r in conn.execute(SNAPSHOT, (symbol,)).fetchall()}


_TRUTH: dict[tuple[str, bool], tuple[list[Bar], dict[tuple[str, datetime], tuple]]] = {}


def truth(conn: psycopg.Connection, symbol: str, sparse: bool) -> dict[tuple[str, datetime], tuple]:
    """The bars a from-scratch aggregation of the stored 1m rows gives (every window complete).
    Recomputed only when the 1m rows changed since the last call for the symbol."""
    raw = raw_rows(conn, symbol)
    cached = _TRUTH.get((symbol, sparse))
    if cached is not None and cached[0] == raw:
        return cached[1]
    bars = {
        key: (
            b.open,
            b.high,
            b.low,
            b.close,
            b.vol,
            b.vwap,
            b.trade_count,
            b.source_candles,
            b.expected_candles,
            b.quality_score,
        )
        for key, b in from_scratch(raw, {}, sparse, symbol).items()
    }
    _TRUTH[(symbol, sparse)] = (raw, bars)
    return bars


def same(a: tuple, b: tuple) -> bool:
    """Equal bar values; vol and vwap are sums, added up in another order by PostgreSQL."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9):
                return False
        elif x != y:
            return False
    return True


def delays(conn: psycopg.Connection, symbol: str) -> dict[str, timedelta]:
    return {
        tf: timedelta(seconds=d or 0)
        for tf, d in conn.execute(
            "SELECT timeframe, aggregation_delay_seconds FROM data_agg_state WHERE canonical_symbol = %s",
            (symbol,),
        )
    }


@dataclass
class Checker:
    """Follows one symbol's derived bars from step to step (see the module docstring)."""

    conn: psycopg.Connection
    symbol: str
    sparse: bool
    before: dict[tuple[str, datetime], tuple] | None = None
    steps: int = 0
    written: int = 0

    def check_step(self, now: datetime, what: str) -> None:
        self.steps += 1
        after = snapshot(self.conn, self.symbol)
        delay = delays(self.conn, self.symbol)
        for tf, ts in after:
            final_at = ts + LADDER[tf].interval + delay.get(tf, timedelta(0))
            assert final_at <= now, (
                f"after {what} at {now}: a {tf} bar for {ts}, a window final only at {final_at}"
            )
        before = self.before or {}
        changed = {key for key, row in after.items() if before.get(key) != row}
        gone = set(before) - set(after)
        if changed or gone:
            expected = truth(self.conn, self.symbol, self.sparse)
            for key in sorted(changed):
                self.written += 1
                old = before.get(key)
                assert old is None or not same(old[VALUES], after[key][VALUES]), (
                    f"after {what} at {now}: {key} rewritten with equal values"
                )
                assert key in expected, f"after {what} at {now}: {key} written, but no such bar from scratch"
                assert same(after[key][VALUES], expected[key]), (
                    f"after {what} at {now}: {key} written as {after[key][VALUES]}, from scratch {expected[key]}"
                )
            for key in sorted(gone):
                assert key not in expected, (
                    f"after {what} at {now}: {key} withdrawn, but from scratch it exists"
                )
        self.before = after

    def assert_equals_from_scratch(self) -> None:
        """Every bar equals a from-scratch aggregation, and the counts add up: bars created minus
        bars withdrawn is what is stored (every caller counts what it writes)."""
        got = snapshot(self.conn, self.symbol)
        (balance,) = self.conn.execute(
            "SELECT sum(total_bars_created - total_bars_withdrawn) FROM data_agg_state WHERE canonical_symbol = %s",
            (self.symbol,),
        ).fetchone()
        assert balance == len(got), f"created - withdrawn = {balance}, stored {len(got)}"
        expected = truth(self.conn, self.symbol, self.sparse)
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        assert not missing and not extra, f"missing {missing}, extra {extra}"
        different = [k for k in expected if not same(got[k][VALUES], expected[k])][:5]
        assert not different, f"different: {[(k, got[k][VALUES], expected[k]) for k in different]}"


def pending(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT canonical_symbol, timeframe, window_start FROM agg_invalidations ORDER BY 1, 2, 3"
    ).fetchall()
