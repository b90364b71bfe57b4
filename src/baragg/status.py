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
from baragg.errors import BaraggError
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
    bars_created: int
    bars_quality_poor: int
    lease_owner: str | None
    pending_invalidations: int = 0  # windows to re-aggregate: their source changed after aggregation
    session: str = "24x7"  # the symbol's trading session, which cuts its windows (DESIGN.md 3b)

    @property
    def alert(self) -> bool:
        return self.status in ("hard_failed", "disabled")

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "alert": self.alert}


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
            bars_quality_poor=r["total_bars_quality_poor"],
            lease_owner=r["lease_owner"],
            pending_invalidations=r["pending_invalidations"],
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
    """The status table (rich): problems in colour and first."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(header_style="bold", box=None, pad_edge=False)
    sessions = any(t.session != "24x7" for t in tasks)  # the column only when a symbol has one
    for name, justify in (
        ("symbol", "left"),
        *((("session", "left"),) if sessions else ()),
        ("tf", "left"),
        ("status", "left"),
        ("enabled", "left"),
        ("cursor", "left"),
        ("behind data", "right"),
        ("behind now", "right"),
        ("next run", "left"),
        ("streak", "right"),
        ("bars", "right"),
        ("poor", "right"),
        ("late", "right"),
        ("last error", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def when(moment: datetime | None) -> str:
        return moment.strftime("%Y-%m-%d %H:%M") if moment else "-"

    for t in tasks:
        style = {"hard_failed": "bold red", "disabled": "yellow", "running": "cyan"}.get(t.status, "")
        if not t.enabled and not style:
            style = "dim"
        error = (t.last_error or "")[:60]
        table.add_row(
            t.symbol,
            *((t.session,) if sessions else ()),
            t.timeframe,
            t.status.upper() if t.alert else t.status,
            "yes" if t.enabled else "no",
            when(t.cursor),
            human_duration(t.lag_frontier_seconds),
            human_duration(t.lag_now_seconds),
            when(t.next_run_at),
            str(t.hard_fail_streak or ""),
            f"{t.bars_created:,}",
            f"{t.bars_quality_poor:,}" if t.bars_quality_poor else "",
            f"{t.pending_invalidations:,}" if t.pending_invalidations else "",
            error,
            style=style,
        )
    console.print(table)
    alerts = [t for t in tasks if t.alert]
    if alerts:
        console.print(
            f"[bold red]{len(alerts)} task(s) need attention[/] "
            "(hard_failed: failing repeatedly, still retried; disabled: an optional task stopped after "
            "failures; after fixing the cause: `baragg reenable SYMBOL TIMEFRAME`)"
        )
    if not tasks:
        console.print(
            "no tasks yet (register symbols with `baragg registry add`, then `baragg registry sync`)"
        )


def reenable(db: Database, symbol: str, timeframe: str, *, now: datetime | None = None) -> bool:
    """Give a hard_failed or disabled task a fresh start (streak 0, due now); False if it needed none."""
    with db.connect() as conn:
        row = conn.execute(
            query("status_reenable"), {"symbol": symbol, "timeframe": timeframe, "now": now}
        ).fetchone()
        conn.commit()
    return bool(row and row[0] and row[0].get("changed"))
