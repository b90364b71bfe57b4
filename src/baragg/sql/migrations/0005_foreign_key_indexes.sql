-- 0005: an index with exactly the columns of each foreign key (DESIGN.md 10b: Supabase's database
-- linter, lint 0001 unindexed_foreign_keys, reports a foreign key whose columns are not exactly those of
-- some index).
--
-- data_bars and derived_data_bars: the unique indexes (canonical_symbol, timeframe, ts_utc) already
-- serve the foreign key's lookups (deleting a registry row probes them by their leading column), but the
-- linter only accepts an index on exactly (canonical_symbol). With B-tree deduplication an index on a
-- column with a few hundred distinct values is small (a posting list per symbol); its cost is one more
-- index insert per bar written, measured in bench/README.md ("Supabase-native").
-- agg_invalidations: the cascade from data_agg_state looks up (canonical_symbol, timeframe); the primary
-- key starts with them, the linter wants them alone. The log is small.
--
-- On a large existing table CREATE INDEX blocks writes while it builds (minutes for tens of millions of
-- rows): upgrade in a quiet moment, or create the two bar indexes beforehand with CREATE INDEX
-- CONCURRENTLY under these names (this migration then finds them).

CREATE INDEX IF NOT EXISTS data_bars_canonical_symbol_idx ON data_bars (canonical_symbol);
CREATE INDEX IF NOT EXISTS derived_data_bars_canonical_symbol_idx ON derived_data_bars (canonical_symbol);
CREATE INDEX IF NOT EXISTS agg_invalidations_task_idx ON agg_invalidations (canonical_symbol, timeframe);
