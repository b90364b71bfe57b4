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
import itertools
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import FrameType
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    stop_when_event_set,
    wait_exponential_jitter,
)

from baragg import partitions, sessions
from baragg.db import Database
from baragg.errors import BaraggError
from baragg.sql import query
from baragg.timeframes import LADDER

log = logging.getLogger(__name__)

# The counts of one catch-up call (agg_catchup_tasks). Every recomputed window is exactly one of
# created (inserted), rewritten (values changed), unchanged (equal: nothing written) or, where a
# stored bar lost its source, withdrawn (soft-deleted); a window with too few source bars is skipped.
STAT_KEYS = (
    "windows_processed",
    "bars_created",
    "bars_rewritten",
    "bars_unchanged",
    "bars_withdrawn",
    "bars_quality_poor",
    "bars_skipped",
    "gaps_skipped",
)
# The counts of the re-aggregation of logged windows (late or corrected data, agg_reaggregate_tasks).
# It records them in data_agg_state itself, so they are never passed on to a checkpoint or finish.
REAGGREGATE_KEYS = (
    "windows",
    "bars_created",
    "bars_rewritten",
    "bars_unchanged",
    "bars_withdrawn",
    "bars_quality_poor",
    "bars_reaggregated",
)
_BOTH_PATHS = ("bars_created", "bars_rewritten", "bars_unchanged", "bars_withdrawn", "bars_quality_poor")
DEFAULT_LEASE_SECONDS = 300
DEFAULT_TIME_BUDGET = 60.0
DEFAULT_MAX_WINDOWS = 2000
DEFAULT_BATCH_SIZE = 500
# Test hook: seconds to sleep after each committed catch-up call (to kill a worker mid catch-up).
PAUSE_ENV = "BARAGG_TEST_PAUSE_BETWEEN_CALLS"
# While the database is unreachable: wait 0.5 s, 1 s, 2 s, then RETRY_MAX_DELAY between attempts
# (plus up to 0.25 s of jitter), so a worker resumes within a few seconds of the database's return.
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 3.0
# Every worker connection holds pg_advisory_lock(SESSION_LOCK_CLASS, random key) while it lives
# (migration 0006): a claim records the key, and a running task whose key is no longer held (its
# session ended: process killed, connection cut, server restarted) is taken over at once.
SESSION_LOCK_CLASS = 1650553447


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
    shutdown), transient / hard (failed, recorded by agg_finish), lease_lost (another worker holds it).

    The bar counts cover both paths of the claim, the re-aggregation of logged windows (late or
    corrected data) and the catch-up: created (inserted), rewritten (values changed), withdrawn
    (soft-deleted), unchanged (recomputed equal, nothing written). ``windows_reaggregated`` and
    ``bars_reaggregated`` (created + rewritten) are the late-data path's share.
    """

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
    bars_reaggregated: int = 0
    bars_withdrawn: int = 0
    bars_rewritten: int = 0
    bars_unchanged: int = 0
    windows_reaggregated: int = 0

    def log_fields(self) -> dict[str, Any]:
        return {
            "event": "task_run",
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "windows": self.windows,
            "bars_created": self.bars_created,
            "bars_rewritten": self.bars_rewritten,
            "bars_withdrawn": self.bars_withdrawn,
            "bars_unchanged": self.bars_unchanged,
            "bars_quality_poor": self.bars_quality_poor,
            "bars_skipped": self.bars_skipped,
            "gaps_skipped": self.gaps_skipped,
            "windows_reaggregated": self.windows_reaggregated,
            "bars_reaggregated": self.bars_reaggregated,
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
            "bars_rewritten": sum(t.bars_rewritten for t in self.tasks),
            "bars_withdrawn": sum(t.bars_withdrawn for t in self.tasks),
            "bars_unchanged": sum(t.bars_unchanged for t in self.tasks),
            "bars_quality_poor": sum(t.bars_quality_poor for t in self.tasks),
            "bars_skipped": sum(t.bars_skipped for t in self.tasks),
            "gaps_skipped": sum(t.gaps_skipped for t in self.tasks),
            "windows_reaggregated": sum(t.windows_reaggregated for t in self.tasks),
            "bars_reaggregated": sum(t.bars_reaggregated for t in self.tasks),
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
    if database_unavailable(exc):  # also a reconnect that failed (Database.connect's BaraggError)
        return "transient"
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, ConnectionError)):
        return "transient"
    with contextlib.suppress(ImportError):
        from psycopg_pool import PoolTimeout

        if isinstance(exc, PoolTimeout):
            return "transient"
    return "hard"


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be reached: a connection that could not be made
    (Database.connect's BaraggError wraps it) or was lost, the server shutting down or starting up.
    Worth retrying soon; anything else is a fault of the work itself."""
    if isinstance(exc, BaraggError) and isinstance(exc.__cause__, psycopg.OperationalError):
        return True
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        # No SQLSTATE: libpq lost the socket. 08: connection exception. 57P0x: shut down / starting.
        return not state or state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return False


def _retry_wait() -> Any:
    return wait_exponential_jitter(multiplier=RETRY_FIRST_DELAY, max=RETRY_MAX_DELAY, jitter=0.25)


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
        self.on_citus: bool | None = None  # distributed with Citus (asked at the first claim)
        self.buffer_pages = 0  # the server's shared_buffers in pages (asked at the first claim)
        pause = os.environ.get(PAUSE_ENV, "")
        self.pause = float(pause) if pause else 0.0

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "now": self.settings.now, **extra}

    # -- registry ------------------------------------------------------------------------------
    def sync(self, attempts: int = 3) -> dict[str, Any]:
        """Create/enable/disable tasks from the registry; a transient error (e.g. a deadlock with a
        finishing worker) is retried."""
        for attempt in range(1, attempts + 1):
            try:
                with self.connect() as conn:
                    row = conn.execute(query("worker_sync"), self.params(env=self.settings.env)).fetchone()
                break
            except psycopg.Error as exc:
                if attempt == attempts or classify(exc) != "transient":
                    raise
                log.warning("registry sync failed (%s); retrying", _error_text(exc))
                time.sleep(0.1 * attempt)
        changes: dict[str, Any] = row[0] if row else {}
        self.extend_sessions()
        self.extend_partitions()
        changed = {k: len(v) for k, v in changes.items() if isinstance(v, list) and v}
        if changed:
            log.info(
                "registry sync (%s): %s",
                self.settings.env,
                ", ".join(f"{n} {k}" for k, n in changed.items()),
                extra={"event": "registry_sync", "changes": changes},
            )
        return changes

    def extend_sessions(self) -> None:
        """Materialise the trading days the sessions in use need up to now (DESIGN.md 3b); a failure
        is logged and leaves those symbols' tasks waiting at the end of the known days."""
        try:
            with self.connect() as conn:
                added = sessions.ensure_for_sync(conn, self.settings.now)
        except Exception as exc:
            log.warning("could not extend the sessions' trading days (%s)", _error_text(exc))
            return
        if added:
            log.info(
                "session days added: %s",
                ", ".join(f"{name} {n}" for name, n in added.items()),
                extra={"event": "session_days", "added": added},
            )

    def extend_partitions(self) -> None:
        """This month's and the next months' partitions, and rows moved out of the default partitions
        (DESIGN.md 11); a failure is logged, never fatal: rows of a month without a partition wait in
        the default partition."""
        try:
            with self.connect() as conn:
                created = partitions.maintain(conn)
        except Exception as exc:
            log.warning("could not create the next partitions (%s)", _error_text(exc))
            return
        if created:
            log.info(
                "partitions created: %d",
                created,
                extra={"event": "partitions", "partitions_created": created},
            )

    # -- one round: claim a batch, run it ------------------------------------------------------
    def run_round(self) -> list[TaskResult]:
        """Claim up to batch_size due tasks and run them in due order; [] when none was due.

        Claimed tasks come back ordered by timeframe duration, so a round's 5m tasks are done
        (committed) before its 1h tasks start: an hour waits for its 5m source (DESIGN.md 4 rule 3).
        Tasks of one timeframe are caught up together, one statement for all their symbols.
        """
        s = self.settings
        with self.connect() as conn:
            if self.on_citus is None:
                self.on_citus = bool(conn.execute(query("on_citus")).fetchone()[0])
                self.buffer_pages = int(conn.execute(query("worker_buffer_pages")).fetchone()[0])
            if self.on_citus:
                rows = self.claim_per_symbol(conn)
            else:
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
        for task, row in zip(tasks, rows, strict=True):
            if task.rescued_from:
                log.warning(
                    "%s %s: taken over: %s",
                    task.symbol,
                    task.timeframe,
                    row[7],
                    extra={
                        "event": "task_rescued",
                        "symbol": task.symbol,
                        "timeframe": task.timeframe,
                        "rescued_from": task.rescued_from,
                        "reason": row[7],
                    },
                )
        results: list[TaskResult] = []
        # One time budget for the whole round: the leases of tasks in later groups are not renewed
        # while they wait, and the budget is shorter than a lease.
        deadline = time.monotonic() + s.time_budget
        groups = [list(g) for _, g in itertools.groupby(tasks, key=lambda t: t.timeframe)]
        if self.on_citus:
            # Citus: one task per catch-up call, so that every statement names one symbol (DESIGN.md 11).
            groups = [[t] for g in groups for t in g]
        for i, group in enumerate(groups):
            if self.stop.is_set():
                self.release([t for g in groups[i:] for t in g])
                break
            for result in self.catch_up(group, deadline):
                results.append(result)
                self.report(result)
        return results

    def claim_per_symbol(self, conn: psycopg.Connection) -> list[Any]:
        """Citus: the claim's row locks must name one symbol (a statement that locks rows on several
        shards is refused), so the due symbols are listed first (no lock) and claimed one by one, in
        due order, up to batch_size tasks; then sorted in the claim's order (5m before 1h)."""
        s = self.settings
        live = conn.execute(query("worker_live_sessions")).fetchone()[0]
        candidates = conn.execute(
            query("worker_citus_due_symbols"),
            self.params(limit=s.batch_size, symbols=s.symbols, timeframes=s.timeframes, live=live),
        ).fetchall()
        rows: list[Any] = []
        for (symbol,) in candidates:
            if len(rows) >= s.batch_size:
                break
            rows += conn.execute(
                query("worker_claim"),
                self.params(
                    limit=s.batch_size - len(rows),
                    lease_seconds=s.lease_seconds,
                    symbols=[symbol],
                    timeframes=s.timeframes,
                ),
            ).fetchall()
        rank = {tf: i for i, tf in enumerate(("5m", "15m", "1h", "4h", "1d", "1w", "1mo"))}
        return sorted(rows, key=lambda r: (not r[4], rank.get(r[1], 99)))

    def report(self, result: TaskResult) -> None:
        # A run that found nothing to do (a task polled at its frontier) is logged at DEBUG, so that a
        # daemon's log shows work and failures, not thousands of empty polls.
        if result.outcome not in ("ok", "continue"):
            level = logging.WARNING
        else:
            worked = (
                result.windows or result.gaps_skipped or result.windows_reaggregated or result.bars_withdrawn
            )
            level = logging.INFO if worked else logging.DEBUG
        if log.isEnabledFor(level):
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

    # -- catching up -----------------------------------------------------------------------------
    def catch_up(self, tasks: list[Task], deadline: float) -> list[TaskResult]:
        """Catch claimed tasks of one timeframe up: call after call while ``continue``, until the
        deadline (monotonic clock; the first call always runs). Each call (one statement for all symbols still behind) commits together with
        the new cursors; the last call of a task finishes it in the same transaction.

        If a transaction fails, nothing of it was written; the tasks still behind are then run one
        by one, so that a failure is recorded against the task that caused it (and a lost lease
        only costs its own task).
        """
        s = self.settings
        timeframe = tasks[0].timeframe
        started = time.monotonic()
        progress = {t.symbol: _Progress(t) for t in tasks}
        pending = list(tasks)
        first = True
        max_windows = s.max_windows
        try:
            with self.connect() as conn:
                self.active = conn
                while pending:
                    symbols = [t.symbol for t in pending]
                    call_started = time.monotonic()
                    with conn.transaction():
                        batch = self.params(symbols=symbols, timeframe=timeframe)
                        conn.execute(query("worker_lock_tasks"), batch)
                        conn.execute(query("worker_clear_rerun"), batch)
                        if first:
                            # Late data first: re-aggregate the logged windows behind the cursors
                            # that are final (DESIGN.md 5; the others stay logged and agg_finish
                            # schedules the task for them), committed with the first catch-up call.
                            fixed = conn.execute(
                                query("worker_reaggregate_many"),
                                self.params(timeframe=timeframe, symbols=symbols),
                            ).fetchall()
                        rows = conn.execute(
                            query("worker_catchup_many"),
                            self.params(
                                timeframe=timeframe,
                                symbols=symbols,
                                cursors=[progress[t.symbol].cursor for t in pending],
                                max_windows=max_windows,
                            ),
                        ).fetchall()
                        in_time = not self.stop.is_set() and time.monotonic() < deadline
                        finishing, continuing, calls = [], [], {}
                        for symbol, result in rows:
                            if not result.get("success", False):
                                raise CatchupFailed(f"{symbol} {timeframe}: {result.get('error') or result}")
                            call = _Call(result, progress[symbol].cursor)
                            calls[symbol] = call
                            item = {
                                "canonical_symbol": symbol,
                                "timeframe": timeframe,
                                "new_cursor_utc": call.cursor.isoformat() if call.cursor else None,
                                "stats": call.stats,
                            }
                            if call.backlog and in_time:
                                continuing.append(item)
                            else:
                                finishing.append({**item, "stats": {**call.stats, "continue": call.backlog}})
                        unchanged: list[dict[str, Any]] = []
                        if finishing:
                            answer = conn.execute(
                                query("worker_finish_many"), self.params(results=Jsonb(finishing))
                            ).fetchone()[0]
                            unchanged += answer["unchanged"]
                        if continuing:
                            answer = conn.execute(
                                query("worker_checkpoint_many"),
                                self.params(items=Jsonb(continuing), lease_seconds=s.lease_seconds),
                            ).fetchone()[0]
                            unchanged += answer["unchanged"]
                        if unchanged:
                            raise LeaseLost("; ".join(u["reason"] for u in unchanged))
                    # committed: bars and cursors together
                    for symbol, call in calls.items():
                        progress[symbol].add(call)
                    if first:
                        first = False
                        for symbol, result in fixed:
                            progress[symbol].add_reaggregated(result)
                    still = {item["canonical_symbol"] for item in continuing}
                    for t in pending:
                        if t.symbol not in still:
                            progress[t.symbol].outcome = "continue" if calls[t.symbol].backlog else "ok"
                    pending = [t for t in pending if t.symbol in still]
                    if pending and not self.pause:  # (a paused worker is watched call by call)
                        max_windows = _next_max_windows(
                            s.max_windows,
                            sum(c.stats["windows_processed"] for c in calls.values()),
                            time.monotonic() - call_started,
                            deadline - time.monotonic(),
                            len(pending),
                            _read_cap(timeframe, len(pending), self.buffer_pages),
                        )
                    if pending and self.pause:
                        time.sleep(self.pause)
        except Exception as exc:
            lost = database_unavailable(exc)
            if len(tasks) == 1 or lost:
                # One task, or the connection is gone (running the rest one by one would only fail
                # again): record the failure against each task still in hand.
                if lost:
                    log.warning(
                        "lost the database connection while catching up %d %s task(s): %s",
                        len(pending),
                        timeframe,
                        _error_text(exc),
                        extra={"event": "connection_lost", "timeframe": timeframe, "error": _error_text(exc)},
                    )
                kind = "lease_lost" if isinstance(exc, LeaseLost) else classify(exc)
                error = str(exc) if isinstance(exc, LeaseLost) else _error_text(exc)
                unrecorded = []
                for t in pending:
                    p = progress[t.symbol]
                    p.outcome, p.error = kind, error
                    if kind != "lease_lost" and (unrecorded or not self.record_failure(t, kind, error)):
                        unrecorded.append(t)
                if unrecorded:
                    log.warning(
                        "could not record the failure of %d %s task(s) (%s): the next claim of any worker "
                        "takes them over once the database is back (their session ended)",
                        len(unrecorded),
                        timeframe,
                        ", ".join(t.symbol for t in unrecorded[:5]) + ("..." if len(unrecorded) > 5 else ""),
                        extra={"event": "finish_failed", "timeframe": timeframe, "tasks": len(unrecorded)},
                    )
                pending = []
            else:
                log.debug(
                    "batch of %d %s tasks failed (%s); running them one by one",
                    len(pending),
                    timeframe,
                    _error_text(exc),
                )
        finally:
            self.active = None
        seconds = time.monotonic() - started
        results = []
        for t in tasks:
            p = progress[t.symbol]
            if any(t is q for q in pending):
                alone = self.catch_up([replace(t, cursor=p.cursor)], deadline)[0]
                results.append(p.merged(alone, seconds / len(tasks)))
            else:
                results.append(p.result(seconds / len(tasks)))
        return results

    def record_failure(self, task: Task, kind: str, error: str) -> bool:
        """agg_finish(false) (on a new connection if the last one broke); False when even that fails:
        then the task stays running until a claim sees that this worker's session ended (or the lease
        expires) and takes it over, recording why."""
        try:
            with self.connect() as conn:
                conn.execute(
                    query("worker_finish_failed"),
                    self.params(symbol=task.symbol, timeframe=task.timeframe, fail_kind=kind, error=error),
                )
        except Exception as exc:
            log.debug(
                "%s %s: could not record the %s failure: %s",
                task.symbol,
                task.timeframe,
                kind,
                _error_text(exc),
            )
            return False
        return True

    def seconds_to_next_due(self) -> float | None:
        with self.connect() as conn:
            row = conn.execute(query("worker_seconds_to_next_due")).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))


# A call is sized to at most this share of the time budget left (the rate is the last call's).
_BUDGET_SHARE = 0.8
_MAX_WINDOWS_CAP = 1_000_000


# A grown call reads per task at most this share of the shared buffers' pages in source rows.
_BUFFER_SHARE = 0.5


def _read_cap(timeframe: str, tasks: int, buffer_pages: int) -> int:
    """The most windows per task a grown call of several tasks may take: its source rows (at most
    max_source_bars per window) within half the shared buffers. A feed writes each minute's rows of
    all symbols together, so neighbouring symbols share heap pages, and the call reads them task after
    task: while one task's pages fit in the buffers the next task finds them there. Past that every
    row is a miss (1,000 symbols x 30 days, 128MB buffers: a call grown to 3,600 windows per task took
    39 us per window, 2,000-window calls 22 us). One task shares no pages with another: no cap."""
    tf = LADDER.get(timeframe)
    if tasks <= 1 or buffer_pages <= 0 or tf is None:
        return _MAX_WINDOWS_CAP
    return max(1, int(buffer_pages * _BUFFER_SHARE / tf.max_source_bars))


def _next_max_windows(
    floor: int, windows: int, seconds: float, remaining: float, tasks: int, cap: int = _MAX_WINDOWS_CAP
) -> int:
    """Windows per task for the next catch-up call of a backlog: as many as the last call's rate says
    fit into most of the time budget left, at most ``cap`` (_read_cap), never fewer than ``floor``
    (--max-windows). Fewer, larger calls: each call costs its planning, probes, locks and commit per
    task, whatever its size."""
    if windows <= 0 or seconds <= 0 or remaining <= 0 or tasks <= 0:
        return floor
    fit = windows / seconds * remaining * _BUDGET_SHARE / tasks
    return max(floor, int(min(fit, cap, _MAX_WINDOWS_CAP)))


class _Call:
    """One catch-up call's answer for one task."""

    def __init__(self, result: dict[str, Any], cursor_before: datetime | None) -> None:
        self.cursor = _timestamp(result.get("cursor_advanced_to")) or cursor_before
        self.stats = {k: int(result.get(k) or 0) for k in STAT_KEYS}
        self.backlog = bool(result.get("continue"))


class _Progress:
    """What the committed calls of one claim did so far."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.cursor_before = task.cursor
        self.cursor = task.cursor
        self.totals = dict.fromkeys(STAT_KEYS, 0)
        self.reaggregated = dict.fromkeys(REAGGREGATE_KEYS, 0)
        self.outcome = "continue"
        self.error: str | None = None

    def add(self, call: _Call) -> None:
        self.cursor = call.cursor
        for k in STAT_KEYS:
            self.totals[k] += call.stats[k]

    def add_reaggregated(self, result: dict[str, Any]) -> None:
        for k in REAGGREGATE_KEYS:
            self.reaggregated[k] += int(result.get(k) or 0)

    def result(self, seconds: float) -> TaskResult:
        both = {k: self.totals[k] + self.reaggregated[k] for k in _BOTH_PATHS}
        return TaskResult(
            symbol=self.task.symbol,
            timeframe=self.task.timeframe,
            windows=self.totals["windows_processed"],
            bars_created=both["bars_created"],
            bars_quality_poor=both["bars_quality_poor"],
            bars_skipped=self.totals["bars_skipped"],
            gaps_skipped=self.totals["gaps_skipped"],
            cursor_before=self.cursor_before,
            cursor_after=self.cursor,
            seconds=seconds,
            outcome=self.outcome,
            error=self.error,
            bars_reaggregated=self.reaggregated["bars_reaggregated"],
            bars_withdrawn=both["bars_withdrawn"],
            bars_rewritten=both["bars_rewritten"],
            bars_unchanged=both["bars_unchanged"],
            windows_reaggregated=self.reaggregated["windows"],
        )

    def merged(self, later: TaskResult, seconds: float) -> TaskResult:
        """This claim's committed batch calls followed by its run alone."""
        mine = self.result(seconds)
        return replace(
            later,
            windows=mine.windows + later.windows,
            bars_created=mine.bars_created + later.bars_created,
            bars_rewritten=mine.bars_rewritten + later.bars_rewritten,
            bars_withdrawn=mine.bars_withdrawn + later.bars_withdrawn,
            bars_unchanged=mine.bars_unchanged + later.bars_unchanged,
            bars_quality_poor=mine.bars_quality_poor + later.bars_quality_poor,
            bars_skipped=mine.bars_skipped + later.bars_skipped,
            gaps_skipped=mine.gaps_skipped + later.gaps_skipped,
            windows_reaggregated=mine.windows_reaggregated + later.windows_reaggregated,
            bars_reaggregated=mine.bars_reaggregated + later.bars_reaggregated,
            cursor_before=self.cursor_before,
            seconds=seconds + later.seconds,
        )


def _timestamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _short(ts: datetime | None) -> str:
    return ts.isoformat().replace("+00:00", "Z") if ts else "-"


def describe_bars(counts: dict[str, int] | Any) -> str:
    """'3 bars created, 1 rewritten, 0 withdrawn, 5 unchanged' from a mapping or an object with the
    four counts: the same words in every text output (log lines, run --once, backfill)."""

    def get(key: str) -> int:
        return int(counts.get(key, 0) if isinstance(counts, dict) else getattr(counts, key, 0))

    return (
        f"{get('bars_created'):,} bars created, {get('bars_rewritten'):,} rewritten, "
        f"{get('bars_withdrawn'):,} withdrawn, {get('bars_unchanged'):,} unchanged"
    )


def _describe(r: TaskResult) -> str:
    late = f"; {r.windows_reaggregated} late windows re-aggregated" if r.windows_reaggregated else ""
    text = (
        f"{r.symbol} {r.timeframe} {r.outcome}: {r.windows} windows, {describe_bars(r)} "
        f"({r.bars_quality_poor} poor, {r.bars_skipped} skipped, {r.gaps_skipped} gaps{late}), "
        f"cursor {_short(r.cursor_before)} -> {_short(r.cursor_after)} in {r.seconds:.3f}s"
    )
    return f"{text}: {r.error}" if r.error else text


# ---------------------------------------------------------------------------------------------
# run --once
# ---------------------------------------------------------------------------------------------
REQUIRED_FUNCTIONS = (
    "agg_claim_tasks",
    "agg_catchup_tasks",
    "agg_finish_many",
    "sync_agg_state_from_registry",
)


def check_schema(db: Database) -> None:
    """Fail with a clear message when the worker's SQL functions are missing (schema not upgraded).

    Checks the migrations table (a recorded schema with pending migrations is refused: the worker
    would run new code on old tables), then the functions themselves: the migrations may have been
    applied with psql or the Supabase CLI, which record nothing.
    """
    from baragg import migrate

    migrate.require_current(db)
    with db.connect(autocommit=True) as conn:
        missing = [
            name
            for name in REQUIRED_FUNCTIONS
            if not conn.execute(query("worker_has_function"), {"name": name}).fetchone()[0]
        ]
    if missing:
        raise BaraggError(
            f"the database schema is not current (function {missing[0]} is missing): run `baragg db upgrade`"
        )


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
        "run finished: %d task runs, %d windows, %s (%d late windows re-aggregated), %d failed in %.2fs",
        totals["task_runs"],
        totals["windows"],
        describe_bars(totals),
        totals["windows_reaggregated"],
        totals["transient"] + totals["hard"],
        summary.seconds,
        extra={"event": "run_finished", **totals, "seconds": round(summary.seconds, 3)},
    )
    return summary


class _ReconnectingConnection:
    """One autocommit connection for one claimer, replaced when it breaks; each new connection takes
    its session's worker lock (SESSION_LOCK_CLASS, a fresh random key) before any claim.

    Not behind a transaction pooler (``Database.prepare`` False: PgBouncer/Supavisor in transaction
    mode), where a session-level lock would stay with a server connection the pooler shares: there
    claims record no session and only the lease protects a task, as before.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn: psycopg.Connection | None = None
        self.session: int | None = None

    def __enter__(self) -> Callable[[], contextlib.AbstractContextManager[psycopg.Connection]]:
        return self.borrow

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @contextlib.contextmanager
    def borrow(self) -> Iterator[psycopg.Connection]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.close()
            conn = self.db.connect(autocommit=True)
            try:
                self.session = self._lock_session(conn) if self.db.prepare else None
            except BaseException:
                conn.close()
                raise
            self.conn = conn
        yield self.conn

    @staticmethod
    def _lock_session(conn: psycopg.Connection) -> int:
        rng = random.SystemRandom()
        for _ in range(8):
            key = rng.randint(1, 2**31 - 1)
            if conn.execute(query("worker_session_lock"), {"key": key}).fetchone()[0]:
                return key
        raise BaraggError("could not take a worker session lock (8 random keys were taken)")


def wait_for_database(
    db: Database, stop: threading.Event, timeout: float | None = None, what: str = "worker"
) -> bool:
    """Try to connect until it works (True) or ``stop`` is set (False); a WARNING per failed attempt,
    with backoff. After ``timeout`` seconds (None: never) the last error is raised."""

    def warn(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: the database is not reachable (attempt %d, %.0fs): %s; retrying in %.1fs",
            what,
            state.attempt_number,
            state.seconds_since_start or 0.0,
            _error_text(exc.__cause__ or exc) if exc else "?",
            delay,
            extra={"event": "database_unavailable", "attempt": state.attempt_number},
        )

    retrying = Retrying(
        retry=retry_if_exception(database_unavailable),
        wait=_retry_wait(),
        stop=stop_when_event_set(stop) | (stop_after_delay(timeout) if timeout is not None else stop_never),
        sleep=stop.wait,
        before_sleep=warn,
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                if stop.is_set():
                    return False
                db.connect(autocommit=True).close()
            if attempt.retry_state.attempt_number > 1:
                log.info("%s: the database is reachable", what, extra={"event": "database_available"})
    except Exception as exc:
        if stop.is_set() and database_unavailable(exc):
            return False
        if timeout is not None and database_unavailable(exc):
            raise BaraggError(
                f"the database was not reachable within --startup-timeout {timeout:g}s: "
                f"{_error_text(exc.__cause__ or exc)}"
            ) from exc
        raise
    return True


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------
class Worker:
    """``baragg worker``: ``concurrency`` threads, each claiming on its own connection.

    It first waits for the database (a WARNING per attempt, with backoff; ``startup_timeout`` bounds
    the wait, None: forever) and checks the schema. Every ``interval`` seconds (or earlier, when a
    task's next_run_at arrives) a thread syncs the registry (the first thread) and drains due tasks.
    When the database goes away, each thread retries with the same backoff (at most
    RETRY_MAX_DELAY between attempts) and resumes as soon as it can connect. ``stop()``
    (SIGINT/SIGTERM in ``run``) stops claiming, or waiting; the task in hand is finished (its current
    call completes, then the cursor is stored and the task released as due), waiting at most
    ``shutdown_timeout`` seconds before cancelling the statement in flight (a cancelled statement is a
    transient failure, recorded). Nothing is left running. A second signal exits at once.
    ``on_task`` is called from the worker threads.
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
        startup_timeout: float | None = None,
        on_task: Callable[[TaskResult], None] | None = None,
    ) -> None:
        self.db = db
        self.interval = interval
        self.concurrency = max(1, concurrency)
        self.shutdown_timeout = shutdown_timeout
        self.startup_timeout = startup_timeout
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
        self.waiting_for_database = False  # /healthz: alive while it waits at start-up

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
        connections = [_ReconnectingConnection(self.db) for _ in range(self.concurrency)]
        try:
            self.waiting_for_database = True
            try:
                if not wait_for_database(self.db, self._stop, self.startup_timeout):
                    log.info("stopped while waiting for the database", extra={"event": "worker_stopped"})
                    return
            finally:
                self.waiting_for_database = False
            check_schema(self.db)
            base = new_worker_id()
            self._claimers = [
                _Claimer(c.borrow, self.settings, f"{base}:{i}", self._stop, self.on_task)
                for i, c in enumerate(connections)
            ]
            log.info(
                "worker started: env %s, %d thread(s), interval %.1fs",
                self.settings.env,
                self.concurrency,
                self.interval,
                extra={"event": "worker_started", "env": self.settings.env, "concurrency": self.concurrency},
            )
            threads = [
                threading.Thread(target=self._loop, args=(c, i), name=f"baragg-worker-{i}", daemon=True)
                for i, c in enumerate(self._claimers)
            ]
            for t in threads:
                t.start()
            self._wait(threads)
        finally:
            for c in connections:
                with contextlib.suppress(Exception):
                    c.close()
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

    def _loop(self, claimer: _Claimer, index: int) -> None:
        """One claim thread: ticks until stopped. A tick that finds the database unreachable is
        retried with backoff (thread 0 logs a WARNING per attempt, the others at DEBUG); any other
        error is logged and the tick runs again after ``interval``."""
        state = {"next_sync": 0.0}

        def warn(retry: RetryCallState) -> None:
            exc = retry.outcome.exception() if retry.outcome else None
            delay = retry.next_action.sleep if retry.next_action else 0.0
            log.log(
                logging.WARNING if index == 0 else logging.DEBUG,
                "the database is unavailable (attempt %d, %.0fs): %s; retrying in %.1fs",
                retry.attempt_number,
                retry.seconds_since_start or 0.0,
                _error_text(exc.__cause__ or exc) if exc else "?",
                delay,
                extra={"event": "database_unavailable", "attempt": retry.attempt_number},
            )

        while not self._stop.is_set():
            try:
                retrying = Retrying(
                    retry=retry_if_exception(database_unavailable),
                    wait=_retry_wait(),
                    stop=stop_when_event_set(self._stop),
                    sleep=self._stop.wait,
                    before_sleep=warn,
                    reraise=True,
                )
                for attempt in retrying:
                    with attempt:
                        wait = self._tick(claimer, index == 0, state)
                    if attempt.retry_state.attempt_number > 1 and index == 0:
                        log.info(
                            "the database is back after %.1fs",
                            attempt.retry_state.seconds_since_start or 0.0,
                            extra={"event": "database_available"},
                        )
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.error(
                    "worker tick failed: %s",
                    _error_text(exc),
                    extra={"event": "tick_failed", "error": _error_text(exc)},
                )
                wait = self.interval
            self._stop.wait(wait)

    def _tick(self, claimer: _Claimer, syncs: bool, state: dict[str, float]) -> float:
        """Sync when due (first thread), drain due tasks; returns how long to sleep."""
        if syncs and time.monotonic() >= state["next_sync"]:
            if state["next_sync"]:
                # Due work first: a window that just became final is not held back by
                # the registry sync (~0.1 s at 1,000 symbols). The first tick syncs first.
                while not self._stop.is_set() and claimer.run_round():
                    pass
            claimer.sync()
            state["next_sync"] = time.monotonic() + self.interval
        while not self._stop.is_set() and claimer.run_round():
            pass
        if self._stop.is_set():
            return 0.0
        wait = self.interval
        until_due = claimer.seconds_to_next_due()
        if until_due is not None:
            wait = min(wait, max(until_due, 0.05))
        return wait
