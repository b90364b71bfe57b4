"""A Supabase-like database on any PostgreSQL: Supabase's API roles and default privileges, and our own
copies of the Supabase database linter's (supabase/splinter) lint queries that baragg must pass.

Supabase creates ``anon``, ``authenticated`` and ``service_role`` (NOLOGIN NOINHERIT; service_role
bypasses RLS) and ``authenticator`` (the LOGIN role PostgREST connects as, switching to the role of each
request's JWT), and sets default privileges so that every table, sequence and function created in
schema ``public`` by the project's ``postgres`` role is granted to all three. These are simulated here
for the role that runs the migrations.
"""

from __future__ import annotations

import psycopg

API_ROLES = ("anon", "authenticated", "service_role")

# Server-wide (roles are shared by every database of a server), created once, safe to run again.
CREATE_ROLES = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticator') THEN
        CREATE ROLE authenticator LOGIN NOINHERIT;
    END IF;
    GRANT anon, authenticated, service_role TO authenticator;
END
$$
"""

# Per database, before `baragg db upgrade` (what Supabase's initial schema does for schema public).
DEFAULT_PRIVILEGES = """
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
"""

# Schemas every splinter lint leaves out (Supabase's own and extensions').
_SYSTEM_SCHEMAS = """(
    '_timescaledb_cache', '_timescaledb_catalog', '_timescaledb_config', '_timescaledb_internal', 'auth',
    'cron', 'extensions', 'graphql', 'graphql_public', 'information_schema', 'net', 'pgmq', 'pgroonga',
    'pgsodium', 'pgsodium_masks', 'pgtle', 'pgbouncer', 'pg_catalog', 'pg_toast', 'realtime', 'repack',
    'storage', 'supabase_functions', 'supabase_migrations', 'tiger', 'topology', 'vault')"""

# Our copies of the lints (same conditions as splinter's, written for this test; each returns one
# row per finding: the object and what is wrong). Security and performance lints baragg must pass.
LINTS: dict[str, str] = {
    # 0001 unindexed_foreign_keys: a foreign key whose columns are not exactly those of a valid index.
    "0001_unindexed_foreign_keys": f"""
        SELECT c.oid::regclass::text, format('foreign key %s has no index on exactly its columns', k.conname)
        FROM pg_constraint k
        JOIN pg_class c ON c.oid = k.conrelid
        WHERE k.contype = 'f' AND c.relnamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
          AND NOT EXISTS (SELECT 1 FROM pg_index i
                          WHERE i.indrelid = c.oid AND i.indisvalid
                            AND string_to_array(i.indkey::text, ' ')::smallint[] = k.conkey)""",
    # 0004 no_primary_key: a regular table without a primary key.
    "0004_no_primary_key": f"""
        SELECT c.oid::regclass::text, 'no primary key'
        FROM pg_class c
        WHERE c.relkind = 'r' AND c.relnamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)""",
    # 0006 multiple_permissive_policies: two permissive policies for one role and action.
    "0006_multiple_permissive_policies": f"""
        SELECT c.oid::regclass::text, format('role %s, %s: %s', r.rolname, a.cmd, array_agg(p.polname))
        FROM pg_policy p
        JOIN pg_class c ON c.oid = p.polrelid
        JOIN pg_roles r ON p.polroles @> ARRAY[r.oid] OR p.polroles = ARRAY[0::oid]
        CROSS JOIN LATERAL unnest(CASE p.polcmd WHEN 'r' THEN ARRAY['SELECT'] WHEN 'a' THEN ARRAY['INSERT']
                                                WHEN 'w' THEN ARRAY['UPDATE'] WHEN 'd' THEN ARRAY['DELETE']
                                                ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'] END) a(cmd)
        WHERE c.relkind = 'r' AND p.polpermissive
          AND c.relnamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND r.rolname NOT LIKE 'pg\\_%' AND NOT r.rolbypassrls
        GROUP BY c.oid, r.rolname, a.cmd
        HAVING count(*) > 1""",
    # 0007 policy_exists_rls_disabled / 0008 rls_enabled_no_policy.
    "0007_policy_exists_rls_disabled": f"""
        SELECT c.oid::regclass::text, 'has policies but row-level security is off'
        FROM pg_class c
        WHERE c.relkind = 'r' AND NOT c.relrowsecurity
          AND c.relnamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid)""",
    "0008_rls_enabled_no_policy": f"""
        SELECT c.oid::regclass::text, 'row-level security on, no policy'
        FROM pg_class c
        WHERE c.relkind = 'r' AND c.relrowsecurity
          AND c.relnamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid)""",
    # 0009 duplicate_index: two indexes of a table that differ only by name.
    "0009_duplicate_index": f"""
        SELECT c.oid::regclass::text, format('identical indexes %s', array_agg(x.indexname ORDER BY x.indexname))
        FROM pg_indexes x
        JOIN pg_namespace n ON n.nspname = x.schemaname
        JOIN pg_class c ON c.relname = x.tablename AND c.relnamespace = n.oid
        WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN {_SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
        GROUP BY c.oid, replace(x.indexdef, x.indexname, '')
        HAVING count(*) > 1""",
    # 0010 security_definer_view: a view the API roles can read that is not security_invoker.
    "0010_security_definer_view": f"""
        SELECT c.oid::regclass::text, 'view without security_invoker, readable by anon or authenticated'
        FROM pg_class c
        WHERE c.relkind = 'v' AND c.relnamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND (has_table_privilege('anon', c.oid, 'SELECT')
               OR has_table_privilege('authenticated', c.oid, 'SELECT'))
          AND NOT lower(COALESCE(c.reloptions::text, '{{}}'))::text[]
              && ARRAY['security_invoker=1', 'security_invoker=true', 'security_invoker=yes',
                       'security_invoker=on']""",
    # 0011 function_search_path_mutable: a function or procedure with no search_path of its own.
    "0011_function_search_path_mutable": f"""
        SELECT p.oid::regprocedure::text, 'search_path not set'
        FROM pg_proc p
        WHERE p.pronamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
          AND NOT EXISTS (SELECT 1 FROM unnest(COALESCE(p.proconfig, '{{}}')) cfg
                          WHERE cfg LIKE 'search\\_path=%')""",
    # 0013 rls_disabled_in_public: a table in public without row-level security.
    "0013_rls_disabled_in_public": """
        SELECT c.oid::regclass::text, 'row-level security is off'
        FROM pg_class c
        WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace AND NOT c.relrowsecurity""",
    # 0024 rls_policy_always_true: an always-true write policy for anon, authenticated or PUBLIC.
    "0024_rls_policy_always_true": f"""
        SELECT c.oid::regclass::text, format('policy %s lets anyone write', p.polname)
        FROM pg_policy p
        JOIN pg_class c ON c.oid = p.polrelid
        JOIN pg_policies v ON v.schemaname = c.relnamespace::regnamespace::text AND v.tablename = c.relname
                           AND v.policyname = p.polname
        WHERE c.relkind = 'r' AND c.relrowsecurity AND p.polpermissive
          AND c.relnamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}
          AND (p.polroles = ARRAY[0::oid]
               OR EXISTS (SELECT 1 FROM unnest(p.polroles) r
                          WHERE r::regrole::text IN ('anon', 'authenticated')))
          AND ((p.polcmd IN ('w', 'd', '*')
                AND (replace(lower(COALESCE(v.qual, '')), ' ', '') IN ('true', '(true)', '1=1', '(1=1)')
                     OR v.qual IS NULL))
               OR replace(lower(COALESCE(v.with_check, '')), ' ', '') IN ('true', '(true)', '1=1', '(1=1)')
               OR (v.with_check IS NULL AND p.polcmd = 'a'))""",
    # 0028 / 0029: SECURITY DEFINER functions that anon / authenticated may execute.
    "0028_anon_security_definer_function_executable": f"""
        SELECT p.oid::regprocedure::text, 'SECURITY DEFINER, executable by anon'
        FROM pg_proc p
        WHERE p.prosecdef AND has_function_privilege('anon', p.oid, 'EXECUTE')
          AND p.pronamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}""",
    "0029_authenticated_security_definer_function_executable": f"""
        SELECT p.oid::regprocedure::text, 'SECURITY DEFINER, executable by authenticated'
        FROM pg_proc p
        WHERE p.prosecdef AND has_function_privilege('authenticated', p.oid, 'EXECUTE')
          AND p.pronamespace::regnamespace::text NOT IN {_SYSTEM_SCHEMAS}""",
}


def create_roles(conn: psycopg.Connection) -> None:
    conn.execute(CREATE_ROLES)


def apply_default_privileges(conn: psycopg.Connection) -> None:
    conn.execute(DEFAULT_PRIVILEGES)


def lint(conn: psycopg.Connection, name: str) -> list[tuple[str, str]]:
    """The findings of one lint: (object, what is wrong)."""
    return [(obj, detail) for obj, detail in conn.execute(LINTS[name]).fetchall()]
