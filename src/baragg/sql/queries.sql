-- Every runtime query the Python side sends, as named blocks (loaded by baragg.sql).
-- Placeholders are psycopg's: %(name)s.

-- name: migrations_table
CREATE TABLE IF NOT EXISTS baragg_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_lock
SELECT pg_advisory_lock(hashtext('baragg.migrations'));

-- name: migrations_unlock
SELECT pg_advisory_unlock(hashtext('baragg.migrations'));

-- name: migrations_applied
SELECT version, name, checksum, applied_at FROM baragg_schema_migrations ORDER BY version;

-- name: migrations_record
INSERT INTO baragg_schema_migrations (version, name, checksum) VALUES (%(version)s, %(name)s, %(checksum)s);

-- ==== worker ====

-- name: worker_sync
SELECT sync_agg_state_from_registry(%(env)s, %(now)s::timestamptz);

-- name: worker_claim
SELECT canonical_symbol, timeframe, source_timeframe, last_agg_bar_ts_utc, is_mandatory, lease_expires_at,
       rescued_from
FROM agg_claim_tasks(%(worker_id)s, %(limit)s, %(lease_seconds)s, %(now)s::timestamptz,
                     %(symbols)s::text[], %(timeframes)s::text[]);

-- name: worker_bootstrap
SELECT agg_bootstrap_cursor(%(symbol)s, %(timeframe)s, COALESCE(%(now)s::timestamptz, now()));

-- name: worker_catchup
SELECT catchup_aggregation_range(%(symbol)s, %(timeframe)s, %(cursor)s::timestamptz, %(max_windows)s,
                                 %(now)s::timestamptz);

-- name: worker_checkpoint
SELECT agg_checkpoint(%(symbol)s, %(timeframe)s, %(worker_id)s, %(cursor)s::timestamptz, %(stats)s::jsonb,
                      %(now)s::timestamptz, %(lease_seconds)s);

-- name: worker_finish_ok
SELECT agg_finish(%(symbol)s, %(timeframe)s, true, %(cursor)s::timestamptz, %(stats)s::jsonb, NULL, NULL,
                  %(now)s::timestamptz, %(worker_id)s);

-- name: worker_finish_failed
SELECT agg_finish(%(symbol)s, %(timeframe)s, false, NULL, NULL, %(fail_kind)s, %(error)s,
                  %(now)s::timestamptz, %(worker_id)s);

-- name: worker_finish_many
SELECT agg_finish_many(%(worker_id)s, %(results)s::jsonb, %(now)s::timestamptz);

-- name: worker_release
SELECT agg_release(%(symbol)s, %(timeframe)s, %(worker_id)s, %(now)s::timestamptz);

-- name: worker_seconds_to_next_due
-- How long until some task becomes due (idle/hard_failed: next_run_at; running: its lease end).
-- Only tasks a claim can take (their timeframe is on the ladder).
SELECT EXTRACT(epoch FROM min(CASE WHEN s.status = 'running'
                                   THEN GREATEST(_agg_lease_end(s.lease_expires_at, s.running_started_at_utc),
                                                 s.next_run_at)
                                   ELSE COALESCE(s.next_run_at, now()) END) - now())::float8
FROM data_agg_state s
JOIN agg_timeframes t ON t.timeframe = s.timeframe
WHERE s.enabled AND s.status IN ('idle', 'hard_failed', 'running');

-- name: worker_has_function
SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = %(name)s AND pronamespace = 'public'::regnamespace);

-- name: worker_clear_rerun
-- Before each catch-up call: a wake-up from the source task that arrived before this call is
-- served by it, so it must not schedule another run (one arriving later still does).
UPDATE data_agg_state SET rerun_requested = false
WHERE canonical_symbol = ANY (%(symbols)s::text[]) AND timeframe = %(timeframe)s
  AND lease_owner = %(worker_id)s AND rerun_requested;

-- name: worker_catchup_many
SELECT canonical_symbol, result
FROM agg_catchup_tasks(%(timeframe)s, %(symbols)s::text[], %(cursors)s::timestamptz[], %(max_windows)s,
                       %(now)s::timestamptz);

-- name: worker_checkpoint_many
SELECT agg_checkpoint_many(%(worker_id)s, %(items)s::jsonb, %(now)s::timestamptz, %(lease_seconds)s);

-- ==== late data (migration 0004) ====

-- name: worker_reaggregate_many
-- Re-aggregate the invalidated windows of claimed tasks of one timeframe (all of them, one
-- statement); result keys: windows, bars_reaggregated, bars_withdrawn, entries_dropped.
SELECT canonical_symbol, result FROM agg_reaggregate_tasks(%(timeframe)s, %(symbols)s::text[]);

-- name: pending_invalidations
-- Per task: windows waiting to be re-aggregated because their source changed after aggregation.
SELECT s.canonical_symbol, s.timeframe, count(i.window_start)::bigint AS pending_invalidations,
       min(i.window_start) AS oldest_invalidated_window, min(i.first_seen_at) AS first_seen_at
FROM data_agg_state s
LEFT JOIN agg_invalidations i ON i.canonical_symbol = s.canonical_symbol AND i.timeframe = s.timeframe
GROUP BY s.canonical_symbol, s.timeframe
ORDER BY s.canonical_symbol, s.timeframe;
