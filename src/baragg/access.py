"""Who may read the bars: ``baragg db grant-read ROLE`` / ``baragg db revoke-read ROLE``.

baragg's objects are closed to everyone but its two roles (functions/90_security.sql). Read access for
another role (e.g. Supabase's ``authenticated``, for charts in an app) is given explicitly: SELECT on
data_bars and derived_data_bars, and a place in their row-level-security policy ``baragg_reader_select``.
The role itself gets both, not a membership of baragg_reader: Supabase's API roles are NOINHERIT, so a
membership would give them nothing. Run as the owner of the tables (the role that ran the migrations).
"""

from __future__ import annotations

import psycopg

from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.sql import query

READER_ROLE = "baragg_reader"


def readers(db: Database) -> list[str]:
    """The roles that can read the bars through baragg's policy (baragg_reader included)."""
    with db.connect(autocommit=True) as conn:
        row = conn.execute(query("access_readers")).fetchone()
    return list(row[0]) if row else []


def grant_read(db: Database, role: str) -> bool:
    """Give ``role`` read access to the bars; False when it had it already."""
    return _change(db, role, grant=True)


def revoke_read(db: Database, role: str) -> bool:
    """Take read access to the bars from ``role``; False when it had none."""
    if role == READER_ROLE:
        raise InvalidInput(
            f"{READER_ROLE} is baragg's own reader role; to take it from a login role, "
            f"REVOKE {READER_ROLE} FROM that role"
        )
    return _change(db, role, grant=False)


def _change(db: Database, role: str, *, grant: bool) -> bool:
    with db.connect() as conn:
        if not conn.execute(query("access_role_exists"), {"role": role}).fetchone()[0]:
            raise InvalidInput(f"role {role!r} does not exist")
        before = role in conn.execute(query("access_readers")).fetchone()[0]
        try:
            with conn.transaction():
                conn.execute(query("access_set_role"), {"role": role})
                conn.execute(query("access_grant_read" if grant else "access_revoke_read"))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise BaraggError(
                f"{_first_line(exc)}: run this as the owner of baragg's tables (the role that ran "
                "`baragg db upgrade`)"
            ) from exc
        except psycopg.Error as exc:
            raise BaraggError(_first_line(exc)) from exc
        conn.commit()
    return before != grant


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
