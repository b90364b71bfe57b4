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

-- ==== observability ====
-- The status page, the JSON API and the scrape-time metrics read these. Read-only, autocommit.
-- The `now` parameter may be NULL (then the server's now()); tests pass a fixed clock.

-- name: obs_tasks
-- One row per task with its lag. The frontier of a task is the end of the last window that its
-- source data covers completely: the source's latest bar end, rounded down to the task's bucket
-- (weeks start on Monday). Lag behind the frontier = frontier - cursor (0 when caught up); lag behind
-- now = now - end of the window at the cursor (0 while that window is still open).
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now_utc
),
tasks AS (
    -- The ladder comes from agg_timeframes (migration 0002); raw 1m bars are the base, one minute each.
    SELECT s.*,
           coalesce(s.source_timeframe, tf.source_timeframe) AS src_tf,
           tf.bucket_interval AS tf_interval,
           tf.bucket_origin AS tf_origin,
           coalesce(tf.duration_rank, 99) AS tf_order,
           coalesce(src.bucket_interval, interval '1 minute') AS src_interval
    FROM data_agg_state s
    LEFT JOIN agg_timeframes tf ON tf.timeframe = s.timeframe
    LEFT JOIN agg_timeframes src ON src.timeframe = coalesce(s.source_timeframe, tf.source_timeframe)
),
probed AS MATERIALIZED (  -- evaluate each probe once per task, not once per use
    SELECT t.*,
           CASE WHEN t.src_tf = '1m' THEN (
               SELECT max(b.ts_utc) FROM data_bars b
               WHERE b.canonical_symbol = t.canonical_symbol AND b.timeframe = '1m' AND NOT b.is_partial)
           ELSE (
               SELECT max(d.ts_utc) FROM derived_data_bars d
               WHERE d.canonical_symbol = t.canonical_symbol AND d.timeframe = t.src_tf
                 AND d.deleted_at IS NULL)
           END AS source_last_ts,
           (SELECT max(d.ts_utc) FROM derived_data_bars d
            WHERE d.canonical_symbol = t.canonical_symbol AND d.timeframe = t.timeframe
              AND d.deleted_at IS NULL) AS last_bar_ts
    FROM tasks t
),
framed AS (
    SELECT p.*,
           date_bin(p.tf_interval, p.source_last_ts + p.src_interval, p.tf_origin) AS frontier_utc
    FROM probed p
)
SELECT f.canonical_symbol AS symbol,
       f.timeframe,
       f.src_tf AS source_timeframe,
       f.status,
       f.enabled,
       f.is_mandatory AS mandatory,
       f.task_priority AS priority,
       f.last_agg_bar_ts_utc AS cursor_utc,
       f.agg_start_utc,
       f.frontier_utc,
       f.source_last_ts AS source_last_bar_utc,
       f.last_bar_ts AS last_bar_utc,
       CASE WHEN f.last_agg_bar_ts_utc IS NOT NULL AND f.frontier_utc IS NOT NULL
            THEN greatest(0, extract(epoch FROM f.frontier_utc - f.last_agg_bar_ts_utc))::float8
       END AS lag_frontier_seconds,
       CASE WHEN f.last_agg_bar_ts_utc IS NOT NULL AND f.tf_interval IS NOT NULL
            THEN greatest(0, extract(epoch FROM c.now_utc - (f.last_agg_bar_ts_utc + f.tf_interval)))::float8
       END AS lag_now_seconds,
       f.next_run_at AS next_run_utc,
       f.hard_fail_streak AS streak,
       f.last_error,
       f.last_attempted_at_utc AS last_attempt_utc,
       f.last_successful_at_utc AS last_success_utc,
       f.running_started_at_utc AS running_since_utc,
       f.lease_owner,
       f.lease_expires_at AS lease_expires_utc,
       f.last_rescue,
       f.total_runs,
       f.total_transient_failures AS transient_failures,
       f.total_hard_failures AS hard_failures,
       f.total_bars_created AS bars_created,
       f.total_bars_quality_poor AS bars_quality_poor,
       c.now_utc
FROM framed f CROSS JOIN clock c
ORDER BY f.canonical_symbol, f.tf_order, f.timeframe;

-- name: obs_symbols
SELECT r.canonical_symbol AS symbol,
       r.asset_class,
       coalesce(r.active, false) AS active,
       EXISTS (SELECT 1 FROM data_bars b WHERE b.canonical_symbol = r.canonical_symbol AND b.timeframe = '1m')
           AS has_1m,
       coalesce((SELECT array_agg(s.timeframe ORDER BY s.timeframe) FROM data_agg_state s
                 WHERE s.canonical_symbol = r.canonical_symbol), '{}') AS timeframes
FROM core_asset_registry_all r
ORDER BY r.canonical_symbol;

-- name: obs_symbol_exists
SELECT EXISTS (SELECT 1 FROM core_asset_registry_all WHERE canonical_symbol = %(symbol)s);

-- name: obs_bars_derived
-- The latest `limit` bars in [from, to), returned oldest first as one JSON object of columns, so
-- a year of 5m bars (~100k) goes from PostgreSQL to the browser without a Python object per value.
WITH newest AS (
    SELECT ts_utc, open, high, low, close, vol, quality_score, source_candles, expected_candles
    FROM derived_data_bars
    WHERE canonical_symbol = %(symbol)s AND timeframe = %(timeframe)s AND deleted_at IS NULL
      AND ts_utc >= coalesce(%(from)s::timestamptz, '-infinity')
      AND ts_utc < coalesce(%(to)s::timestamptz, 'infinity')
    ORDER BY ts_utc DESC
    LIMIT %(limit)s + 1  -- one more than asked: tells whether older bars exist
),
picked AS (
    SELECT * FROM newest ORDER BY ts_utc DESC LIMIT %(limit)s
)
SELECT count(*) AS n,
       (SELECT count(*) FROM newest) > %(limit)s AS truncated,
       json_build_object(
           'ts', coalesce(json_agg(extract(epoch FROM ts_utc)::bigint ORDER BY ts_utc), '[]'),
           'open', coalesce(json_agg(open ORDER BY ts_utc), '[]'),
           'high', coalesce(json_agg(high ORDER BY ts_utc), '[]'),
           'low', coalesce(json_agg(low ORDER BY ts_utc), '[]'),
           'close', coalesce(json_agg(close ORDER BY ts_utc), '[]'),
           'vol', coalesce(json_agg(vol ORDER BY ts_utc), '[]'),
           'quality', coalesce(json_agg(quality_score ORDER BY ts_utc), '[]'),
           'source_candles', coalesce(json_agg(source_candles ORDER BY ts_utc), '[]'),
           'expected_candles', coalesce(json_agg(expected_candles ORDER BY ts_utc), '[]')
       )::text AS columns
FROM picked;

-- name: obs_bars_1m
-- Raw 1m bars from data_bars, in the same shape (no quality: they are the source).
WITH newest AS (
    SELECT ts_utc, open, high, low, close, vol
    FROM data_bars
    WHERE canonical_symbol = %(symbol)s AND timeframe = '1m' AND NOT is_partial
      AND ts_utc >= coalesce(%(from)s::timestamptz, '-infinity')
      AND ts_utc < coalesce(%(to)s::timestamptz, 'infinity')
    ORDER BY ts_utc DESC
    LIMIT %(limit)s + 1  -- one more than asked: tells whether older bars exist
),
picked AS (
    SELECT * FROM newest ORDER BY ts_utc DESC LIMIT %(limit)s
)
SELECT count(*) AS n,
       (SELECT count(*) FROM newest) > %(limit)s AS truncated,
       json_build_object(
           'ts', coalesce(json_agg(extract(epoch FROM ts_utc)::bigint ORDER BY ts_utc), '[]'),
           'open', coalesce(json_agg(open ORDER BY ts_utc), '[]'),
           'high', coalesce(json_agg(high ORDER BY ts_utc), '[]'),
           'low', coalesce(json_agg(low ORDER BY ts_utc), '[]'),
           'close', coalesce(json_agg(close ORDER BY ts_utc), '[]'),
           'vol', coalesce(json_agg(vol ORDER BY ts_utc), '[]'),
           'quality', coalesce(json_agg(NULL::int ORDER BY ts_utc), '[]'),
           'source_candles', coalesce(json_agg(NULL::int ORDER BY ts_utc), '[]'),
           'expected_candles', coalesce(json_agg(NULL::int ORDER BY ts_utc), '[]')
       )::text AS columns
FROM picked;

-- name: obs_invalidation_log_exists
-- The invalidation log arrives with migration 0004; until then the metrics report nothing for it.
SELECT to_regclass('agg_invalidations') IS NOT NULL;

-- name: obs_invalidations_pending
SELECT count(*) AS pending,
       extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - min(recorded_at))::float8 AS oldest_age_seconds
FROM agg_invalidations;
