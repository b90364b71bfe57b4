-- 0003: scheduling, claiming and failures (DESIGN.md sections 6 and 7).
-- Tables and data only; the functions (and triggers) are the repeatable file functions/20_scheduling.sql.
--
-- A task is one row of data_agg_state (symbol x timeframe). Its life:
--
--   idle ──claim──▶ running (lease_owner, lease_expires_at) ──finish──▶ idle | hard_failed | disabled
--                      │  checkpoint: cursor + counters + lease renewed, in the transaction of the bars
--                      └─ lease expired (worker died) ──▶ claimable again, the rescue is recorded
--
-- Every state change is guarded in SQL: a claim only takes a due row (FOR UPDATE SKIP LOCKED, so two
-- workers never take one task), a checkpoint or finish only changes a row still owned by the caller and
-- says so when nothing changed. Every function that depends on time takes p_now_utc (NULL = now()).
-- Re-runnable as a whole (ADD COLUMN IF NOT EXISTS, CREATE OR REPLACE), so it also applies with psql -f.

-- ---------------------------------------------------------------------------------------------
-- data_agg_state: what the worker needs beyond the seed
-- ---------------------------------------------------------------------------------------------
ALTER TABLE data_agg_state
    -- The claim: who holds the task and until when. A running task whose lease has expired is
    -- claimable again (its worker died); a live lease is never taken over.
    ADD COLUMN IF NOT EXISTS lease_owner text,
    ADD COLUMN IF NOT EXISTS lease_expires_at timestamptz,
    -- Set when the source task advanced while this task was running, so that its finish schedules
    -- another run at once instead of waiting (no lost wake-up).
    ADD COLUMN IF NOT EXISTS rerun_requested boolean NOT NULL DEFAULT false,
    -- Stats of the current/last claim (summed over its checkpoints) and why work was last rescued.
    ADD COLUMN IF NOT EXISTS last_run_stats jsonb,
    ADD COLUMN IF NOT EXISTS last_rescue text,
    ADD COLUMN IF NOT EXISTS total_windows_processed bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_bars_skipped bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_gaps_skipped bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_transient_failures bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_hard_failures bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_rescues bigint NOT NULL DEFAULT 0;

-- Every task row is updated two to three times per run (claim, finish, wake-up of the tasks built
-- from it) and none of the updated columns is indexed, so each update can be HOT (no index entry,
-- no page split) when its page has room for the new version. At the default fillfactor (100) most
-- are not (measured: 17-25% HOT); 70 gave 85%, 50 keeps room on every page. The table is small
-- (about 500 bytes per task), so doubling it costs little. Applies to pages written from now on.
ALTER TABLE data_agg_state SET (fillfactor = 50);

-- The four states a task can be in (the seed used 'idle', 'running' and 'disabled'). A status the
-- seed's code never wrote (hand edits) means nothing to the worker: such a task becomes idle.
UPDATE data_agg_state SET status = 'idle'
WHERE status NOT IN ('idle', 'running', 'hard_failed', 'disabled');
ALTER TABLE data_agg_state DROP CONSTRAINT IF EXISTS data_agg_state_status_check;
ALTER TABLE data_agg_state ADD CONSTRAINT data_agg_state_status_check
    CHECK (status IN ('idle', 'running', 'hard_failed', 'disabled'));
