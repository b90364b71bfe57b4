-- 0005: performance (bench/README.md, docs/decisions.md "Performance").
--
-- Re-runnable as a whole (CREATE OR REPLACE, ALTER ... SET), so it also applies with psql -f.

-- ---------------------------------------------------------------------------------------------
-- The scheduling helpers of 0003 as STABLE, so that the planner inlines them.
-- ---------------------------------------------------------------------------------------------
-- They were declared IMMUTABLE, but their bodies call STABLE functions (timestamptz + interval
-- depends on the session TimeZone; jsonb_build_object is STABLE). PostgreSQL does not inline a SQL
-- function whose body is more volatile than its declaration, so each was run through the SQL
-- function executor once per row: ~40 us per _agg_stats_add, ~6 us per _agg_next_run, in every
-- finish and every claim (_agg_is_due over all candidate rows). Declared STABLE (which they are),
-- they are inlined into the statements that use them. Bodies unchanged.

CREATE OR REPLACE FUNCTION _agg_lease_end(p_lease_expires_at timestamptz, p_running_started_at_utc timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT COALESCE(p_lease_expires_at, p_running_started_at_utc + interval '5 minutes', '-infinity')
$$;

CREATE OR REPLACE FUNCTION _agg_is_due(p_enabled boolean, p_status text, p_next_run_at timestamptz,
    p_lease_expires_at timestamptz, p_running_started_at_utc timestamptz, p_now timestamptz)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT p_enabled
       AND (p_next_run_at IS NULL OR p_next_run_at <= p_now)
       AND (p_status IN ('idle', 'hard_failed')
            OR (p_status = 'running' AND _agg_lease_end(p_lease_expires_at, p_running_started_at_utc) <= p_now))
$$;

CREATE OR REPLACE FUNCTION _agg_stats_add(p_sum jsonb, p_stats jsonb)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT COALESCE(p_sum, '{}'::jsonb) || jsonb_build_object(
        'windows_processed', COALESCE((p_sum->>'windows_processed')::bigint, 0) + COALESCE((p_stats->>'windows_processed')::bigint, 0),
        'bars_created', COALESCE((p_sum->>'bars_created')::bigint, 0) + COALESCE((p_stats->>'bars_created')::bigint, 0),
        'bars_quality_poor', COALESCE((p_sum->>'bars_quality_poor')::bigint, 0) + COALESCE((p_stats->>'bars_quality_poor')::bigint, 0),
        'bars_skipped', COALESCE((p_sum->>'bars_skipped')::bigint, 0) + COALESCE((p_stats->>'bars_skipped')::bigint, 0),
        'gaps_skipped', COALESCE((p_sum->>'gaps_skipped')::bigint, 0) + COALESCE((p_stats->>'gaps_skipped')::bigint, 0),
        'calls', COALESCE((p_sum->>'calls')::bigint, 0) + 1)
$$;

CREATE OR REPLACE FUNCTION _agg_next_run(p_cursor timestamptz, p_interval interval, p_delay_seconds integer,
    p_run_interval_minutes integer, p_run_again boolean, p_now timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_run_again THEN p_now
        WHEN p_cursor IS NULL OR p_interval IS NULL
            THEN p_now + make_interval(mins => COALESCE(p_run_interval_minutes, 5))
        WHEN p_cursor + p_interval + make_interval(secs => COALESCE(p_delay_seconds, 0)) <= p_now
            THEN p_now + interval '1 minute'
        ELSE p_cursor + p_interval + make_interval(secs => COALESCE(p_delay_seconds, 0))
    END
$$;

-- ---------------------------------------------------------------------------------------------
-- data_agg_state: room for HOT updates
-- ---------------------------------------------------------------------------------------------
-- Every task row is updated two to three times per run (claim, finish, wake-up of the tasks built
-- from it) and none of the updated columns is indexed, so each update can be HOT (no index entry,
-- no page split) when its page has room for the new version. At the default fillfactor (100) the
-- pages are full after the first pass and most updates are not HOT (measured: 17% HOT). 50 keeps
-- room on every page; the table is small (about 500 bytes per task), so doubling it costs little.
-- Applies to pages written from now on; VACUUM FULL (or the next rewrite) repacks the old ones.
ALTER TABLE data_agg_state SET (fillfactor = 50);
