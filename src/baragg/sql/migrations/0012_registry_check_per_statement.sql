-- 0012: derived_data_bars' reference to the registry is checked once per statement, not per row
-- (issue 15, part 3; docs/decisions.md "Performance").
--
-- The foreign key derived_canonical_symbol_fkey ran a trigger per derived bar written: one probe of the
-- registry and a KEY SHARE lock on its row, about a quarter of a backfill's time (bench/README.md). It
-- is replaced by the same rule, enforced set-based (functions/30_invalidation.sql):
--   * a statement that inserts or updates derived bars locks the registry rows of the symbols it wrote
--     (FOR KEY SHARE, once per symbol) and fails with foreign_key_violation, under the constraint's
--     name, if one is missing;
--   * deleting a registry row, renaming its canonical_symbol or truncating the registry fails while
--     derived bars of the symbol exist.
-- data_bars keeps its foreign key (ingest's reference is the plain COPY into the same table).
-- On a Citus cluster (`baragg db distribute`) the foreign key stays: Citus enforces a reference from a
-- distributed table to a reference table on each shard, and the check functions stand aside there.
DO $$
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition
                   WHERE logicalrelid = 'public.derived_data_bars'::regclass) THEN
            RETURN;
        END IF;
    END IF;
    ALTER TABLE derived_data_bars DROP CONSTRAINT IF EXISTS derived_canonical_symbol_fkey;
END
$$;
