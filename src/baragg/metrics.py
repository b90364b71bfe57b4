"""Prometheus metrics: what the worker did (counted as it happens) and what the database says (read
at scrape time).

Labels stay bounded: timeframe (7 values), outcome, failure kind and task status (a handful each).
There are no per-symbol series: with thousands of symbols they would swamp Prometheus, and the status
page and /api/tasks show each task anyway.

The worker calls ``record_task_result(result)`` once per task run (its ``on_task`` hook). Task
counts, lag and pending invalidations come from a collector that queries the database when
Prometheus scrapes, so they are right even for work done by other worker processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import cache
from typing import Any, Protocol

import psycopg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from baragg import __version__
from baragg.sql import query

log = logging.getLogger(__name__)

NAMESPACE = "baragg"

# Task runs take milliseconds when a task is current and minutes in a backfill.
RUN_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# The worker's outcomes (baragg.worker.TaskResult): ok (at its frontier), continue (backlog left),
# transient / hard (failed), lease_lost (another worker took the task over). Any other outcome, or a
# result that carries an error, counts as a failure whose kind is the outcome.
SUCCESS_OUTCOMES = frozenset({"ok", "continue"})


class TaskResultLike(Protocol):
    """The fields of baragg.worker.TaskResult that the metrics read."""

    timeframe: str
    windows: int
    bars_created: int
    bars_quality_poor: int
    bars_skipped: int
    gaps_skipped: int
    seconds: float
    outcome: str
    error: str | None
    bars_reaggregated: int
    bars_withdrawn: int
    bars_rewritten: int
    bars_unchanged: int


ConnectionSource = Callable[[], AbstractContextManager[psycopg.Connection]]


class Metrics:
    """The counters the worker updates, in a registry of their own (one per process in practice,
    one per test in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        per_tf = ("timeframe",)

        def counter(name: str, doc: str, labels: tuple[str, ...] = per_tf) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

        self.task_runs = counter("task_runs", "Task runs by timeframe and outcome.", ("timeframe", "outcome"))
        self.windows = counter("windows_processed", "Non-empty windows handled by task runs.")
        # Every recomputed window counts once: created, rewritten, withdrawn or unchanged.
        self.bars_created = counter("bars_created", "Derived bars inserted (new rows).")
        self.bars_rewritten = counter(
            "bars_rewritten", "Stored derived bars whose values changed and were rewritten."
        )
        self.bars_unchanged = counter(
            "bars_unchanged", "Derived bars recomputed equal to the stored bar (nothing written)."
        )
        self.bars_poor = counter(
            "bars_quality_poor", "Derived bars inserted or rewritten with quality_score <= 0."
        )
        self.bars_skipped = counter("bars_skipped", "Final windows not stored: too few source bars.")
        self.gaps_skipped = counter(
            "gaps_skipped", "Empty windows passed over because later source data exists."
        )
        self.bars_reaggregated = counter(
            "bars_reaggregated",
            "Derived bars inserted or rewritten after late or corrected source data (also counted in "
            "bars_created / bars_rewritten).",
        )
        self.bars_withdrawn = counter(
            "bars_withdrawn", "Derived bars soft-deleted because their source bars disappeared."
        )
        self.failures = counter(
            "task_failures",
            "Failed task runs by timeframe and kind (the worker's outcome: transient, hard, ...).",
            ("timeframe", "kind"),
        )
        self.run_seconds = Histogram(
            "task_run_seconds",
            "Duration of one task run (claim to finish).",
            per_tf,
            buckets=RUN_SECONDS_BUCKETS,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.last_run = Gauge(
            "last_task_run_timestamp_seconds",
            "Unix time of the last task run this process finished.",
            namespace=NAMESPACE,
            registry=self.registry,
        )
        Info("build", "baragg version.", namespace=NAMESPACE, registry=self.registry).info(
            {"version": __version__}
        )
        # The standard process_* (CPU, memory, open files) and python_info series of a daemon.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._database_collector: DatabaseCollector | None = None

    def record_task_result(self, result: TaskResultLike) -> None:
        """Count one task run. Called by the worker after each task (its on_task hook)."""
        tf = str(result.timeframe)
        outcome = str(result.outcome)
        self.task_runs.labels(tf, outcome).inc()
        self.windows.labels(tf).inc(_count(result.windows))
        self.bars_created.labels(tf).inc(_count(result.bars_created))
        self.bars_rewritten.labels(tf).inc(_count(result.bars_rewritten))
        self.bars_unchanged.labels(tf).inc(_count(result.bars_unchanged))
        self.bars_poor.labels(tf).inc(_count(result.bars_quality_poor))
        self.bars_skipped.labels(tf).inc(_count(result.bars_skipped))
        self.gaps_skipped.labels(tf).inc(_count(result.gaps_skipped))
        self.bars_reaggregated.labels(tf).inc(_count(result.bars_reaggregated))
        self.bars_withdrawn.labels(tf).inc(_count(result.bars_withdrawn))
        if result.error is not None or outcome not in SUCCESS_OUTCOMES:
            self.failures.labels(tf, outcome).inc()
        if result.seconds is not None:
            self.run_seconds.labels(tf).observe(max(0.0, float(result.seconds)))
        self.last_run.set(time.time())

    def watch_database(self, connection: ConnectionSource) -> None:
        """Read task states, lag and invalidations from this connection source at scrape time (the
        collector is registered once; a later call points it at the new source)."""
        if self._database_collector is None:
            self._database_collector = DatabaseCollector(connection)
            self.registry.register(self._database_collector)
        else:
            self._database_collector.connection = connection

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in the registry."""
        return generate_latest(self.registry)


def _count(value: Any) -> int:
    """Counters only go up: a missing or negative count adds nothing."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


@cache
def default_metrics() -> Metrics:
    """The process's metrics, made on first use (importing this module has no side effects)."""
    return Metrics()


def record_task_result(result: TaskResultLike, metrics: Metrics | None = None) -> None:
    """Count one task run in the process's metrics (or the given ones)."""
    (metrics or default_metrics()).record_task_result(result)


class DatabaseCollector(Collector):
    """Reads data_agg_state (and the invalidation log, when it exists) at scrape time."""

    def __init__(self, connection: ConnectionSource) -> None:
        self.connection = connection

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not touch the database.
        yield from self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                f"{NAMESPACE}_database_up", "1 when the last scrape could read the database, else 0."
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_tasks",
                "Tasks by timeframe and state (idle, running, hard_failed, disabled; enabled=false counts as disabled).",
                labels=["timeframe", "status"],
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_frontier_lag_seconds",
                "Largest lag behind the frontier (end of complete source data) among enabled tasks.",
                labels=["timeframe"],
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_now_lag_seconds",
                "Largest time since the window at the cursor ended, among enabled tasks (grows over market closures).",
                labels=["timeframe"],
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_invalidations_pending",
                "Windows waiting to be re-aggregated after late or corrected source data.",
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_invalidation_oldest_age_seconds",
                "Age of the oldest pending invalidation (0 when none).",
            ),
        ]

    def collect(self) -> Iterator[Metric]:
        from baragg.web.api import effective_status, fetch_tasks  # the one task query, shared

        up, tasks, lag_frontier, lag_now, pending, oldest = self._families()
        try:
            with self.connection() as conn:
                rows = fetch_tasks(conn)
                invalidations = _invalidations(conn)
        except (psycopg.Error, OSError, TimeoutError, RuntimeError) as exc:
            # psycopg_pool raises PoolTimeout (a psycopg.OperationalError) when the server is gone.
            log.warning("metrics: cannot read the database: %s", str(exc).strip().splitlines()[0:1])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        counts: dict[tuple[str, str], int] = {}
        worst_frontier: dict[str, float] = {}
        worst_now: dict[str, float] = {}
        for row in rows:
            tf, state = row["timeframe"], effective_status(row)
            counts[(tf, state)] = counts.get((tf, state), 0) + 1
            if state == "disabled":
                continue
            worst_frontier.setdefault(tf, 0.0)
            worst_now.setdefault(tf, 0.0)
            if row["lag_frontier_seconds"] is not None:
                worst_frontier[tf] = max(worst_frontier[tf], row["lag_frontier_seconds"])
            if row["lag_now_seconds"] is not None:
                worst_now[tf] = max(worst_now[tf], row["lag_now_seconds"])
        for (tf, state), n in sorted(counts.items()):
            tasks.add_metric([tf, state], n)
        yield tasks
        for tf, lag in sorted(worst_frontier.items()):
            lag_frontier.add_metric([tf], lag)
        yield lag_frontier
        for tf, lag in sorted(worst_now.items()):
            lag_now.add_metric([tf], lag)
        yield lag_now
        if invalidations is not None:
            pending.add_metric([], invalidations[0])
            oldest.add_metric([], invalidations[1])
            yield pending
            yield oldest


def _invalidations(conn: psycopg.Connection) -> tuple[int, float] | None:
    """(pending, age of the oldest) or None while the invalidation log does not exist yet."""
    if not conn.execute(query("obs_invalidation_log_exists")).fetchone()[0]:
        return None
    try:
        pending, oldest_age = conn.execute(query("obs_invalidations_pending"), {"now": None}).fetchone()
    except psycopg.errors.UndefinedColumn as exc:  # a schema newer than this baragg
        log.warning("metrics: the invalidation log has an unexpected shape: %s", exc)
        return None
    return int(pending), float(oldest_age or 0.0)
