"""``baragg db distribute``: spread baragg's bar tables over a Citus cluster (DESIGN.md 11).

On a Citus coordinator, the four tables that grow with the data and are always read or written one
symbol at a time are distributed by ``canonical_symbol``, co-located (a symbol's raw bars, derived bars,
tasks and late-data log live on the same node, so every per-symbol statement runs on one node and the
invalidation triggers find the symbol's tasks there); the small tables every statement joins (registry,
ladder, sessions, trading days) become reference tables (a copy on every node).

All of it happens in one transaction (nothing is left half-distributed when a step fails), after the
invalidation triggers are dropped (Citus distributes no table with triggers); the repeatable function
files are then re-applied, which re-creates the triggers on every shard and adapts the functions
(functions/50_citus.sql). Running it again finds every table in place and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from baragg import migrate
from baragg.db import Database
from baragg.errors import BaraggError
from baragg.sql import query

# Distributed by canonical_symbol, in this order: the first is the co-location group's anchor.
DISTRIBUTED = ("data_agg_state", "agg_invalidations", "data_bars", "derived_data_bars")
# Copied to every node; referenced tables before the tables that reference them (foreign keys).
REFERENCE = ("agg_sessions", "agg_session_days", "agg_timeframes", "core_asset_registry_all")


@dataclass
class Distribution:
    """What ``distribute`` did: tables it distributed or made reference tables now (empty: all were)."""

    citus_version: str
    workers: int
    distributed: list[str] = field(default_factory=list)
    reference: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.distributed or self.reference)


def table_kinds(conn: psycopg.Connection) -> dict[str, tuple[str, int | None, str | None]]:
    """Each baragg table's placement: (kind, co-location id, distribution column)."""
    rows = conn.execute(query("citus_table_kinds"), {"tables": list(DISTRIBUTED + REFERENCE)}).fetchall()
    return {name: (kind, colocation, column) for name, kind, colocation, column in rows}


def distribute(
    db: Database,
    *,
    allow_running_workers: bool = False,
    require_schema: Callable[[Database], None] | None = None,
) -> Distribution:
    """Distribute baragg's tables on the Citus coordinator ``db`` (idempotent). ``require_schema``
    checks that baragg's schema is current, once Citus and the node's role are known to be right."""
    with db.connect() as conn:
        row = conn.execute(query("citus_version")).fetchone()
        if row is None:
            raise BaraggError(
                "Citus is not installed in this database: on each node set shared_preload_libraries = "
                "'citus' and run CREATE EXTENSION citus (README: Scaling out)"
            )
        version = row[0]
        coordinator, workers = conn.execute(query("citus_is_coordinator")).fetchone()
        if not coordinator:
            raise BaraggError(
                "this node is not the Citus coordinator: run `baragg db distribute` against the "
                "coordinator (the node clients connect to)"
            )
        if workers == 0:
            raise BaraggError(
                "the Citus coordinator has no worker nodes: add them first (SELECT citus_add_node(host, port))"
            )
        if require_schema is not None:
            require_schema(db)
        kinds = table_kinds(conn)
        todo_dist = [t for t in DISTRIBUTED if kinds[t][0] != "distributed"]
        todo_ref = [t for t in REFERENCE if kinds[t][0] != "reference"]
        wrong = [t for t in DISTRIBUTED if kinds[t][0] not in ("local", "distributed")]
        wrong += [t for t in REFERENCE if kinds[t][0] not in ("local", "reference")]
        wrong += [
            t for t in DISTRIBUTED if kinds[t][0] == "distributed" and kinds[t][2] != "canonical_symbol"
        ]
        if wrong:
            raise BaraggError(
                f"table(s) {', '.join(wrong)} are already Citus tables of another kind; undistribute them "
                "(SELECT undistribute_table(...)) before `baragg db distribute`"
            )
        done = Distribution(version, workers)
        if not todo_dist and not todo_ref:
            return done
        sessions, tasks = conn.execute(query("citus_live_workers")).fetchone()
        if (sessions or tasks) and not allow_running_workers:
            raise BaraggError(
                f"baragg workers are running ({sessions} worker session(s), {tasks} task(s) leased): stop "
                "them before `baragg db distribute` (it rewrites the tables under an exclusive lock)"
            )
        conn.rollback()
        try:
            with conn.transaction():
                conn.execute(query("citus_begin"))
                conn.execute(query("citus_drop_triggers"))
                for table in todo_ref:
                    conn.execute(query("citus_create_reference_table"), {"table": f"public.{table}"})
                    done.reference.append(table)
                for i, table in enumerate(DISTRIBUTED):
                    if table in todo_dist:
                        conn.execute(
                            query("citus_create_distributed_table"),
                            {
                                "table": f"public.{table}",
                                "colocate_with": "default" if i == 0 else DISTRIBUTED[0],
                            },
                        )
                        done.distributed.append(table)
                conn.execute(query("citus_derived_fkey"))
                # The triggers again (now on every shard) and the functions in their Citus form.
                migrate.reapply_repeatables(conn)
        except psycopg.Error as exc:
            raise BaraggError(
                f"distributing failed, nothing changed: {str(exc).strip().splitlines()[0]}"
            ) from exc
    return done
