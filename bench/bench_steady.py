"""Steady-state benchmark: N symbols x the two mandatory tasks (5m, 1h) at the live edge, one new window
each, timed three ways: `run_once` in process, the whole `baragg run --once` process, and one tick of
the daemon (its claim loop on a warm pooled connection).

    .venv/bin/python bench/bench_steady.py [--sizes 100,1000,5000] [--ticks 3]

For each size: N symbols caught up to 10:55 of a Monday; each timed tick first adds the minutes
:55-:59 of the hour (one new 5m window per symbol, and the hour becomes complete) and then runs at
hh+1:01, so every tick does the same work: N 5m windows and N 1h windows (2N task runs) plus the
registry sync. Between ticks (untimed) the next 55 minutes are added and caught up. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

from _common import add_symbols, header, load, med, scratch_database
from baragg import worker
from baragg.db import Database

DAY = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday

ADD_MINUTES = """
INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count, source)
SELECT sym, '1m', ts, p, p + 0.75, p - 0.5, p + 0.25, 1 + m %% 7, p + 0.1, 1 + m %% 3, 'bench'
FROM unnest(%(symbols)s::text[]) AS sym,
     generate_series(%(start)s::timestamptz, %(end)s::timestamptz - interval '1 minute', interval '1 minute') AS ts,
     LATERAL (SELECT (extract(epoch FROM ts) / 60)::bigint AS m) AS mm,
     LATERAL (SELECT 100 + (m * 7 + length(sym) * 13) %% 29 + (m %% 1440) / 100.0 AS p) AS pp
"""


def add_minutes(db: Database, symbols: list[str], start: datetime, end: datetime) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(ADD_MINUTES, {"symbols": symbols, "start": start, "end": end})
        conn.execute("ANALYZE data_bars, derived_data_bars, data_agg_state")


def tick_in_process(db: Database, now: datetime) -> tuple[float, int]:
    t0 = time.perf_counter()
    summary = worker.run_once(db, now=now)
    return time.perf_counter() - t0, summary.totals["windows"]


def tick_process(db: Database, now: datetime) -> tuple[float, int]:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "baragg.cli", "run", "--once", "--now", now.isoformat()],
        env={**os.environ, "DATABASE_URL": db.url},
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0, -1


class Daemon:
    """The daemon's tick (Worker._loop's body: sync, then claim rounds until none is due) on a pool
    connection kept open between ticks, with the clock fixed like run_once's."""

    def __init__(self, db: Database) -> None:
        self.pool = db.pool(min_size=1, max_size=2, name="bench-daemon")
        self.pool.open(wait=True, timeout=30)
        self.settings = worker._Settings()
        self.claimer = worker._Claimer(
            worker._autocommit(self.pool), self.settings, worker.new_worker_id("bench"), threading.Event()
        )

    def tick(self, now: datetime) -> tuple[float, int]:
        self.settings.now = now
        t0 = time.perf_counter()
        self.claimer.sync()
        windows = 0
        for _ in range(10_000):  # a round claims every due task; far fewer rounds end a tick
            if not (results := self.claimer.run_round()):
                break
            windows += sum(r.windows for r in results)
        else:
            raise SystemExit(f"tick at {now}: tasks still due after 10,000 claim rounds")
        return time.perf_counter() - t0, windows

    def close(self) -> None:
        self.pool.close()


def bench_size(n: int, ticks: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {
        "run_once (in process)": [],
        "baragg run --once (process)": [],
        "daemon tick": [],
    }
    with scratch_database() as db:
        symbols = [f"S{i:05d}" for i in range(n)]
        with db.connect() as conn:
            add_symbols(conn, symbols, all_levels=False)
            conn.commit()
        add_minutes(db, symbols, DAY + timedelta(hours=9), DAY + timedelta(hours=10, minutes=55))
        worker.run_once(db, now=DAY + timedelta(hours=10, minutes=56))
        daemon = Daemon(db)
        hour = DAY + timedelta(hours=10)
        modes = [
            ("run_once (in process)", lambda now: tick_in_process(db, now)),
            ("baragg run --once (process)", lambda now: tick_process(db, now)),
            ("daemon tick", daemon.tick),
        ]
        try:
            for _ in range(ticks):
                for name, fn in modes:
                    add_minutes(db, symbols, hour + timedelta(minutes=55), hour + timedelta(minutes=60))
                    seconds, windows = fn(hour + timedelta(hours=1, minutes=1))
                    assert windows in (-1, 2 * n), (name, windows)
                    times[name].append(seconds)
                    hour += timedelta(hours=1)
                    add_minutes(db, symbols, hour, hour + timedelta(minutes=55))  # untimed
                    worker.run_once(db, now=hour + timedelta(minutes=56))
            with db.connect() as conn:
                assert (
                    conn.execute(
                        "SELECT count(*) FROM data_agg_state WHERE last_agg_bar_ts_utc IS DISTINCT FROM"
                        " CASE timeframe WHEN '5m' THEN %s::timestamptz + interval '55 minutes' ELSE %s END",
                        (hour, hour),
                    ).fetchone()[0]
                    == 0
                )
                head = header(conn, LOAD_AT_START)
        finally:
            daemon.close()
    print(head)
    return times


LOAD_AT_START = load()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--ticks", type=int, default=3, help="timed ticks per mode and size")
    args = parser.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        times = bench_size(n, args.ticks)
        for name, values in times.items():
            rows.append((n, name, med(values), values))
            print(
                f"{n} symbols, {name}: median {med(values):.3f}s ({', '.join(f'{v:.3f}' for v in values)})",
                flush=True,
            )
    print()
    print("| symbols | tasks | what | median seconds | per task (ms) |")
    print("|---|---|---|---|---|")
    for n, name, m, _ in rows:
        print(f"| {n:,} | {2 * n:,} | {name} | {m:.3f} | {1000 * m / (2 * n):.3f} |")


if __name__ == "__main__":
    main()
