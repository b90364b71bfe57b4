-- Repeatable: what the functions need on a Citus cluster (DESIGN.md 11, `baragg db distribute`).
-- On plain PostgreSQL (and Supabase) this file changes nothing: every block below returns at once
-- unless data_bars is a distributed table.
--
-- SQL-language functions that read or write the distributed or reference tables become PL/pgSQL, same body.
-- Citus cannot plan a query on a distributed table inside a SQL-language function that has
-- parameters ("could not create distributed plan ... parameters in SQL functions"); in PL/pgSQL the
-- parameters are values when Citus plans the statement, so a statement filtered by one symbol
-- routes to that symbol's shard. The bodies stay those of the files before this one (re-written
-- here from the catalogue each time the repeatables are applied, so they cannot drift).
-- (The invalidation triggers on the shards: functions/30_invalidation.sql.)

DO $citus$
DECLARE
    f record;
    v_def text;
    v_body text;
    v_new text;
BEGIN
    IF NOT public._agg_on_citus() THEN
        RETURN;
    END IF;
    FOR f IN
        SELECT p.oid, p.proretset, p.prosrc,
               (SELECT string_agg(quote_ident(a.name), ', ' ORDER BY a.ord)
                FROM unnest(p.proargnames, p.proargmodes::text[]) WITH ORDINALITY AS a(name, mode, ord)
                WHERE a.mode IN ('o', 'b')) AS outs
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
          AND p.prolang = (SELECT l.oid FROM pg_catalog.pg_language l WHERE l.lanname = 'sql')
          AND p.prosrc ~ 'public\.(data_bars|derived_data_bars|data_agg_state|agg_invalidations|core_asset_registry_all|agg_timeframes|agg_sessions|agg_session_days)\M'
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                          WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        v_def := pg_catalog.pg_get_functiondef(f.oid);
        v_body := regexp_replace(f.prosrc, ';\s*$', '');
        v_new := E'\n#variable_conflict use_column\nBEGIN\n'
                 || CASE WHEN f.proretset THEN 'RETURN QUERY ' || v_body || E';\n'
                         WHEN f.outs IS NOT NULL  -- one row into the OUT parameters
                         THEN 'SELECT * INTO ' || f.outs || ' FROM (' || v_body || E') AS r;\nRETURN;\n'
                         ELSE 'RETURN (' || v_body || E');\n' END
                 || 'END';
        -- pg_get_functiondef writes "LANGUAGE sql" on a line of its own and the body last, quoted
        -- with $function$.
        v_def := replace(v_def, E' LANGUAGE sql\n', E' LANGUAGE plpgsql\n');
        v_def := substr(v_def, 1, strpos(v_def, 'AS $function$') - 1)
                 || 'AS $function$' || v_new || E'$function$\n';
        EXECUTE v_def;
    END LOOP;
END
$citus$;

