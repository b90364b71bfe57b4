"""`baragg verify` speed and memory: one symbol's 5m bars (and the 1h bars built from them).

    .venv/bin/python bench/bench_verify.py                      # 1,000,000 5m bars (~5M 1m rows)
    .venv/bin/python bench/bench_verify.py --bars 200000        # the size of the issue's report
    PYTHONPATH=/path/to/old/src .venv/bin/python bench/bench_verify.py --bars 200000   # an older verify

Generates FX-like 1m bars in SQL (closed Friday 21:00 to Sunday 22:00 UTC, ~1% of minutes missing)
for one symbol, builds its 5m and 1h bars with the hand-written GROUP BY of bench/_common.py (not the
engine: verify only needs stored bars to compare with), sets the tasks' cursors past them, then runs
`baragg verify BENCH 5m` and `baragg verify BENCH 1h` as subprocesses (the real command; PYTHONPATH is
passed on, so an older checkout can be measured the same way) and reports wall time, bars per minute
and peak RSS (getrusage of the child, measured from a wrapper whose only child it is). Every bar must
verify equal (exit 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import GENERATE, add_symbols, ceiling_insert, header, load, scratch_database

SYMBOL = "BENCH"
START = "2010-01-04"  # a Monday
# FX-like data trades 5 of 7 days (Sunday 22:00 to Friday 21:00 UTC): ~119 of 168 hours a week.
OPEN_SHARE = 119 / 168 * 0.99

_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t0 = time.perf_counter()\n"
    "code = subprocess.call(sys.argv[2:], stdout=subprocess.DEVNULL)\n"
    "seconds = time.perf_counter() - t0\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "open(sys.argv[1], 'w').write(f'{code} {seconds} {peak}')\n"
)


def generate(db, bars: int) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """1m rows for about ``bars`` 5m bars, then the 5m and 1h bars and tasks; (1m rows, 5m, 1h)."""
    days = math.ceil(bars * 5 / 1440 / OPEN_SHARE)
    rows = 0
    with db.connect() as conn:
        add_symbols(conn, [SYMBOL], all_levels=False)
        conn.commit()
        for first in range(0, days, 365):  # one statement per year of data
            span = min(365, days - first)
            start = conn.execute(
                "SELECT %s::timestamptz + make_interval(days => %s)", (START, first)
            ).fetchone()[0]
            rows += conn.execute(
                GENERATE, {"symbols": [SYMBOL], "k_offset": 0, "start": start, "minutes": span * 1440}
            ).rowcount
            conn.commit()
            print(f"  generated {rows:,} 1m rows ({first + span} of {days} days)", file=sys.stderr)
        counts = []
        for tf in ("5m", "1h"):
            counts.append(conn.execute(ceiling_insert(tf)).rowcount)
            conn.commit()
        end = conn.execute("SELECT %s::timestamptz + make_interval(days => %s)", (START, days)).fetchone()[0]
        for tf, source in (("5m", "1m"), ("1h", "5m")):
            conn.execute(
                "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, agg_start_utc,"
                " last_agg_bar_ts_utc) VALUES (%s, %s, %s, %s, %s)",
                (SYMBOL, tf, source, START, end),
            )
        conn.execute("ANALYZE")
        conn.commit()
    return rows, counts[0], counts[1]


def run_verify(db, timeframe: str) -> tuple[int, float, float, dict]:  # type: ignore[no-untyped-def]
    """(exit code, seconds, peak RSS MiB, the JSON report) of `baragg verify BENCH TF`."""
    env = {**os.environ, "DATABASE_URL": db.url}
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "result"
        command = [sys.executable, "-m", "baragg.cli", "verify", SYMBOL, timeframe]
        subprocess.run([sys.executable, "-c", _WRAPPER, str(out), *command], env=env, check=True)
        code, seconds, peak = out.read_text().split()
    report = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True)
    summary = json.loads(report.stdout) if report.stdout else {}
    return int(code), float(seconds), int(peak) / 1024, summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bars", type=int, default=1_000_000, help="5m bars to verify (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=1, help="verify runs per timeframe (default 1)")
    parser.add_argument("--no-json", action="store_true", help="skip the --json run (it checks the counts)")
    args = parser.parse_args()
    started_load = load()
    with scratch_database() as db:
        t0 = time.perf_counter()
        rows, bars_5m, bars_1h = generate(db, args.bars)
        print(
            f"data: {rows:,} 1m rows, {bars_5m:,} 5m bars, {bars_1h:,} 1h bars ({time.perf_counter() - t0:.0f} s)"
        )
        results = []
        for timeframe, bars in (("5m", bars_5m), ("1h", bars_1h)):
            for _ in range(args.repeat):
                code, seconds, peak, summary = run_verify(db, timeframe)
                checked = summary.get("checked", "?")
                assert code == 0, f"verify {timeframe} exit {code}: {summary}"
                results.append((timeframe, bars, checked, seconds, peak))
        with db.connect() as conn:
            print(header(conn, started_load))
    print("| timeframe | bars | checked | seconds | bars per minute | peak RSS |")
    print("|---|---|---|---|---|---|")
    for timeframe, bars, checked, seconds, peak in results:
        print(
            f"| {timeframe} | {bars:,} | {checked:,} | {seconds:.1f} | {bars / seconds * 60:,.0f} | {peak:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
