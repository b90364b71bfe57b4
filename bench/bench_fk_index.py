"""What an index on exactly (canonical_symbol) costs per row written (migration 0005).

    .venv/bin/python bench/bench_fk_index.py [--rows 300000] [--runs 9]

Supabase's linter (lint 0001) wants an index on exactly the columns of each foreign key; the bar tables'
foreign key is (canonical_symbol), whose lookups their unique (canonical_symbol, timeframe, ts_utc)
index serves already. This inserts the same rows (30,000 per symbol, in the catch-up's order: symbol by
symbol, in time) into a table with that unique index and: no other index, a B-tree on
(canonical_symbol), or a BRIN on it; interleaved, the order rotated every run; microseconds per row,
median of --runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import header, load, scratch_database

VARIANTS = {
    "unique index only (before 0005)": [],
    "+ B-tree on (canonical_symbol)": ["CREATE INDEX ON t (canonical_symbol)"],
    "+ BRIN on (canonical_symbol) (0005)": ["CREATE INDEX ON t USING brin (canonical_symbol)"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    load_at_start = load()
    with scratch_database() as db, db.connect(autocommit=True) as conn:
        conn.execute(
            "CREATE UNLOGGED TABLE src AS"
            " SELECT 'SYM' || (i / 30000) AS canonical_symbol,"
            "        timestamptz '2024-01-01' + make_interval(mins => 5 * (i %% 30000)) AS ts_utc, i::float8 AS v"
            " FROM generate_series(0, %s - 1) i ORDER BY 1, 2",
            (args.rows,),
        )
        names = list(VARIANTS)
        results: dict[str, list[float]] = {name: [] for name in names}
        for run in range(args.runs):
            for name in names[run % len(names) :] + names[: run % len(names)]:
                conn.execute("DROP TABLE IF EXISTS t")
                conn.execute(
                    "CREATE TABLE t (id bigserial PRIMARY KEY, canonical_symbol text NOT NULL,"
                    " ts_utc timestamptz NOT NULL, v float8, UNIQUE (canonical_symbol, ts_utc))"
                )
                for ddl in VARIANTS[name]:
                    conn.execute(ddl)
                conn.execute("CHECKPOINT")
                t0 = time.perf_counter()
                conn.execute(
                    "INSERT INTO t (canonical_symbol, ts_utc, v) SELECT canonical_symbol, ts_utc, v FROM src"
                )
                results[name].append(time.perf_counter() - t0)
            print(f"run {run + 1} done (load {load():.1f})", flush=True)
        print()
        print(header(conn, load_at_start))
        print(f"{args.rows:,} rows, median of {args.runs} runs, order rotated")
        print()
        base = statistics.median(results[names[0]])
        print("| table | µs per row | vs unique index only |")
        print("|---|---|---|")
        for name in names:
            m = statistics.median(results[name])
            print(
                f"| {name} | {1e6 * m / args.rows:.2f} | {1e6 * (m - base) / args.rows:+.2f} µs ({m / base - 1:+.0%}) |"
            )


if __name__ == "__main__":
    main()
