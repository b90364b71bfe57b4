"""`baragg backfill`: catch every task up as fast as the machine allows, with progress.

It runs the real worker path (``baragg.worker.run_once``: claims, leases, bars and cursor committed
together), in several threads at once when asked: claims make that safe, and tasks of different
symbols then run in parallel. Progress is measured in time covered: each task has a span from its
cursor to the frontier of its symbol's 1m data, and every finished task run moves its part forward
(its ``cursor_after``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from baragg import registry
from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.sql import query

ProgressCallback = Callable[[float, float, str], None]  # (done, total, rate text); seconds of market time


@dataclass
class BackfillReport:
    tasks: int = 0
    task_runs: int = 0
    windows: int = 0
    # Every recomputed window is one of: created (inserted), rewritten (values changed), withdrawn
    # (soft-deleted), unchanged (equal to the stored bar: nothing written). A `--from` over data that
    # did not change rewrites nothing and reports its bars as unchanged.
    bars_created: int = 0
    bars_rewritten: int = 0
    bars_withdrawn: int = 0
    bars_unchanged: int = 0
    bars_quality_poor: int = 0
    windows_reaggregated: int = 0  # logged windows (late or corrected source data, DESIGN.md 5)
    bars_reaggregated: int = 0  # of the bars above, created or rewritten through that path
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Selected tasks it could not run: backing off, hard_failed, disabled, held by another worker,
    # or asked for but not active in the registry. Each {symbol, timeframe, reason}.
    not_run: list[dict[str, Any]] = field(default_factory=list)
    # Selected tasks with source rows before their agg_start_utc, which they never aggregate
    # (DESIGN.md 4, rule 1). Each {symbol, timeframe, agg_start_utc, first_source_before_start}.
    source_rows_before_start: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "windows_per_second": self.windows / self.seconds if self.seconds else None}


def _estimate(
    db: Database, symbols: list[str] | None, timeframes: list[str] | None
) -> dict[tuple[str, str], tuple[datetime | None, float]]:
    """Per task: (where it starts, seconds of market time it has to cover)."""
    with db.connect() as conn:
        rows = conn.execute(
            query("backfill_estimate"), {"symbols": symbols, "timeframes": timeframes}
        ).fetchall()
    out = {}
    for symbol, timeframe, _interval, start_at, end_at in rows:
        span = (end_at - start_at).total_seconds() if start_at and end_at else 0.0
        out[(symbol, timeframe)] = (start_at, max(0.0, span))
    return out


def restart_from(
    db: Database, start: datetime, *, symbols: list[str] | None = None, timeframes: list[str] | None = None
) -> int:
    """Set the tasks' agg_start_utc to ``start`` and reset their cursors, so that the worker
    bootstraps them again from there: history before the old agg_start_utc gets aggregated, and bars
    already stored are recomputed (nothing is written where the source did not change: those bars
    count as unchanged).
    Refused while a worker is running one of the tasks."""
    params = {"start": start, "symbols": symbols, "timeframes": timeframes}
    with db.connect() as conn:
        running = [name for (name,) in conn.execute(query("backfill_running"), params)]
        if running:
            raise BaraggError(
                f"cannot restart tasks a worker is running: {', '.join(running)}; try again later"
            )
        changed = conn.execute(query("backfill_restart_from"), params).fetchall()
        conn.commit()
    return len(changed)


def backfill(
    db: Database,
    *,
    env: str = "prod",
    symbols: list[str] | None = None,
    timeframes: list[str] | None = None,
    now: datetime | None = None,
    jobs: int = 1,
    start: datetime | None = None,
    on_progress: ProgressCallback | None = None,
) -> BackfillReport:
    """Run the worker until every selected task is at its frontier; returns what was done.

    With ``start``, the selected tasks first restart from there (see ``restart_from``).
    """
    try:
        from baragg import worker
    except ImportError as exc:  # pragma: no cover - only before the worker is installed
        raise BaraggError("the worker module is not available in this installation") from exc

    check_symbols(db, symbols)
    registry.sync(db, env)
    if start is not None:
        restart_from(db, start, symbols=symbols, timeframes=timeframes)
    spans = _estimate(db, symbols, timeframes)
    total = sum(span for _, span in spans.values()) or 1.0
    done: dict[tuple[str, str], float] = {key: 0.0 for key in spans}
    report = BackfillReport(tasks=len(spans))
    lock = threading.Lock()
    started = time.monotonic()

    ran_tasks: set[tuple[str, str]] = set()

    def on_task(result: Any) -> None:
        key = (result.symbol, result.timeframe)
        with lock:
            ran_tasks.add(key)
            report.task_runs += 1
            report.windows += result.windows
            report.bars_created += result.bars_created
            report.bars_rewritten += result.bars_rewritten
            report.bars_withdrawn += result.bars_withdrawn
            report.bars_unchanged += result.bars_unchanged
            report.bars_quality_poor += result.bars_quality_poor
            report.windows_reaggregated += result.windows_reaggregated
            report.bars_reaggregated += result.bars_reaggregated
            if result.outcome in ("transient", "hard"):
                report.failures.append(
                    {
                        "symbol": result.symbol,
                        "timeframe": result.timeframe,
                        "kind": result.outcome,
                        "error": result.error,
                    }
                )
            if key in spans and result.cursor_after is not None:
                start, span = spans[key]
                origin = start if start is not None else result.cursor_before
                if origin is not None:
                    covered = (result.cursor_after - origin) / timedelta(seconds=1)
                    done[key] = min(span, max(done[key], covered))
            if on_progress:
                elapsed = max(time.monotonic() - started, 1e-9)
                on_progress(sum(done.values()), total, f"{report.windows / elapsed:,.0f} windows/s")

    def run() -> None:
        worker.run_once(db, env=env, now=now, symbols=symbols, timeframes=timeframes, on_task=on_task)

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            run()
        except BaseException as exc:  # reported after all threads end
            errors.append(exc)

    if jobs <= 1:
        run()
    else:
        threads = [threading.Thread(target=guarded, name=f"backfill-{i}") for i in range(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    report.seconds = time.monotonic() - started
    ran = {(r["symbol"], r["timeframe"]) for r in report.failures} | set(ran_tasks)
    report.not_run = not_run(db, env, symbols, timeframes, ran=ran, now=now)
    report.source_rows_before_start = rows_before_start(db, symbols, timeframes)
    if on_progress:
        complete = not report.failures and not report.not_run
        on_progress(total if complete else sum(done.values()), total, "")
    return report


def check_symbols(db: Database, symbols: list[str] | None) -> None:
    """An unknown symbol is a usage error, before anything is written."""
    if not symbols:
        return
    with db.connect() as conn:
        known = {name for (name,) in conn.execute(query("backfill_known_symbols"), {"symbols": symbols})}
    unknown = [name for name in dict.fromkeys(symbols) if name not in known]
    if unknown:
        from baragg.terminal import printable

        names = ", ".join(f"'{printable(name)}'" for name in unknown)
        raise InvalidInput(
            f"backfill: unknown symbol {names} (registered symbols: baragg registry list; "
            f"add one with: baragg registry add SYMBOL)"
        )


def not_run(
    db: Database,
    env: str,
    symbols: list[str] | None,
    timeframes: list[str] | None,
    *,
    ran: set[tuple[str, str]],
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The selected tasks this backfill could not run, each with the reason and what to do.

    A task that did not run because it is at its frontier is fine and not listed. Tasks the registry
    does not want (``enabled = false``) are listed only when asked for by name (--symbol)."""
    clock = now or datetime.now(UTC)
    with db.connect() as conn:
        rows = conn.execute(
            query("backfill_task_states"), {"symbols": symbols, "timeframes": timeframes}
        ).fetchall()
    out: list[dict[str, Any]] = []
    active: set[str] = set()
    for symbol, timeframe, enabled, status, streak, error, next_run_at, owner, lease_end in rows:
        if enabled:
            active.add(symbol)
        if (symbol, timeframe) in ran or not enabled:
            continue
        error_text = f": {' '.join(error.split())[:300]}" if error else ""
        retry = f"retry now with: baragg reenable {symbol} {timeframe}"
        if status == "disabled":
            reason = f"disabled after {streak} failures in a row{error_text}; {retry}"
        elif status == "hard_failed":
            reason = f"hard_failed, next retry {_when(next_run_at)}{error_text}; {retry}"
        elif status == "running" and lease_end is not None and lease_end > clock:
            reason = f"held by worker {owner} until {_when(lease_end)}"
        elif streak or error:
            reason = f"backing off after a failure until {_when(next_run_at)}{error_text}; {retry}"
        else:
            continue
        out.append({"symbol": symbol, "timeframe": timeframe, "status": status, "reason": reason})
    for symbol in dict.fromkeys(symbols or []):
        if symbol not in active:
            what = f" {'/'.join(timeframes)}" if timeframes else ""
            out.append(
                {
                    "symbol": symbol,
                    "timeframe": "/".join(timeframes) if timeframes else None,
                    "status": None,
                    "reason": f"no active{what} task in env {env} (the registry has the symbol inactive "
                    "or the timeframe's flag off: baragg registry list)",
                }
            )
    return out


def rows_before_start(
    db: Database, symbols: list[str] | None, timeframes: list[str] | None
) -> list[dict[str, Any]]:
    """Selected tasks whose source has rows before their agg_start_utc (never aggregated)."""
    with db.connect() as conn:
        rows = conn.execute(
            query("backfill_before_start"), {"symbols": symbols, "timeframes": timeframes}
        ).fetchall()
    return [
        {
            "symbol": symbol,
            "timeframe": timeframe,
            "agg_start_utc": start.astimezone(UTC),
            "first_source_before_start": first.astimezone(UTC),
        }
        for symbol, timeframe, start, first in rows
    ]


def _when(moment: datetime | None) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if moment is not None else "now"
