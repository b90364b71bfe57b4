"""Trading sessions (DESIGN.md 3b): when a symbol's market trades, as data.

A session is a time zone, a daily open and close in it, the weekdays of its trading dates, and optionally
an exchange calendar (holidays, early closes) from the ``exchange_calendars`` package. Its trading days
are *materialised* in ``agg_session_days`` (the open and close instant in UTC of every trading date), so
that the set-based SQL engine joins them instead of calling out to Python. This module

- generates the days (from the rule, or from the exchange calendar) and stores them, idempotently, over
  the range the data needs, extending it as data arrives (on ingest, on registry changes and on every
  worker sync);
- holds the pure-Python model of how a session cuts windows, used by the tests' reference model (and
  written independently of the SQL, which it checks).

A trading day is labelled by the date it *ends* on: with a close at or before the open (a market open
overnight or around the clock, e.g. FX 17:00-17:00 New York) the session of date D opens on D - 1 at the
open; a close of 00:00 means midnight at the end of D. A local open or close that does not exist (the
hour skipped by daylight saving) is the instant the clock jumps to; one that exists twice is the first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import psycopg
from psycopg.rows import dict_row

from baragg.db import Database
from baragg.errors import InvalidInput
from baragg.sql import query
from baragg.timeframes import LADDER, Timeframe

DEFAULT_SESSION = "24x7"
WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # ISO 1..7
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
MIDNIGHT = time(0, 0)

# How far the materialised days reach: at least this far past "now" (so the window containing now and
# the next ones are known), and extended in steps of EXTEND_STEP so that a daemon does not extend them
# on every sync.
HORIZON = timedelta(days=40)
EXTEND_STEP = timedelta(days=366)
# Before the first date needed: one week, so that the trading week around it is complete.
LOOKBACK = timedelta(days=7)


@dataclass(frozen=True)
class Session:
    """One row of agg_sessions."""

    name: str
    tz: str
    open: time
    close: time
    weekdays: tuple[int, ...]  # ISO weekdays of the trading dates (1 = Monday)
    calendar: str | None = None
    builtin: bool = False
    days_from: date | None = None
    days_to: date | None = None

    @property
    def around_the_clock(self) -> bool:
        return self.open == self.close

    @property
    def weekdays_text(self) -> str:
        return format_weekdays(self.weekdays)

    @property
    def counts_weekdays_only(self) -> bool:
        """The 24x7 session's weeks (and months) expect Monday-Friday only (the seed's 5 per week)."""
        return self.name == DEFAULT_SESSION

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tz": self.tz,
            "open": self.open.strftime("%H:%M"),
            "close": self.close.strftime("%H:%M"),
            "days": self.weekdays_text,
            "calendar": self.calendar,
            "builtin": self.builtin,
            "days_from": self.days_from,
            "days_to": self.days_to,
        }


@dataclass(frozen=True)
class Day:
    """One trading session: its trading date and its open and close instants (UTC)."""

    date: date
    open: datetime
    close: datetime


@dataclass(frozen=True)
class Window:
    """One window of a level: [start, end) and the source bars a complete one holds."""

    start: datetime
    end: datetime
    expected: int


# ---------------------------------------------------------------------------------------------
# Parsing what operators type
# ---------------------------------------------------------------------------------------------
def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            f"session name {name!r} is not valid (letters, digits and _ . : -, at most 64 characters)"
        )
    return name


def parse_hhmm(text: str, flag: str) -> time:
    match = _HHMM.match(text.strip())
    if not match:
        raise InvalidInput(f"{flag}: {text!r} is not a time of day HH:MM (00:00-23:59)")
    return time(int(match.group(1)), int(match.group(2)))


def check_tz(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(
            f"--tz: {name!r} is not an IANA time zone (e.g. America/New_York, Europe/London, Etc/GMT+5)"
        ) from None
    if name not in available_timezones() and name != "UTC":
        raise InvalidInput(f"--tz: {name!r} is not an IANA time zone name")
    return name


def parse_weekdays(text: str) -> tuple[int, ...]:
    """'mon-fri', 'sun-thu' (wraps), 'mon,wed,fri', 'sat', 'all' -> ISO weekdays, sorted."""
    spec = text.strip().lower()
    if spec in ("all", "daily", "mon-sun"):
        return (1, 2, 3, 4, 5, 6, 7)
    days: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        ends = part.split("-")
        if len(ends) > 2 or not all(e in WEEKDAY_NAMES for e in ends):
            raise InvalidInput(
                f"--days: {text!r} is not a list of weekdays (e.g. mon-fri, sun-thu, mon,wed,fri, all)"
            )
        first, last = WEEKDAY_NAMES.index(ends[0]), WEEKDAY_NAMES.index(ends[-1])
        span = (last - first) % 7
        days.update((first + i) % 7 + 1 for i in range(span + 1))
    return tuple(sorted(days))


def format_weekdays(weekdays: Sequence[int]) -> str:
    """ISO weekdays as the shortest text parse_weekdays reads back ('mon-fri', 'all', 'mon,wed')."""
    days = sorted(set(weekdays))
    if len(days) == 7:
        return "all"
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    # A run that ends on Sunday continues with one that starts on Monday (sun-thu).
    if len(runs) > 1 and runs[0][0] == 1 and runs[-1][-1] == 7:
        runs[0] = runs.pop() + runs[0]
    parts = []
    for run in runs:
        a, b = WEEKDAY_NAMES[run[0] - 1], WEEKDAY_NAMES[run[-1] - 1]
        parts.append(a if len(run) == 1 else f"{a},{b}" if len(run) == 2 else f"{a}-{b}")
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# Generating trading days
# ---------------------------------------------------------------------------------------------
def _localize(zone: str, walls: list[datetime]) -> list[datetime]:
    """Wall times in ``zone`` to UTC instants: a wall time skipped by daylight saving is the instant
    the clock jumps to, one that happens twice is the first of the two."""
    if not walls:
        return []
    import pandas as pd

    index = pd.DatetimeIndex(walls).tz_localize(
        zone, ambiguous=[True] * len(walls), nonexistent="shift_forward"
    )
    return [ts.to_pydatetime() for ts in index.tz_convert(UTC)]


def rule_days(session: Session, first: date, last: date) -> list[Day]:
    """The trading days of a rule-based session (no exchange calendar) with dates in [first, last]."""
    close_is_midnight = session.close == MIDNIGHT
    opens_day_before = not close_is_midnight and session.open >= session.close
    dates = [
        first + timedelta(days=i)
        for i in range((last - first).days + 1)
        if (first + timedelta(days=i)).isoweekday() in session.weekdays
    ]
    open_walls = [
        datetime.combine(d - timedelta(days=1) if opens_day_before else d, session.open) for d in dates
    ]
    close_walls = [
        datetime.combine(d + timedelta(days=1), MIDNIGHT)
        if close_is_midnight
        else datetime.combine(d, session.close)
        for d in dates
    ]
    opens, closes = _localize(session.tz, open_walls), _localize(session.tz, close_walls)
    return [Day(d, o, c) for d, o, c in zip(dates, opens, closes, strict=True) if c > o]


def calendar_session(code: str) -> Session:
    """A session row for an exchange_calendars code (aliases resolve to the canonical code)."""
    import exchange_calendars as xc

    names = set(xc.get_calendar_names(include_aliases=True))
    if code not in names:
        raise InvalidInput(
            f"unknown session or exchange calendar {code!r} (see `baragg session list`; exchange calendars "
            "are exchange_calendars codes such as XNYS, XLON, CMES)"
        )
    canonical = xc.resolve_alias(code) if code in xc.calendar_utils.aliases_to_names() else code
    cal = xc.get_calendar(canonical)
    weekdays = tuple(i + 1 for i, flag in enumerate(cal.weekmask) if flag == "1")
    return Session(
        name=canonical,
        tz=str(cal.tz.key if hasattr(cal.tz, "key") else cal.tz),
        open=cal.open_times[-1][1],
        close=cal.close_times[-1][1],
        weekdays=weekdays,
        calendar=canonical,
    )


def calendar_days(code: str, first: date, last: date) -> tuple[list[Day], date, date]:
    """The sessions of an exchange calendar with dates in [first, last], and the range it covered
    (clipped to what the calendar can compute)."""
    import exchange_calendars as xc

    cls = type(xc.get_calendar(code, start=first, end=first + timedelta(days=40)))
    low, high = cls.bound_min(), cls.bound_max()
    if low is not None:
        first = max(first, low.date())
    if high is not None:
        last = min(last, high.date())
    if last < first:
        return [], first, last
    cal = xc.get_calendar(code, start=first, end=last)
    schedule = cal.schedule
    days = [
        Day(d.date(), o.to_pydatetime(), c.to_pydatetime())
        for d, o, c in zip(schedule.index, schedule["open"], schedule["close"], strict=True)
    ]
    return days, first, last


def generate_days(session: Session, first: date, last: date) -> tuple[list[Day], date, date]:
    """Trading days with dates in [first, last] and the range of dates they cover."""
    if session.calendar:
        return calendar_days(session.calendar, first, last)
    return rule_days(session, first, last), first, last


# ---------------------------------------------------------------------------------------------
# The window model (pure Python; the tests' reference model uses it, the SQL engine must agree)
# ---------------------------------------------------------------------------------------------
def _source_step(tf: Timeframe) -> timedelta:
    return timedelta(minutes=1) if tf.source == "1m" else LADDER[tf.source].interval


def _ceil_div(a: timedelta, b: timedelta) -> int:
    return math.ceil(a / b)


def windows(
    days: Iterable[Day],
    tf: Timeframe,
    *,
    covered: tuple[date, date] | None = None,
    weekdays_only: bool = False,
) -> list[Window]:
    """Every window of ``tf`` that ``days`` (sorted trading days) make, in time order.

    - interval levels: open + k * interval, the last one clipped at the close; a window expects the
      source windows inside it (the source level is cut from the same open, so a clipped window
      expects proportionally fewer);
    - 1d: one session, expecting its hours (an early close fewer, a 25-hour day 25);
    - 1w / 1mo: the sessions of one ISO week / calendar month of trading dates, from the first open to
      the last close, expecting one daily bar per session (``weekdays_only``: Monday-Friday only, the
      24x7 session's rule). Only weeks and months wholly inside ``covered`` (the dates the days are
      known for) are made.
    """
    days = list(days)
    step = _source_step(tf)
    if tf.window_kind == "interval":
        out = []
        for d in days:
            ws = d.open
            while ws < d.close:
                we = min(ws + tf.interval, d.close)
                out.append(Window(ws, we, _ceil_div(we - ws, step)))
                ws += tf.interval
        return out
    if tf.window_kind == "session":
        return [Window(d.open, d.close, _ceil_div(d.close - d.open, step)) for d in days]
    groups: dict[date, list[Day]] = {}
    for d in days:
        key = d.date - timedelta(days=d.date.weekday()) if tf.window_kind == "week" else d.date.replace(day=1)
        groups.setdefault(key, []).append(d)
    out = []
    for key, members in sorted(groups.items()):
        if tf.window_kind == "week":
            period_end = key + timedelta(days=6)
        else:
            period_end = (key.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
        if covered is not None and (key < covered[0] or period_end > covered[1]):
            continue
        expected = sum(1 for d in members if not weekdays_only or d.date.isoweekday() <= 5)
        out.append(Window(members[0].open, members[-1].close, expected))
    return out


# ---------------------------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------------------------
def _session(row: dict[str, Any]) -> Session:
    return Session(
        name=row["name"],
        tz=row["tz"],
        open=row["open_time"],
        close=row["close_time"],
        weekdays=tuple(row["weekdays"]),
        calendar=row["calendar"],
        builtin=row["builtin"],
        days_from=row["days_from"],
        days_to=row["days_to"],
    )


def list_sessions(db: Database) -> list[Session]:
    with db.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
        return [_session(r) for r in cur.execute(query("session_list"))]


def get_session(conn: psycopg.Connection, name: str) -> Session | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("session_get"), {"name": name}).fetchone()
    return _session(row) if row else None


def _insert(conn: psycopg.Connection, s: Session) -> None:
    conn.execute(
        query("session_insert"),
        {
            "name": s.name,
            "tz": s.tz,
            "open": s.open,
            "close": s.close,
            "weekdays": list(s.weekdays),
            "calendar": s.calendar,
        },
    )


def add_session(
    db: Database,
    name: str,
    *,
    tz: str | None,
    open_: str | None,
    close: str | None = None,
    days: str | None = None,
    calendar: str | None = None,
) -> Session:
    """Create a session; an existing name is an error (sessions in use are not redefined under their bars)."""
    check_name(name)
    if calendar:
        if tz or open_ or close or days:
            raise InvalidInput(
                "session add: with --calendar the hours, days and time zone come from the exchange calendar "
                "(leave out --tz, --open, --close and --days)"
            )
        session = calendar_session(calendar)
        session = Session(name, session.tz, session.open, session.close, session.weekdays, session.calendar)
    else:
        if not tz or not open_:
            raise InvalidInput("session add: --tz and --open are required (or --calendar CODE)")
        opening = parse_hhmm(open_, "--open")
        session = Session(
            name=name,
            tz=check_tz(tz),
            open=opening,
            close=parse_hhmm(close, "--close") if close else opening,
            weekdays=parse_weekdays(days) if days else (1, 2, 3, 4, 5),
        )
    with db.connect() as conn:
        if get_session(conn, name) is not None:
            raise InvalidInput(f"session {name!r} exists already (see `baragg session list`)")
        _insert(conn, session)
        conn.commit()
    return session


def resolve(conn: psycopg.Connection, name: str) -> Session:
    """The session called ``name``; an exchange calendar code not yet known becomes a session now."""
    found = get_session(conn, name)
    if found is not None:
        return found
    import exchange_calendars as xc

    if name in xc.get_calendar_names(include_aliases=True):
        session = calendar_session(name)
        existing = get_session(conn, session.name)
        if existing is not None:
            return existing
        _insert(conn, session)
        return get_session(conn, session.name) or session
    raise InvalidInput(
        f"unknown session {name!r}: add it with `baragg session add {name} --tz ZONE --open HH:MM`, or use a "
        "built-in one (24x7, fx) or an exchange calendar code (e.g. XNYS, XLON, CMES)"
    )


def _date_range(first: date, last: date) -> tuple[date, date]:
    """Widen to whole ISO weeks and whole months, so that weekly and monthly windows are complete."""
    first = first.replace(day=1)
    first -= timedelta(days=first.weekday())
    nxt = (last.replace(day=28) + timedelta(days=4)).replace(day=1)
    last = nxt - timedelta(days=1)
    last += timedelta(days=6 - last.weekday())
    return first, last


def ensure_days(conn: psycopg.Connection, name: str, first: date, last: date) -> int:
    """Make sure ``name``'s trading days cover the dates [first, last] (extending the stored range
    contiguously, in whole weeks and months); returns how many days were added. Idempotent; concurrent
    callers are serialised per session."""
    with conn.transaction():
        conn.execute(query("session_lock"), {"name": name})
        session = get_session(conn, name)
        if session is None:
            raise InvalidInput(f"unknown session {name!r}")
        if session.days_from is not None and session.days_from <= first and last <= session.days_to:
            return 0
        lo, hi = _date_range(first, last)
        pieces: list[tuple[date, date]] = []
        if session.days_from is None or session.days_to is None:
            pieces.append((lo, hi))
        else:
            if lo < session.days_from:
                pieces.append((lo, session.days_from - timedelta(days=1)))
            if hi > session.days_to:
                pieces.append((session.days_to + timedelta(days=1), hi))
        added = 0
        new_from, new_to = session.days_from, session.days_to
        for a, b in pieces:
            days, got_from, got_to = generate_days(session, a, b)
            if got_to < got_from:
                continue  # beyond what the exchange calendar can compute
            # Keep the range contiguous (a calendar may stop short of what was asked).
            if (
                new_from is not None
                and new_to is not None
                and (got_from > new_to + timedelta(days=1) or got_to < new_from - timedelta(days=1))
            ):
                continue
            row = conn.execute(
                query("session_day_insert"),
                {
                    "name": name,
                    "dates": [d.date for d in days],
                    "opens": [d.open for d in days],
                    "closes": [d.close for d in days],
                },
            ).fetchone()
            added += int(row[0]) if row else 0
            new_from = got_from if new_from is None else min(new_from, got_from)
            new_to = got_to if new_to is None else max(new_to, got_to)
        if new_from is not None and (new_from, new_to) != (session.days_from, session.days_to):
            conn.execute(query("session_set_range"), {"name": name, "from": new_from, "to": new_to})
            conn.execute(query("session_regroup"), {"name": name})
        return added


def ensure_for_sync(conn: psycopg.Connection, now: datetime | None = None) -> dict[str, int]:
    """Extend every session in use so that it covers its symbols' tasks (from their agg_start_utc) up to
    ``now`` + HORIZON. One query when nothing is needed (the worker calls this on every sync)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    needed_to = (moment + HORIZON).date()
    rows = conn.execute(query("session_needed"), {"now": moment}).fetchall()
    added: dict[str, int] = {}
    for name, days_from, days_to, first in rows:
        first_date = min(first.astimezone(UTC).date() if first else moment.date(), moment.date()) - LOOKBACK
        if days_from is not None and days_from <= first_date and needed_to <= days_to:
            continue
        last = (
            max(needed_to, moment.date() + EXTEND_STEP)
            if days_to is None or needed_to > days_to
            else needed_to
        )
        n = ensure_days(conn, name, first_date, last)
        if n:
            added[name] = n
    return added


def ensure_ahead(conn: psycopg.Connection, until: date) -> None:
    """Store every session's trading days up to ``until`` (an exchange calendar stops where it can
    compute). For the pg_cron round, which runs in SQL and cannot compute days: `db schedule` stores
    years ahead, `status` says when they run short."""
    today = datetime.now(UTC).date()
    for (name,) in conn.execute(query("session_names")).fetchall():
        session = get_session(conn, name)
        first = today - LOOKBACK
        if session and session.days_from:
            first = min(first, session.days_from)
        ensure_days(conn, name, first, until)


def sessions_ending(conn: psycopg.Connection, before: date) -> list[tuple[str, date | None]]:
    """Sessions in use whose stored trading days end before ``before`` (or were never stored)."""
    return [(n, d) for n, d in conn.execute(query("session_in_use_ends"), {"before": before})]


def ensure_for_range(
    conn: psycopg.Connection, symbols: Sequence[str], first: datetime, last: datetime
) -> None:
    """Cover [first, last] (e.g. the times of an ingested file) for the sessions of ``symbols``."""
    names = [r[0] for r in conn.execute(query("session_of_symbols"), {"symbols": list(symbols)})]
    for name in names:
        ensure_days(
            conn, name, first.astimezone(UTC).date() - LOOKBACK, last.astimezone(UTC).date() + LOOKBACK
        )


def stored_days(conn: psycopg.Connection, name: str, start: datetime, end: datetime) -> list[Day]:
    """The materialised days of ``name`` whose session overlaps [start, end)."""
    rows = conn.execute(query("session_days_between"), {"name": name, "start": start, "end": end}).fetchall()
    return [Day(d, o.astimezone(UTC), c.astimezone(UTC)) for d, o, c in rows]
