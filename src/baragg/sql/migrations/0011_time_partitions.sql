-- Time partitions and retention (DESIGN.md 11, issue 15 part 2).
-- Tables only; the functions (partition upkeep, the online conversion, retention) are the repeatable
-- file functions/05_partitions.sql, which also turns the two bar tables of a new install into
-- partitioned tables (monthly by ts_utc) while they are still empty.
--
-- baragg_partition_log: during `baragg db partition`, every change to the table being converted is
-- logged here (its key) by a statement trigger, so that rows written while the copy runs are copied
-- again before the swap. Empty outside a conversion.
-- baragg_partition_progress: one row per table being (or done being) converted: the phase and the last
-- key copied, committed with each batch, which is what makes the conversion resumable after kill -9.
-- baragg_retention_log: every partition `baragg retention` dropped; the newest end is the raw
-- horizon (verify does not rebuild 5m bars from 1m rows that are gone).
--
-- Re-runnable (IF NOT EXISTS), so it also applies with psql -f.

CREATE TABLE IF NOT EXISTS baragg_partition_log (
    seq bigserial PRIMARY KEY,
    table_name text NOT NULL CHECK (table_name IN ('data_bars', 'derived_data_bars')),
    canonical_symbol text NOT NULL,
    timeframe text NOT NULL,
    ts_utc timestamptz NOT NULL,
    id bigint
);
CREATE INDEX IF NOT EXISTS baragg_partition_log_key_idx
    ON baragg_partition_log (table_name, canonical_symbol, timeframe, ts_utc);
CREATE INDEX IF NOT EXISTS baragg_partition_log_id_idx ON baragg_partition_log (table_name, id);

CREATE TABLE IF NOT EXISTS baragg_partition_progress (
    table_name text PRIMARY KEY CHECK (table_name IN ('data_bars', 'derived_data_bars')),
    -- copying: the partitioned copy exists and the log is on; done: swapped.
    phase text NOT NULL CHECK (phase IN ('copying', 'done')),
    -- The key of the last row copied (data_bars: symbol, timeframe, time; derived_data_bars: id).
    last_symbol text,
    last_timeframe text,
    last_ts_utc timestamptz,
    last_id bigint,
    rows_copied bigint NOT NULL DEFAULT 0,
    rows_replayed bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE TABLE IF NOT EXISTS baragg_retention_log (
    partition_name text PRIMARY KEY,
    table_name text NOT NULL,
    range_start timestamptz NOT NULL,
    range_end timestamptz NOT NULL,
    dropped_at timestamptz NOT NULL DEFAULT now()
);
