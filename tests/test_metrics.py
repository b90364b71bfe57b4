"""Prometheus metrics, read back from the real /metrics endpoint with prometheus-client's parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from baragg import worker
from baragg.metrics import Metrics, record_task_result
from obs_data import standard_fixture
from web_client import closed_port_database, get, running_server


def TaskResult(symbol: str, timeframe: str, **fields: object) -> worker.TaskResult:
    """A baragg.worker.TaskResult as the worker hands it to on_task; unnamed counts are 0."""
    defaults: dict[str, object] = {
        "windows": 0,
        "bars_created": 0,
        "bars_quality_poor": 0,
        "bars_skipped": 0,
        "gaps_skipped": 0,
        "cursor_before": None,
        "cursor_after": None,
        "seconds": 0.01,
        "outcome": "ok",
    }
    return worker.TaskResult(symbol, timeframe, **{**defaults, **fields})  # type: ignore[arg-type]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the endpoint."""
    res = get(url + "/metrics")
    assert res.status == 200
    assert res.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(res.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def closed_port_db():
    return closed_port_database()


def test_task_results_are_counted_by_timeframe_and_outcome(db):
    metrics = Metrics()
    results = [
        TaskResult(
            "ESZ4", "5m", windows=12, bars_created=11, bars_quality_poor=1, bars_skipped=1, gaps_skipped=4
        ),
        TaskResult("GCZ4", "5m", windows=3, bars_created=3, seconds=0.2),
        TaskResult("ESZ4", "1h", windows=1, bars_created=1, seconds=1.5),
        TaskResult("GCZ4", "1h", outcome="transient", error="connection lost", seconds=0.05),
        TaskResult("CLZ4", "1h", outcome="hard", error="division by zero", seconds=0.05),
    ]
    for r in results:
        record_task_result(r, metrics)
    with running_server(db, metrics=metrics) as server:
        m = scrape(server.url)
    assert value(m, "baragg_task_runs_total", timeframe="5m", outcome="ok") == 2
    assert value(m, "baragg_task_runs_total", timeframe="1h", outcome="ok") == 1
    assert value(m, "baragg_task_runs_total", timeframe="1h", outcome="transient") == 1
    assert value(m, "baragg_windows_processed_total", timeframe="5m") == 15
    assert value(m, "baragg_bars_created_total", timeframe="5m") == 14
    assert value(m, "baragg_bars_created_total", timeframe="1h") == 1
    assert value(m, "baragg_bars_quality_poor_total", timeframe="5m") == 1
    assert value(m, "baragg_bars_skipped_total", timeframe="5m") == 1
    assert value(m, "baragg_gaps_skipped_total", timeframe="5m") == 4
    assert value(m, "baragg_task_failures_total", timeframe="1h", kind="transient") == 1
    assert value(m, "baragg_task_failures_total", timeframe="1h", kind="hard") == 1
    assert value(m, "baragg_task_failures_total", timeframe="5m", kind="ok") is None
    assert value(m, "baragg_task_run_seconds_count", timeframe="1h") == 3
    assert value(m, "baragg_task_run_seconds_bucket", timeframe="1h", le="0.1") == 2
    assert value(m, "baragg_task_run_seconds_bucket", timeframe="1h", le="+Inf") == 3
    assert value(m, "baragg_last_task_run_timestamp_seconds") > 0
    assert value(m, "baragg_build_info", version=__import__("baragg").__version__) == 1
    assert value(m, "process_resident_memory_bytes") > 0


def test_negative_or_missing_counts_never_decrease_a_counter():
    metrics = Metrics()
    record_task_result(TaskResult("X", "5m", bars_created=5), metrics)
    record_task_result(TaskResult("X", "5m", bars_created=-3, windows=None), metrics)  # type: ignore[arg-type]
    assert metrics.registry.get_sample_value("baragg_bars_created_total", {"timeframe": "5m"}) == 5


def test_task_states_and_lag_come_from_the_database(db, conn):
    standard_fixture(conn)
    with running_server(db) as server:
        m = scrape(server.url)
    assert value(m, "baragg_database_up") == 1
    assert value(m, "baragg_tasks", timeframe="5m", status="hard_failed") == 1
    assert value(m, "baragg_tasks", timeframe="5m", status="idle") == 1
    assert value(m, "baragg_tasks", timeframe="5m", status="running") == 1
    assert value(m, "baragg_tasks", timeframe="15m", status="disabled") == 1
    assert value(m, "baragg_tasks", timeframe="15m", status="idle") == 1
    assert value(m, "baragg_tasks", timeframe="1h", status="idle") == 2
    assert value(m, "baragg_frontier_lag_seconds", timeframe="1h") == 7200
    assert value(m, "baragg_frontier_lag_seconds", timeframe="5m") == 0
    # The disabled CLZ4 15m task lags by weeks but is not counted: it will not run.
    assert value(m, "baragg_frontier_lag_seconds", timeframe="15m") == 0
    assert value(m, "baragg_now_lag_seconds", timeframe="1h") > 3600


def test_state_changes_show_at_the_next_scrape(db, conn):
    standard_fixture(conn)
    with running_server(db) as server:
        assert value(scrape(server.url), "baragg_tasks", timeframe="1h", status="hard_failed") is None
        conn.execute("UPDATE data_agg_state SET status = 'hard_failed' WHERE timeframe = '1h'")
        assert value(scrape(server.url), "baragg_tasks", timeframe="1h", status="hard_failed") == 2


def test_no_per_symbol_series(db, conn):
    standard_fixture(conn)
    metrics = Metrics()
    for sym in ("A", "B", "C"):
        record_task_result(TaskResult(sym, "5m", bars_created=1), metrics)
    with running_server(db, metrics=metrics) as server:
        m = scrape(server.url)
    m = {key: v for key, v in m.items() if key[0].startswith("baragg_")}
    label_names = {name for (_, labels) in m for name, _ in labels}
    assert label_names <= {"timeframe", "outcome", "kind", "status", "le", "version"}
    assert not any(v in ("ESZ4", "GCZ4", "CLZ4", "A") for (_, labels) in m for _, v in labels)


def test_pending_invalidations_and_the_age_of_the_oldest(db, conn):
    standard_fixture(conn)
    with running_server(db) as server:
        m = scrape(server.url)
        assert value(m, "baragg_invalidations_pending") == 0
        assert value(m, "baragg_invalidation_oldest_age_seconds") == 0
        # What the source-table triggers of migration 0004 record for late or corrected bars.
        conn.execute(
            "INSERT INTO agg_invalidations (canonical_symbol, timeframe, window_start, first_seen_at, reason)"
            " VALUES ('ESZ4', '5m', '2024-11-22 10:00', now() - interval '90 seconds', 'update'),"
            "        ('ESZ4', '1h', '2024-11-22 10:00', now() - interval '10 seconds', 'insert')"
        )
        m = scrape(server.url)
        assert value(m, "baragg_invalidations_pending") == 2
        assert value(m, "baragg_invalidation_oldest_age_seconds") >= 90
        tasks = {(t["symbol"], t["timeframe"]): t for t in get(server.url + "/api/tasks").json()["tasks"]}
        assert tasks["ESZ4", "5m"]["invalidations_pending"] == 1
        assert get(server.url + "/api/summary").json()["invalidations_pending"] == 2


def test_reaggregated_and_withdrawn_bars_are_counted():
    metrics = Metrics()
    record_task_result(TaskResult("X", "1h", bars_reaggregated=3, bars_withdrawn=1), metrics)
    assert metrics.registry.get_sample_value("baragg_bars_reaggregated_total", {"timeframe": "1h"}) == 3
    assert metrics.registry.get_sample_value("baragg_bars_withdrawn_total", {"timeframe": "1h"}) == 1


def test_created_rewritten_withdrawn_and_unchanged_bars_are_counted_apart():
    """Issue 11: an upsert that rewrote a bar, or recomputed an equal one, is not a created bar."""
    metrics = Metrics()
    result = TaskResult("X", "5m", bars_created=2, bars_rewritten=3, bars_withdrawn=1, bars_unchanged=40)
    record_task_result(result, metrics)
    sample = metrics.registry.get_sample_value
    assert [sample(f"baragg_bars_{k}_total", {"timeframe": "5m"}) for k in (
        "created", "rewritten", "withdrawn", "unchanged")] == [2, 3, 1, 40]  # fmt: skip
    text = metrics.exposition().decode()
    assert "# HELP baragg_bars_created_total Derived bars inserted (new rows)." in text
    assert "# HELP baragg_bars_unchanged_total Derived bars recomputed equal to the stored bar" in text


@pytest.mark.parametrize("pages", [True, False])
def test_metrics_when_the_database_is_unreachable(closed_port_db, pages):
    metrics = Metrics()
    record_task_result(TaskResult("X", "5m", bars_created=2), metrics)
    with running_server(closed_port_db, metrics=metrics, pages=pages, db_timeout=1) as server:
        m = scrape(server.url)
    assert value(m, "baragg_database_up") == 0
    assert value(m, "baragg_bars_created_total", timeframe="5m") == 2  # the worker's counters still there
    assert not any(name == "baragg_tasks" for name, _ in m)
