-- 0005: honest counts (issue 11). Tables only; the functions that fill these columns are the
-- repeatable files functions/10_engine.sql (catch-up), 20_scheduling.sql (checkpoint, finish) and
-- 30_invalidation.sql (re-aggregation of logged windows).
--
-- Every recomputed window now ends in exactly one of four counts, per task in data_agg_state:
--   total_bars_created    a bar inserted (a new window, or again after a withdrawal)
--   total_bars_rewritten  a stored bar whose values changed and was updated   (new here)
--   total_bars_withdrawn  a stored bar soft-deleted: its window lost its source  (0004)
--   total_bars_unchanged  recomputed equal to the stored bar: nothing written  (new here)
-- Until now an upsert counted inserts and rewrites alike as "created", so a `backfill --from` over
-- unchanged data "created" every bar again. Existing totals keep what they counted then.
-- Re-runnable (ADD COLUMN IF NOT EXISTS), so it also applies with psql -f.
ALTER TABLE data_agg_state
    ADD COLUMN IF NOT EXISTS total_bars_rewritten bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_bars_unchanged bigint NOT NULL DEFAULT 0;
