"""What every task is doing: `baragg status` (a table for people, JSON for scripts).

Two lags per task: behind its *frontier* (how much source data is already there but not yet
aggregated; should be about zero after a run) and behind *now* (how old the newest bar it can have
is; grows over weekends and outages, which is not a fault). A task that failed hard or was disabled
by failures sorts first and stands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.rows import dict_row

from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.sql import query

# Problems first: failed tasks, then tasks disabled by failures, running ones, the rest.
_STATUS_ORDER = {"hard_failed": 0, "disabled": 1, "running": 2, "idle": 3}


@dataclass(frozen=True)
class TaskStatus:
    symbol: str
    timeframe: str
    status: str
    enabled: bool
    mandatory: bool
    cursor: datetime | None
    frontier: datetime | None
    lag_frontier_seconds: float | None
    lag_now_seconds: float | None
    next_run_at: datetime | None
    hard_fail_streak: int
    last_error: str | None
    last_successful_at: datetime | None
    bars_created: int  # inserted
    bars_quality_poor: int
    lease_owner: str | None
    pending_invalidations: int = 0  # windows to re-aggregate: their source changed after aggregation
    bars_rewritten: int = 0  # stored bars whose values changed
    bars_withdrawn: int = 0  # stored bars soft-deleted (their source vanished)
    bars_unchanged: int = 0  # recomputed equal to the stored bar: nothing written
    source_timeframe: str = "1m"
    agg_start: datetime | None = None  # None: no explicit start, from the first source data
    first_source_before_start: datetime | None = None  # source rows it will never aggregate (rule 1)
    session: str = "24x7"  # the symbol's trading session, which cuts its windows (DESIGN.md 3b)

    @property
    def alert(self) -> bool:
        return self.status in ("hard_failed", "disabled")

    @property
    def backing_off(self) -> bool:
        """Failed lately and waiting for its retry (`baragg reenable` retries now)."""
        return self.status == "idle" and self.enabled and (self.hard_fail_streak > 0 or bool(self.last_error))

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "alert": self.alert,
            "backing_off": self.backing_off,
            "source_rows_before_start": self.first_source_before_start is not None,
        }


def task_status(
    db: Database, *, now: datetime | None = None, symbols: list[str] | None = None
) -> list[TaskStatus]:
    """Every task, problems first, then by symbol and timeframe duration."""
    with db.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
        ready = cur.execute(query("status_ready")).fetchone()
        if not ready or not ready["ready"]:
            raise BaraggError("the database schema is not current: run `baragg db upgrade` first")
        rows = cur.execute(query("status_tasks"), {"now": now, "symbols": symbols}).fetchall()
    out = [
        TaskStatus(
            symbol=r["canonical_symbol"],
            timeframe=r["timeframe"],
            status=r["status"],
            enabled=r["enabled"],
            mandatory=r["is_mandatory"],
            cursor=_utc(r["last_agg_bar_ts_utc"]),
            frontier=_utc(r["frontier"]),
            lag_frontier_seconds=_seconds(r["lag_frontier_seconds"]),
            lag_now_seconds=_seconds(r["lag_now_seconds"]),
            next_run_at=_utc(r["next_run_at"]),
            hard_fail_streak=r["hard_fail_streak"],
            last_error=r["last_error"],
            last_successful_at=_utc(r["last_successful_at_utc"]),
            bars_created=r["total_bars_created"],
            bars_rewritten=r["total_bars_rewritten"],
            bars_withdrawn=r["total_bars_withdrawn"],
            bars_unchanged=r["total_bars_unchanged"],
            bars_quality_poor=r["total_bars_quality_poor"],
            lease_owner=r["lease_owner"],
            pending_invalidations=r["pending_invalidations"],
            source_timeframe=r["ladder_source"],
            agg_start=_utc(r["agg_start_utc"]),
            first_source_before_start=_utc(r["first_before_start"]),
            session=r["session"] or "24x7",
        )
        for r in rows
    ]
    return sorted(out, key=lambda t: (_STATUS_ORDER.get(t.status, 9), not t.enabled))


def _utc(value: datetime | None) -> datetime | None:
    """Times in UTC whatever the session's TimeZone setting."""
    return value.astimezone(UTC) if value is not None else None


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def human_duration(seconds: float | None) -> str:
    """3d 4h, 2h 5m, 4m, 0 — short and coarse, for a table."""
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "0"
    delta = timedelta(seconds=int(seconds))
    days, rest = delta.days, delta.seconds
    hours, minutes = rest // 3600, rest % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{rest}s"


def render(tasks: list[TaskStatus], *, console: Any = None, now: datetime | None = None) -> None:
    """The status table (rich), readable at 80 columns: problems in colour and first; the details
    that do not fit a column (last errors, rows before a task's start) as lines below it.

    Names and error texts come from the database and are shown with control characters escaped, so
    a name cannot move the cursor or recolour the terminal.
    """
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    clock = now or datetime.now(UTC)
    # Counts that are usually zero get a column only when some task has one, in this order of
    # importance, and only while the table still fits the terminal (the rest: --json).
    optional = [
        ("late", lambda t: t.pending_invalidations),
        ("poor", lambda t: t.bars_quality_poor),
        ("rewritten", lambda t: t.bars_rewritten),
        ("withdrawn", lambda t: t.bars_withdrawn),
        ("unchanged", lambda t: t.bars_unchanged),
    ]
    optional = [(name, value) for name, value in optional if any(value(t) for t in tasks)]
    shown = len(optional)
    table = _table(tasks, clock, optional)
    while shown and _width(console, table) > console.width:
        shown -= 1
        table = _table(tasks, clock, optional[:shown])
    if tasks:
        # Never cut a column: when the names are too long for the terminal, the table is as wide as it
        # needs (the terminal wraps the line) instead of rich truncating "GBPUSD" to "GBPU…".
        width = console.width
        console.width = max(width, _width(console, table))
        try:
            console.print(table)
        finally:
            console.width = width
    if shown < len(optional):
        left_out = ", ".join(name for name, _ in optional[shown:])
        console.print(Text(f"(not shown at this width: {left_out}; see --json)"))
    for line in notes(tasks, clock):
        console.print(Text(line), soft_wrap=False)
    alerts = [t for t in tasks if t.alert]
    if alerts:
        console.print(
            f"[bold red]{len(alerts)} task(s) need attention[/] "
            "(FAILED: hard_failed, failing repeatedly, still retried; DISABLED: an optional task stopped "
            "after failures; after fixing the cause: `baragg reenable SYMBOL TIMEFRAME`)"
        )
    if not tasks:
        console.print(
            "no tasks yet (register symbols with `baragg registry add`, then `baragg registry sync`)"
        )


def _table(tasks: list[TaskStatus], clock: datetime, optional: list[tuple[str, Any]]) -> Any:
    """The task table with the base columns and the given optional count columns."""
    from rich.table import Table
    from rich.text import Text

    from baragg.terminal import printable

    # One space between columns (two-line headers keep the numeric columns narrow): with symbols of
    # up to ~12 characters the base columns fit 80; longer names widen the table, never get cut.
    table = Table(header_style="bold", box=None, pad_edge=False, padding=(0, 1, 0, 0))
    sessions = any(t.session != "24x7" for t in tasks)  # the column only when a symbol has one
    columns = [
        ("symbol", "left"),
        *((("session", "left"),) if sessions else ()),
        ("tf", "left"),
        ("status", "left"),
        ("cursor (UTC)", "left"),
        ("behind\ndata", "right"),
        ("behind\nnow", "right"),
        ("next\nrun", "right"),
        ("bars", "right"),
    ]
    columns += [(name, "right") for name, _ in optional]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for t in tasks:
        style = {"hard_failed": "bold red", "disabled": "yellow", "running": "cyan"}.get(t.status, "")
        if t.backing_off:
            style = "yellow"
        if not t.enabled and not style:
            style = "dim"
        cells = [
            Text(printable(t.symbol)),
            *([Text(printable(t.session))] if sessions else []),
            Text(printable(t.timeframe)),
            Text(_state(t)),
            Text(t.cursor.strftime("%Y-%m-%d %H:%M") if t.cursor else "-"),
            Text(human_duration(t.lag_frontier_seconds)),
            Text(human_duration(t.lag_now_seconds)),
            Text(_relative(t.next_run_at, clock) if t.enabled and t.status != "disabled" else "-"),
            Text(f"{t.bars_created:,}"),
        ]
        cells += [Text(f"{value(t):,}" if value(t) else "") for _, value in optional]
        table.add_row(*cells, style=style)
    return table


def _width(console: Any, table: Any) -> int:
    """The width the table needs to show every cell whole."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(width=100_000), table).maximum


def _state(t: TaskStatus) -> str:
    """The status column: idle, running, off (the registry does not want it), FAILED (hard_failed),
    DISABLED (three strikes), or backoff for a task waiting to retry after a failure."""
    if not t.enabled:
        return "off"
    if t.status == "hard_failed":
        return "FAILED"
    if t.status == "disabled":
        return "DISABLED"
    if t.backing_off:
        return "backoff"
    return t.status


def _relative(moment: datetime | None, clock: datetime) -> str:
    """When the next run is, relative to the clock: "due", "in 4m", "in 2h 5m"."""
    if moment is None or moment <= clock:
        return "due"
    return f"in {human_duration((moment - clock).total_seconds())}"


def notes(tasks: list[TaskStatus], clock: datetime) -> list[str]:
    """What the table cannot show: last errors, and source rows before a task's start (never
    aggregated, with the command that includes them). Names and errors are escaped."""
    from baragg.terminal import printable

    out = []
    for t in tasks:
        if t.last_error:
            error = printable(" ".join(t.last_error.split()))
            if len(error) > 200:
                error = error[:199] + "…"
            streak = f" ({t.hard_fail_streak} in a row)" if t.hard_fail_streak else ""
            out.append(f"{printable(t.symbol)} {printable(t.timeframe)} last error{streak}: {error}")
    before: dict[str, list[TaskStatus]] = {}
    for t in tasks:
        if t.first_source_before_start is not None:
            before.setdefault(t.symbol, []).append(t)
    for symbol, group in before.items():
        first = min(t.first_source_before_start for t in group if t.first_source_before_start)
        start = max(t.agg_start for t in group if t.agg_start)
        out.append(before_start_note(symbol, [t.timeframe for t in group], first, start))
    return out


def before_start_note(symbol: str, timeframes: list[str], first: datetime, start: datetime) -> str:
    """One line: a symbol's source rows before its tasks' start are never aggregated, and the fix."""
    from baragg.terminal import printable

    return (
        f"note: {printable(symbol)} has source rows from {first:%Y-%m-%d %H:%M} before the start of its "
        f"{printable(', '.join(timeframes))} task(s) ({start:%Y-%m-%d %H:%M}): never aggregated; "
        f"to include them: baragg backfill --symbol {printable(symbol)} --from {first:%Y-%m-%d}"
    )


def reenable(
    db: Database, symbol: str, timeframe: str, *, env: str = "prod", now: datetime | None = None
) -> None:
    """Retry a failing task now: hard_failed, disabled after three strikes, or backing off after one
    or two (idle, streak 0, due now). Refused, with the reason, for a task that is not failing, is
    running, or that the registry has inactive in ``env`` (the next sync would disable it again)."""
    from baragg.terminal import printable

    name = f"{printable(symbol)} {printable(timeframe)}"
    with db.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            query("status_reenable_check"), {"symbol": symbol, "timeframe": timeframe, "env": env}
        ).fetchone()
        if row is None:
            raise InvalidInput(f"no task {name} (the tasks are listed by: baragg status)")
        if not row["wanted"]:
            raise InvalidInput(
                f"{name}: the registry has it inactive in env {env} (the symbol inactive, or its timeframe "
                f"flag off); activate it first, e.g. baragg registry set {printable(symbol)} --active"
            )
        if row["status"] == "running":
            raise InvalidInput(f"{name} is running now (held by {row['lease_owner']}); nothing to retry")
        failing = (
            row["status"] in ("hard_failed", "disabled")
            or not row["enabled"]
            or row["hard_fail_streak"] > 0
            or row["last_error"] is not None
        )
        if not failing:
            raise InvalidInput(f"{name} is neither failing nor disabled: nothing to retry")
        cur.execute(query("status_reenable"), {"symbol": symbol, "timeframe": timeframe, "now": now})
        changed = cur.fetchone()
        conn.commit()
    if not changed or not next(iter(changed.values())).get("changed"):
        raise BaraggError(f"{name}: the database did not re-enable it (it changed meanwhile); try again")
