"""Latency of the status server (`baragg serve`) as a browser sees it: the page, its assets, the JSON API
and /metrics, over one keep-alive connection with gzip, then many clients at once.

    .venv/bin/python bench/bench_web.py [--symbols 1000] [--bars 150000] [--repeat 30]

Starts `baragg serve` as its own process against a scratch database (embedded server or
$DATABASE_URL's) with `--symbols` symbols x 2 tasks and `--bars` 5m bars of one symbol, and prints
median and 95th percentile per route in milliseconds, then the throughput of 8 parallel clients.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import header, load, scratch_database

ROOT = Path(__file__).resolve().parents[1]


def fill(conn, symbols: int, bars: int) -> None:
    conn.execute(
        "INSERT INTO core_asset_registry_all (canonical_symbol, active)"
        " SELECT 'S' || lpad(i::text, 5, '0'), true FROM generate_series(1, %s) i",
        (symbols,),
    )
    conn.execute(
        """
        INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, is_mandatory,
            last_agg_bar_ts_utc, status, enabled, agg_start_utc, next_run_at)
        SELECT r.canonical_symbol, tf.timeframe, tf.source, true, timestamptz '2024-11-22 15:00Z', 'idle', true,
               timestamptz '2024-01-01', timestamptz '2024-11-22 15:10Z'
        FROM core_asset_registry_all r, (VALUES ('5m', '1m'), ('1h', '5m')) tf(timeframe, source)
        """
    )
    conn.execute(
        """
        INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol,
            source_timeframe, source_candles, expected_candles, quality_score, derivation_version)
        SELECT 'S00001', '5m', timestamptz '2024-11-22 15:00Z' - make_interval(mins => 5 * i),
               100 + sin(i / 50.0), 101 + sin(i / 50.0), 99 + sin(i / 50.0), 100.5 + sin(i / 50.0), 10 + i %% 7,
               '1m', 5, 5, 2, 1
        FROM generate_series(1, %s) i
        """,
        (bars,),
    )
    conn.execute("ANALYZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"baragg serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("baragg serve did not start")


def get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path, headers={"Accept-Encoding": "gzip", "Host": "127.0.0.1"})
    res = conn.getresponse()
    body = res.read()
    if res.status != 200:
        raise SystemExit(f"GET {path}: {res.status} {body[:200]!r}")
    return len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--bars", type=int, default=150_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    started_load = load()
    with scratch_database() as db:
        with db.connect(autocommit=True) as conn:
            fill(conn, args.symbols, args.bars)
            print(header(conn, started_load))
        port = free_port()
        env = {**os.environ, "DATABASE_URL": db.url}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "baragg.cli",
                "serve",
                "--port",
                str(port),
                "--now",
                "2024-11-22T15:07:30Z",
            ],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_up(port, proc)
            routes = [
                ("/", args.repeat),
                ("/static/app.js", args.repeat),
                ("/static/lightweight-charts.standalone.production.js", args.repeat),
                ("/api/config", args.repeat),
                ("/healthz", args.repeat),
                ("/api/summary", args.repeat),
                ("/api/tasks", args.repeat),
                ("/api/symbols", args.repeat),
                ("/api/bars?symbol=S00001&timeframe=5m&limit=2000", args.repeat),
                (f"/api/bars?symbol=S00001&timeframe=5m&limit={args.bars}", max(3, args.repeat // 6)),
                ("/metrics", args.repeat),
            ]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for path, _ in routes:  # warm-up: imports, pool connections, plan caches
                get(conn, path)
            print(f"{'route':<58} {'bytes':>9} {'median ms':>10} {'p95 ms':>8}")
            for path, n in routes:
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    size = get(conn, path)
                    times.append((time.perf_counter() - t) * 1000)
                times.sort()
                p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                print(f"{path:<58} {size:>9} {statistics.median(times):>10.2f} {p95:>8.2f}")
            conn.close()

            # Many clients at once: 8 threads, each with its own keep-alive connection.
            for path in ("/healthz", "/api/summary"):
                per_thread = 25
                errors: list[str] = []

                def client(p: str = path, per_thread: int = per_thread, errors: list[str] = errors) -> None:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    try:
                        for _ in range(per_thread):
                            get(c, p)
                    except BaseException as exc:  # reported below
                        errors.append(repr(exc))
                    finally:
                        c.close()

                threads = [threading.Thread(target=client) for _ in range(8)]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(120)
                seconds = time.perf_counter() - t
                print(
                    f"8 clients x {per_thread} GET {path}: {8 * per_thread / seconds:,.0f} requests/s"
                    + (f" ({len(errors)} errors: {errors[0]})" if errors else "")
                )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
