"""A comparable snapshot of a database's schema, read from the catalogs."""

from __future__ import annotations

import psycopg

_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, column_default, is_nullable
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, column_name""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
        ORDER BY 1, 2""",
    "functions": """
        SELECT proname, pg_get_function_identity_arguments(oid), pg_get_function_result(oid), md5(prosrc)
        FROM pg_proc WHERE pronamespace = 'public'::regnamespace
        ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "views": """
        SELECT table_name, view_definition FROM information_schema.views WHERE table_schema = 'public'
        ORDER BY 1""",
    # Who may do what (functions/90_security.sql): row-level security and grants of tables and
    # sequences, policies, and each routine's grants, pinned settings and security mode.
    "privileges": """
        SELECT relname, relkind::text, relrowsecurity, relforcerowsecurity, relacl::text
        FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'S')
        ORDER BY 1""",
    "policies": """
        SELECT tablename, policyname, permissive, roles::text, cmd, qual, with_check
        FROM pg_policies WHERE schemaname = 'public' ORDER BY 1, 2""",
    "routine_privileges": """
        SELECT proname, pg_get_function_identity_arguments(oid), proacl::text, proconfig::text, prosecdef
        FROM pg_proc WHERE pronamespace = 'public'::regnamespace
        ORDER BY 1, 2""",
    "sequences": """
        SELECT sequence_name, data_type FROM information_schema.sequences WHERE sequence_schema = 'public'
        ORDER BY 1""",
}


def snapshot(conn: psycopg.Connection, *, exclude_tables: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    """Every column, constraint, index, function, trigger, view and sequence of schema public, and who
    may use them (grants, row-level security, policies)."""
    out = {}
    for kind, sql in _QUERIES.items():
        rows = conn.execute(sql).fetchall()
        out[kind] = [r for r in rows if not (kind != "functions" and r[0] in exclude_tables)]
    return out
