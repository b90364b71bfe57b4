"""Where the write path goes (issue 15, part 4): what partitioning and distribution change per bar.

    PYTHONPATH=src python bench/bench_writepath_options.py [--bars 300000] [--rows 1000000] [--runs 3]

Two writes, each into variants of the real table built in a scratch schema (same columns, defaults,
keys as after migration 0010, the registry foreign key, the BRIN index; no triggers, so only the
table's layout is compared):

- **derived bars** (the catch-up's write): `--bars` ready-made 5m, 1h and 1d bars (no aggregation),
  `INSERT ... SELECT ... ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
  DO UPDATE` as the engine writes them, into derived_data_bars as it is today, partitioned by
  timeframe (LIST), by month (RANGE on ts_utc), and by both;
- **1m rows** (the ingest's write): `--rows` rows COPYed (binary, as `baragg ingest`'s direct path)
  into data_bars as it is today and partitioned by month.

Each variant is created empty, written once per run, then dropped; variants alternate within a run
(the machine is shared), medians of `--runs` with the spread. With a Citus build on the machine
(`/usr/lib/postgresql/*/lib/citus.so`) a single-node distributed table would be one more variant;
the script says when it is absent.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time

import numpy as np
import pandas as pd

from _common import DERIVED_UPSERT, DERIVED_WRITE_COLUMNS, header, load, scratch_database
from baragg.ingest import _copy_binary

DERIVED_COLUMNS = DERIVED_WRITE_COLUMNS
UPSERT = DERIVED_UPSERT
FK = (
    "ALTER TABLE {t} ADD FOREIGN KEY (canonical_symbol) REFERENCES core_asset_registry_all (canonical_symbol)"
)
BRIN = "CREATE INDEX ON {t} USING brin (canonical_symbol)"
DERIVED_KEYS = [
    "ALTER TABLE {t} ADD PRIMARY KEY (id, canonical_symbol, ts_utc)",
    "CREATE UNIQUE INDEX ON {t} (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL",
    FK,
    BRIN,
]
# A unique key of a table partitioned by timeframe must contain timeframe: the primary key widens.
DERIVED_KEYS_TF = [
    "ALTER TABLE {t} ADD PRIMARY KEY (id, canonical_symbol, timeframe, ts_utc)",
    *DERIVED_KEYS[1:],
]
TIMEFRAMES = ("5m", "1h", "1d")


def months(first: str, last: str) -> list[tuple[str, str]]:
    """(from, to) of every calendar month between two dates."""
    starts = pd.date_range(pd.Timestamp(first).to_period("M").to_timestamp(), last, freq="MS")
    return [(a.strftime("%Y-%m-%d"), (a + pd.offsets.MonthBegin()).strftime("%Y-%m-%d")) for a in starts]


def derived_variants(first: str, last: str) -> dict[str, list[str]]:
    """name -> DDL creating table {t} (the first statement creates it)."""
    like = "CREATE TABLE {t} (LIKE derived_data_bars INCLUDING DEFAULTS)"
    monthly = [
        f"CREATE TABLE {{t}}_{a[:7].replace('-', '')} PARTITION OF {{t}} FOR VALUES FROM ('{a}') TO ('{b}')"
        for a, b in months(first, last)
    ]
    by_tf = [f"CREATE TABLE {{t}}_{tf} PARTITION OF {{t}} FOR VALUES IN ('{tf}')" for tf in TIMEFRAMES]
    both = []
    for tf in TIMEFRAMES:
        both.append(
            f"CREATE TABLE {{t}}_{tf} PARTITION OF {{t}} FOR VALUES IN ('{tf}') PARTITION BY RANGE (ts_utc)"
        )
        both += [
            f"CREATE TABLE {{t}}_{tf}_{a[:7].replace('-', '')} PARTITION OF {{t}}_{tf} "
            f"FOR VALUES FROM ('{a}') TO ('{b}')"
            for a, b in months(first, last)
        ]
    return {
        "today: one table (PK (id, symbol, ts), partial unique, FK, BRIN)": [like, *DERIVED_KEYS],
        "partitioned by timeframe (LIST, 3 partitions; PK + timeframe)": [
            like + " PARTITION BY LIST (timeframe)",
            *by_tf,
            *DERIVED_KEYS_TF,
        ],
        "partitioned by month (RANGE on ts_utc)": [
            like + " PARTITION BY RANGE (ts_utc)",
            *monthly,
            *DERIVED_KEYS,
        ],
        "partitioned by timeframe, then month": [
            like + " PARTITION BY LIST (timeframe)",
            *both,
            *DERIVED_KEYS_TF,
        ],
        "today without the FK (reference: what the registry check costs)": [like, *DERIVED_KEYS[:2], BRIN],
    }


def raw_variants(first: str, last: str) -> dict[str, list[str]]:
    like = "CREATE TABLE {t} (LIKE data_bars INCLUDING DEFAULTS)"
    keys = ["ALTER TABLE {t} ADD PRIMARY KEY (canonical_symbol, timeframe, ts_utc)", FK, BRIN]
    monthly = [
        f"CREATE TABLE {{t}}_{a[:7].replace('-', '')} PARTITION OF {{t}} FOR VALUES FROM ('{a}') TO ('{b}')"
        for a, b in months(first, last)
    ]
    return {
        "today: one table (PK (symbol, timeframe, ts), FK, BRIN)": [like, *keys],
        "partitioned by month (RANGE on ts_utc)": [like + " PARTITION BY RANGE (ts_utc)", *monthly, *keys],
    }


def build(conn, name: str, ddl: list[str]) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
    for stmt in ddl:
        conn.execute(stmt.format(t=name))
    conn.execute(f"ALTER TABLE {name} ALTER COLUMN id SET DEFAULT nextval('derived_data_bars_id_seq')")


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=300_000, help="derived bars per write")
    parser.add_argument("--rows", type=int, default=1_000_000, help="1m rows per write")
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    load_at_start = load()
    citus = sorted(glob.glob("/usr/lib/postgresql/*/lib/citus.so"))
    with scratch_database() as db, db.connect(autocommit=True) as conn:
        symbols = [f"W{i:03d}" for i in range(args.symbols)]
        conn.execute(
            "INSERT INTO core_asset_registry_all (canonical_symbol) SELECT unnest(%s::text[])", (symbols,)
        )
        # Derived bars: per symbol, 5m, 1h and 1d bars over the same span (the 5m level dominates, as in
        # a backfill: 12 5m bars per 1h bar, 24 1h bars per 1d bar).
        per_symbol = args.bars // args.symbols
        n5 = round(per_symbol * 288 / (288 + 24 + 1))
        conn.execute(
            f"""CREATE UNLOGGED TABLE derived_src AS
            SELECT s.sym AS canonical_symbol, tf.tf AS timeframe,
                   timestamptz '2024-01-01' + tf.step * i AS ts_utc,
                   1 + i * 1e-6 AS open, 1.001 + i * 1e-6 AS high, 0.999 + i * 1e-6 AS low, 1 + i * 1e-6 AS close,
                   50.0 AS vol, 1.0 AS vwap, 15 AS trade_count, false AS is_partial, 'agg'::text AS source,
                   tf.src AS source_timeframe, 5 AS source_candles, 5 AS expected_candles, 2 AS quality_score,
                   1 AS derivation_version
            FROM unnest(%s::text[]) s(sym)
            CROSS JOIN (VALUES ('5m', interval '5 minutes', '1m', 1), ('1h', interval '1 hour', '5m', 12),
                               ('1d', interval '1 day', '1h', 288)) tf(tf, step, src, per)
            CROSS JOIN LATERAL generate_series(0, {n5} / tf.per - 1) i
            ORDER BY tf.per, s.sym, i""",
            (symbols,),
        )
        conn.execute("VACUUM ANALYZE derived_src")
        (n_bars, first, last) = conn.execute(
            "SELECT count(*), min(ts_utc)::date::text, max(ts_utc)::date::text FROM derived_src"
        ).fetchone()
        # 1m rows, binary COPY payload as ingest's direct path builds it (one symbol per block).
        per_rows = args.rows // args.symbols
        ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.arange(per_rows), unit="min")
        price = 1 + np.arange(per_rows) * 1e-7
        payloads = []
        for sym in symbols:
            bars = pd.DataFrame(
                {
                    "canonical_symbol": sym,
                    "ts_utc": ts,
                    "open": price,
                    "high": price + 1e-4,
                    "low": price - 1e-4,
                    "close": price,
                    "vol": 10.0,
                    "vwap": price,
                    "trade_count": pd.array(np.full(per_rows, 3), dtype="Int64"),
                }
            )
            payloads.append(_copy_binary(bars, np.ones(per_rows, dtype=bool), {}, "bench"))
        n_rows = per_rows * args.symbols
        raw_last = str((ts[-1] + pd.Timedelta(days=1)).date())
        conn.execute("CREATE SCHEMA wp")
        derived = derived_variants(first, last)
        raw = raw_variants("2024-01-01", raw_last)
        times: dict[str, list[float]] = {}
        for run in range(args.runs):
            for i, (name, ddl) in enumerate(derived.items()):
                t = f"wp.d{i}"
                build(conn, t, ddl)
                conn.execute("CHECKPOINT")
                sql = (
                    f"INSERT INTO {t} ({DERIVED_COLUMNS}) SELECT {DERIVED_COLUMNS} FROM derived_src" + UPSERT
                )
                with conn.transaction():
                    t0 = time.perf_counter()
                    conn.execute(sql)
                times.setdefault("derived: " + name, []).append(time.perf_counter() - t0)
                conn.execute(f"DROP TABLE {t} CASCADE")
            for i, (name, ddl) in enumerate(raw.items()):
                t = f"wp.r{i}"
                build(conn, t, ddl)
                conn.execute("CHECKPOINT")
                columns = (
                    "canonical_symbol, provider_ticker, timeframe, ts_utc, open, high, low, close, vol, vwap, "
                    "trade_count, is_partial, source"
                )
                with conn.transaction(), conn.cursor() as cur:
                    t0 = time.perf_counter()
                    for payload in payloads:
                        with cur.copy(f"COPY {t} ({columns}) FROM STDIN WITH (FORMAT binary)") as copy:
                            for buffer in payload:
                                copy.write(buffer)
                times.setdefault("1m rows: " + name, []).append(time.perf_counter() - t0)
                conn.execute(f"DROP TABLE {t} CASCADE")
            print(f"run {run + 1} done (load {load():.1f})", flush=True)
        print()
        print(header(conn, load_at_start))
        print(
            f"derived: {n_bars:,} bars of {args.symbols} symbols ({first} to {last}); 1m rows: {n_rows:,}; "
            f"median of {args.runs} runs (min-max); including the commit"
        )
        print()
        print("| write | table | median s | min-max s | µs per bar/row | per second | vs today |")
        print("|---|---|---|---|---|---|---|")
        for kind, n in (("derived", n_bars), ("1m rows", n_rows)):
            rows = {k.split(": ", 1)[1]: v for k, v in times.items() if k.startswith(kind + ":")}
            today = statistics.median(next(iter(rows.values())))
            for name, values in rows.items():
                m = statistics.median(values)
                print(
                    f"| {kind} | {name} | {m:.2f} | {spread(values)} | {1e6 * m / n:.2f} | {n / m:,.0f} |"
                    f" {today / m:.0%} |"
                )
        print()
        if citus:
            print(
                f"Citus found ({citus[0]}): the distributed variant needs a Citus server; not run by this script."
            )
        else:
            print(
                "Citus: no /usr/lib/postgresql/*/lib/citus.so on this machine: the distributed table not measured."
            )


if __name__ == "__main__":
    main()
