"""The worker: sync the registry → claim due tasks → catch each up → finish; leases; shutdown.

The database does the aggregation and guards every state change (migration 0003); this module
orchestrates. A claimed task is caught up fully in one claim, call after call of
``catchup_aggregation_range`` while it says ``continue``, within a time budget. Each call runs in its
own transaction together with the task's new cursor (``agg_checkpoint``, or ``agg_finish`` for the
last call), so bars and cursor commit together, and only while this worker still holds the lease:
if the lease was lost (we were too slow and another worker rescued the task), the transaction rolls
back and nothing is written twice.

``run_once`` is the cron form (``baragg run --once``); ``Worker`` is the daemon (``baragg worker``):
N threads, each claiming on its own, a stop event on SIGINT/SIGTERM, a bounded wait for the work in
hand, a second signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from baragg.db import Database
from baragg.sql import query

log = logging.getLogger(__name__)

STAT_KEYS = ("windows_processed", "bars_created", "bars_quality_poor", "bars_skipped", "gaps_skipped")
REAGGREGATE_KEYS = ("bars_reaggregated", "bars_withdrawn")
DEFAULT_LEASE_SECONDS = 300
DEFAULT_TIME_BUDGET = 60.0
DEFAULT_MAX_WINDOWS = 2000
DEFAULT_BATCH_SIZE = 100
# Test hook: seconds to sleep after each committed catch-up call (to kill a worker mid catch-up).
PAUSE_ENV = "BARAGG_TEST_PAUSE_BETWEEN_CALLS"


def resolve_env(name: str | None = None) -> str:
    """The environment: the given name, else $BARAGG_ENV, else $DISTORT_ENV (the seed's), else 'prod'."""
    return name or os.environ.get("BARAGG_ENV") or os.environ.get("DISTORT_ENV") or "prod"


def new_worker_id(suffix: str = "") -> str:
    """Names a claimer in leases and rescue notes: host, process, a random part (and thread)."""
    base = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return f"{base}:{suffix}" if suffix else base


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskResult:
    """One claim of one task. outcome: ok (at its frontier), continue (backlog left: time budget or
    shutdown), transient / hard (failed, recorded by agg_finish), lease_lost (another worker holds it)."""

    symbol: str
    timeframe: str
    windows: int
    bars_created: int
    bars_quality_poor: int
    bars_skipped: int
    gaps_skipped: int
    cursor_before: datetime | None
    cursor_after: datetime | None
    seconds: float
    outcome: str
    error: str | None = None
    # Late data (migration 0004): bars rewritten / soft-deleted because their source changed.
    bars_reaggregated: int = 0
    bars_withdrawn: int = 0

    def log_fields(self) -> dict[str, Any]:
        return {
            "event": "task_run",
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "windows": self.windows,
            "bars_created": self.bars_created,
            "bars_quality_poor": self.bars_quality_poor,
            "bars_skipped": self.bars_skipped,
            "gaps_skipped": self.gaps_skipped,
            "bars_reaggregated": self.bars_reaggregated,
            "bars_withdrawn": self.bars_withdrawn,
            "cursor_before": self.cursor_before,
            "cursor_after": self.cursor_after,
            "seconds": round(self.seconds, 4),
            "outcome": self.outcome,
            "error": self.error,
        }


@dataclass
class RunSummary:
    """What one ``run_once`` did: every task run in order, and the registry sync's changes."""

    tasks: list[TaskResult] = field(default_factory=list)
    sync: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def totals(self) -> dict[str, int]:
        out = {
            "task_runs": len(self.tasks),
            "windows": sum(t.windows for t in self.tasks),
            "bars_created": sum(t.bars_created for t in self.tasks),
            "bars_quality_poor": sum(t.bars_quality_poor for t in self.tasks),
            "bars_skipped": sum(t.bars_skipped for t in self.tasks),
            "gaps_skipped": sum(t.gaps_skipped for t in self.tasks),
            "bars_reaggregated": sum(t.bars_reaggregated for t in self.tasks),
            "bars_withdrawn": sum(t.bars_withdrawn for t in self.tasks),
        }
        for outcome in ("ok", "continue", "transient", "hard", "lease_lost"):
            out[outcome] = sum(1 for t in self.tasks if t.outcome == outcome)
        return out


@dataclass(frozen=True)
class Task:
    symbol: str
    timeframe: str
    source_timeframe: str | None
    cursor: datetime | None
    is_mandatory: bool
    rescued_from: str | None


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class LeaseLost(Exception):
    """This worker no longer holds the task (its lease expired and another worker took it)."""


class CatchupFailed(Exception):
    """catchup_aggregation_range answered success = false."""


def classify(exc: BaseException) -> str:
    """'transient' for what may succeed on retry, 'hard' for everything else (DESIGN.md 6).

    Transient: lost or refused connections, timeouts and cancellations, serialization failures,
    deadlocks, lock timeouts, server shutdown, resource shortage. Program limits (class 54) are hard.
    """
    if isinstance(exc, psycopg.errors.ProgramLimitExceeded):
        return "hard"
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, ConnectionError)):
        return "transient"
    with contextlib.suppress(ImportError):
        from psycopg_pool import PoolTimeout

        if isinstance(exc, PoolTimeout):
            return "transient"
    return "hard"


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The work of one worker (one thread): claim, catch up, finish
# ---------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    env: str = "prod"
    now: datetime | None = None
    symbols: list[str] | None = None
    timeframes: list[str] | None = None
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    time_budget: float = DEFAULT_TIME_BUDGET
    max_windows: int = DEFAULT_MAX_WINDOWS
    batch_size: int = DEFAULT_BATCH_SIZE


class _Claimer:
    """Claims and runs tasks on connections from ``connect`` (reconnecting after a lost one)."""

    def __init__(
        self,
        connect: Callable[[], contextlib.AbstractContextManager[psycopg.Connection]],
        settings: _Settings,
        worker_id: str,
        stop: threading.Event,
        on_task: Callable[[TaskResult], None] | None = None,
    ) -> None:
        self.connect = connect
        self.settings = settings
        self.worker_id = worker_id
        self.stop = stop
        self.on_task = on_task
        self.active: psycopg.Connection | None = None  # for cancelling at shutdown
        pause = os.environ.get(PAUSE_ENV, "")
        self.pause = float(pause) if pause else 0.0

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "now": self.settings.now, **extra}

    # -- registry ------------------------------------------------------------------------------
    def sync(self) -> dict[str, Any]:
        with self.connect() as conn:
            row = conn.execute(query("worker_sync"), self.params(env=self.settings.env)).fetchone()
        changes: dict[str, Any] = row[0] if row else {}
        changed = {k: len(v) for k, v in changes.items() if isinstance(v, list) and v}
        if changed:
            log.info(
                "registry sync (%s): %s",
                self.settings.env,
                ", ".join(f"{n} {k}" for k, n in changed.items()),
                extra={"event": "registry_sync", **changes},
            )
        return changes

    # -- one round: claim a batch, run it ------------------------------------------------------
    def run_round(self) -> list[TaskResult]:
        """Claim up to batch_size due tasks and run them in due order; [] when none was due."""
        s = self.settings
        with self.connect() as conn:
            rows = conn.execute(
                query("worker_claim"),
                self.params(
                    limit=s.batch_size,
                    lease_seconds=s.lease_seconds,
                    symbols=s.symbols,
                    timeframes=s.timeframes,
                ),
            ).fetchall()
        tasks = [Task(r[0], r[1], r[2], r[3], r[4], r[6]) for r in rows]
        results: list[TaskResult] = []
        for i, task in enumerate(tasks):
            if self.stop.is_set():
                self.release(tasks[i:])
                break
            if task.rescued_from:
                log.warning(
                    "%s %s: lease of %s had expired; rescued",
                    task.symbol,
                    task.timeframe,
                    task.rescued_from,
                    extra={
                        "event": "task_rescued",
                        "symbol": task.symbol,
                        "timeframe": task.timeframe,
                        "rescued_from": task.rescued_from,
                    },
                )
            result = self.catch_up(task)
            results.append(result)
            self.report(result)
        return results

    def report(self, result: TaskResult) -> None:
        level = logging.INFO if result.outcome in ("ok", "continue") else logging.WARNING
        log.log(level, _describe(result), extra=result.log_fields())
        if self.on_task is not None:
            self.on_task(result)

    def release(self, tasks: Sequence[Task]) -> None:
        """Give back claimed tasks not started (shutdown): idle and due again, nothing counted."""
        with self.connect() as conn:
            for task in tasks:
                conn.execute(
                    query("worker_release"), self.params(symbol=task.symbol, timeframe=task.timeframe)
                )
        if tasks:
            log.info("released %d claimed task(s) at shutdown", len(tasks), extra={"event": "released"})

    # -- one task ------------------------------------------------------------------------------
    def catch_up(self, task: Task) -> TaskResult:
        """Catch one claimed task up: call after call while ``continue``, within the time budget."""
        s = self.settings
        started = time.monotonic()
        totals = dict.fromkeys(STAT_KEYS, 0)
        reaggregated = dict.fromkeys(REAGGREGATE_KEYS, 0)
        cursor_before = cursor = task.cursor
        outcome, error = "ok", None
        try:
            with self.connect() as conn:
                self.active = conn
                first = True
                while True:
                    with conn.transaction():
                        if first:
                            # Late data first: rewrite the windows invalidated behind the cursor,
                            # committed with the first catch-up call (migration 0004).
                            fixed = conn.execute(
                                query("worker_reaggregate"),
                                self.params(symbol=task.symbol, timeframe=task.timeframe),
                            ).fetchone()[0]
                        if cursor is None:
                            cursor = conn.execute(
                                query("worker_bootstrap"),
                                self.params(symbol=task.symbol, timeframe=task.timeframe),
                            ).fetchone()[0]
                        result = conn.execute(
                            query("worker_catchup"),
                            self.params(
                                symbol=task.symbol,
                                timeframe=task.timeframe,
                                cursor=cursor,
                                max_windows=s.max_windows,
                            ),
                        ).fetchone()[0]
                        if not result.get("success", False):
                            raise CatchupFailed(str(result.get("error") or result))
                        new_cursor = _timestamp(result.get("cursor_advanced_to")) or cursor
                        stats = {k: int(result.get(k) or 0) for k in STAT_KEYS}
                        backlog = bool(result.get("continue"))
                        more = (
                            backlog and not self.stop.is_set() and time.monotonic() - started < s.time_budget
                        )
                        if more:
                            answer = conn.execute(
                                query("worker_checkpoint"),
                                self.params(
                                    symbol=task.symbol,
                                    timeframe=task.timeframe,
                                    cursor=new_cursor,
                                    stats=Jsonb(stats),
                                    lease_seconds=s.lease_seconds,
                                ),
                            ).fetchone()[0]
                        else:
                            answer = conn.execute(
                                query("worker_finish_ok"),
                                self.params(
                                    symbol=task.symbol,
                                    timeframe=task.timeframe,
                                    cursor=new_cursor,
                                    stats=Jsonb({**stats, "continue": backlog}),
                                ),
                            ).fetchone()[0]
                        if not answer.get("changed"):
                            raise LeaseLost(answer.get("reason") or "task no longer held")
                    # committed: bars and cursor together
                    cursor = new_cursor
                    for k in STAT_KEYS:
                        totals[k] += stats[k]
                    if first:
                        first = False
                        for k in REAGGREGATE_KEYS:
                            reaggregated[k] += int(fixed.get(k) or 0)
                    if not more:
                        outcome = "continue" if backlog else "ok"
                        break
                    if self.pause:
                        time.sleep(self.pause)
        except LeaseLost as exc:
            outcome, error = "lease_lost", str(exc)
        except Exception as exc:
            outcome, error = classify(exc), _error_text(exc)
            self.record_failure(task, outcome, error)
        finally:
            self.active = None
        return TaskResult(
            symbol=task.symbol,
            timeframe=task.timeframe,
            windows=totals["windows_processed"],
            bars_created=totals["bars_created"],
            bars_quality_poor=totals["bars_quality_poor"],
            bars_skipped=totals["bars_skipped"],
            gaps_skipped=totals["gaps_skipped"],
            cursor_before=cursor_before,
            cursor_after=cursor,
            seconds=time.monotonic() - started,
            outcome=outcome,
            error=error,
            bars_reaggregated=reaggregated["bars_reaggregated"],
            bars_withdrawn=reaggregated["bars_withdrawn"],
        )

    def record_failure(self, task: Task, kind: str, error: str) -> None:
        """agg_finish(false) on a fresh connection; if even that fails, the lease expires instead."""
        try:
            with self.connect() as conn:
                conn.execute(
                    query("worker_finish_failed"),
                    self.params(symbol=task.symbol, timeframe=task.timeframe, fail_kind=kind, error=error),
                )
        except Exception as exc:
            log.error(
                "%s %s: could not record the %s failure (%s); the lease will expire",
                task.symbol,
                task.timeframe,
                kind,
                _error_text(exc),
                extra={"event": "finish_failed", "symbol": task.symbol, "timeframe": task.timeframe},
            )

    def seconds_to_next_due(self) -> float | None:
        with self.connect() as conn:
            row = conn.execute(query("worker_seconds_to_next_due")).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))


def _timestamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _short(ts: datetime | None) -> str:
    return ts.isoformat().replace("+00:00", "Z") if ts else "-"


def _describe(r: TaskResult) -> str:
    text = (
        f"{r.symbol} {r.timeframe} {r.outcome}: {r.windows} windows, {r.bars_created} bars "
        f"({r.bars_quality_poor} poor, {r.bars_skipped} skipped, {r.gaps_skipped} gaps), "
        f"{r.bars_reaggregated} re-aggregated, {r.bars_withdrawn} withdrawn, "
        f"cursor {_short(r.cursor_before)} -> {_short(r.cursor_after)} in {r.seconds:.3f}s"
    )
    return f"{text}: {r.error}" if r.error else text


# ---------------------------------------------------------------------------------------------
# run --once
# ---------------------------------------------------------------------------------------------
def run_once(
    db: Database,
    *,
    env: str = "prod",
    now: datetime | None = None,
    symbols: Sequence[str] | None = None,
    timeframes: Sequence[str] | None = None,
    on_task: Callable[[TaskResult], None] | None = None,
    lease_seconds: int = DEFAULT_LEASE_SECONDS,
    time_budget: float = DEFAULT_TIME_BUDGET,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: threading.Event | None = None,
    worker_id: str | None = None,
) -> RunSummary:
    """Sync the registry, then claim and run due tasks until none is due; every task ends at its
    frontier (or failed, recorded), unless another process holds it. ``now`` fixes the clock."""
    started = time.monotonic()
    settings = _Settings(
        env=env,
        now=now,
        symbols=list(symbols) if symbols else None,
        timeframes=list(timeframes) if timeframes else None,
        lease_seconds=lease_seconds,
        time_budget=time_budget,
        max_windows=max_windows,
        batch_size=batch_size,
    )
    summary = RunSummary()
    with _ReconnectingConnection(db) as connect:
        claimer = _Claimer(
            connect, settings, worker_id or new_worker_id(), stop or threading.Event(), on_task
        )
        summary.sync = claimer.sync()
        while not claimer.stop.is_set():
            results = claimer.run_round()
            if not results:
                break
            summary.tasks.extend(results)
    summary.seconds = time.monotonic() - started
    totals = summary.totals
    log.info(
        "run finished: %d task runs, %d windows, %d bars created, %d failed in %.2fs",
        totals["task_runs"],
        totals["windows"],
        totals["bars_created"],
        totals["transient"] + totals["hard"],
        summary.seconds,
        extra={"event": "run_finished", **totals, "seconds": round(summary.seconds, 3)},
    )
    return summary


class _ReconnectingConnection:
    """One autocommit connection for a run, replaced when it breaks (a lost connection is transient)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn: psycopg.Connection | None = None

    def __enter__(self) -> Callable[[], contextlib.AbstractContextManager[psycopg.Connection]]:
        return self.borrow

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[psycopg.Connection]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = self.db.connect(autocommit=True)
        yield self.conn


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------
def _autocommit(pool: Any) -> Callable[[], contextlib.AbstractContextManager[psycopg.Connection]]:
    """Pool connections in autocommit mode: every transaction of the worker is explicit."""

    @contextlib.contextmanager
    def borrow() -> Iterator[psycopg.Connection]:
        with pool.connection() as conn:
            if not conn.autocommit:
                conn.autocommit = True
            yield conn

    return borrow


class Worker:
    """``baragg worker``: ``concurrency`` threads, each claiming on its own from a shared pool.

    Every ``interval`` seconds (or earlier, when a task's next_run_at arrives) a thread syncs the
    registry (the first thread) and drains due tasks. ``stop()`` (SIGINT/SIGTERM in ``run``) stops
    claiming; the task in hand is finished (its current call completes, then the cursor is stored
    and the task released as due), waiting at most ``shutdown_timeout`` seconds before cancelling
    the statement in flight (a cancelled statement is a transient failure, recorded). Nothing is
    left running. A second signal exits at once.
    """

    def __init__(
        self,
        db: Database,
        *,
        env: str = "prod",
        interval: float = 10.0,
        concurrency: int = 1,
        lease_seconds: int = DEFAULT_LEASE_SECONDS,
        time_budget: float = DEFAULT_TIME_BUDGET,
        max_windows: int = DEFAULT_MAX_WINDOWS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        shutdown_timeout: float = 30.0,
        on_task: Callable[[TaskResult], None] | None = None,
    ) -> None:
        self.db = db
        self.interval = interval
        self.concurrency = max(1, concurrency)
        self.shutdown_timeout = shutdown_timeout
        self.on_task = on_task
        self.settings = _Settings(
            env=env,
            lease_seconds=lease_seconds,
            time_budget=time_budget,
            max_windows=max_windows,
            batch_size=batch_size,
        )
        self._stop = threading.Event()
        self._signals = 0
        self._claimers: list[_Claimer] = []

    def stop(self) -> None:
        """Stop claiming; threads finish or release what they hold, then exit."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", extra={"event": "shutdown_forced"})
            os._exit(1)
        log.info(
            "%s: stopping (finishing the tasks in hand)",
            signal.Signals(signum).name,
            extra={"event": "shutdown", "signal": signal.Signals(signum).name},
        )
        self.stop()

    def run(self) -> None:
        """Run until stopped. Installs SIGINT/SIGTERM handlers when called from the main thread."""
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                installed[sig] = signal.signal(sig, self._on_signal)
        pool = self.db.pool(min_size=1, max_size=self.concurrency + 1, name="baragg-worker")
        try:
            pool.open(wait=True, timeout=30)
            base = new_worker_id()
            self._claimers = [
                _Claimer(_autocommit(pool), self.settings, f"{base}:{i}", self._stop, self.on_task)
                for i in range(self.concurrency)
            ]
            log.info(
                "worker started: env %s, %d thread(s), interval %.1fs",
                self.settings.env,
                self.concurrency,
                self.interval,
                extra={"event": "worker_started", "env": self.settings.env, "concurrency": self.concurrency},
            )
            threads = [
                threading.Thread(target=self._loop, args=(c, i == 0), name=f"baragg-worker-{i}", daemon=True)
                for i, c in enumerate(self._claimers)
            ]
            for t in threads:
                t.start()
            self._wait(threads)
        finally:
            pool.close()
            for sig, previous in installed.items():
                signal.signal(sig, previous)
        log.info("worker stopped", extra={"event": "worker_stopped"})

    def _wait(self, threads: list[threading.Thread]) -> None:
        # Join with a timeout so that signal handlers run in the main thread meanwhile.
        while any(t.is_alive() for t in threads) and not self._stop.is_set():
            for t in threads:
                t.join(0.2)
        deadline = time.monotonic() + self.shutdown_timeout
        cancelled = False
        while any(t.is_alive() for t in threads):
            if not cancelled and time.monotonic() > deadline:
                cancelled = True
                for c in self._claimers:
                    conn = c.active
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.cancel_safe()
            for t in threads:
                t.join(0.2)

    def _loop(self, claimer: _Claimer, syncs: bool) -> None:
        next_sync = 0.0
        while not self._stop.is_set():
            try:
                if syncs and time.monotonic() >= next_sync:
                    claimer.sync()
                    next_sync = time.monotonic() + self.interval
                while not self._stop.is_set() and claimer.run_round():
                    pass
                if self._stop.is_set():
                    break
                wait = self.interval
                until_due = claimer.seconds_to_next_due()
                if until_due is not None:
                    wait = min(wait, max(until_due, 0.05))
            except Exception as exc:  # the database went away: log, wait, try again
                log.error(
                    "worker tick failed: %s",
                    _error_text(exc),
                    extra={"event": "tick_failed", "error": _error_text(exc)},
                )
                wait = self.interval
            self._stop.wait(wait)
