"""Freshness benchmark: with the daemon running (`baragg worker` in a subprocess, real clock), how long
after a 5m window becomes final (window end + aggregation delay) are its bars committed, for N symbols?

    .venv/bin/python bench/bench_freshness.py [--symbols 1000] [--samples 2] [--interval 10]

A feeder plays the data provider: at every minute boundary it inserts the minute that just ended for
every symbol (so the last minute of a 5m window arrives the moment the window closes). The bench polls
derived_data_bars every 20 ms and records when all N bars of the window are visible (committed), and
the transaction time the worker stamped on them (created_at). The tasks keep the delay the registry
sync gives them (30 s for 5m). Each sample waits for a real 5-minute boundary, so a run takes
about 5 minutes per sample.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta

from _common import add_symbols, header, load, med, scratch_database
from baragg.db import Database
from bench_steady import ADD_MINUTES


def floor_minutes(ts: datetime, minutes: int) -> datetime:
    return ts.replace(second=0, microsecond=0, minute=ts.minute - ts.minute % minutes)


def feeder(db: Database, symbols: list[str], stop: threading.Event, log: list[str]) -> None:
    """At each minute boundary, insert the minute that just ended."""
    with db.connect(autocommit=True) as conn:
        while not stop.is_set():
            now = datetime.now(UTC)
            boundary = floor_minutes(now, 1) + timedelta(minutes=1)
            if stop.wait((boundary - now).total_seconds()):
                return
            t0 = time.perf_counter()
            conn.execute(
                ADD_MINUTES, {"symbols": symbols, "start": boundary - timedelta(minutes=1), "end": boundary}
            )
            log.append(f"{boundary:%H:%M:%S} minute inserted in {time.perf_counter() - t0:.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--interval", type=float, default=10.0, help="the daemon's --interval")
    args = parser.parse_args()
    load_at_start = load()
    with scratch_database() as db, db.connect(autocommit=True) as conn:
        symbols = [f"F{i:05d}" for i in range(args.symbols)]
        add_symbols(conn, symbols, all_levels=False)
        conn.execute("SELECT sync_agg_state_from_registry('prod')")
        now = datetime.now(UTC)
        start = floor_minutes(now, 60) - timedelta(hours=1)
        conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (start,))
        conn.execute(ADD_MINUTES, {"symbols": symbols, "start": start, "end": floor_minutes(now, 1)})
        conn.execute("ANALYZE")
        stop = threading.Event()
        feed_log: list[str] = []
        feed = threading.Thread(target=feeder, args=(db, symbols, stop, feed_log), daemon=True)
        feed.start()
        daemon_log = tempfile.NamedTemporaryFile(prefix="baragg-bench-daemon-", suffix=".log", delete=False)  # noqa: SIM115
        daemon = subprocess.Popen(
            [sys.executable, "-m", "baragg.cli", "worker", "--interval", str(args.interval)],
            env={**os.environ, "DATABASE_URL": db.url},
            stdout=daemon_log,
            stderr=daemon_log,
        )
        samples = []
        try:
            for _ in range(args.samples):
                now = datetime.now(UTC)
                window_end = floor_minutes(now, 5) + timedelta(minutes=5)
                window = window_end - timedelta(minutes=5)
                (delay,) = conn.execute(
                    "SELECT max(aggregation_delay_seconds) FROM data_agg_state WHERE timeframe = '5m'"
                ).fetchone()
                final_at = window_end + timedelta(seconds=delay)
                print(f"waiting for the {window:%H:%M} window (final at {final_at:%H:%M:%S})", flush=True)
                time.sleep(max(0.0, (final_at - datetime.now(UTC)).total_seconds() - 1))
                while True:
                    n, last_created = conn.execute(
                        "SELECT count(*), max(created_at) FROM derived_data_bars WHERE timeframe = '5m' AND ts_utc = %s",
                        (window,),
                    ).fetchone()
                    seen = datetime.now(UTC)
                    if n >= args.symbols:
                        break
                    if (seen - final_at).total_seconds() > 120:
                        raise SystemExit(
                            f"the {window:%H:%M} bars did not appear within 2 minutes ({n} seen)"
                        )
                    time.sleep(0.02)
                committed = (seen - final_at).total_seconds()
                stamped = (last_created - final_at).total_seconds()
                samples.append((committed, stamped))
                print(
                    f"{window:%H:%M} window: {n} bars visible {committed:.3f}s after final"
                    f" (transaction started {stamped:.3f}s after final)",
                    flush=True,
                )
        finally:
            stop.set()
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
            print("\n".join(feed_log[-3:]))
            print(f"daemon log: {daemon_log.name}")
        print()
        print(header(conn, load_at_start))
        print(
            f"{args.symbols} symbols, daemon --interval {args.interval:g}, {args.samples} samples: median delay"
            f" from final to visible {med([s[0] for s in samples]):.3f}s"
            f" (max {max(s[0] for s in samples):.3f}s); worker transaction start"
            f" {med([s[1] for s in samples]):.3f}s after final (20 ms polling)"
        )


if __name__ == "__main__":
    main()
