-- 0010: keys that carry the symbol and the time (DESIGN.md 11, issue 15).
--
-- A declarative partition by time needs every unique index to contain ts_utc, and Citus needs every
-- unique index of a table distributed by canonical_symbol to contain canonical_symbol. The seed's
-- primary keys were `id` alone.
--
-- data_bars: the primary key becomes the natural key (canonical_symbol, timeframe, ts_utc), which the
-- unique constraint held already; that constraint goes, so a row written costs one B-tree fewer than
-- before (id stays a column with its sequence: the seed's readers and the triggers' transition tables
-- still use it, it is just no longer indexed).
-- derived_data_bars: soft-deleted bars repeat a natural key, so the primary key stays on id, widened to
-- (id, canonical_symbol, ts_utc): id first keeps its B-tree append-only.
-- Both keys are rebuilt on upgrade (one pass over each table under its lock: plan it for a large one).

ALTER TABLE data_bars DROP CONSTRAINT IF EXISTS bars_pkey;
ALTER TABLE data_bars DROP CONSTRAINT IF EXISTS data_bars_symbol_tf_ts_unique;
ALTER TABLE data_bars ADD CONSTRAINT bars_pkey PRIMARY KEY (canonical_symbol, timeframe, ts_utc);

ALTER TABLE derived_data_bars DROP CONSTRAINT IF EXISTS derived_data_bars_pkey;
ALTER TABLE derived_data_bars ADD CONSTRAINT derived_data_bars_pkey PRIMARY KEY (id, canonical_symbol, ts_utc);
