"""What the status page and the JSON API read: tasks with their lag, symbols, bars, a summary.

Each function takes an open connection and returns plain JSON-ready values, so the HTTP layer only
routes and encodes, and the metrics collector can reuse the same task query.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from baragg.errors import InvalidInput
from baragg.sql import query
from baragg.timeframes import LADDER

# The timeframes a chart can show: raw 1m bars from data_bars, then the ladder's derived timeframes.
CHART_TIMEFRAMES = ("1m", *sorted(LADDER, key=lambda name: LADDER[name].duration_rank))
TIMEFRAME_ORDER = {tf: i for i, tf in enumerate(CHART_TIMEFRAMES)}

DEFAULT_BAR_LIMIT = 10_000
MAX_BAR_LIMIT = 500_000

# Statuses an operator must act on. A task whose `enabled` is false counts as disabled whatever its
# status column says: it will not run.
ALERT_STATUSES = ("hard_failed", "disabled")


def iso(value: datetime | None) -> str | None:
    """UTC timestamps as ISO 8601 with a Z, the one format every client parses."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def effective_status(row: dict[str, Any]) -> str:
    """The status an operator sees: `disabled` when the task is switched off, else the status column."""
    return "disabled" if not row["enabled"] else str(row["status"])


def fetch_tasks(conn: psycopg.Connection, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every task in data_agg_state with cursor, frontier and lag (raw rows, datetimes kept)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("obs_tasks"), {"now": now}).fetchall()


def task_json(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "now_utc":
            continue
        out[key] = iso(value) if isinstance(value, datetime) else value
    out["state"] = effective_status(row)
    return out


def tasks(conn: psycopg.Connection, now: datetime | None = None) -> dict[str, Any]:
    rows = fetch_tasks(conn, now)
    now_utc = rows[0]["now_utc"] if rows else (now or conn.execute("SELECT now()").fetchone()[0])
    return {"now": iso(now_utc), "tasks": [task_json(r) for r in rows]}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by state and the worst lag per timeframe, over the rows of fetch_tasks."""
    by_state = Counter(effective_status(r) for r in rows)
    worst: dict[str, dict[str, Any]] = {}
    for r in rows:
        if effective_status(r) == "disabled":
            continue
        tf = r["timeframe"]
        entry = worst.setdefault(
            tf, {"lag_frontier_seconds": None, "lag_now_seconds": None, "symbol_frontier": None}
        )
        lag = r["lag_frontier_seconds"]
        if lag is not None and (entry["lag_frontier_seconds"] is None or lag > entry["lag_frontier_seconds"]):
            entry["lag_frontier_seconds"] = lag
            entry["symbol_frontier"] = r["symbol"]
        lag_now = r["lag_now_seconds"]
        if lag_now is not None and (entry["lag_now_seconds"] is None or lag_now > entry["lag_now_seconds"]):
            entry["lag_now_seconds"] = lag_now
    return {
        "tasks": len(rows),
        "by_state": dict(sorted(by_state.items())),
        "alerts": [
            {
                "symbol": r["symbol"],
                "timeframe": r["timeframe"],
                "state": effective_status(r),
                "streak": r["streak"],
                "last_error": r["last_error"],
            }
            for r in rows
            if effective_status(r) in ALERT_STATUSES
        ],
        "worst_lag": dict(sorted(worst.items(), key=lambda kv: TIMEFRAME_ORDER.get(kv[0], 99))),
        # Every recomputed window counts once: created (inserted), rewritten (values changed),
        # withdrawn (soft-deleted) or unchanged (equal: nothing written). Bars stored = created -
        # withdrawn (over a task's life, when no bar was removed by hand).
        "bars_created": sum(int(r["bars_created"] or 0) for r in rows),
        "bars_rewritten": sum(int(r["bars_rewritten"] or 0) for r in rows),
        "bars_withdrawn": sum(int(r["bars_withdrawn"] or 0) for r in rows),
        "bars_unchanged": sum(int(r["bars_unchanged"] or 0) for r in rows),
        "bars_quality_poor": sum(int(r["bars_quality_poor"] or 0) for r in rows),
        "invalidations_pending": sum(int(r["invalidations_pending"] or 0) for r in rows),
    }


def summary(conn: psycopg.Connection, now: datetime | None = None) -> dict[str, Any]:
    rows = fetch_tasks(conn, now)
    now_utc = rows[0]["now_utc"] if rows else (now or conn.execute("SELECT now()").fetchone()[0])
    return {"now": iso(now_utc), **summarize(rows)}


def symbols(conn: psycopg.Connection) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("obs_symbols")).fetchall()
    out = []
    for r in rows:
        tfs = set(r["timeframes"])
        if r["has_1m"]:
            tfs.add("1m")
        out.append(
            {
                "symbol": r["symbol"],
                "asset_class": r["asset_class"],
                "session": r["session"],
                "active": r["active"],
                "timeframes": sorted(tfs, key=lambda tf: TIMEFRAME_ORDER.get(tf, 99)),
            }
        )
    return {"symbols": out}


def parse_time(name: str, text: str | None) -> datetime | None:
    """A query-string time: ISO 8601 (no offset means UTC) or epoch seconds."""
    if text is None or text == "":
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise InvalidInput(f"{name}: not a finite number: {text!r}")
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise InvalidInput(f"{name}: epoch seconds out of range: {text!r}") from exc
    try:
        # A "+" in a query string arrives as a space: "2024-01-01T00:00:00 00:00" means +00:00.
        value = datetime.fromisoformat(text.replace(" ", "+") if "T" in text else text)
    except ValueError as exc:
        raise InvalidInput(f"{name}: not ISO 8601 or epoch seconds: {text!r}") from exc
    try:
        # In UTC from here on; 0001-01-01T00:00+14:00 is before the first representable UTC instant.
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"{name}: out of range: {text!r}") from exc


def parse_limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_BAR_LIMIT
    try:
        limit = int(text)
    except ValueError as exc:
        raise InvalidInput(f"limit: not an integer: {text!r}") from exc
    if not 1 <= limit <= MAX_BAR_LIMIT:
        raise InvalidInput(f"limit: must be between 1 and {MAX_BAR_LIMIT}, got {limit}")
    return limit


def bars_params(params: dict[str, str]) -> dict[str, Any]:
    """Validate the query string of /api/bars; every problem is an InvalidInput (HTTP 400)."""
    unknown = set(params) - {"symbol", "timeframe", "from", "to", "limit"}
    if unknown:
        raise InvalidInput(f"unknown parameter: {sorted(unknown)[0]}")
    symbol = params.get("symbol", "").strip()
    if not symbol:
        raise InvalidInput("symbol: required")
    timeframe = params.get("timeframe", "").strip()
    if timeframe not in CHART_TIMEFRAMES:
        raise InvalidInput(f"timeframe: must be one of {', '.join(CHART_TIMEFRAMES)}, got {timeframe!r}")
    start = parse_time("from", params.get("from"))
    end = parse_time("to", params.get("to"))
    if start and end and start >= end:
        raise InvalidInput("from: must be before to")
    return {
        "symbol": symbol,
        "timeframe": timeframe,
        "from": start,
        "to": end,
        "limit": parse_limit(params.get("limit")),
    }


class UnknownSymbol(InvalidInput):
    """A well-formed request for a symbol the registry does not have (HTTP 404)."""


def bars_json(conn: psycopg.Connection, params: dict[str, Any]) -> str:
    """The JSON text of /api/bars, built by PostgreSQL (see obs_bars)."""
    if not conn.execute(query("obs_symbol_exists"), {"symbol": params["symbol"]}).fetchone()[0]:
        raise UnknownSymbol(f"symbol: not in the registry: {params['symbol']!r}")
    count, truncated, columns = conn.execute(query("obs_bars"), params).fetchone()
    head = {
        "symbol": params["symbol"],
        "timeframe": params["timeframe"],
        "from": iso(params["from"]),
        "to": iso(params["to"]),
        "limit": params["limit"],
        "count": count,
        "truncated": truncated,
    }
    # Splice the columns object in as text: re-parsing ~1M numbers in Python would cost more than the query.
    return json.dumps(head)[:-1] + ', "columns": ' + columns + "}"


def cron(conn: psycopg.Connection) -> dict[str, Any]:
    """/api/cron: the pg_cron job that runs the worker round (baragg db schedule) and its latest runs;
    {"job": null} without pg_cron or without the job."""
    from baragg import pgcron

    job = pgcron.job_status_on(conn, limit=10)
    if job is None:
        return {"job": None}
    out = job.as_dict()
    out["runs"] = [
        {**r, "start_time": iso(r["start_time"]), "end_time": iso(r["end_time"])} for r in out["runs"]
    ]
    return {"job": out}
