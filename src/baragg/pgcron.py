"""The worker round as a pg_cron job: ``baragg db schedule`` / ``baragg db unschedule``, and the job's
recent runs for ``baragg status`` and the status page.

The round itself is SQL (functions/40_round.sql): a DO block that commits between steps of
``baragg_round_step``, the same claims, leases and functions as ``baragg run --once``, so it can run
beside Python workers. pg_cron runs it as the role that scheduled it, in this database (pg_cron lives in
one database per server: ``cron.database_name``; on Supabase that is ``postgres``, where the data is).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.sql import query

JOB_NAME = "baragg"
DEFAULT_EVERY = "1 minute"
DEFAULT_BUDGET = 50  # seconds; a round stops claiming after this long
_EVERY = re.compile(r"^\s*(\d+)\s*(minute|minutes|min|hour|hours|h)\s*$", re.IGNORECASE)
_CRON_FIELD = re.compile(r"^[0-9*,/\-]+$")


@dataclass(frozen=True)
class CronRun:
    runid: int
    status: str  # starting | running | succeeded | failed (pg_cron's words)
    message: str | None
    start_time: datetime | None
    end_time: datetime | None

    @property
    def seconds(self) -> float | None:
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": self.seconds}


@dataclass(frozen=True)
class CronJob:
    jobid: int
    schedule: str
    command: str
    active: bool
    username: str
    database: str
    runs: list[CronRun] = field(default_factory=list)

    @property
    def env(self) -> str | None:
        """The environment the round runs for (read from its command)."""
        match = re.search(r"baragg_round_start\('((?:[^']|'')*)'", self.command)
        return match.group(1).replace("''", "'") if match else None

    @property
    def failures(self) -> list[CronRun]:
        return [r for r in self.runs if r.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("runs", "command")}
        return {**out, "env": self.env, "runs": [r.as_dict() for r in self.runs]}


def parse_every(text: str) -> tuple[str, int | None]:
    """``--every``: 'N minutes' or 'N hours' → a cron schedule and its period in seconds; a five-field
    cron expression passes through (period unknown)."""
    match = _EVERY.match(text)
    if match:
        n, unit = int(match.group(1)), match.group(2).lower()
        if unit.startswith("m"):
            if not 1 <= n <= 59:
                raise InvalidInput(f"--every {text!r}: minutes must be 1 to 59")
            return ("* * * * *" if n == 1 else f"*/{n} * * * *"), n * 60
        if not 1 <= n <= 23:
            raise InvalidInput(f"--every {text!r}: hours must be 1 to 23")
        return ("0 * * * *" if n == 1 else f"0 */{n} * * *"), n * 3600
    fields = text.split()
    if len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields):
        return " ".join(fields), None
    raise InvalidInput(
        f"--every {text!r}: expected e.g. '1 minute', '5 minutes', '1 hour' or a cron expression"
    )


def default_budget(period_seconds: int | None) -> int:
    """Seconds a round may claim for: 50, or less when the schedule is tighter (rounds never overlap)."""
    if period_seconds is None:
        return DEFAULT_BUDGET
    return max(1, min(DEFAULT_BUDGET, period_seconds - 10))


def _require_cron(conn: psycopg.Connection) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        state = cur.execute(query("cron_state")).fetchone()
    assert state is not None
    if not state["installed"]:
        if state["available"]:
            raise BaraggError(
                "pg_cron is not installed in this database: CREATE EXTENSION pg_cron (it must also be in "
                "shared_preload_libraries, with cron.database_name this database; on Supabase: Database > "
                "Extensions > pg_cron)"
            )
        raise BaraggError(
            "pg_cron is not available on this server: install it (e.g. the postgresql-NN-cron package), add "
            "it to shared_preload_libraries and CREATE EXTENSION pg_cron; or run `baragg worker` instead"
        )
    if not state["usable"]:
        user = conn.execute("SELECT current_user").fetchone()[0]
        raise BaraggError(f"role {user} may not use pg_cron: GRANT USAGE ON SCHEMA cron TO {user}")
    return state


SESSION_DAYS_AHEAD = timedelta(days=5 * 366)
SESSION_WARN_WITHIN = timedelta(days=60)


def schedule(
    db: Database, *, every: str = DEFAULT_EVERY, env: str = "prod", budget: int | None = None
) -> CronJob:
    """Create the job, or change its schedule, environment and budget when it exists."""
    cron_schedule, period = parse_every(every)
    budget = budget if budget is not None else default_budget(period)
    with db.connect() as conn:
        _require_cron(conn)
        try:
            conn.execute(
                query("cron_schedule"),
                {"job": JOB_NAME, "schedule": cron_schedule, "env": env, "budget": budget},
            )
        except psycopg.errors.UndefinedFunction as exc:
            raise BaraggError("the database schema is not current: run `baragg db upgrade` first") from exc
        except psycopg.Error as exc:
            raise BaraggError(f"cron.schedule failed: {_first_line(exc)}") from exc
        conn.commit()
        # The round cannot compute trading days (exchange calendars live in Python): store them
        # years ahead now; `baragg status` warns when they run short.
        from baragg import sessions

        sessions.ensure_ahead(conn, (datetime.now(UTC) + SESSION_DAYS_AHEAD).date())
    job = job_status(db, limit=0)
    assert job is not None
    return job


def session_warnings(db: Database, now: datetime | None = None) -> list[str]:
    """Lines for `baragg status` beside a pg_cron job: sessions in use whose stored trading days end
    within SESSION_WARN_WITHIN (the round stops building their bars there)."""
    from baragg import sessions

    clock = (now or datetime.now(UTC)).astimezone(UTC)
    with db.connect(autocommit=True) as conn:
        ending = sessions.sessions_ending(conn, (clock + SESSION_WARN_WITHIN).date())
    return [
        f"  session {name}: trading days stored only to {days_to or 'nothing yet'}; the pg_cron round "
        "cannot extend them: run `baragg db schedule` again (or any baragg worker, or `baragg registry sync`)"
        for name, days_to in ending
    ]


def unschedule(db: Database) -> bool:
    """Remove the job; False when there was none."""
    with db.connect() as conn:
        _require_cron(conn)
        removed = conn.execute(query("cron_unschedule"), {"job": JOB_NAME}).fetchall()
        conn.commit()
    return bool(removed)


def job_status(db: Database, *, limit: int = 10) -> CronJob | None:
    """The job and its latest ``limit`` runs; None when pg_cron is absent, not usable by this role, or
    the job is not scheduled (or scheduled by another role: pg_cron shows each role its own jobs)."""
    with db.connect(autocommit=True) as conn:
        return job_status_on(conn, limit=limit)


def job_status_on(conn: psycopg.Connection, *, limit: int = 10) -> CronJob | None:
    """job_status on an open connection (the status page's pool)."""
    with conn.cursor(row_factory=dict_row) as cur:
        state = cur.execute(query("cron_state")).fetchone()
        if not state or not state["usable"]:
            return None
        jobs = cur.execute(query("cron_job"), {"job": JOB_NAME}).fetchall()
        if not jobs:
            return None
        runs = []
        if limit > 0 and state["has_run_details"]:
            runs = [
                CronRun(r["runid"], r["status"], r["return_message"], r["start_time"], r["end_time"])
                for r in cur.execute(query("cron_runs"), {"job": JOB_NAME, "limit": limit}).fetchall()
            ]
    j = jobs[-1]
    return CronJob(j["jobid"], j["schedule"], j["command"], j["active"], j["username"], j["database"], runs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(job: CronJob) -> list[str]:
    """Lines for `baragg status`: the job, its latest runs, and its failures with their messages."""
    state = "active" if job.active else "paused"
    lines = [f"pg_cron job {JOB_NAME} ({job.schedule}, env {job.env}, as {job.username}, {state})"]
    if not job.runs:
        lines.append("  no runs yet")
        return lines
    runs = ", ".join(
        f"{_when(r.start_time)} {r.status}" + (f" {r.seconds:.1f}s" if r.seconds is not None else "")
        for r in job.runs[:5]
    )
    lines.append(f"  latest runs: {runs}")
    for r in job.failures[:3]:
        lines.append(
            f"  failed {_when(r.start_time)}: {(r.message or '').strip().splitlines()[0] if r.message else ''}"
        )
    return lines


def _when(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else "-"
