-- Repeatable, applied last: least privilege (DESIGN.md section 10b). It runs after every function file,
-- and again whenever a numbered migration was applied, because CREATE FUNCTION (and CREATE TABLE under
-- Supabase's default privileges) grants what this file takes away.
--
-- * Two roles, NOLOGIN, created when absent (roles belong to the whole server, not to one database):
--     baragg_worker  what the worker, the CLI's write paths and the pg_cron round need, nothing more;
--     baragg_reader  read the bars (data_bars, derived_data_bars), e.g. for charts in an app.
--   Log in as a role that is a member of one of them (CREATE ROLE ... LOGIN IN ROLE baragg_worker), or on
--   Supabase let PostgREST switch to it (GRANT baragg_worker TO authenticator). `baragg db grant-read
--   ROLE` gives ROLE itself SELECT on the bar tables and adds it to their reader policy (not membership:
--   Supabase's anon and authenticated are NOINHERIT, so a membership would give them nothing).
-- * Nothing of baragg's is granted to PUBLIC, anon or authenticated: on Supabase, default privileges
--   give those roles ALL on every new table, sequence and function in schema public, and every function
--   is executable by PUBLIC unless revoked. (service_role, Supabase's admin key that bypasses RLS, keeps
--   what the project's defaults give it, like the owner.)
-- * Row-level security on every table, with one policy per role. The owner (the role that ran the
--   migrations) bypasses it, as owners do; it is not FORCEd (see docs/decisions.md).
--
-- Works on plain PostgreSQL too: anon/authenticated are handled only where they exist. Running it needs
-- the CREATEROLE privilege only the first time on a server (when the two roles do not exist yet).

-- ---------------------------------------------------------------------------------------------
-- The roles
-- ---------------------------------------------------------------------------------------------
DO $baragg$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['baragg_worker', 'baragg_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- created meanwhile by an upgrade of another database on this server
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'baragg needs the role % and % cannot create it', v_role, current_user
                        USING HINT = format('a role with CREATEROLE runs: CREATE ROLE %I NOLOGIN; then upgrade again',
                                            v_role);
            END;
        END IF;
    END LOOP;
END
$baragg$;

COMMENT ON ROLE baragg_worker IS
    'baragg: runs the worker, the CLI''s write paths and the pg_cron round (grant it to a LOGIN role)';
COMMENT ON ROLE baragg_reader IS
    'baragg: reads data_bars and derived_data_bars (baragg db grant-read ROLE)';

-- ---------------------------------------------------------------------------------------------
-- Tables and sequences
-- ---------------------------------------------------------------------------------------------
DO $baragg$
DECLARE
    -- Every table of baragg's, with what the worker role may do to it. Nothing deletes bars (they are
    -- soft-deleted) and nothing truncates; only the invalidation log loses rows.
    v_tables CONSTANT text[][] := ARRAY[
        ['core_asset_registry_all',   'SELECT, INSERT, UPDATE'],
        ['data_bars',                 'SELECT, INSERT, UPDATE'],
        ['derived_data_bars',         'SELECT, INSERT, UPDATE'],
        ['data_agg_state',            'SELECT, INSERT, UPDATE'],
        ['agg_timeframes',            'SELECT'],
        ['agg_invalidations',         'SELECT, INSERT, UPDATE, DELETE'],
        -- Trading sessions (migration 0009): the worker extends the materialised days as data arrives.
        ['agg_sessions',              'SELECT, INSERT, UPDATE'],
        ['agg_session_days',          'SELECT, INSERT, UPDATE'],
        ['baragg_schema_migrations',  'SELECT'],
        ['baragg_schema_repeatables', 'SELECT'],
        -- Time partitions (migration 0011): a write during `baragg db partition` logs its key (the
        -- capture trigger runs as the writer); partitions themselves are reached through their parent.
        ['baragg_partition_log',      'SELECT, INSERT'],
        ['baragg_partition_progress', 'SELECT'],
        ['baragg_retention_log',      'SELECT']];
    v_readable CONSTANT text[] := ARRAY['data_bars', 'derived_data_bars'];
    v_public_roles text[];
    v_readers text[];
    v_table text;
    v_sequence text;
    i integer;
BEGIN
    SELECT array_agg(quote_ident(rolname) ORDER BY rolname) INTO v_public_roles
    FROM pg_catalog.pg_roles WHERE rolname IN ('anon', 'authenticated');
    v_public_roles := array_prepend('PUBLIC', COALESCE(v_public_roles, '{}'));

    FOR i IN 1 .. array_length(v_tables, 1) LOOP
        v_table := v_tables[i][1];
        CONTINUE WHEN to_regclass('public.' || quote_ident(v_table)) IS NULL;
        EXECUTE format('REVOKE ALL ON TABLE public.%I FROM %s', v_table, array_to_string(v_public_roles, ', '));
        EXECUTE format('REVOKE ALL ON TABLE public.%I FROM baragg_worker, baragg_reader', v_table);
        EXECUTE format('GRANT %s ON TABLE public.%I TO baragg_worker', v_tables[i][2], v_table);
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', v_table);
        -- (a converted table was secured as a partition while it was built: 05_partitions.sql)
        EXECUTE format('DROP POLICY IF EXISTS baragg_through_parent_only ON public.%I', v_table);
        EXECUTE format('DROP POLICY IF EXISTS baragg_worker_all ON public.%I', v_table);
        EXECUTE format('CREATE POLICY baragg_worker_all ON public.%I AS PERMISSIVE FOR ALL TO baragg_worker '
                       'USING (true) WITH CHECK (true)', v_table);
        IF v_table = ANY (v_readable) THEN
            -- The readers: baragg_reader and the roles `baragg db grant-read` added to this policy (kept
            -- across upgrades; their SELECT was revoked above with everyone else's and is given back).
            SELECT array_agg(DISTINCT quote_ident(r.rolname)) INTO v_readers
            FROM pg_catalog.pg_policy p
            JOIN pg_catalog.pg_roles r ON r.oid = ANY (p.polroles)
            WHERE p.polrelid = ('public.' || quote_ident(v_table))::regclass AND p.polname = 'baragg_reader_select'
              AND r.rolname <> 'baragg_reader';
            v_readers := array_prepend('baragg_reader', COALESCE(v_readers, '{}'));
            EXECUTE format('DROP POLICY IF EXISTS baragg_reader_select ON public.%I', v_table);
            EXECUTE format('CREATE POLICY baragg_reader_select ON public.%I AS PERMISSIVE FOR SELECT TO %s '
                           'USING (true)', v_table, array_to_string(v_readers, ', '));
            EXECUTE format('GRANT SELECT ON TABLE public.%I TO %s', v_table, array_to_string(v_readers, ', '));
        ELSE
            EXECUTE format('DROP POLICY IF EXISTS baragg_reader_select ON public.%I', v_table);
        END IF;
        -- The id sequences (bigserial): the worker inserts rows, so it draws ids.
        FOR v_sequence IN
            SELECT pg_catalog.pg_get_serial_sequence('public.' || quote_ident(v_table), a.attname)
            FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = ('public.' || quote_ident(v_table))::regclass AND a.attnum > 0
              AND NOT a.attisdropped
              AND pg_catalog.pg_get_serial_sequence('public.' || quote_ident(v_table), a.attname) IS NOT NULL
        LOOP
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %s', v_sequence, array_to_string(v_public_roles, ', '));
            EXECUTE format('GRANT USAGE ON SEQUENCE %s TO baragg_worker', v_sequence);
        END LOOP;
    END LOOP;

    -- Both roles reach schema public (PUBLIC usually can already; some hardened servers revoke it).
    IF NOT has_schema_privilege('baragg_worker', 'public', 'USAGE') THEN
        GRANT USAGE ON SCHEMA public TO baragg_worker;
    END IF;
    IF NOT has_schema_privilege('baragg_reader', 'public', 'USAGE') THEN
        GRANT USAGE ON SCHEMA public TO baragg_reader;
    END IF;
END
$baragg$;

-- ---------------------------------------------------------------------------------------------
-- Functions
-- ---------------------------------------------------------------------------------------------
-- baragg's functions are named agg_*, _agg_*, baragg_* or _baragg_*, or keep one of the seed's names. PostgreSQL
-- grants EXECUTE on every new function to PUBLIC (and Supabase's default privileges to anon and
-- authenticated): taken back here, and given to the worker role, which runs all of them (helpers
-- included: a function's callers need EXECUTE on it too).
DO $baragg$
DECLARE
    v_function regprocedure;
    v_public_roles text[];
BEGIN
    SELECT array_agg(quote_ident(rolname) ORDER BY rolname) INTO v_public_roles
    FROM pg_catalog.pg_roles WHERE rolname IN ('anon', 'authenticated');
    v_public_roles := array_prepend('PUBLIC', COALESCE(v_public_roles, '{}'));
    FOR v_function IN
        SELECT p.oid::regprocedure
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND (p.proname ~ '^_?(agg_|baragg_)'
               OR p.proname IN ('catchup_aggregation_range', 'sync_agg_state_from_registry', 'aggregate_window',
                                'aggregate_1m_to_5m_window', 'aggregate_5m_to_1h_window', '_upsert_derived_bar'))
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM %s', v_function, array_to_string(v_public_roles, ', '));
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO baragg_worker', v_function);
    END LOOP;
END
$baragg$;
