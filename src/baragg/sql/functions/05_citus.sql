-- Repeatable: whether this database is distributed with Citus (`baragg db distribute`, DESIGN.md 11).
-- The functions that must work differently there (one statement per symbol where Citus needs it)
-- ask this; on plain PostgreSQL and Supabase (no Citus catalogue) it is false.
CREATE OR REPLACE FUNCTION public._agg_on_citus()
RETURNS boolean LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v_distributed boolean := false;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        -- dynamic: the catalogue table does not exist without Citus, so it cannot be named statically
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition
                                WHERE logicalrelid = ''public.data_agg_state''::regclass)'
        INTO v_distributed;
    END IF;
    RETURN v_distributed;
END
$$;
