"""Observability of the worker: metrics after a real run, and `baragg worker --metrics-port --serve`."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families

from baragg import worker
from baragg.metrics import Metrics, record_task_result
from scheduling_helpers import T0, add_assets, add_minutes, hours_ago, popen_cli, run_cli, tasks_from
from stream_lines import LineReader
from web_client import get, running_server


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    res = get(url + "/metrics")
    assert res.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(res.text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_after_a_run_match_the_database(db, conn):
    add_assets(conn, ["AAA", "BBB"], calc_15m=True)
    add_minutes(conn, ["AAA", "BBB"], T0, T0 + timedelta(hours=6))
    metrics = Metrics()
    summary = worker.run_once(
        db, now=T0 + timedelta(hours=6, minutes=5), on_task=lambda r: record_task_result(r, metrics)
    )
    assert summary.tasks
    with running_server(db, metrics=metrics) as server:
        m = scrape(server.url)

    stored = dict(conn.execute("SELECT timeframe, count(*) FROM derived_data_bars GROUP BY 1").fetchall())
    assert stored == {"5m": 2 * 72, "15m": 2 * 24, "1h": 2 * 6}
    for tf, n in stored.items():
        assert value(m, "baragg_bars_created_total", timeframe=tf) == n
    for (tf, outcome), n in Counter((r.timeframe, r.outcome) for r in summary.tasks).items():
        assert value(m, "baragg_task_runs_total", timeframe=tf, outcome=outcome) == n
        assert value(m, "baragg_task_run_seconds_count", timeframe=tf) >= n
    # Every task caught up to its frontier, and the database says so.
    assert value(m, "baragg_tasks", timeframe="5m", status="idle") == 2
    for tf in ("5m", "15m", "1h"):
        assert value(m, "baragg_frontier_lag_seconds", timeframe=tf) == 0


def test_worker_daemon_serves_metrics_health_and_pages(db, conn):
    # The daemon runs on the real clock: two hours of data that ended an hour ago are final.
    start = hours_ago(3)
    add_assets(conn, ["AAA"])
    add_minutes(conn, ["AAA"], start, start + timedelta(hours=2))
    tasks_from(conn, start)
    proc = popen_cli("worker", "--metrics-port", "0", "--serve", "--interval", "0.5", url=db.url)
    assert proc.stderr is not None
    stderr = LineReader(proc, proc.stderr)
    try:
        url = stderr.wait_for(r"serving on (http://127\.0\.0\.1:\d+)", timeout=60).group(1)

        # The worker aggregates the two hours; the metrics of this process count the bars.
        deadline = time.monotonic() + 60
        while (bars := value(scrape(url), "baragg_bars_created_total", timeframe="5m")) != 24:
            assert time.monotonic() < deadline, f"{bars} 5m bars counted after 60 s, not 24"
            assert proc.poll() is None, f"the worker exited ({proc.returncode})"
            time.sleep(0.1)
        m = scrape(url)
        assert value(m, "baragg_tasks", timeframe="5m", status="idle") == 1
        health = get(url + "/healthz")
        assert (health.status, health.json()["reason"]) == (200, "1 claim thread(s) running")
        assert get(url + "/readyz").status == 200
        tasks = {(t["symbol"], t["timeframe"]): t for t in get(url + "/api/tasks").json()["tasks"]}
        assert tasks["AAA", "5m"]["bars_created"] == 24
        assert get(url + "/").status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    assert proc.returncode == 0, stderr.rest(timeout=10)


def test_serve_needs_a_metrics_port(db):
    res = run_cli("worker", "--serve", url=db.url, timeout=60)
    assert res.returncode == 2
    assert res.stderr == "baragg: error: baragg worker: --serve needs --metrics-port\n"
