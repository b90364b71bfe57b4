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

-- name: migrations_rechecksum
UPDATE baragg_schema_migrations SET checksum = %(checksum)s WHERE version = %(version)s;

-- name: repeatables_table
CREATE TABLE IF NOT EXISTS baragg_schema_repeatables (
    name text PRIMARY KEY,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: repeatables_applied
SELECT name, checksum, applied_at FROM baragg_schema_repeatables ORDER BY name;

-- name: repeatables_record
INSERT INTO baragg_schema_repeatables AS r (name, checksum) VALUES (%(name)s, %(checksum)s)
ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now();

-- name: schema_present
-- Whether baragg's tables exist (migrations may have been applied with psql, which records nothing).
SELECT to_regclass('data_agg_state') IS NOT NULL AND to_regclass('agg_timeframes') IS NOT NULL;

-- ==== worker ====

-- name: worker_sync
SELECT sync_agg_state_from_registry(%(env)s, %(now)s::timestamptz);

-- name: worker_claim
SELECT canonical_symbol, timeframe, source_timeframe, last_agg_bar_ts_utc, is_mandatory, lease_expires_at,
       rescued_from, rescue_reason
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
                                   THEN GREATEST(COALESCE(s.lease_expires_at,  -- lease end
                                                          s.running_started_at_utc + interval '5 minutes',
                                                          '-infinity'),
                                                 s.next_run_at)
                                   ELSE COALESCE(s.next_run_at, now()) END) - now())::float8
FROM data_agg_state s
JOIN agg_timeframes t ON t.timeframe = s.timeframe
WHERE s.enabled AND s.status IN ('idle', 'hard_failed', 'running');

-- name: worker_session_lock
-- The worker lock of this connection's session (migration 0006): held until the session ends, so a
-- claim can tell that a running task's owner is gone. false: the key is taken, pick another.
SELECT pg_try_advisory_lock(1650553447, %(key)s);

-- name: worker_has_function
SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = %(name)s AND pronamespace = 'public'::regnamespace);

-- name: worker_lock_tasks
-- First statement of every catch-up transaction: lock the batch's task rows (key order) until the
-- commit of the new cursors. The invalidation triggers (0004, _agg_lock_dependents) lock the same rows
-- before reading a cursor, so a source row written while this catch-up is in flight is either seen by
-- it or recorded against the advanced cursor: never lost.
SELECT count(*) FROM (
    SELECT 1 FROM data_agg_state
    WHERE canonical_symbol = ANY (%(symbols)s::text[]) AND timeframe = %(timeframe)s
      AND lease_owner = %(worker_id)s
    ORDER BY canonical_symbol
    FOR NO KEY UPDATE
) locked;

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
-- Re-aggregate the final logged windows of claimed tasks of one timeframe (all of them, one
-- statement; windows not final yet stay logged); result keys: windows, bars_created, bars_rewritten,
-- bars_unchanged, bars_withdrawn, bars_quality_poor, bars_reaggregated, entries_dropped, entries_waiting.
SELECT canonical_symbol, result
FROM agg_reaggregate_tasks(%(timeframe)s, %(symbols)s::text[], 1, %(now)s::timestamptz);

-- name: pending_invalidations
-- Per task: windows waiting to be re-aggregated because their source changed after aggregation.
SELECT s.canonical_symbol, s.timeframe, count(i.window_start)::bigint AS pending_invalidations,
       min(i.window_start) AS oldest_invalidated_window, min(i.first_seen_at) AS first_seen_at
FROM data_agg_state s
LEFT JOIN agg_invalidations i ON i.canonical_symbol = s.canonical_symbol AND i.timeframe = s.timeframe
GROUP BY s.canonical_symbol, s.timeframe
ORDER BY s.canonical_symbol, s.timeframe;
-- ==== operator tools: ingest ====

-- name: ingest_session_settings
SELECT set_config('temp_buffers', '256MB', false), set_config('work_mem', '128MB', true);

-- name: ingest_create_stage
-- One row per file row that has a symbol and a time (bad ones too, with ok = false, so that
-- duplicate times are found across the whole file). Times arrive as microseconds since the epoch
-- (cheap to write and parse); ts_utc is computed from them. Dropped with the transaction.
CREATE TEMP TABLE ingest_stage (
    line bigint NOT NULL,
    canonical_symbol text NOT NULL,
    ts_us bigint NOT NULL,
    ts_utc timestamptz GENERATED ALWAYS AS (to_timestamp(ts_us / 1e6::double precision)) STORED,
    open double precision,
    high double precision,
    low double precision,
    close double precision,
    vol double precision,
    vwap double precision,
    trade_count integer,
    ok boolean NOT NULL
) ON COMMIT DROP;

-- name: ingest_copy_stage
COPY ingest_stage (line, canonical_symbol, ts_us, open, high, low, close, vol, vwap, trade_count, ok)
FROM STDIN WITH (FORMAT csv);

-- name: ingest_duplicates
-- Good rows whose (symbol, time) appears more than once in the file, in line order, with up to five
-- of the other lines and how many other lines there are (a time repeated a million times must not
-- give every one of its rows a list of a million lines).
WITH repeated AS (
    SELECT canonical_symbol, ts_utc, count(*) AS n, (array_agg(line ORDER BY line))[1:6] AS first_lines
    FROM ingest_stage
    GROUP BY canonical_symbol, ts_utc
    HAVING count(*) > 1
)
SELECT s.line, s.ts_utc,
       ARRAY(SELECT l FROM unnest(r.first_lines) AS l WHERE l <> s.line ORDER BY l LIMIT 5) AS others,
       r.n - 1 AS n_others
FROM ingest_stage s
JOIN repeated r USING (canonical_symbol, ts_utc)
WHERE s.ok
ORDER BY s.line;

-- name: ingest_drop_duplicates
UPDATE ingest_stage s SET ok = false
FROM (
    SELECT canonical_symbol, ts_utc FROM ingest_stage
    GROUP BY canonical_symbol, ts_utc HAVING count(*) > 1
) d
WHERE s.canonical_symbol = d.canonical_symbol AND s.ts_utc = d.ts_utc AND s.ok;

-- name: ingest_upsert
-- Insert new bars; overwrite an existing bar only when a value differs, so that re-ingesting a file
-- rewrites nothing (no new row versions, ingested_at and triggers untouched).
-- RETURNING xmax cannot tell an insert from an update on a partitioned table: a row whose id was drawn
-- after id_floor (drawn before the first row is written; the sequence is monotonic) is new.
WITH id_floor AS MATERIALIZED (
    SELECT nextval('data_bars_id_seq'::regclass) AS f
),
written AS (
    INSERT INTO data_bars AS d (canonical_symbol, provider_ticker, timeframe, ts_utc, open, high, low, close,
                                vol, vwap, trade_count, is_partial, source)
    SELECT s.canonical_symbol, r.provider_ticker, '1m', s.ts_utc, s.open, s.high, s.low, s.close,
           s.vol, s.vwap, s.trade_count, false, %(source)s
    FROM ingest_stage s
    JOIN core_asset_registry_all r USING (canonical_symbol)
    CROSS JOIN id_floor
    WHERE s.ok
    ON CONFLICT (canonical_symbol, timeframe, ts_utc) DO UPDATE
    SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
        vol = EXCLUDED.vol, vwap = EXCLUDED.vwap, trade_count = EXCLUDED.trade_count,
        -- (EXCLUDED.ingested_at is the column's default, now(): Citus takes no function here)
        is_partial = false, source = EXCLUDED.source, ingested_at = EXCLUDED.ingested_at
    WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial)
          IS DISTINCT FROM
          (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vol, EXCLUDED.vwap,
           EXCLUDED.trade_count, false)
    RETURNING d.id
)
SELECT count(*) FILTER (WHERE id > (SELECT f FROM id_floor)),
       count(*) FILTER (WHERE id <= (SELECT f FROM id_floor)),
       (SELECT count(*) FROM ingest_stage WHERE ok)
FROM written;

-- name: ingest_stage_symbols
SELECT canonical_symbol, min(ts_utc), max(ts_utc) FROM ingest_stage WHERE ok GROUP BY 1 ORDER BY 1;

-- name: ingest_symbol_tickers
-- Each registered symbol's provider ticker, written with its rows by the direct path.
SELECT canonical_symbol, provider_ticker FROM core_asset_registry_all;

-- name: ingest_overlaps
-- Does data_bars hold any 1m row of these symbols between these times (one index probe per symbol)?
-- A chunk of new rows only (the usual case: a file of history not loaded before) is COPYed straight
-- into data_bars; one that overlaps goes through the staging table and the upsert.
-- The chunk's whole span as plain bounds too: they prune data_bars' monthly partitions when the query
-- is planned, so the probe reads (and locks) only the chunk's months, not the default partition, which
-- attaching a later month's partition must lock exclusively (ingest creates those on another
-- connection while this transaction is open). Run unprepared (ingest.py): a prepared statement's plan
-- locked every partition, and from the 6th chunk on no month could be attached.
SELECT EXISTS (
    SELECT 1
    FROM unnest(%(symbols)s::text[], %(firsts)s::timestamptz[], %(lasts)s::timestamptz[]) AS c(sym, lo, hi)
    WHERE EXISTS (SELECT 1 FROM data_bars d
                  WHERE d.canonical_symbol = c.sym AND d.timeframe = '1m' AND d.ts_utc BETWEEN c.lo AND c.hi
                    AND d.ts_utc >= %(first)s AND d.ts_utc <= %(last)s)
);

-- name: ingest_copy_direct
-- The direct path: good rows of a chunk that overlaps no stored row, in COPY's binary format (no text
-- to parse on either side); the insert triggers see them as they see any insert.
COPY data_bars (canonical_symbol, provider_ticker, timeframe, ts_utc, open, high, low, close, vol, vwap,
                trade_count, is_partial, source)
FROM STDIN WITH (FORMAT binary);

-- ==== operator tools: registry ====

-- name: registry_insert_new
-- A NULL parameter means "not given": the new row gets the column default. An existing symbol is left
-- to registry_update (in the same transaction), which keeps the values not given.
INSERT INTO core_asset_registry_all (
    canonical_symbol, provider_ticker, asset_class, source, active, test_active, is_sparse,
    calc_15m, calc_4h, calc_1d, calc_1w, calc_1mo, session, notes, agg_start_utc)
VALUES (
    %(symbol)s, %(provider_ticker)s, %(asset_class)s, %(source)s,
    COALESCE(%(active)s, true), COALESCE(%(test_active)s, true), COALESCE(%(is_sparse)s, false),
    COALESCE(%(calc_15m)s, false), COALESCE(%(calc_4h)s, false), COALESCE(%(calc_1d)s, false),
    COALESCE(%(calc_1w)s, false), COALESCE(%(calc_1mo)s, false), COALESCE(%(session)s, '24x7'), %(notes)s,
    %(agg_start_utc)s)
ON CONFLICT (canonical_symbol) DO NOTHING
RETURNING canonical_symbol;

-- name: registry_update
UPDATE core_asset_registry_all AS r SET
    provider_ticker = COALESCE(%(provider_ticker)s, r.provider_ticker),
    asset_class = COALESCE(%(asset_class)s, r.asset_class),
    source = COALESCE(%(source)s, r.source),
    active = COALESCE(%(active)s, r.active),
    test_active = COALESCE(%(test_active)s, r.test_active),
    is_sparse = COALESCE(%(is_sparse)s, r.is_sparse),
    calc_15m = COALESCE(%(calc_15m)s, r.calc_15m),
    calc_4h = COALESCE(%(calc_4h)s, r.calc_4h),
    calc_1d = COALESCE(%(calc_1d)s, r.calc_1d),
    calc_1w = COALESCE(%(calc_1w)s, r.calc_1w),
    calc_1mo = COALESCE(%(calc_1mo)s, r.calc_1mo),
    session = COALESCE(%(session)s, r.session),
    notes = COALESCE(%(notes)s, r.notes),
    agg_start_utc = COALESCE(%(agg_start_utc)s, r.agg_start_utc),
    updated_at = now()
WHERE canonical_symbol = %(symbol)s
RETURNING canonical_symbol;

-- name: registry_list
SELECT canonical_symbol, provider_ticker, asset_class, source, active, test_active, is_sparse,
       calc_15m, calc_4h, calc_1d, calc_1w, calc_1mo, session, notes, agg_start_utc, created_at, updated_at
FROM core_asset_registry_all
ORDER BY canonical_symbol;

-- name: registry_existing_task_starts
-- The symbol's tasks and their start, to say that an existing task keeps it (the sync never moves it).
SELECT timeframe, NULLIF(agg_start_utc, '-infinity') FROM data_agg_state WHERE canonical_symbol = %(symbol)s
ORDER BY timeframe;

-- name: registry_bad_symbols
-- Registry names that break the naming rule (kept from before the CHECK of migration 0007).
-- (after `db upgrade`, so the table exists)
SELECT canonical_symbol FROM core_asset_registry_all
WHERE canonical_symbol !~ '^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$'
ORDER BY canonical_symbol;

-- name: registry_rebuild_key
SELECT session, COALESCE(is_sparse, false) FROM core_asset_registry_all WHERE canonical_symbol = %(symbol)s;

-- name: registry_symbol_span
-- The times a symbol's session days must cover: its data, its tasks' agg_start_utc and cursors
-- (a start of '-infinity', "from the first row", adds nothing).
SELECT LEAST(b.first_bar, t.first_start), GREATEST(b.last_bar, t.last_cursor, t.first_start)
FROM (SELECT min(ts_utc) AS first_bar, max(ts_utc) AS last_bar FROM data_bars
      WHERE canonical_symbol = %(symbol)s AND timeframe = '1m') b,
     (SELECT min(NULLIF(agg_start_utc, '-infinity')) AS first_start, max(last_agg_bar_ts_utc) AS last_cursor
      FROM data_agg_state WHERE canonical_symbol = %(symbol)s) t;

-- name: registry_rebuild
SELECT agg_rebuild_symbol(%(symbol)s);

-- name: registry_sync_exists
SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'sync_agg_state_from_registry');

-- name: registry_sync
SELECT * FROM sync_agg_state_from_registry(%(env)s);

-- ==== operator tools: cleanup ====

-- name: cleanup_legacy_derived_count
SELECT canonical_symbol, count(*)
FROM derived_data_bars
WHERE timeframe = %(timeframe)s AND deleted_at IS NULL
GROUP BY canonical_symbol
ORDER BY canonical_symbol;

-- name: cleanup_legacy_derived
WITH deleted AS (
    UPDATE derived_data_bars SET deleted_at = now(), updated_at = now()
    WHERE timeframe = %(timeframe)s AND deleted_at IS NULL
    RETURNING canonical_symbol
)
SELECT canonical_symbol, count(*) FROM deleted GROUP BY canonical_symbol ORDER BY canonical_symbol;

-- ==== operator tools: verify ====

-- name: verify_asset
SELECT coalesce(is_sparse, false), session FROM core_asset_registry_all WHERE canonical_symbol = %(symbol)s;

-- name: verify_session_range
SELECT days_from, days_to FROM agg_sessions WHERE name = %(session)s;

-- name: verify_session_days
SELECT trading_date, open_utc, close_utc FROM agg_session_days WHERE session = %(session)s ORDER BY open_utc;

-- name: verify_task
-- '-infinity' (no explicit start: from the first source row) reads as NULL.
SELECT NULLIF(agg_start_utc, '-infinity'), last_agg_bar_ts_utc
FROM data_agg_state
WHERE canonical_symbol = %(symbol)s AND timeframe = %(timeframe)s;

-- name: verify_session_settings
-- One chunk is one aggregate over an index range: parallel workers only add a sort and a merge.
SELECT set_config('max_parallel_workers_per_gather', '0', true);

-- name: verify_next_base
-- `baragg verify` reads rows one chunk of time at a time and aggregates them itself, independently
-- of the engine. Where the next chunk starts: the first source or stored row at or after the given
-- instants (an empty stretch of the range costs one index probe each side).
SELECT least(
    (SELECT min(ts_utc) FROM data_bars
     WHERE canonical_symbol = %(symbol)s AND timeframe = %(source_timeframe)s
       AND ts_utc >= %(source_from)s AND ts_utc < %(hi)s AND NOT coalesce(is_partial, false)),
    (SELECT min(ts_utc) FROM derived_data_bars
     WHERE canonical_symbol = %(symbol)s AND timeframe = %(timeframe)s
       AND ts_utc >= %(stored_from)s AND ts_utc < %(hi)s AND deleted_at IS NULL));

-- name: verify_next_derived
SELECT least(
    (SELECT min(ts_utc) FROM derived_data_bars
     WHERE canonical_symbol = %(symbol)s AND timeframe = %(source_timeframe)s
       AND ts_utc >= %(source_from)s AND ts_utc < %(hi)s
       AND deleted_at IS NULL AND NOT coalesce(is_partial, false)),
    (SELECT min(ts_utc) FROM derived_data_bars
     WHERE canonical_symbol = %(symbol)s AND timeframe = %(timeframe)s
       AND ts_utc >= %(stored_from)s AND ts_utc < %(hi)s AND deleted_at IS NULL));

-- name: verify_source_base
-- Raw 1m bars that count as source (not still forming), in time order, one column per value: each a
-- float8[] in PostgreSQL's binary array format (array_send), which Python reads straight into numpy;
-- NULL is sent as NaN (a missing value either way). Rows never travel one by one.
SELECT array_send(array_agg(ts_utc ORDER BY ts_utc)),
       array_send(array_agg(coalesce(open, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(high, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(low, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(close, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(vol, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(vwap, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(trade_count::float8, 'NaN') ORDER BY ts_utc))
FROM data_bars
WHERE canonical_symbol = %(symbol)s AND timeframe = %(source_timeframe)s
  AND ts_utc >= %(lo)s AND ts_utc < %(hi)s
  AND NOT coalesce(is_partial, false);

-- name: verify_source_derived
SELECT array_send(array_agg(ts_utc ORDER BY ts_utc)),
       array_send(array_agg(coalesce(open, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(high, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(low, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(close, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(vol, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(vwap, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(trade_count::float8, 'NaN') ORDER BY ts_utc))
FROM derived_data_bars
WHERE canonical_symbol = %(symbol)s AND timeframe = %(source_timeframe)s
  AND ts_utc >= %(lo)s AND ts_utc < %(hi)s
  AND deleted_at IS NULL AND NOT coalesce(is_partial, false);

-- name: verify_stored
SELECT array_send(array_agg(ts_utc ORDER BY ts_utc)),
       array_send(array_agg(coalesce(open, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(high, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(low, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(close, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(vol, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(vwap, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(trade_count::float8, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(source_candles::float8, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(expected_candles::float8, 'NaN') ORDER BY ts_utc)),
       array_send(array_agg(coalesce(quality_score::float8, 'NaN') ORDER BY ts_utc)),
       array_agg(source_timeframe ORDER BY ts_utc)
FROM derived_data_bars
WHERE canonical_symbol = %(symbol)s AND timeframe = %(timeframe)s
  AND ts_utc >= %(lo)s AND ts_utc < %(hi)s
  AND deleted_at IS NULL;

-- ==== operator tools: status ====

-- name: status_ready
SELECT to_regclass('agg_timeframes') IS NOT NULL
   AND EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_name = 'data_agg_state' AND column_name = 'lease_owner') AS ready;

-- name: status_tasks
-- The frontier of a task is the end of the last window its source data covers completely:
-- the bucket that starts right after the newest source bar ends.
-- Shaped for Citus too (DESIGN.md 11): the per-task reads are lateral subqueries joined on the
-- symbol (Citus runs them on the shards), and the session frontier, which reads the trading days, is
-- computed from their materialised result (on the coordinator: a function reading a table may not
-- run inside a query on a shard).
WITH t AS MATERIALIZED (
    SELECT s.canonical_symbol, s.timeframe, s.status, s.enabled, s.is_mandatory, s.last_agg_bar_ts_utc,
           r.session, s.next_run_at, s.hard_fail_streak, s.last_error, s.last_successful_at_utc,
           s.total_bars_created, s.total_bars_rewritten, s.total_bars_withdrawn, s.total_bars_unchanged,
           s.total_bars_quality_poor, s.lease_owner,
           -- '-infinity' (no explicit start: from the first source data) reads as NULL
           NULLIF(s.agg_start_utc, '-infinity') AS agg_start_utc,
           COALESCE(eb.first_ts, ed.first_ts) AS first_before_start, tf.source_timeframe AS ladder_source,
           COALESCE(nb.newest, nd.newest) + COALESCE(src.bucket_interval, interval '1 minute') AS newest_end,
           tf.bucket_interval, tf.bucket_origin, tf.duration_rank,
           CASE WHEN s.last_agg_bar_ts_utc IS NOT NULL
                THEN greatest(0, extract(epoch FROM COALESCE(%(now)s::timestamptz, now()) - s.last_agg_bar_ts_utc))
           END AS lag_now_seconds,
           -- windows behind the cursor waiting to be re-aggregated (late or corrected source data, 0004)
           pi.n AS pending_invalidations
    FROM data_agg_state s
    JOIN agg_timeframes tf ON tf.timeframe = s.timeframe
    LEFT JOIN agg_timeframes src ON src.timeframe = tf.source_timeframe
    LEFT JOIN core_asset_registry_all r ON r.canonical_symbol = s.canonical_symbol
    LEFT JOIN LATERAL (
        SELECT max(b.ts_utc) AS newest FROM data_bars b
        WHERE tf.source_table = 'data_bars'
          AND b.canonical_symbol = s.canonical_symbol AND b.timeframe = tf.source_timeframe
    ) nb ON true
    LEFT JOIN LATERAL (
        SELECT max(d.ts_utc) AS newest FROM derived_data_bars d
        WHERE tf.source_table = 'derived_data_bars'
          AND d.canonical_symbol = s.canonical_symbol AND d.timeframe = tf.source_timeframe
          AND d.deleted_at IS NULL
    ) nd ON true
    -- The first source row before the task's start: rows the task will never aggregate (rule 1).
    -- One index probe; none when the task has no explicit start.
    LEFT JOIN LATERAL (
        SELECT min(b.ts_utc) AS first_ts FROM data_bars b
        WHERE s.agg_start_utc <> '-infinity' AND tf.source_table = 'data_bars'
          AND b.canonical_symbol = s.canonical_symbol AND b.timeframe = tf.source_timeframe
          AND b.ts_utc < s.agg_start_utc
    ) eb ON true
    LEFT JOIN LATERAL (
        SELECT min(d.ts_utc) AS first_ts FROM derived_data_bars d
        WHERE s.agg_start_utc <> '-infinity' AND tf.source_table = 'derived_data_bars'
          AND d.canonical_symbol = s.canonical_symbol AND d.timeframe = tf.source_timeframe
          AND d.ts_utc < s.agg_start_utc AND d.deleted_at IS NULL
    ) ed ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS n FROM agg_invalidations i
        WHERE i.canonical_symbol = s.canonical_symbol AND i.timeframe = s.timeframe
    ) pi ON true
    WHERE %(symbols)s::text[] IS NULL OR s.canonical_symbol = ANY (%(symbols)s::text[])
)
SELECT t.*, f.frontier,
       CASE WHEN t.last_agg_bar_ts_utc IS NOT NULL AND f.frontier IS NOT NULL
            THEN greatest(0, extract(epoch FROM f.frontier - t.last_agg_bar_ts_utc)) END AS lag_frontier_seconds
FROM t
CROSS JOIN LATERAL (
    -- (a symbol on a trading session, or 1mo: its session's windows, 15_sessions.sql; 24x7 inline)
    SELECT CASE WHEN t.timeframe <> '1mo' AND COALESCE(t.session, '24x7') = '24x7'
                THEN date_bin(t.bucket_interval, t.newest_end, t.bucket_origin)
                ELSE _agg_frontier(t.canonical_symbol, t.timeframe, t.newest_end, t.bucket_interval, t.bucket_origin)
           END AS frontier
) f
ORDER BY t.canonical_symbol, t.duration_rank;

-- name: status_reenable_check
-- What `baragg reenable` needs to know first: the task's state, and whether the registry wants it in
-- the environment (a task the registry has inactive would be disabled again by the next sync).
SELECT s.status, s.enabled, s.hard_fail_streak, s.last_error, s.next_run_at, s.lease_owner,
       EXISTS (SELECT 1 FROM _agg_wanted_tasks(%(env)s) w
               WHERE w.canonical_symbol = s.canonical_symbol AND w.timeframe = s.timeframe) AS wanted
FROM data_agg_state s
WHERE s.canonical_symbol = %(symbol)s AND s.timeframe = %(timeframe)s
FOR UPDATE;

-- name: status_reenable
SELECT agg_reenable_task(%(symbol)s, %(timeframe)s, %(now)s::timestamptz);

-- ==== operator tools: backfill ====

-- name: backfill_estimate
-- How much time each selected task still has to cover: from its cursor (or where its bootstrap will
-- put it) to the frontier of the raw 1m data, which every timeframe reaches after a full catch-up.
SELECT s.canonical_symbol, s.timeframe, tf.bucket_interval,
       COALESCE(s.last_agg_bar_ts_utc,
                date_bin(tf.bucket_interval, greatest(NULLIF(s.agg_start_utc, '-infinity'), b.first_bar),
                         tf.bucket_origin)) AS start_at,
       date_bin(tf.bucket_interval, b.last_bar + interval '1 minute', tf.bucket_origin) AS end_at
FROM data_agg_state s
JOIN agg_timeframes tf ON tf.timeframe = s.timeframe
CROSS JOIN LATERAL (
    SELECT (SELECT min(ts_utc) FROM data_bars d
            WHERE d.canonical_symbol = s.canonical_symbol AND d.timeframe = '1m' AND d.ts_utc >= s.agg_start_utc) AS first_bar,
           (SELECT max(ts_utc) FROM data_bars d
            WHERE d.canonical_symbol = s.canonical_symbol AND d.timeframe = '1m') AS last_bar
) b
WHERE s.enabled
  AND (%(symbols)s::text[] IS NULL OR s.canonical_symbol = ANY (%(symbols)s::text[]))
  AND (%(timeframes)s::text[] IS NULL OR s.timeframe = ANY (%(timeframes)s::text[]))
ORDER BY s.canonical_symbol, tf.duration_rank;

-- name: backfill_restart_from
-- Set agg_start_utc of the selected tasks and send their cursors back to be bootstrapped again from
-- there. Tasks a live worker holds are left alone (and reported by the caller).
UPDATE data_agg_state s
SET agg_start_utc = %(start)s, last_agg_bar_ts_utc = NULL, next_run_at = NULL, updated_at = now()
WHERE (%(symbols)s::text[] IS NULL OR s.canonical_symbol = ANY (%(symbols)s::text[]))
  AND (%(timeframes)s::text[] IS NULL OR s.timeframe = ANY (%(timeframes)s::text[]))
  AND s.status <> 'running'
RETURNING s.canonical_symbol, s.timeframe;

-- name: backfill_known_symbols
SELECT canonical_symbol FROM core_asset_registry_all WHERE canonical_symbol = ANY (%(symbols)s::text[]);

-- name: backfill_task_states
-- The selected tasks after a backfill, to report those it could not run (failing, held, off).
SELECT s.canonical_symbol, s.timeframe, s.enabled, s.status, s.hard_fail_streak, s.last_error, s.next_run_at,
       s.lease_owner,
       COALESCE(s.lease_expires_at, s.running_started_at_utc + interval '5 minutes') AS lease_end  -- lease end
FROM data_agg_state s
JOIN agg_timeframes tf ON tf.timeframe = s.timeframe
WHERE (%(symbols)s::text[] IS NULL OR s.canonical_symbol = ANY (%(symbols)s::text[]))
  AND (%(timeframes)s::text[] IS NULL OR s.timeframe = ANY (%(timeframes)s::text[]))
ORDER BY s.canonical_symbol, tf.duration_rank;

-- name: backfill_before_start
-- Selected tasks that have source rows before their agg_start_utc: rows they never aggregate (rule 1).
SELECT s.canonical_symbol, s.timeframe, s.agg_start_utc, e.first_before_start
FROM data_agg_state s
JOIN agg_timeframes tf ON tf.timeframe = s.timeframe
CROSS JOIN LATERAL (
    SELECT CASE WHEN tf.source_table = 'data_bars' THEN
                    (SELECT min(b.ts_utc) FROM data_bars b
                     WHERE b.canonical_symbol = s.canonical_symbol AND b.timeframe = tf.source_timeframe
                       AND b.ts_utc < s.agg_start_utc)
                ELSE
                    (SELECT min(d.ts_utc) FROM derived_data_bars d
                     WHERE d.canonical_symbol = s.canonical_symbol AND d.timeframe = tf.source_timeframe
                       AND d.ts_utc < s.agg_start_utc AND d.deleted_at IS NULL)
           END AS first_before_start
) e
WHERE s.agg_start_utc <> '-infinity' AND s.enabled AND e.first_before_start IS NOT NULL
  AND (%(symbols)s::text[] IS NULL OR s.canonical_symbol = ANY (%(symbols)s::text[]))
  AND (%(timeframes)s::text[] IS NULL OR s.timeframe = ANY (%(timeframes)s::text[]))
ORDER BY s.canonical_symbol, tf.duration_rank;

-- name: backfill_running
SELECT s.canonical_symbol || ' ' || s.timeframe
FROM data_agg_state s
WHERE (%(symbols)s::text[] IS NULL OR s.canonical_symbol = ANY (%(symbols)s::text[]))
  AND (%(timeframes)s::text[] IS NULL OR s.timeframe = ANY (%(timeframes)s::text[]))
  AND s.status = 'running'
ORDER BY 1;
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
           (SELECT r.session FROM core_asset_registry_all r WHERE r.canonical_symbol = s.canonical_symbol) AS session,
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
              AND d.deleted_at IS NULL) AS last_bar_ts,
           (SELECT count(*) FROM agg_invalidations i
            WHERE i.canonical_symbol = t.canonical_symbol AND i.timeframe = t.timeframe) AS invalidations
    FROM tasks t
),
framed AS (
    SELECT p.*,
           CASE WHEN p.tf_interval IS NULL THEN NULL
                WHEN p.timeframe <> '1mo' AND COALESCE(p.session, '24x7') = '24x7'
                    THEN date_bin(p.tf_interval, p.source_last_ts + p.src_interval, p.tf_origin)
                ELSE _agg_frontier(p.canonical_symbol, p.timeframe, p.source_last_ts + p.src_interval,
                                   p.tf_interval, p.tf_origin) END AS frontier_utc
    FROM probed p
)
SELECT f.canonical_symbol AS symbol,
       f.timeframe,
       f.session,
       f.src_tf AS source_timeframe,
       f.status,
       f.enabled,
       f.is_mandatory AS mandatory,
       f.task_priority AS priority,
       f.last_agg_bar_ts_utc AS cursor_utc,
       NULLIF(f.agg_start_utc, '-infinity') AS agg_start_utc,  -- null: from the first source row
       f.frontier_utc,
       f.source_last_ts AS source_last_bar_utc,
       f.last_bar_ts AS last_bar_utc,
       CASE WHEN f.last_agg_bar_ts_utc IS NOT NULL AND f.frontier_utc IS NOT NULL
            THEN greatest(0, extract(epoch FROM f.frontier_utc - f.last_agg_bar_ts_utc))::float8
       END AS lag_frontier_seconds,
       CASE WHEN f.last_agg_bar_ts_utc IS NOT NULL AND f.tf_interval IS NOT NULL
            THEN greatest(0, extract(epoch FROM c.now_utc - (f.last_agg_bar_ts_utc
                 + CASE WHEN f.timeframe <> '1mo' AND COALESCE(f.session, '24x7') = '24x7' THEN f.tf_interval
                        ELSE _agg_window_length(f.canonical_symbol, f.timeframe, f.last_agg_bar_ts_utc,
                                                f.tf_interval) END)))::float8
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
       f.total_bars_rewritten AS bars_rewritten,
       f.total_bars_withdrawn AS bars_withdrawn,
       f.total_bars_unchanged AS bars_unchanged,
       f.total_bars_quality_poor AS bars_quality_poor,
       f.invalidations AS invalidations_pending,
       c.now_utc
FROM framed f CROSS JOIN clock c
ORDER BY f.canonical_symbol, f.tf_order, f.timeframe;

-- name: obs_symbols
SELECT r.canonical_symbol AS symbol,
       r.asset_class,
       r.session,
       coalesce(r.active, false) AS active,
       EXISTS (SELECT 1 FROM data_bars b WHERE b.canonical_symbol = r.canonical_symbol AND b.timeframe = '1m')
           AS has_1m,
       coalesce((SELECT array_agg(s.timeframe ORDER BY s.timeframe) FROM data_agg_state s
                 WHERE s.canonical_symbol = r.canonical_symbol), '{}') AS timeframes
FROM core_asset_registry_all r
ORDER BY r.canonical_symbol;

-- name: obs_symbol_exists
SELECT EXISTS (SELECT 1 FROM core_asset_registry_all WHERE canonical_symbol = %(symbol)s);

-- name: obs_bars
-- The latest `limit` bars in [from, to), returned oldest first as one JSON object of columns, so
-- a year of 5m bars (~100k) goes from PostgreSQL to the browser without a Python object per value.
-- Timeframe 1m reads the raw bars of data_bars (no quality: they are the source); the other branch
-- is pruned at execution time by its constant condition.
WITH source AS (
    SELECT ts_utc, open, high, low, close, vol, quality_score, source_candles, expected_candles
    FROM derived_data_bars
    WHERE %(timeframe)s <> '1m'
      AND canonical_symbol = %(symbol)s AND timeframe = %(timeframe)s AND deleted_at IS NULL
      AND ts_utc >= coalesce(%(from)s::timestamptz, '-infinity')
      AND ts_utc < coalesce(%(to)s::timestamptz, 'infinity')
    UNION ALL
    SELECT ts_utc, open, high, low, close, vol, NULL::int, NULL::int, NULL::int
    FROM data_bars
    WHERE %(timeframe)s = '1m'
      AND canonical_symbol = %(symbol)s AND timeframe = '1m' AND NOT is_partial
      AND ts_utc >= coalesce(%(from)s::timestamptz, '-infinity')
      AND ts_utc < coalesce(%(to)s::timestamptz, 'infinity')
),
newest AS (
    SELECT * FROM source
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

-- name: obs_invalidation_log_exists
-- The invalidation log comes with migration 0004; on an older schema the metrics leave it out.
SELECT to_regclass('agg_invalidations') IS NOT NULL;

-- name: obs_invalidations_pending
SELECT count(*) AS pending,
       extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - min(first_seen_at))::float8 AS oldest_age_seconds
FROM agg_invalidations;

-- ==== access: read access to the bars (functions/90_security.sql) ====
-- A role given read access holds SELECT on the two bar tables and is in their baragg_reader_select
-- policy; 90_security.sql keeps both across upgrades. Run by the tables' owner.

-- name: access_role_exists
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %(role)s);

-- name: access_readers
-- The roles with read access through baragg's policy (the same on both tables).
SELECT COALESCE(array_agg(r.rolname::text ORDER BY r.rolname), '{}')
FROM pg_catalog.pg_policy p
JOIN pg_catalog.pg_roles r ON r.oid = ANY (p.polroles)
WHERE p.polrelid = to_regclass('public.derived_data_bars') AND p.polname = 'baragg_reader_select';

-- name: access_set_role
-- The role for the DO block that follows in the same transaction (a DO block takes no parameters).
SELECT set_config('baragg.access_role', %(role)s, true);

-- name: access_grant_read
DO $baragg$
DECLARE
    v_role text := current_setting('baragg.access_role');
    v_table text;
    v_readers text[];
BEGIN
    FOREACH v_table IN ARRAY ARRAY['data_bars', 'derived_data_bars'] LOOP
        SELECT array_agg(quote_ident(r.rolname) ORDER BY r.rolname) INTO v_readers
        FROM pg_catalog.pg_policy p
        JOIN pg_catalog.pg_roles r ON r.oid = ANY (p.polroles)
        WHERE p.polrelid = ('public.' || v_table)::regclass AND p.polname = 'baragg_reader_select';
        IF v_readers IS NULL THEN
            RAISE EXCEPTION 'table % has no policy baragg_reader_select: run `baragg db upgrade` first', v_table;
        END IF;
        IF NOT quote_ident(v_role) = ANY (v_readers) THEN
            EXECUTE format('ALTER POLICY baragg_reader_select ON public.%I TO %s', v_table,
                           array_to_string(v_readers || quote_ident(v_role), ', '));
        END IF;
        EXECUTE format('GRANT SELECT ON TABLE public.%I TO %I', v_table, v_role);
    END LOOP;
END
$baragg$;

-- name: access_revoke_read
DO $baragg$
DECLARE
    v_role text := current_setting('baragg.access_role');
    v_table text;
    v_readers text[];
BEGIN
    FOREACH v_table IN ARRAY ARRAY['data_bars', 'derived_data_bars'] LOOP
        SELECT array_agg(quote_ident(r.rolname) ORDER BY r.rolname) INTO v_readers
        FROM pg_catalog.pg_policy p
        JOIN pg_catalog.pg_roles r ON r.oid = ANY (p.polroles)
        WHERE p.polrelid = ('public.' || v_table)::regclass AND p.polname = 'baragg_reader_select'
          AND r.rolname <> v_role;
        IF v_readers IS NOT NULL THEN
            EXECUTE format('ALTER POLICY baragg_reader_select ON public.%I TO %s', v_table,
                           array_to_string(v_readers, ', '));
        END IF;
        EXECUTE format('REVOKE SELECT ON TABLE public.%I FROM %I', v_table, v_role);
    END LOOP;
END
$baragg$;

-- ==== pg_cron: the worker round as a pg_cron job (functions/40_round.sql) ====

-- name: cron_state
-- Whether pg_cron is installed in this database, could be, and may be used by the current role.
SELECT to_regnamespace('cron') IS NOT NULL AS installed,
       EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = 'pg_cron') AS available,
       to_regnamespace('cron') IS NOT NULL AND has_schema_privilege('cron', 'USAGE') AS usable,
       to_regclass('cron.job_run_details') IS NOT NULL AS has_run_details;

-- name: cron_schedule
-- cron.schedule with a job name updates that job when it exists (pg_cron >= 1.3): idempotent.
SELECT cron.schedule(%(job)s, %(schedule)s, public.baragg_round_command(%(env)s, %(budget)s));

-- name: cron_unschedule
SELECT cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobname = %(job)s;

-- name: cron_job
SELECT j.jobid, j.schedule, j.command, j.active, j.username, j.database
FROM cron.job j WHERE j.jobname = %(job)s ORDER BY j.jobid;

-- name: cron_runs
-- The job's latest runs (pg_cron keeps them in cron.job_run_details), newest first.
SELECT d.runid, d.status, d.return_message, d.start_time, d.end_time
FROM cron.job_run_details d
JOIN cron.job j ON j.jobid = d.jobid
WHERE j.jobname = %(job)s
ORDER BY d.start_time DESC NULLS LAST, d.runid DESC
LIMIT %(limit)s;

-- ==== trading sessions (migration 0009, baragg/sessions.py) ====

-- name: session_list
SELECT name, tz, open_time, close_time, weekdays, calendar, builtin, days_from, days_to
FROM agg_sessions
ORDER BY builtin DESC, name;

-- name: session_get
SELECT name, tz, open_time, close_time, weekdays, calendar, builtin, days_from, days_to
FROM agg_sessions
WHERE name = %(name)s;

-- name: session_insert
INSERT INTO agg_sessions (name, tz, open_time, close_time, weekdays, calendar)
VALUES (%(name)s, %(tz)s, %(open)s, %(close)s, %(weekdays)s::smallint[], %(calendar)s)
ON CONFLICT (name) DO NOTHING;

-- name: session_lock
-- Serialises the extension of one session's days (held to the end of the transaction).
SELECT pg_advisory_xact_lock(hashtext('baragg.session_days'), hashtext(%(name)s));

-- name: session_day_insert
WITH added AS (
    INSERT INTO agg_session_days (session, trading_date, open_utc, close_utc)
    SELECT %(name)s, d.trading_date, d.open_utc, d.close_utc
    FROM unnest(%(dates)s::date[], %(opens)s::timestamptz[], %(closes)s::timestamptz[]) AS d(trading_date, open_utc, close_utc)
    ON CONFLICT (session, trading_date) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM added;

-- name: session_set_range
UPDATE agg_sessions SET days_from = %(from)s, days_to = %(to)s, updated_at = now() WHERE name = %(name)s;

-- name: session_regroup
-- The trading week (ISO week of the trading dates) and calendar month of every day: first open, last
-- close and the number of days a weekly or monthly bar expects (the 24x7 session counts Monday-Friday
-- only, the seed's 5 per week). NULL for a week or month not wholly inside [days_from, days_to].
WITH s AS (
    SELECT name, days_from, days_to, name = '24x7' AS weekdays_only FROM agg_sessions WHERE name = %(name)s
),
keyed AS (
    SELECT d.trading_date, d.open_utc, d.close_utc, s.days_from, s.days_to,
           (NOT s.weekdays_only OR extract(isodow FROM d.trading_date) <= 5) AS counted,
           d.trading_date - (extract(isodow FROM d.trading_date)::integer - 1) AS wk,
           date_trunc('month', d.trading_date)::date AS mo
    FROM agg_session_days d JOIN s ON s.name = d.session
),
grouped AS (
    SELECT k.trading_date,
           (k.wk >= k.days_from AND k.wk + 6 <= k.days_to) AS week_known,
           (k.mo >= k.days_from AND (k.mo + interval '1 month')::date - 1 <= k.days_to) AS month_known,
           min(k.open_utc) OVER w AS wo, max(k.close_utc) OVER w AS wc,
           count(*) FILTER (WHERE k.counted) OVER w AS wn,
           min(k.open_utc) OVER m AS mo_open, max(k.close_utc) OVER m AS mo_close,
           count(*) FILTER (WHERE k.counted) OVER m AS mn
    FROM keyed k
    WINDOW w AS (PARTITION BY k.wk), m AS (PARTITION BY k.mo)
),
final AS (
    SELECT g.trading_date,
           CASE WHEN g.week_known THEN g.wo END AS week_open,
           CASE WHEN g.week_known THEN g.wc END AS week_close,
           CASE WHEN g.week_known THEN g.wn END AS week_days,
           CASE WHEN g.month_known THEN g.mo_open END AS month_open,
           CASE WHEN g.month_known THEN g.mo_close END AS month_close,
           CASE WHEN g.month_known THEN g.mn END AS month_days
    FROM grouped g
)
UPDATE agg_session_days d
SET week_open = f.week_open, week_close = f.week_close, week_days = f.week_days,
    month_open = f.month_open, month_close = f.month_close, month_days = f.month_days
FROM final f
WHERE d.session = %(name)s AND d.trading_date = f.trading_date
  AND (d.week_open, d.week_close, d.week_days, d.month_open, d.month_close, d.month_days)
      IS DISTINCT FROM (f.week_open, f.week_close, f.week_days, f.month_open, f.month_close, f.month_days);

-- name: session_needed
-- Every session in use, its materialised range, and the earliest agg_start_utc of its symbols' tasks
-- (no bar is ever older), for the worker's sync to extend what is missing.
-- A task starting at '-infinity' ("from the first source row", the default) needs its symbol's first
-- 1m bar (one index probe per such task). The tasks are grouped by symbol in a subquery that joins
-- only co-located tables on the symbol, so Citus runs it on the shards (DESIGN.md 11).
SELECT s.name, s.days_from, s.days_to, min(t.first_start) AS first_needed
FROM agg_sessions s
JOIN core_asset_registry_all r ON r.session = s.name
LEFT JOIN (
    SELECT st.canonical_symbol,
           min(CASE WHEN st.agg_start_utc = '-infinity' THEN fb.first_ts ELSE st.agg_start_utc END) AS first_start
    FROM data_agg_state st
    LEFT JOIN LATERAL (
        SELECT min(b.ts_utc) AS first_ts FROM data_bars b
        WHERE b.canonical_symbol = st.canonical_symbol AND b.timeframe = '1m' AND st.agg_start_utc = '-infinity'
    ) fb ON true
    WHERE st.enabled
    GROUP BY st.canonical_symbol
) t ON t.canonical_symbol = r.canonical_symbol
GROUP BY s.name, s.days_from, s.days_to
ORDER BY s.name;

-- name: session_names
SELECT name FROM agg_sessions ORDER BY name;

-- name: session_in_use_ends
-- Sessions some symbol uses whose stored days end before a date (NULL: none stored yet).
SELECT s.name, s.days_to
FROM agg_sessions s
WHERE EXISTS (SELECT 1 FROM core_asset_registry_all r WHERE r.session = s.name)
  AND (s.days_to IS NULL OR s.days_to < %(before)s::date)
ORDER BY s.name;

-- name: session_of_symbols
SELECT DISTINCT session FROM core_asset_registry_all WHERE canonical_symbol = ANY (%(symbols)s::text[]) ORDER BY 1;

-- name: session_days_between
SELECT trading_date, open_utc, close_utc
FROM agg_session_days
WHERE session = %(name)s AND open_utc < %(end)s AND close_utc > %(start)s
ORDER BY open_utc;

-- ---------------------------------------------------------------------------------------------
-- Time partitions and retention (baragg.partitions, functions/05_partitions.sql)
-- ---------------------------------------------------------------------------------------------
-- name: partitions_maintain
SELECT public.baragg_partitions_maintain(%(ahead)s, %(table)s);

-- name: partitions_ensure
SELECT public.baragg_partitions_ensure(%(table)s, %(months)s::timestamptz[]);

-- name: partitions_stage_months
SELECT COALESCE(array_agg(DISTINCT date_trunc('month', ts_utc, 'UTC')), '{}') FROM ingest_stage WHERE ok;

-- name: partitions_kind
SELECT c.relname, c.relkind::text,
       (SELECT p.phase FROM baragg_partition_progress p WHERE p.table_name = c.relname)
FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relname IN ('data_bars', 'derived_data_bars')
ORDER BY c.relname;

-- name: partitions_setup
SELECT public._baragg_part_setup(%(table)s);

-- name: partitions_copy
SELECT public._baragg_part_copy(%(table)s, %(rows)s);

-- name: partitions_replay
SELECT public._baragg_part_replay(%(table)s, %(rows)s);

-- name: partitions_compare
SELECT old_rows, new_rows, old_hash, new_hash, logged FROM public._baragg_part_compare(%(table)s);

-- name: partitions_swap
SELECT public._baragg_part_swap(%(table)s);

-- name: partitions_progress
SELECT phase, rows_copied, rows_replayed FROM baragg_partition_progress WHERE table_name = %(table)s;

-- name: partitions_list
-- The partitions of a table, oldest first, with their bounds (NULL for the default partition).
SELECT c.relname,
       substring(pg_get_expr(c.relpartbound, c.oid) FROM $$FROM \('([^']*)'\)$$)::timestamptz AS range_start,
       substring(pg_get_expr(c.relpartbound, c.oid) FROM $$TO \('([^']*)'\)$$)::timestamptz AS range_end
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = %(table)s::regclass
ORDER BY 2 NULLS LAST, 1;

-- name: retention_blockers
-- Why the 1m rows of [start, end) may not go yet: a task (of any level, of any symbol) that still has
-- source rows before the end to aggregate (its cursor is before them; a task that has not started
-- counts from its start), or a logged window (late data) overlapping the month. A task stuck at an
-- earlier frontier with no source rows after its cursor (e.g. a 1w task whose days were all too thin
-- to store) has nothing left to build from these months and does not hold them.
SELECT format('task %%s %%s has aggregated up to %%s only', s.canonical_symbol, s.timeframe,
              COALESCE(to_char(s.last_agg_bar_ts_utc AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'), 'nothing'))
FROM data_agg_state s
JOIN agg_timeframes t ON t.timeframe = s.timeframe
WHERE s.agg_start_utc < %(end)s
  AND (s.last_agg_bar_ts_utc IS NULL OR s.last_agg_bar_ts_utc < %(end)s)
  AND CASE WHEN t.source_table = 'data_bars'
           THEN EXISTS (SELECT 1 FROM data_bars b
                        WHERE b.canonical_symbol = s.canonical_symbol AND b.timeframe = t.source_timeframe
                          AND b.ts_utc >= GREATEST(COALESCE(s.last_agg_bar_ts_utc, '-infinity'), s.agg_start_utc)
                          AND b.ts_utc < %(end)s)
           ELSE EXISTS (SELECT 1 FROM derived_data_bars b
                        WHERE b.canonical_symbol = s.canonical_symbol AND b.timeframe = t.source_timeframe
                          AND b.ts_utc >= GREATEST(COALESCE(s.last_agg_bar_ts_utc, '-infinity'), s.agg_start_utc)
                          AND b.ts_utc < %(end)s AND b.deleted_at IS NULL)
      END
UNION ALL
SELECT format('late data waits to be re-aggregated: %%s %%s window %%s', i.canonical_symbol, i.timeframe,
              to_char(i.window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'))
FROM agg_invalidations i JOIN agg_timeframes t ON t.timeframe = i.timeframe
WHERE i.window_start < %(end)s AND i.window_start + t.bucket_interval + interval '1 day' > %(start)s
LIMIT 3;

-- name: retention_lock
-- Cursors must not move back (backfill --from) while a partition goes.
LOCK TABLE data_agg_state, agg_invalidations IN SHARE MODE;

-- name: retention_record
INSERT INTO baragg_retention_log (partition_name, table_name, range_start, range_end)
VALUES (%(name)s, 'data_bars', %(start)s, %(end)s)
ON CONFLICT (partition_name) DO UPDATE SET dropped_at = now();

-- name: retention_horizon
SELECT max(range_end) FROM baragg_retention_log WHERE table_name = 'data_bars';

-- ==== Citus: baragg db distribute (baragg/citus.py, DESIGN.md 11) ====

-- name: citus_version
-- The installed Citus extension's version in this database, or no row.
SELECT extversion FROM pg_extension WHERE extname = 'citus';

-- name: citus_is_coordinator
-- Whether this node is the cluster's coordinator (the node that holds the metadata and that clients
-- connect to), and how many active worker nodes it knows.
SELECT citus_is_coordinator(),
       (SELECT count(*) FROM pg_dist_node WHERE groupid <> 0 AND isactive AND noderole = 'primary');

-- name: citus_table_kinds
-- How each baragg table is held now: 'distributed' (hash, with its column), 'reference', or 'local'.
SELECT t.name,
       CASE WHEN p.partmethod = 'h' THEN 'distributed'
            WHEN p.partmethod = 'n' AND p.repmodel = 't' THEN 'reference'
            WHEN p.partmethod IS NULL THEN 'local'
            ELSE 'other' END AS kind,
       p.colocationid,
       CASE WHEN p.partmethod = 'h' THEN column_to_column_name(p.logicalrelid, p.partkey) END AS column
FROM unnest(%(tables)s::text[]) AS t(name)
LEFT JOIN pg_dist_partition p ON p.logicalrelid = to_regclass('public.' || t.name);

-- name: citus_live_workers
-- Other sessions that hold a baragg worker lock (a running `baragg worker`/`run`), and tasks leased now.
SELECT (SELECT count(*) FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.classid = 1650553447::oid AND l.objsubid = 2 AND l.granted
          AND l.pid <> pg_backend_pid()
          AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())),
       (SELECT count(*) FROM data_agg_state WHERE status = 'running' AND lease_expires_at > now());

-- name: citus_begin
-- One transaction for the whole distribution: several tables with foreign keys between them are
-- distributed in one transaction only in sequential mode.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

-- name: citus_drop_triggers
-- Citus distributes no table that has triggers: the invalidation triggers go first, and the repeatable
-- functions/30_invalidation.sql creates them again on the distributed tables (on every shard).
DO $$
DECLARE
    v_table text;
    v_op text;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['data_bars', 'derived_data_bars'] LOOP
        FOREACH v_op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON public.%I', 'agg_invalidate_' || v_op, v_table);
        END LOOP;
    END LOOP;
    -- the registry's check of derived bars (0012): on Citus the foreign key does it (citus_derived_fkey)
    DROP TRIGGER IF EXISTS agg_registry_keeps_derived ON public.core_asset_registry_all;
    DROP TRIGGER IF EXISTS agg_registry_keeps_derived_truncate ON public.core_asset_registry_all;
END
$$;

-- name: citus_derived_fkey
-- Migration 0012 checks derived_data_bars' symbols per statement on one node; on Citus the foreign key
-- to the registry (a reference table now) is back, checked by Citus on each shard.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                   WHERE conrelid = 'public.derived_data_bars'::regclass
                     AND conname = 'derived_canonical_symbol_fkey') THEN
        ALTER TABLE public.derived_data_bars ADD CONSTRAINT derived_canonical_symbol_fkey
            FOREIGN KEY (canonical_symbol) REFERENCES public.core_asset_registry_all (canonical_symbol);
    END IF;
END
$$;

-- name: citus_create_reference_table
SELECT create_reference_table(%(table)s::regclass);

-- name: citus_create_distributed_table
SELECT create_distributed_table(%(table)s::regclass, 'canonical_symbol', colocate_with => %(colocate_with)s);

-- name: worker_live_sessions
SELECT _agg_live_sessions();

-- name: on_citus
-- Whether baragg's tables are distributed with Citus: the worker then claims and catches up symbol by
-- symbol (every statement names one symbol, DESIGN.md 11), ingest writes no bar before the session
-- days, and `db partition` refuses.
SELECT _agg_on_citus();

-- name: worker_buffer_pages
-- The server's shared buffers, in pages: how large a grown catch-up call may read per task (worker.py,
-- _read_cap).
SELECT setting::bigint FROM pg_settings WHERE name = 'shared_buffers';

-- name: worker_citus_due_symbols
-- Citus: the symbols that have a due task (as agg_claim_tasks defines due), in due order, read without
-- locks; each is then claimed by agg_claim_tasks for that symbol alone (worker_claim). The live worker
-- sessions (%(live)s: _agg_live_sessions()) are read first, on the coordinator, where the workers hold
-- their locks.
WITH live AS MATERIALIZED (
    SELECT %(live)s::integer[] AS keys, LEAST(COALESCE(%(now)s::timestamptz, now()), now()) AS clock
)
SELECT s.canonical_symbol
FROM data_agg_state s
JOIN agg_timeframes t ON t.timeframe = s.timeframe
CROSS JOIN live
WHERE s.enabled
  AND (((s.next_run_at IS NULL OR s.next_run_at <= live.clock)
        AND (s.status IN ('idle', 'hard_failed')
             OR (s.status = 'running'
                 AND COALESCE(s.lease_expires_at, s.running_started_at_utc + interval '5 minutes', '-infinity')
                     <= live.clock)))
       OR (s.status = 'running' AND s.lease_session IS NOT NULL AND NOT (s.lease_session = ANY (live.keys))))
  AND (%(symbols)s::text[] IS NULL OR s.canonical_symbol = ANY (%(symbols)s::text[]))
  AND (%(timeframes)s::text[] IS NULL OR s.timeframe = ANY (%(timeframes)s::text[]))
GROUP BY s.canonical_symbol
ORDER BY bool_or(s.is_mandatory) DESC, min(t.bucket_interval), min(s.task_priority),
         min(s.last_successful_at_utc) NULLS FIRST, s.canonical_symbol
LIMIT 4 * %(limit)s;
