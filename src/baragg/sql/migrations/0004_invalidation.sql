-- 0004: late and corrected data (DESIGN.md section 5).
-- Tables and data only; the functions (and triggers) are the repeatable file functions/30_invalidation.sql.
--
-- A source row that is inserted, changed or deleted after its window was aggregated makes the
-- derived bar stale. Statement-level triggers (with transition tables: one pass over the changed
-- rows per statement, nothing per row) record each affected (symbol, dependent timeframe, window)
-- in agg_invalidations, but only when the window lies before the dependent task's cursor: a window
-- at or after the cursor has not been aggregated yet, so it is simply future work.
--
--   data_bars 1m ──▶ 5m task        derived 5m ──▶ 15m, 1h tasks
--   derived 1h  ──▶ 4h, 1d tasks    derived 1d ──▶ 1w task        (the agg_timeframes ladder)
--
-- The worker calls agg_reaggregate_tasks before catching a task up: it recomputes every pending
-- window of the task in one statement from the current source rows (with the engine's core,
-- _agg_window_bars), upserts the corrected bars, soft-deletes the bars whose window lost its source
-- rows or fell below the storing threshold, and deletes the log entries, in one transaction. Its own
-- writes to derived_data_bars fire the triggers again, so the change climbs the ladder; the worker
-- runs 5m before 1h before 4h/1d, so one run fixes every level.
--
-- Re-runnable as a whole (IF NOT EXISTS, CREATE OR REPLACE, DROP ... IF EXISTS), so it also applies
-- with psql -f.

-- ---------------------------------------------------------------------------------------------
-- The invalidation log: one row per (task, window) waiting to be re-aggregated
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS agg_invalidations (
    canonical_symbol text NOT NULL,
    -- The dependent (derived) timeframe whose window is stale, e.g. '5m' for a changed 1m bar.
    timeframe text NOT NULL,
    window_start timestamptz NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    -- What first invalidated the window: insert | update | delete (of a source row).
    reason text NOT NULL,
    -- The primary key is also the index the worker reads a task's pending windows with, and the
    -- one the "pending per task" status query counts with: work is proportional to the log's size
    -- for the task, never to the history.
    CONSTRAINT agg_invalidations_pkey PRIMARY KEY (canonical_symbol, timeframe, window_start),
    CONSTRAINT agg_invalidations_task_fkey FOREIGN KEY (canonical_symbol, timeframe)
        REFERENCES data_agg_state (canonical_symbol, timeframe) ON DELETE CASCADE
);

-- Counters of the re-aggregation, beside the worker's totals.
ALTER TABLE data_agg_state
    ADD COLUMN IF NOT EXISTS total_bars_reaggregated bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_bars_withdrawn bigint NOT NULL DEFAULT 0;
