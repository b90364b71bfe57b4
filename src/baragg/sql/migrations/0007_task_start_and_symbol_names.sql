-- 0007: where new tasks start, and which symbol names the registry accepts.
-- Tables and data only (the functions that use them are in functions/). Re-runnable.

-- ---------------------------------------------------------------------------------------------
-- A new task aggregates its symbol's whole history: agg_start_utc defaults to '-infinity' (no lower
-- bound), so the bootstrap starts at the first source row (DESIGN.md 4: max(agg_start_utc, first
-- row) is the first row). The seed's cut-off (2025-07-01) belongs to the seed's production tasks:
-- SET DEFAULT touches no existing row, so an upgraded database keeps every task's start.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE data_agg_state ALTER COLUMN agg_start_utc SET DEFAULT '-infinity';

-- An explicit start per symbol (`baragg registry add SYMBOL --agg-start TIME`): the registry sync
-- creates the symbol's tasks with it. NULL: from the first source row. Existing tasks keep theirs
-- (the sync never touches agg_start_utc of a task; `baragg backfill --from` moves it).
ALTER TABLE core_asset_registry_all ADD COLUMN IF NOT EXISTS agg_start_utc timestamptz;

-- ---------------------------------------------------------------------------------------------
-- Symbol names: the rule `baragg registry add` applies (baragg/registry.py), enforced for every
-- writer: a letter or digit, then letters, digits and . _ : / -, at most 64 characters. No spaces,
-- no control characters, nothing a terminal or a shell would interpret. data_bars and
-- derived_data_bars reference the registry, so their names follow.
--
-- A database upgraded from the seed may already hold other names, which cannot be renamed here
-- (bars reference them). The constraint is then added NOT VALID (new and changed rows are checked,
-- existing ones are not) and a WARNING lists them; `baragg db upgrade` repeats it. On a database
-- whose names all follow the rule it is validated at once.
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
    v_bad text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'core_asset_registry_all_symbol_check'
                     AND conrelid = 'core_asset_registry_all'::regclass) THEN
        ALTER TABLE core_asset_registry_all ADD CONSTRAINT core_asset_registry_all_symbol_check
            CHECK (canonical_symbol ~ '^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$') NOT VALID;
    END IF;
    -- (control characters shown as '?', so that the warning itself is safe to print)
    SELECT string_agg(quote_literal(regexp_replace(canonical_symbol, '[[:cntrl:]]', '?', 'g')), ', '
                      ORDER BY canonical_symbol) INTO v_bad
    FROM core_asset_registry_all
    WHERE canonical_symbol !~ '^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$';
    IF v_bad IS NULL THEN
        ALTER TABLE core_asset_registry_all VALIDATE CONSTRAINT core_asset_registry_all_symbol_check;
    ELSE
        RAISE WARNING 'symbol names that do not follow the naming rule stay as they are (the check applies to new and changed rows): %', v_bad;
    END IF;
END
$$;
