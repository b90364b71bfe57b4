-- Repeatable: late and corrected data (DESIGN.md section 5): the triggers on the source tables and the
-- re-aggregation of logged windows; the log table is created by migration 0004. The triggers are
-- re-created here because they name these functions.

-- ---------------------------------------------------------------------------------------------
-- _agg_record_invalidations: the common tail of every trigger
-- ---------------------------------------------------------------------------------------------
-- The arrays hold one (symbol, dependent timeframe, window) per changed source row that passed the
-- triggers' "before the dependent task's cursor" filter; bulk ingest of new data never gets here.
-- Records the windows, then wakes the tasks that got a new entry: an idle task becomes due at once
-- (next_run_at NULL: due under any clock, including a replayed one), a running one runs again right
-- after its finish (rerun_requested, as agg_finish does for the tasks built from a task). A disabled
-- task is woken too: it is not due while disabled, and runs as soon as it is enabled again.
CREATE OR REPLACE FUNCTION public._agg_record_invalidations(p_symbols text[], p_timeframes text[],
                                                     p_windows timestamptz[], p_reason text)
RETURNS integer LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_recorded integer;
    v_syms text[];
    v_tfs text[];
    v_sym text;
BEGIN
    -- Statement by statement, each on the log or the task table alone and filtered by the symbols
    -- (on Citus every statement then runs on the node holding those symbols' shards: the triggers
    -- fire there and may reach local shards only).
    WITH recorded AS (
        INSERT INTO public.agg_invalidations AS i (canonical_symbol, timeframe, window_start, reason)
        SELECT DISTINCT u.sym, u.tf, u.ws, p_reason
        FROM unnest(p_symbols, p_timeframes, p_windows) AS u(sym, tf, ws)
        ORDER BY 1, 2, 3
        ON CONFLICT (canonical_symbol, timeframe, window_start) DO NOTHING
        RETURNING i.canonical_symbol, i.timeframe
    ), tasks AS (
        SELECT DISTINCT r.canonical_symbol, r.timeframe FROM recorded r
    )
    SELECT (SELECT count(*) FROM recorded), array_agg(t.canonical_symbol), array_agg(t.timeframe)
    INTO v_recorded, v_syms, v_tfs
    FROM tasks t;
    IF v_syms IS NULL THEN
        RETURN v_recorded;
    END IF;
    -- Lock the tasks that got a new entry in key order (as sync_agg_state_from_registry and
    -- agg_finish_many do) so that two writers waking overlapping tasks cannot deadlock, then wake them.
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN  -- (on Citus: the triggers' callers locked them)
        PERFORM 1
        FROM public.data_agg_state s
        WHERE s.canonical_symbol = ANY (v_syms) AND s.timeframe = ANY (v_tfs)
          AND (s.canonical_symbol, s.timeframe) IN (SELECT u.sym, u.tf FROM unnest(v_syms, v_tfs) AS u(sym, tf))
        ORDER BY s.canonical_symbol, s.timeframe
        FOR NO KEY UPDATE OF s;
    END IF;
    FOR v_sym IN
        -- Citus: one statement per symbol, so that each reaches that symbol's shard only
        SELECT DISTINCT u.sym FROM unnest(v_syms) AS u(sym)
        WHERE to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL ORDER BY 1
    LOOP
        UPDATE public.data_agg_state s
        SET next_run_at = CASE WHEN s.status = 'idle' THEN NULL ELSE s.next_run_at END,
            rerun_requested = s.rerun_requested OR s.status = 'running',
            updated_at = now()
        WHERE s.canonical_symbol = v_sym
          AND s.timeframe IN (SELECT u.tf FROM unnest(v_syms, v_tfs) AS u(sym, tf) WHERE u.sym = v_sym)
          AND ((s.status = 'idle' AND s.next_run_at IS NOT NULL)
               OR (s.status = 'running' AND NOT s.rerun_requested));
    END LOOP;
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        RETURN v_recorded;
    END IF;
    UPDATE public.data_agg_state s
    SET next_run_at = CASE WHEN s.status = 'idle' THEN NULL ELSE s.next_run_at END,
        rerun_requested = s.rerun_requested OR s.status = 'running',
        updated_at = now()
    WHERE s.canonical_symbol = ANY (v_syms) AND s.timeframe = ANY (v_tfs)
      AND (s.canonical_symbol, s.timeframe) IN (SELECT u.sym, u.tf FROM unnest(v_syms, v_tfs) AS u(sym, tf))
      AND ((s.status = 'idle' AND s.next_run_at IS NOT NULL)
           OR (s.status = 'running' AND NOT s.rerun_requested));
    RETURN v_recorded;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- derived_data_bars -> core_asset_registry_all, checked per statement (migration 0012)
-- ---------------------------------------------------------------------------------------------
-- The rule of the foreign key derived_canonical_symbol_fkey, which cost a trigger call, a registry
-- probe and a row lock per derived bar (a quarter of a backfill): now one check per statement that
-- writes derived bars (the invalidation trigger below calls it with the symbols written) and one per
-- registry row deleted or renamed. Errors keep the constraint's name and SQLSTATE 23503, as before.
-- On Citus the foreign key itself stays (Citus checks it on each shard): both stand aside there.
--
-- Concurrency, as the foreign key's: a writer KEY SHARE-locks the registry rows of its symbols (key
-- order) before it checks that they exist, so a concurrent DELETE of such a row waits for the
-- writer's commit and then (READ COMMITTED: each statement of the registry trigger takes a new
-- snapshot) sees its bars and fails; a DELETE that went first makes the writer's check fail.
CREATE OR REPLACE FUNCTION public._agg_require_registered(p_symbols text[]) RETURNS void
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_missing text;
BEGIN
    PERFORM 1 FROM public.core_asset_registry_all r
    WHERE r.canonical_symbol = ANY (p_symbols)
    ORDER BY r.canonical_symbol
    FOR KEY SHARE;
    SELECT x INTO v_missing
    FROM unnest(p_symbols) x
    WHERE NOT EXISTS (SELECT 1 FROM public.core_asset_registry_all r WHERE r.canonical_symbol = x)
    ORDER BY x NULLS FIRST LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "derived_data_bars" violates foreign key constraint "derived_canonical_symbol_fkey"'
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'derived_canonical_symbol_fkey',
                  TABLE = 'derived_data_bars',
                  DETAIL = format('Key (canonical_symbol)=(%s) is not present in table "core_asset_registry_all".',
                                  v_missing);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION public._agg_registry_keeps_derived() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT 1 FROM public.derived_data_bars) THEN
            RAISE EXCEPTION 'cannot truncate core_asset_registry_all: derived_data_bars holds bars of its symbols'
                USING ERRCODE = 'feature_not_supported', TABLE = 'core_asset_registry_all',
                      HINT = 'delete those derived bars first';
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.canonical_symbol IS NOT DISTINCT FROM OLD.canonical_symbol THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM public.derived_data_bars d WHERE d.canonical_symbol = OLD.canonical_symbol) THEN
        RAISE EXCEPTION 'update or delete on table "core_asset_registry_all" violates foreign key constraint "derived_canonical_symbol_fkey" on table "derived_data_bars"'
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'derived_canonical_symbol_fkey',
                  TABLE = 'derived_data_bars',
                  DETAIL = format('Key (canonical_symbol)=(%s) is still referenced from table "derived_data_bars".',
                                  OLD.canonical_symbol);
    END IF;
    RETURN NULL;
END
$$;

DO $registry$
BEGIN
    -- On Citus the registry is a reference table, which takes no trigger (not even a DROP TRIGGER):
    -- `baragg db distribute` dropped these before making it one (citus_drop_triggers).
    IF NOT public._agg_on_citus() THEN
        DROP TRIGGER IF EXISTS agg_registry_keeps_derived ON public.core_asset_registry_all;
        DROP TRIGGER IF EXISTS agg_registry_keeps_derived_truncate ON public.core_asset_registry_all;
        CREATE TRIGGER agg_registry_keeps_derived AFTER DELETE OR UPDATE OF canonical_symbol
            ON public.core_asset_registry_all FOR EACH ROW EXECUTE FUNCTION public._agg_registry_keeps_derived();
        CREATE TRIGGER agg_registry_keeps_derived_truncate BEFORE TRUNCATE
            ON public.core_asset_registry_all FOR EACH STATEMENT EXECUTE FUNCTION public._agg_registry_keeps_derived();
    END IF;
END
$registry$;

-- ---------------------------------------------------------------------------------------------
-- _agg_lock_dependents: lock before reading a cursor, so that no late row is ever lost
-- ---------------------------------------------------------------------------------------------
-- A worker locks its tasks' rows (FOR NO KEY UPDATE, key order) at the start of every catch-up
-- transaction and keeps them until it commits the new cursor. A trigger locks the same rows before it
-- reads their cursors. Then a source row written while a catch-up is in flight is either
--   * committed before the worker's lock is granted: the catch-up statement (a later snapshot) sees it; or
--   * written after: the trigger waits for the worker's commit and then reads the ADVANCED cursor
--     (each statement of this volatile function takes a new snapshot), so the window is recorded.
-- Without the lock, a row committed during the catch-up could be neither seen by it nor recorded
-- (its window was still at or after the old cursor). Claims use SKIP LOCKED and never wait here.
DROP FUNCTION IF EXISTS public._agg_lock_dependents(text, text[], text[]);
CREATE OR REPLACE FUNCTION public._agg_lock_dependents(p_source_table text, p_symbols text[],
                                                p_source_timeframes text[],
                                                OUT dep_syms text[], OUT dep_tfs text[],
                                                OUT dep_cursors timestamptz[], OUT dep_starts timestamptz[])
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_sym text;
    v_row record;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        PERFORM 1
        FROM public.data_agg_state s
        JOIN public.agg_timeframes t ON t.timeframe = s.timeframe
        WHERE s.canonical_symbol = ANY (p_symbols)
          AND t.source_table = p_source_table AND t.source_timeframe = ANY (p_source_timeframes)
        ORDER BY s.canonical_symbol, s.timeframe
        FOR NO KEY UPDATE OF s;
        -- A statement of its own: a new snapshot, taken after the locks were granted, so a cursor
        -- advanced by a catch-up that held them is the one read. Tasks with no cursor have
        -- aggregated nothing yet: no window of theirs can be stale.
        SELECT array_agg(s.canonical_symbol), array_agg(s.timeframe), array_agg(s.last_agg_bar_ts_utc),
               array_agg(s.agg_start_utc)
        INTO dep_syms, dep_tfs, dep_cursors, dep_starts
        FROM public.data_agg_state s
        JOIN public.agg_timeframes t ON t.timeframe = s.timeframe
        WHERE s.canonical_symbol = ANY (p_symbols)
          AND t.source_table = p_source_table AND t.source_timeframe = ANY (p_source_timeframes)
          AND s.last_agg_bar_ts_utc IS NOT NULL;
        RETURN;
    END IF;
    -- Citus (the triggers run on the shards): a statement on a distributed table reaches one shard
    -- only when it is filtered by one symbol (a trigger may reach local shards only), so the same,
    -- one symbol at a time in key order.
    FOR v_sym IN SELECT DISTINCT u.sym FROM unnest(p_symbols) AS u(sym) ORDER BY 1 LOOP
        PERFORM 1
        FROM public.data_agg_state s
        JOIN public.agg_timeframes t ON t.timeframe = s.timeframe
        WHERE s.canonical_symbol = v_sym
          AND t.source_table = p_source_table AND t.source_timeframe = ANY (p_source_timeframes)
        ORDER BY s.timeframe
        FOR NO KEY UPDATE OF s;
        FOR v_row IN
            SELECT s.canonical_symbol, s.timeframe, s.last_agg_bar_ts_utc, s.agg_start_utc
            FROM public.data_agg_state s
            JOIN public.agg_timeframes t ON t.timeframe = s.timeframe
            WHERE s.canonical_symbol = v_sym
              AND t.source_table = p_source_table AND t.source_timeframe = ANY (p_source_timeframes)
              AND s.last_agg_bar_ts_utc IS NOT NULL
        LOOP
            dep_syms := dep_syms || v_row.canonical_symbol;
            dep_tfs := dep_tfs || v_row.timeframe;
            dep_cursors := dep_cursors || v_row.last_agg_bar_ts_utc;
            dep_starts := dep_starts || v_row.agg_start_utc;
        END LOOP;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The triggers
-- ---------------------------------------------------------------------------------------------
-- One function per source table; TG_OP picks the transition tables. For every changed row the
-- dependents are the tasks of the same symbol whose ladder entry reads this table and timeframe;
-- its window is date_bin(bucket_interval, ts, bucket_origin) (1w: Monday) for a 24x7 symbol, the
-- session window containing ts otherwise (none outside the session: nothing to record), from
-- _agg_passed_window (15_sessions.sql). Recorded when
--   agg_start_utc <= window, and the window lies before the cursor (24x7: window < date_bin(cursor);
--   session: window end <= cursor)      (a NULL cursor: nothing aggregated yet)
-- A window before agg_start_utc never has a derived bar (DESIGN.md 4, rule 1), so it is ignored.
-- "Changed" means a change to what aggregation reads: the bar's key, its values (open, high, low,
-- close, vol, vwap, trade_count) or its eligibility (is_partial; deleted_at for derived bars). An
-- UPDATE that rewrites identical values (a re-ingest) or only touches raw, ingested_at, source or
-- provider_ticker records nothing.
--
-- The cheap test comes first: `ts < cursor` on the raw row (the cursor is a bucket start, so a row at
-- or after it lies in future work); only the few rows that pass it are bucketed and recorded.

-- The gate of the INSERT triggers: does any (symbol, source timeframe, earliest eligible new row)
-- lie before the cursor of a task built from it? Only then is the per-row join run: an insert ahead
-- of every cursor (a backfill, an ingest of new history, the live edge) never gets there. (Planned on
-- the transition table, whose row count the planner does not know, that join became a nested loop of
-- every task x every new row: 19 s for 285,593 5m bars and 200 tasks.)
CREATE OR REPLACE FUNCTION public._agg_any_behind(p_syms text[], p_tfs text[], p_first timestamptz[],
                                                   p_lad_tfs text[], p_lad_sources text[],
                                                   p_dep_syms text[], p_dep_tfs text[],
                                                   p_dep_cursors timestamptz[])
RETURNS boolean LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT EXISTS (SELECT 1
                   FROM unnest(p_syms, p_tfs, p_first) AS f(sym, tf, first_ts)
                   JOIN unnest(p_lad_tfs, p_lad_sources) AS t(timeframe, source_timeframe)
                       ON t.source_timeframe = f.tf
                   JOIN unnest(p_dep_syms, p_dep_tfs, p_dep_cursors) AS s(canonical_symbol, timeframe, cursor)
                       ON s.canonical_symbol = f.sym AND s.timeframe = t.timeframe
                   WHERE f.first_ts < s.cursor)
$$;

CREATE OR REPLACE FUNCTION public._agg_invalidate_data_bars() RETURNS trigger LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_syms text[];
    v_tfs text[];
    v_ws timestamptz[];
    v_dep_syms text[];
    v_dep_tfs text[];
    v_dep_cursors timestamptz[];
    v_dep_starts timestamptz[];
    v_lad_tfs text[];
    v_lad_sources text[];
    v_lad_ivs interval[];
    v_lad_origins timestamptz[];
BEGIN
    -- The ladder entries read from this table, and (below) the dependent tasks, each read by a
    -- statement of its own: no statement joins a transition table with a table, which Citus cannot
    -- plan (on Citus these triggers run on the shards, DESIGN.md 11).
    SELECT array_agg(t.timeframe), array_agg(t.source_timeframe), array_agg(t.bucket_interval),
           array_agg(t.bucket_origin)
    INTO v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins
    FROM public.agg_timeframes t WHERE t.source_table = 'data_bars';
    IF TG_OP = 'INSERT' THEN
        -- Per (symbol, timeframe) the earliest eligible new row first; the per-row join only if one
        -- lies behind a dependent cursor (_agg_any_behind).
        SELECT array_agg(f.sym), array_agg(f.tf), array_agg(f.first_ts)
        INTO v_syms, v_tfs, v_ws
        FROM (SELECT n.canonical_symbol AS sym, n.timeframe AS tf,
                     min(n.ts_utc) FILTER (WHERE NOT n.is_partial) AS first_ts
              FROM new_rows n GROUP BY 1, 2) f;
        SELECT * INTO v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts
        FROM public._agg_lock_dependents('data_bars', ARRAY(SELECT DISTINCT unnest(v_syms)),
                                     ARRAY(SELECT DISTINCT unnest(v_tfs)));
        IF public._agg_any_behind(v_syms, v_tfs, v_ws, v_lad_tfs, v_lad_sources,
                                  v_dep_syms, v_dep_tfs, v_dep_cursors) THEN
            SELECT array_agg(s.canonical_symbol), array_agg(s.timeframe),
                   array_agg(w.ws)
            INTO v_syms, v_tfs, v_ws
            FROM new_rows n
            JOIN unnest(v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins)
                AS t(timeframe, source_timeframe, bucket_interval, bucket_origin) ON t.source_timeframe = n.timeframe
            JOIN unnest(v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts)
                AS s(canonical_symbol, timeframe, last_agg_bar_ts_utc, agg_start_utc)
                ON s.canonical_symbol = n.canonical_symbol AND s.timeframe = t.timeframe
            CROSS JOIN LATERAL public._agg_passed_window(s.canonical_symbol, t.timeframe, t.bucket_interval,
                                                  t.bucket_origin, n.ts_utc, s.last_agg_bar_ts_utc) w
            WHERE NOT n.is_partial
              AND n.ts_utc < s.last_agg_bar_ts_utc
              AND w.ws >= s.agg_start_utc;
        ELSE
            v_syms := NULL;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT * INTO v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts
        FROM public._agg_lock_dependents('data_bars', ARRAY(SELECT DISTINCT canonical_symbol FROM old_rows),
                                     ARRAY(SELECT DISTINCT timeframe FROM old_rows));
        SELECT array_agg(s.canonical_symbol), array_agg(s.timeframe),
               array_agg(w.ws)
        INTO v_syms, v_tfs, v_ws
        FROM old_rows o
        JOIN unnest(v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins)
            AS t(timeframe, source_timeframe, bucket_interval, bucket_origin) ON t.source_timeframe = o.timeframe
        JOIN unnest(v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts)
            AS s(canonical_symbol, timeframe, last_agg_bar_ts_utc, agg_start_utc)
            ON s.canonical_symbol = o.canonical_symbol AND s.timeframe = t.timeframe
        CROSS JOIN LATERAL public._agg_passed_window(s.canonical_symbol, t.timeframe, t.bucket_interval, t.bucket_origin,
                                              o.ts_utc, s.last_agg_bar_ts_utc) w
        WHERE NOT o.is_partial
          AND o.ts_utc < s.last_agg_bar_ts_utc
          AND w.ws >= s.agg_start_utc;
    ELSE
        SELECT * INTO v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts
        FROM public._agg_lock_dependents('data_bars',
            ARRAY(SELECT canonical_symbol FROM old_rows UNION SELECT canonical_symbol FROM new_rows),
            ARRAY(SELECT timeframe FROM old_rows UNION SELECT timeframe FROM new_rows));
        -- UPDATE: the row's old position (if it was eligible) and its new one (if it is), for the
        -- rows whose aggregated columns or eligibility changed.
        SELECT array_agg(s.canonical_symbol), array_agg(s.timeframe),
               array_agg(w.ws)
        INTO v_syms, v_tfs, v_ws
        FROM old_rows o
        JOIN new_rows n ON n.id = o.id
        CROSS JOIN LATERAL (VALUES (o.canonical_symbol, o.timeframe, o.ts_utc, NOT o.is_partial),
                                   (n.canonical_symbol, n.timeframe, n.ts_utc, NOT n.is_partial))
            AS k(canonical_symbol, timeframe, ts_utc, eligible)
        JOIN unnest(v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins)
            AS t(timeframe, source_timeframe, bucket_interval, bucket_origin) ON t.source_timeframe = k.timeframe
        JOIN unnest(v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts)
            AS s(canonical_symbol, timeframe, last_agg_bar_ts_utc, agg_start_utc)
            ON s.canonical_symbol = k.canonical_symbol AND s.timeframe = t.timeframe
        CROSS JOIN LATERAL public._agg_passed_window(s.canonical_symbol, t.timeframe, t.bucket_interval, t.bucket_origin,
                                              k.ts_utc, s.last_agg_bar_ts_utc) w
        WHERE (o.canonical_symbol, o.timeframe, o.ts_utc, o.open, o.high, o.low, o.close, o.vol, o.vwap,
               o.trade_count, o.is_partial)
              IS DISTINCT FROM
              (n.canonical_symbol, n.timeframe, n.ts_utc, n.open, n.high, n.low, n.close, n.vol, n.vwap,
               n.trade_count, n.is_partial)
          AND k.eligible
          AND k.ts_utc < s.last_agg_bar_ts_utc
          AND w.ws >= s.agg_start_utc;
    END IF;
    IF v_syms IS NOT NULL THEN
        PERFORM public._agg_record_invalidations(v_syms, v_tfs, v_ws, lower(TG_OP));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION public._agg_invalidate_derived_bars() RETURNS trigger LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_syms text[];
    v_tfs text[];
    v_ws timestamptz[];
    v_dep_syms text[];
    v_dep_tfs text[];
    v_dep_cursors timestamptz[];
    v_dep_starts timestamptz[];
    v_lad_tfs text[];
    v_lad_sources text[];
    v_lad_ivs interval[];
    v_lad_origins timestamptz[];
    v_citus boolean := public._agg_on_citus();  -- the foreign key checks the registry there
    v_written text[];  -- the symbols an INSERT wrote
BEGIN
    -- The ladder entries read from this table, and (below) the dependent tasks, each read by a
    -- statement of its own: no statement joins a transition table with a table, which Citus cannot
    -- plan (on Citus these triggers run on the shards, DESIGN.md 11).
    SELECT array_agg(t.timeframe), array_agg(t.source_timeframe), array_agg(t.bucket_interval),
           array_agg(t.bucket_origin)
    INTO v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins
    FROM public.agg_timeframes t WHERE t.source_table = 'derived_data_bars';
    IF TG_OP = 'INSERT' THEN
        -- Per (symbol, timeframe) the earliest eligible new bar first; the per-row join only if one
        -- lies behind a dependent cursor (_agg_any_behind).
        SELECT array_agg(f.sym), array_agg(f.tf), array_agg(f.first_ts)
        INTO v_syms, v_tfs, v_ws
        FROM (SELECT n.canonical_symbol AS sym, n.timeframe AS tf,
                     min(n.ts_utc) FILTER (WHERE n.deleted_at IS NULL AND NOT n.is_partial) AS first_ts
              FROM new_rows n GROUP BY 1, 2) f;
        v_written := ARRAY(SELECT DISTINCT unnest(v_syms));
        IF NOT v_citus THEN
            PERFORM public._agg_require_registered(v_written);
        END IF;
        SELECT * INTO v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts
        FROM public._agg_lock_dependents('derived_data_bars', v_written, ARRAY(SELECT DISTINCT unnest(v_tfs)));
        IF public._agg_any_behind(v_syms, v_tfs, v_ws, v_lad_tfs, v_lad_sources,
                                  v_dep_syms, v_dep_tfs, v_dep_cursors) THEN
            SELECT array_agg(s.canonical_symbol), array_agg(s.timeframe),
                   array_agg(w.ws)
            INTO v_syms, v_tfs, v_ws
            FROM new_rows n
            JOIN unnest(v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins)
                AS t(timeframe, source_timeframe, bucket_interval, bucket_origin) ON t.source_timeframe = n.timeframe
            JOIN unnest(v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts)
                AS s(canonical_symbol, timeframe, last_agg_bar_ts_utc, agg_start_utc)
                ON s.canonical_symbol = n.canonical_symbol AND s.timeframe = t.timeframe
            CROSS JOIN LATERAL public._agg_passed_window(s.canonical_symbol, t.timeframe, t.bucket_interval,
                                                  t.bucket_origin, n.ts_utc, s.last_agg_bar_ts_utc) w
            WHERE n.deleted_at IS NULL AND NOT n.is_partial
              AND n.ts_utc < s.last_agg_bar_ts_utc
              AND w.ws >= s.agg_start_utc;
        ELSE
            v_syms := NULL;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT * INTO v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts
        FROM public._agg_lock_dependents('derived_data_bars', ARRAY(SELECT DISTINCT canonical_symbol FROM old_rows),
                                     ARRAY(SELECT DISTINCT timeframe FROM old_rows));
        SELECT array_agg(s.canonical_symbol), array_agg(s.timeframe),
               array_agg(w.ws)
        INTO v_syms, v_tfs, v_ws
        FROM old_rows o
        JOIN unnest(v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins)
            AS t(timeframe, source_timeframe, bucket_interval, bucket_origin) ON t.source_timeframe = o.timeframe
        JOIN unnest(v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts)
            AS s(canonical_symbol, timeframe, last_agg_bar_ts_utc, agg_start_utc)
            ON s.canonical_symbol = o.canonical_symbol AND s.timeframe = t.timeframe
        CROSS JOIN LATERAL public._agg_passed_window(s.canonical_symbol, t.timeframe, t.bucket_interval, t.bucket_origin,
                                              o.ts_utc, s.last_agg_bar_ts_utc) w
        WHERE o.deleted_at IS NULL AND NOT o.is_partial
          AND o.ts_utc < s.last_agg_bar_ts_utc
          AND w.ws >= s.agg_start_utc;
    ELSE
        IF NOT v_citus THEN
            PERFORM public._agg_require_registered(ARRAY(SELECT DISTINCT canonical_symbol FROM new_rows));
        END IF;
        SELECT * INTO v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts
        FROM public._agg_lock_dependents('derived_data_bars',
            ARRAY(SELECT canonical_symbol FROM old_rows UNION SELECT canonical_symbol FROM new_rows),
            ARRAY(SELECT timeframe FROM old_rows UNION SELECT timeframe FROM new_rows));
        SELECT array_agg(s.canonical_symbol), array_agg(s.timeframe),
               array_agg(w.ws)
        INTO v_syms, v_tfs, v_ws
        FROM old_rows o
        JOIN new_rows n ON n.id = o.id
        CROSS JOIN LATERAL (VALUES (o.canonical_symbol, o.timeframe, o.ts_utc,
                                    o.deleted_at IS NULL AND NOT o.is_partial),
                                   (n.canonical_symbol, n.timeframe, n.ts_utc,
                                    n.deleted_at IS NULL AND NOT n.is_partial))
            AS k(canonical_symbol, timeframe, ts_utc, eligible)
        JOIN unnest(v_lad_tfs, v_lad_sources, v_lad_ivs, v_lad_origins)
            AS t(timeframe, source_timeframe, bucket_interval, bucket_origin) ON t.source_timeframe = k.timeframe
        JOIN unnest(v_dep_syms, v_dep_tfs, v_dep_cursors, v_dep_starts)
            AS s(canonical_symbol, timeframe, last_agg_bar_ts_utc, agg_start_utc)
            ON s.canonical_symbol = k.canonical_symbol AND s.timeframe = t.timeframe
        CROSS JOIN LATERAL public._agg_passed_window(s.canonical_symbol, t.timeframe, t.bucket_interval, t.bucket_origin,
                                              k.ts_utc, s.last_agg_bar_ts_utc) w
        WHERE (o.canonical_symbol, o.timeframe, o.ts_utc, o.open, o.high, o.low, o.close, o.vol, o.vwap,
               o.trade_count, o.is_partial, o.deleted_at IS NULL)
              IS DISTINCT FROM
              (n.canonical_symbol, n.timeframe, n.ts_utc, n.open, n.high, n.low, n.close, n.vol, n.vwap,
               n.trade_count, n.is_partial, n.deleted_at IS NULL)
          AND k.eligible
          AND k.ts_utc < s.last_agg_bar_ts_utc
          AND w.ws >= s.agg_start_utc;
    END IF;
    IF v_syms IS NOT NULL THEN
        PERFORM public._agg_record_invalidations(v_syms, v_tfs, v_ws, lower(TG_OP));
    END IF;
    RETURN NULL;
END
$$;

-- A transition table serves one event per trigger, hence three triggers per table:
--   AFTER INSERT  REFERENCING NEW TABLE AS new_rows
--   AFTER UPDATE  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
--   AFTER DELETE  REFERENCING OLD TABLE AS old_rows
-- FOR EACH STATEMENT, on data_bars and derived_data_bars. Created one command per EXECUTE, because on
-- Citus (`baragg db distribute`) a trigger command's text is forwarded to every node as it is, and
-- there with citus.enable_unsafe_triggers: Citus creates the triggers on every shard, where they fire
-- on the node holding the changed rows and reach the co-located shards of the same symbols
-- (data_agg_state, agg_invalidations) locally (DESIGN.md 11).
DO $triggers$
DECLARE
    v_table text;
    v_op record;
BEGIN
    IF public._agg_on_citus() THEN
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    END IF;
    FOREACH v_table IN ARRAY ARRAY['data_bars', 'derived_data_bars'] LOOP
        FOR v_op IN SELECT * FROM (VALUES
                ('insert', 'INSERT', 'REFERENCING NEW TABLE AS new_rows'),
                ('update', 'UPDATE', 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'),
                ('delete', 'DELETE', 'REFERENCING OLD TABLE AS old_rows')) AS o(name, event, ref)
        LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON public.%I', 'agg_invalidate_' || v_op.name, v_table);
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON public.%I %s FOR EACH STATEMENT EXECUTE FUNCTION %s',
                           'agg_invalidate_' || v_op.name, v_op.event, v_table, v_op.ref,
                           CASE v_table WHEN 'data_bars' THEN 'public._agg_invalidate_data_bars()'
                                        ELSE 'public._agg_invalidate_derived_bars()' END);
        END LOOP;
    END LOOP;
END
$triggers$;

-- ---------------------------------------------------------------------------------------------
-- agg_reaggregate_tasks: re-aggregate the final logged windows of many tasks of one timeframe
-- ---------------------------------------------------------------------------------------------
--   agg_reaggregate_tasks(p_to_tf text, p_symbols text[], p_derivation_version integer DEFAULT 1,
--                         p_now_utc timestamptz DEFAULT NULL)
--   RETURNS TABLE (canonical_symbol text, result jsonb)      -- one row per symbol, in input order
--
-- result: {"success": true, "windows": n (logged windows re-aggregated), "bars_created": n (inserted),
-- "bars_rewritten": n (values changed), "bars_unchanged": n (recomputed equal: nothing written),
-- "bars_withdrawn": n (soft-deleted), "bars_quality_poor": n (created or rewritten with quality <= 0),
-- "bars_reaggregated": created + rewritten, "entries_dropped": n (at or after the cursor, or before
-- agg_start_utc: nothing to fix there), "entries_waiting": n (not final yet: left in the log)}.
--
-- Finality (DESIGN.md 5): a logged window [ws, we) is re-aggregated only when it is final as the
-- catch-up defines it: now >= we + aggregation_delay_seconds (rule 2) and no task below this one in
-- the chain has unprocessed input before we (rule 3, _agg_chain_bounds: a source row at or after its
-- cursor, or a logged window of its own). A window that is not final stays logged; agg_finish
-- schedules the task for the moment it becomes final.
--
-- One statement: take (delete) the tasks' final log entries and those outside [agg_start_utc,
-- cursor), recompute the final windows from the current source rows with the engine's core
-- (_agg_window_bars, one index range per window), upsert the bars that changed (equal ones are not
-- rewritten, so they cascade nothing), soft-delete the active bars of windows that lost all source
-- rows or fell below the storing threshold, and add the counts to data_agg_state (total_bars_*,
-- last_run_stats). Call it in the transaction of the task's first catch-up call; the cursor is not
-- moved. An entry written by a concurrent transaction after the entries were read stays in the log
-- for the next run.
DROP FUNCTION IF EXISTS public.agg_reaggregate_invalidated(text, text, integer);
DROP FUNCTION IF EXISTS public.agg_reaggregate_tasks(text, text[], integer);
CREATE OR REPLACE FUNCTION public.agg_reaggregate_tasks(p_to_tf text, p_symbols text[],
                                                 p_derivation_version integer DEFAULT 1,
                                                 p_now_utc timestamptz DEFAULT NULL)
RETURNS TABLE (canonical_symbol text, result jsonb)
-- plan_cache_mode: as agg_catchup_tasks (10_engine.sql), a plan for each call's arguments.
LANGUAGE plpgsql SET search_path = '' SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = 'force_custom_plan' AS $$
#variable_conflict use_column
DECLARE
    -- RETURNING xmax cannot tell an insert from an update on a partitioned table: a bar whose id was
    -- drawn after this (monotonic sequence) is new.
    v_id_floor bigint := pg_catalog.nextval('public.derived_data_bars_id_seq'::regclass);
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_now timestamptz := COALESCE(p_now_utc, now());
BEGIN
    -- (Index plans only, as agg_catchup_tasks: statistics of freshly written bars say "empty".)
    -- The common case, every catch-up of a task with nothing pending: one index probe, and the
    -- statement below is not even planned.
    IF NOT EXISTS (SELECT 1 FROM public.agg_invalidations i
                   WHERE i.timeframe = p_to_tf AND i.canonical_symbol = ANY (p_symbols)) THEN
        RETURN QUERY
        SELECT u.sym, jsonb_build_object('success', true, 'windows', 0, 'bars_created', 0, 'bars_rewritten', 0,
                                         'bars_unchanged', 0, 'bars_withdrawn', 0, 'bars_quality_poor', 0,
                                         'bars_reaggregated', 0, 'entries_dropped', 0, 'entries_waiting', 0)
        FROM unnest(p_symbols) WITH ORDINALITY AS u(sym, ord)
        ORDER BY u.ord;
        RETURN;
    END IF;
    -- Citus (`baragg db distribute`): symbol by symbol, each statement on one shard (50_citus.sql;
    -- symbols on a trading session and 1mo included).
    IF public._agg_on_citus() THEN
        RETURN QUERY SELECT * FROM public._agg_reaggregate_citus(p_to_tf, p_symbols, p_derivation_version, p_now_utc);
        RETURN;
    END IF;
    -- Symbols on a trading session, and 1mo, have session windows (15_sessions.sql).
    IF public._agg_needs_sessions(p_to_tf, p_symbols) THEN
        RETURN QUERY SELECT * FROM public._agg_reaggregate_split(p_to_tf, p_symbols, p_derivation_version, p_now_utc);
        RETURN;
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT u.sym, u.ord FROM unnest(p_symbols) WITH ORDINALITY AS u(sym, ord)
    ),
    settings AS (
        SELECT i.sym, s.last_agg_bar_ts_utc AS cur, s.agg_start_utc,
               COALESCE(s.aggregation_delay_seconds, 0) AS delay_seconds,
               COALESCE(b.bound, timestamptz 'infinity') AS bound
        FROM input i
        LEFT JOIN public.data_agg_state s ON s.canonical_symbol = i.sym AND s.timeframe = p_to_tf
        LEFT JOIN public._agg_chain_bounds(p_to_tf, p_symbols) b ON b.canonical_symbol = i.sym
    ),
    entries AS (
        SELECT st.sym, e.window_start AS ws,
               COALESCE(e.window_start < date_bin(v_tf.bucket_interval, st.cur, v_tf.bucket_origin)
                        AND e.window_start >= st.agg_start_utc, false) AS in_range,
               v_now >= e.window_start + v_tf.bucket_interval + make_interval(secs => st.delay_seconds)
                   AND e.window_start + v_tf.bucket_interval <= st.bound AS is_final
        FROM settings st
        JOIN public.agg_invalidations e ON e.canonical_symbol = st.sym AND e.timeframe = p_to_tf
    ),
    taken AS (
        DELETE FROM public.agg_invalidations i
        USING entries e
        WHERE i.canonical_symbol = e.sym AND i.timeframe = p_to_tf AND i.window_start = e.ws
          AND (e.is_final OR NOT e.in_range)
        RETURNING i.canonical_symbol AS sym, i.window_start AS ws
    ),
    pending AS (
        SELECT k.sym, k.ws
        FROM taken k
        JOIN entries e ON e.sym = k.sym AND e.ws = k.ws
        WHERE e.in_range AND e.is_final
    ),
    fresh AS (
        SELECT p.sym, p.ws, w.open, w.high, w.low, w.close, w.vol, w.vwap, w.trade_count,
               w.source_candles, w.expected_candles, w.quality_score
        FROM pending p
        LEFT JOIN LATERAL public._agg_window_bars(p_to_tf, p.sym, p.ws, p.ws + v_tf.bucket_interval) w ON true
    ),
    written AS (
        INSERT INTO public.derived_data_bars AS d (
            canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
            is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
            quality_score, derivation_version, raw, deleted_at)
        SELECT f.sym, p_to_tf, f.ws, f.open, f.high, f.low, f.close, f.vol, f.vwap, f.trade_count,
               false, 'agg', now(), v_tf.source_timeframe, f.source_candles, f.expected_candles,
               f.quality_score, p_derivation_version, '{}'::jsonb, NULL
        FROM fresh f
        WHERE f.quality_score IS NOT NULL
        ORDER BY f.sym, f.ws
        ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
        DO UPDATE SET
            open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
            vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
            is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
            source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
            expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
            derivation_version = excluded.derivation_version,
            updated_at = excluded.ingested_at  -- (= now(); Citus takes no function here)
        WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial,
               d.source_timeframe, d.source_candles, d.expected_candles, d.quality_score,
               d.derivation_version)
              IS DISTINCT FROM
              (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,
               excluded.trade_count, false, excluded.source_timeframe, excluded.source_candles,
               excluded.expected_candles, excluded.quality_score, excluded.derivation_version)
        RETURNING d.canonical_symbol, d.quality_score, (d.id > v_id_floor) AS inserted
    ),
    withdrawn AS (
        UPDATE public.derived_data_bars d
        SET deleted_at = now(), updated_at = now()
        FROM fresh f
        WHERE f.quality_score IS NULL
          AND d.canonical_symbol = f.sym AND d.timeframe = p_to_tf AND d.ts_utc = f.ws
          AND d.deleted_at IS NULL
        RETURNING d.canonical_symbol
    ),
    counts AS (
        SELECT i.sym, i.ord,
               (SELECT count(*) FROM entries e WHERE e.sym = i.sym) AS n_entries,
               (SELECT count(*) FROM pending p WHERE p.sym = i.sym) AS n_windows,
               (SELECT count(*) FROM taken k WHERE k.sym = i.sym) AS n_taken,
               (SELECT count(*) FROM fresh f WHERE f.sym = i.sym AND f.quality_score IS NOT NULL) AS n_storable,
               (SELECT count(*) FROM written w WHERE w.canonical_symbol = i.sym AND w.inserted) AS n_created,
               (SELECT count(*) FROM written w WHERE w.canonical_symbol = i.sym AND NOT w.inserted) AS n_rewritten,
               (SELECT count(*) FROM written w WHERE w.canonical_symbol = i.sym AND w.quality_score <= 0) AS n_poor,
               (SELECT count(*) FROM withdrawn w WHERE w.canonical_symbol = i.sym) AS n_withdrawn
        FROM input i
    ),
    recorded AS (
        UPDATE public.data_agg_state s
        SET total_bars_created = s.total_bars_created + c.n_created,
            total_bars_rewritten = s.total_bars_rewritten + c.n_rewritten,
            total_bars_unchanged = s.total_bars_unchanged + (c.n_storable - c.n_created - c.n_rewritten),
            total_bars_quality_poor = s.total_bars_quality_poor + c.n_poor,
            total_bars_reaggregated = s.total_bars_reaggregated + c.n_created + c.n_rewritten,
            total_bars_withdrawn = s.total_bars_withdrawn + c.n_withdrawn,
            last_run_stats = COALESCE(s.last_run_stats, '{}'::jsonb) || jsonb_build_object(
                'windows_reaggregated', COALESCE((s.last_run_stats->>'windows_reaggregated')::bigint, 0)
                                        + c.n_windows,
                'bars_reaggregated', COALESCE((s.last_run_stats->>'bars_reaggregated')::bigint, 0)
                                     + c.n_created + c.n_rewritten,
                'bars_created', COALESCE((s.last_run_stats->>'bars_created')::bigint, 0) + c.n_created,
                'bars_rewritten', COALESCE((s.last_run_stats->>'bars_rewritten')::bigint, 0) + c.n_rewritten,
                'bars_unchanged', COALESCE((s.last_run_stats->>'bars_unchanged')::bigint, 0)
                                  + (c.n_storable - c.n_created - c.n_rewritten),
                'bars_quality_poor', COALESCE((s.last_run_stats->>'bars_quality_poor')::bigint, 0) + c.n_poor,
                'bars_withdrawn', COALESCE((s.last_run_stats->>'bars_withdrawn')::bigint, 0)
                                  + c.n_withdrawn),
            updated_at = now()
        FROM counts c
        WHERE s.canonical_symbol = c.sym AND s.timeframe = p_to_tf AND c.n_taken > 0
        RETURNING 1
    )
    SELECT c.sym, jsonb_build_object(
               'success', true,
               'windows', c.n_windows,
               'bars_created', c.n_created,
               'bars_rewritten', c.n_rewritten,
               'bars_unchanged', c.n_storable - c.n_created - c.n_rewritten,
               'bars_withdrawn', c.n_withdrawn,
               'bars_quality_poor', c.n_poor,
               'bars_reaggregated', c.n_created + c.n_rewritten,
               'entries_dropped', c.n_taken - c.n_windows,
               'entries_waiting', c.n_entries - c.n_taken)
    FROM counts c
    ORDER BY c.ord;
END
$$;

-- One task, the shape of catchup_aggregation_range's result (for psql and RPC callers).
CREATE OR REPLACE FUNCTION public.agg_reaggregate_invalidated(p_symbol text, p_to_tf text,
                                                       p_derivation_version integer DEFAULT 1,
                                                       p_now_utc timestamptz DEFAULT NULL)
RETURNS jsonb LANGUAGE sql SET search_path = '' AS $$
    SELECT t.result FROM public.agg_reaggregate_tasks(p_to_tf, ARRAY[p_symbol], p_derivation_version, p_now_utc) t
$$;
