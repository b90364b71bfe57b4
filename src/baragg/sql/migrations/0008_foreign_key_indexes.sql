-- 0008: an index on exactly the columns of each foreign key (DESIGN.md 10b: Supabase's database
-- linter, lint 0001 unindexed_foreign_keys, reports a foreign key whose columns are not exactly those of
-- some index).
--
-- data_bars and derived_data_bars: the unique B-tree indexes (canonical_symbol, timeframe, ts_utc)
-- already serve the foreign key's lookups (deleting or renaming a registry row probes them by their
-- leading column), but the linter only accepts an index on exactly (canonical_symbol). A B-tree on it
-- would cost every row written about a third more (bench/bench_fk_index.py: +6.4 µs on 17.8 µs), for
-- lookups the unique index does already. A BRIN index is an index on exactly that column at almost no
-- cost per row (+0.9 µs: a block range is summarised, there is no entry per row).
-- agg_invalidations: the cascade from data_agg_state looks up (canonical_symbol, timeframe); the primary
-- key starts with them, the linter wants them alone. The log is small: a B-tree.

CREATE INDEX IF NOT EXISTS data_bars_canonical_symbol_brin ON data_bars USING brin (canonical_symbol);
CREATE INDEX IF NOT EXISTS derived_data_bars_canonical_symbol_brin ON derived_data_bars USING brin (canonical_symbol);
CREATE INDEX IF NOT EXISTS agg_invalidations_task_idx ON agg_invalidations (canonical_symbol, timeframe);
