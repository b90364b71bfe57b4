"""Write-path study: what each part of derived_data_bars costs per derived bar written.

    .venv/bin/python bench/bench_writepath.py [--bars 750000] [--symbols 10] [--runs 3]

Materialises `--bars` ready-made 5m bars (the aggregation is not measured here), then inserts them
into variants of the table in a scratch schema, each built from the real table (same columns,
defaults, indexes) with one part removed or changed, and reports microseconds per bar, median of
`--runs`. The `INSERT ... ON CONFLICT DO UPDATE` variant is how baragg writes. Compare with the
aggregation alone (SELECT ... GROUP BY, no write) from bench_backfill.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import DERIVED_UPSERT, DERIVED_WRITE_COLUMNS, header, load, scratch_database

COLUMNS = DERIVED_WRITE_COLUMNS
UPSERT = DERIVED_UPSERT

FK = "FOREIGN KEY (canonical_symbol) REFERENCES core_asset_registry_all (canonical_symbol)"
UNIQUE = "CREATE UNIQUE INDEX ON {t} (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL"

# name -> (DDL after `CREATE TABLE {t} (LIKE derived_data_bars INCLUDING DEFAULTS)`, upsert?)
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "as shipped: id PK, partial unique index, FK, raw jsonb; plain INSERT": (
        ["ALTER TABLE {t} ADD PRIMARY KEY (id)", UNIQUE, "ALTER TABLE {t} ADD " + FK],
        False,
    ),
    "as shipped, INSERT ... ON CONFLICT DO UPDATE (baragg's write)": (
        ["ALTER TABLE {t} ADD PRIMARY KEY (id)", UNIQUE, "ALTER TABLE {t} ADD " + FK],
        True,
    ),
    "as shipped + B-tree index on (canonical_symbol), ON CONFLICT (not chosen)": (
        [
            "ALTER TABLE {t} ADD PRIMARY KEY (id)",
            UNIQUE,
            "ALTER TABLE {t} ADD " + FK,
            "CREATE INDEX ON {t} (canonical_symbol)",
        ],
        True,
    ),
    "as shipped + BRIN index on (canonical_symbol) (migration 0005), ON CONFLICT": (
        [
            "ALTER TABLE {t} ADD PRIMARY KEY (id)",
            UNIQUE,
            "ALTER TABLE {t} ADD " + FK,
            "CREATE INDEX ON {t} USING brin (canonical_symbol)",
        ],
        True,
    ),
    "without the FK": (["ALTER TABLE {t} ADD PRIMARY KEY (id)", UNIQUE], False),
    "without the FK, ON CONFLICT DO UPDATE": (["ALTER TABLE {t} ADD PRIMARY KEY (id)", UNIQUE], True),
    "without the id primary key (FK kept)": ([UNIQUE, "ALTER TABLE {t} ADD " + FK], False),
    "without the raw jsonb column": (
        [
            "ALTER TABLE {t} DROP COLUMN raw",
            "ALTER TABLE {t} ADD PRIMARY KEY (id)",
            UNIQUE,
            "ALTER TABLE {t} ADD " + FK,
        ],
        False,
    ),
    "FK DEFERRABLE INITIALLY DEFERRED": (
        [
            "ALTER TABLE {t} ADD PRIMARY KEY (id)",
            UNIQUE,
            "ALTER TABLE {t} ADD " + FK + " DEFERRABLE INITIALLY DEFERRED",
        ],
        False,
    ),
    "unique index only (no FK, no PK): TimescaleDB's one-index table": ([UNIQUE], False),
    "bare heap: no index, no FK": ([], False),
    "bare heap, UNLOGGED": (["ALTER TABLE {t} SET UNLOGGED"], False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=750_000)
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="only the variants whose name contains TEXT (repeatable)",
    )
    args = parser.parse_args()
    load_at_start = load()
    with scratch_database() as db, db.connect(autocommit=True) as conn:
        symbols = [f"W{i:03d}" for i in range(args.symbols)]
        conn.execute(
            "INSERT INTO core_asset_registry_all (canonical_symbol) SELECT unnest(%s::text[])", (symbols,)
        )
        per = args.bars // args.symbols
        # Bars in the order the catch-up writes them: symbol by symbol, in time order.
        conn.execute(
            f"""CREATE UNLOGGED TABLE bars AS
            SELECT s.sym AS canonical_symbol, '5m'::text AS timeframe,
                   timestamptz '2024-01-01' + make_interval(mins => 5 * i) AS ts_utc,
                   1 + i * 1e-6 AS open, 1.001 + i * 1e-6 AS high, 0.999 + i * 1e-6 AS low, 1 + i * 1e-6 AS close,
                   50.0 AS vol, 1.0 AS vwap, 15 AS trade_count, false AS is_partial, 'agg'::text AS source,
                   '1m'::text AS source_timeframe, 5 AS source_candles, 5 AS expected_candles, 2 AS quality_score,
                   1 AS derivation_version
            FROM unnest(%s::text[]) s(sym), generate_series(0, {per - 1}) i
            ORDER BY s.sym, i""",
            (symbols,),
        )
        conn.execute("VACUUM ANALYZE bars")
        (n,) = conn.execute("SELECT count(*) FROM bars").fetchone()
        conn.execute("CREATE SCHEMA wp")
        chosen = {
            name: v
            for name, v in VARIANTS.items()
            if not args.only or name.startswith("bare heap: no index") or any(o in name for o in args.only)
        }
        results: dict[str, list[float]] = {name: [] for name in chosen}
        for run in range(args.runs):
            for i, (name, (ddl, upsert)) in enumerate(chosen.items()):
                t = f"wp.v{i}"
                conn.execute(f"DROP TABLE IF EXISTS {t}")
                conn.execute(f"CREATE TABLE {t} (LIKE derived_data_bars INCLUDING DEFAULTS)")
                conn.execute(
                    f"ALTER TABLE {t} ALTER COLUMN id SET DEFAULT nextval('derived_data_bars_id_seq')"
                )
                for stmt in ddl:
                    conn.execute(stmt.format(t=t))
                conn.execute("CHECKPOINT")
                sql = f"INSERT INTO {t} ({COLUMNS}) SELECT {COLUMNS} FROM bars" + (UPSERT if upsert else "")
                with conn.transaction():
                    t0 = time.perf_counter()
                    conn.execute(sql)
                results[name].append(time.perf_counter() - t0)  # including the commit
                conn.execute(f"DROP TABLE {t}")
            print(f"run {run + 1} done (load {load():.1f})", flush=True)
        print()
        print(header(conn, load_at_start))
        print(f"{n:,} bars of {args.symbols} symbols, median of {args.runs} runs")
        print()
        base = statistics.median(results["bare heap: no index, no FK"])
        print(
            "| table variant | seconds | µs per bar | bars/s | source 1m rows/s equivalent (x5) | vs bare heap (µs/bar) |"
        )
        print("|---|---|---|---|---|---|")
        for name, values in results.items():
            m = statistics.median(values)
            print(
                f"| {name} | {m:.2f} | {1e6 * m / n:.2f} | {n / m:,.0f} | {5 * n / m:,.0f} |"
                f" {1e6 * (m - base) / n:+.2f} |"
            )


if __name__ == "__main__":
    main()
