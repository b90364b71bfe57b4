-- Repeatable: what the functions need on a Citus cluster (DESIGN.md 11, `baragg db distribute`).
-- On plain PostgreSQL (and Supabase) this file changes nothing: every block below returns at once
-- unless data_bars is a distributed table.
--
-- SQL-language functions that read or write the distributed or reference tables become PL/pgSQL, same body.
-- Citus cannot plan a query on a distributed table inside a SQL-language function that has
-- parameters ("could not create distributed plan ... parameters in SQL functions"); in PL/pgSQL the
-- parameters are values when Citus plans the statement, so a statement filtered by one symbol
-- routes to that symbol's shard. The bodies stay those of the files before this one (re-written
-- here from the catalogue each time the repeatables are applied, so they cannot drift).
-- (The invalidation triggers on the shards: functions/30_invalidation.sql.)

-- ---------------------------------------------------------------------------------------------
-- _agg_session_window_bars (15_sessions.sql) in a form Citus routes to the symbol's node. The
-- original reads each trading day's source rows through a function call (_agg_source_bars); Citus
-- sees only reference tables in that query, may run it on any node, and refuses the nested read of a
-- distributed table there ("cannot execute a distributed query from a query on a shard"). Here the
-- call is replaced by the same rows as a lateral subquery on the bar tables, filtered by the symbol
-- (as _agg_window_bars reads them): one statement on the node holding the symbol's shards, where the
-- trading days (a reference table) are local. PL/pgSQL, so the parameters are values when Citus plans
-- it. Made from the catalogue's body on every re-apply (it cannot drift); fails loudly if that body
-- no longer reads its rows this way. Every caller on Citus (catch-up, re-aggregation, the seed's
-- single-window functions, rebuilds after a session change) gets this form.
-- ---------------------------------------------------------------------------------------------
DO $windows$
DECLARE
    v_body text;
    v_new text;
BEGIN
    IF NOT public._agg_on_citus() THEN
        RETURN;
    END IF;
    SELECT p.prosrc INTO v_body FROM pg_catalog.pg_proc p
    WHERE p.oid = 'public._agg_session_window_bars(text, text, text, timestamptz, timestamptz, boolean)'::regprocedure
      AND p.prolang = (SELECT l.oid FROM pg_catalog.pg_language l WHERE l.lanname = 'sql');
    v_new := regexp_replace(
        v_body,
        'CROSS JOIN LATERAL public\._agg_source_bars\(\s*tf\.source_table,\s*p_symbol,\s*tf\.source_timeframe,\s*'
        'GREATEST\(d\.open_utc, p_from\),\s*LEAST\(d\.close_utc, p_to\)\)\s+s\M',
        E'CROSS JOIN LATERAL (\n'
        '        SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count\n'
        '        FROM public.data_bars b\n'
        '        WHERE tf.source_table = ''data_bars'' AND b.canonical_symbol = p_symbol\n'
        '          AND b.timeframe = tf.source_timeframe AND b.ts_utc >= GREATEST(d.open_utc, p_from)\n'
        '          AND b.ts_utc < LEAST(d.close_utc, p_to) AND NOT b.is_partial\n'
        '        UNION ALL\n'
        '        SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count\n'
        '        FROM public.derived_data_bars b\n'
        '        WHERE tf.source_table = ''derived_data_bars'' AND b.canonical_symbol = p_symbol\n'
        '          AND b.timeframe = tf.source_timeframe AND b.ts_utc >= GREATEST(d.open_utc, p_from)\n'
        '          AND b.ts_utc < LEAST(d.close_utc, p_to) AND b.deleted_at IS NULL AND NOT b.is_partial\n'
        '    ) s');
    IF v_body IS NULL OR v_new = v_body THEN
        RAISE EXCEPTION '50_citus.sql: _agg_session_window_bars no longer reads its rows through _agg_source_bars as expected; update its Citus form here';
    END IF;
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION public._agg_session_window_bars(p_to_tf text, p_symbol text, p_session text,
                                                    p_from timestamptz, p_to timestamptz,
                                                    p_is_sparse boolean DEFAULT NULL)
RETURNS TABLE (ts_utc timestamptz, open double precision, high double precision, low double precision,
               close double precision, vol double precision, vwap double precision, trade_count integer,
               source_candles integer, expected_candles integer, quality_score integer, window_end timestamptz)
LANGUAGE plpgsql STABLE SET search_path = '' AS $fn$
#variable_conflict use_column
BEGIN
RETURN QUERY %s;
END
$fn$$f$, regexp_replace(v_new, ';\s*$', ''));
END
$windows$;

DO $citus$
DECLARE
    f record;
    v_def text;
    v_body text;
    v_new text;
BEGIN
    IF NOT public._agg_on_citus() THEN
        RETURN;
    END IF;
    FOR f IN
        SELECT p.oid, p.proretset, p.prosrc, pg_catalog.format_type(p.prorettype, NULL) AS rettype,
               (SELECT string_agg(quote_ident(a.name), ', ' ORDER BY a.ord)
                FROM unnest(p.proargnames, p.proargmodes::text[]) WITH ORDINALITY AS a(name, mode, ord)
                WHERE a.mode IN ('o', 'b')) AS outs
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
          AND p.prolang = (SELECT l.oid FROM pg_catalog.pg_language l WHERE l.lanname = 'sql')
          AND p.prosrc ~ 'public\.(data_bars|derived_data_bars|data_agg_state|agg_invalidations|core_asset_registry_all|agg_timeframes|agg_sessions|agg_session_days)\M'
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                          WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        v_def := pg_catalog.pg_get_functiondef(f.oid);
        v_body := regexp_replace(f.prosrc, ';\s*$', '');
        v_new := E'\n#variable_conflict use_column\n'
                 || CASE WHEN f.proretset THEN E'BEGIN\nRETURN QUERY ' || v_body || E';\n'
                         WHEN f.outs IS NOT NULL  -- one row into the OUT parameters
                         THEN E'BEGIN\nSELECT * INTO ' || f.outs || ' FROM (' || v_body || E') AS r;\nRETURN;\n'
                         -- (INTO at the end: the body may be a WITH holding an UPDATE, which cannot nest)
                         ELSE 'DECLARE result_ ' || f.rettype || E';\nBEGIN\n' || v_body
                              || E'\nINTO result_;\nRETURN result_;\n' END
                 || 'END';
        -- pg_get_functiondef writes "LANGUAGE sql" on a line of its own and the body last, quoted
        -- with $function$.
        v_def := replace(v_def, E' LANGUAGE sql\n', E' LANGUAGE plpgsql\n');
        v_def := substr(v_def, 1, strpos(v_def, 'AS $function$') - 1)
                 || 'AS $function$' || v_new || E'$function$\n';
        EXECUTE v_def;
    END LOOP;
END
$citus$;


-- ---------------------------------------------------------------------------------------------
-- _agg_citus_upsert: write one symbol's computed windows on Citus (the catch-ups and re-aggregations
-- of 50_citus.sql): one element per window in the arrays, quality NULL: nothing storable, skipped.
-- The engine's upsert (a bar equal to the stored one writes nothing), as one statement naming the
-- symbol, so it runs on the symbol's node. Returns the bars inserted, rewritten, and written with
-- quality <= 0.
CREATE OR REPLACE FUNCTION public._agg_citus_upsert(
    p_to_tf text, p_symbol text, p_derivation_version integer, p_now timestamptz,
    p_ws timestamptz[], p_open double precision[], p_high double precision[], p_low double precision[],
    p_close double precision[], p_vol double precision[], p_vwap double precision[], p_trades integer[],
    p_source integer[], p_expected integer[], p_quality integer[],
    OUT created bigint, OUT rewritten bigint, OUT poor bigint)
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
BEGIN
    WITH written AS (
        INSERT INTO public.derived_data_bars AS d (
            canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
            is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
            quality_score, derivation_version, raw, deleted_at)
        SELECT p_symbol, p_to_tf, h.ts_utc, h.open, h.high, h.low, h.close, h.vol, h.vwap, h.trade_count,
               false, 'agg', p_now, v_tf.source_timeframe, h.source_candles, h.expected_candles,
               h.quality_score, p_derivation_version, '{}'::jsonb, NULL
        FROM unnest(p_ws, p_open, p_high, p_low, p_close, p_vol, p_vwap, p_trades, p_source, p_expected, p_quality)
            AS h(ts_utc, open, high, low, close, vol, vwap, trade_count, source_candles, expected_candles,
                 quality_score)
        WHERE h.quality_score IS NOT NULL
        ORDER BY h.ts_utc
        ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
        DO UPDATE SET
            open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
            vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
            is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
            source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
            expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
            derivation_version = excluded.derivation_version, raw = excluded.raw, updated_at = excluded.ingested_at
        WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial,
               d.source_timeframe, d.source_candles, d.expected_candles, d.quality_score,
               d.derivation_version)
              IS DISTINCT FROM
              (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,
               excluded.trade_count, false, excluded.source_timeframe, excluded.source_candles,
               excluded.expected_candles, excluded.quality_score, excluded.derivation_version)
        RETURNING d.quality_score, (d.xmax = 0) AS inserted
    )
    SELECT count(*) FILTER (WHERE w.inserted), count(*) FILTER (WHERE NOT w.inserted),
           count(*) FILTER (WHERE w.quality_score <= 0)
    INTO created, rewritten, poor
    FROM written w;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_citus_withdraw: a Citus catch-up's withdrawal for one symbol (both catch-ups below): the active
-- bars in [p_from, p_to), the windows the call passed over, that have no storable bar now (p_ws /
-- p_quality: the windows it computed, quality NULL: nothing storable) are soft-deleted. Returns how
-- many. One statement naming the symbol, so it runs on the symbol's node.
CREATE OR REPLACE FUNCTION public._agg_citus_withdraw(p_to_tf text, p_symbol text, p_from timestamptz,
                                               p_to timestamptz, p_ws timestamptz[], p_quality integer[])
RETURNS bigint LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_withdrawn bigint;
BEGIN
    WITH wd AS (
        UPDATE public.derived_data_bars d
        SET deleted_at = v_now_real.t, updated_at = v_now_real.t
        FROM (SELECT now() AS t) v_now_real
        WHERE d.canonical_symbol = p_symbol AND d.timeframe = p_to_tf
          AND d.ts_utc >= p_from AND d.ts_utc < p_to AND d.deleted_at IS NULL
          AND NOT (d.ts_utc = ANY (COALESCE(
              ARRAY(SELECT k.ts FROM unnest(p_ws, p_quality) AS k(ts, q) WHERE k.q IS NOT NULL), '{}')))
        RETURNING 1
    )
    SELECT count(*) INTO v_withdrawn FROM wd;
    RETURN v_withdrawn;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_catchup_citus: agg_catchup_tasks on Citus (it calls this first there), symbol by symbol.
-- ---------------------------------------------------------------------------------------------
-- The same plan as agg_catchup_tasks (functions/10_engine.sql: s0, limit, next, scan end, windows,
-- upsert of changed bars, withdrawal, cursor, counts; the same helpers), written as one short
-- statement per step and symbol, each filtered by the symbol: Citus routes each to the node holding
-- that symbol's shards. (The set-based statement joins many symbols' rows with correlated subqueries,
-- which Citus cannot distribute.) Same result keys, same bars. Symbols on a trading session, and 1mo,
-- go to _agg_catchup_session_citus (below), one call per symbol.
CREATE OR REPLACE FUNCTION public._agg_catchup_citus(p_to_tf text, p_symbols text[], p_cursors timestamptz[],
                                              p_max_windows integer, p_now_utc timestamptz,
                                              p_derivation_version integer, p_ignore_confirmation boolean)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_iv interval := v_tf.bucket_interval;
    v_origin timestamptz := v_tf.bucket_origin;
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_derived boolean := v_tf.source_table = 'derived_data_bars';
    v_scan_rows integer := p_max_windows * v_tf.max_source_bars;
    v_sym text;
    v_delay integer;
    v_start timestamptz;
    v_sparse boolean;
    v_s0 timestamptz;
    v_bound timestamptz;
    v_lim timestamptz;
    v_nxt timestamptz;
    v_recheck boolean;
    v_last timestamptz;
    v_se timestamptz;
    v_scan_end timestamptz;
    w_ts timestamptz[];
    w_open double precision[];
    w_high double precision[];
    w_low double precision[];
    w_close double precision[];
    w_vol double precision[];
    w_vwap double precision[];
    w_trades integer[];
    w_source integer[];
    w_expected integer[];
    w_quality integer[];
    v_handled bigint;
    v_last_ws timestamptz;
    v_skipped bigint;
    v_created bigint;
    v_rewritten bigint;
    v_poor bigint;
    v_withdrawn bigint;
    v_new timestamptz;
    v_more boolean;
BEGIN
    FOR i IN 1 .. COALESCE(cardinality(p_symbols), 0) LOOP
        v_sym := p_symbols[i];
        -- Symbols on a trading session, and 1mo: the session engine, symbol by symbol.
        IF public._agg_needs_sessions(p_to_tf, ARRAY[v_sym]) THEN
            RETURN QUERY SELECT * FROM public._agg_catchup_session_citus(
                p_to_tf, ARRAY[v_sym], ARRAY[p_cursors[i]], p_max_windows, p_now_utc, p_derivation_version,
                p_ignore_confirmation);
            CONTINUE;
        END IF;
        -- input: the task's settings (defaults without a task row)
        SELECT st.aggregation_delay_seconds, st.agg_start_utc INTO v_delay, v_start
        FROM public.data_agg_state st WHERE st.canonical_symbol = v_sym AND st.timeframe = p_to_tf;
        v_delay := COALESCE(v_delay, 0);
        v_start := COALESCE(v_start, timestamptz '-infinity');
        SELECT r.is_sparse INTO v_sparse FROM public.core_asset_registry_all r WHERE r.canonical_symbol = v_sym;
        v_sparse := COALESCE(v_sparse, false);
        -- started, limited, planned
        v_s0 := GREATEST(
            date_bin(v_iv, COALESCE(p_cursors[i], public.agg_bootstrap_cursor(v_sym, p_to_tf, v_now)), v_origin),
            CASE WHEN date_bin(v_iv, v_start, v_origin) = v_start THEN v_start
                 ELSE date_bin(v_iv, v_start, v_origin) + v_iv END);
        v_bound := NULL;
        IF v_derived THEN
            SELECT b.bound INTO v_bound FROM public._agg_chain_bounds(p_to_tf, ARRAY[v_sym]) b;
        END IF;
        v_lim := LEAST(CASE WHEN p_ignore_confirmation THEN timestamptz 'infinity'
                            ELSE v_now - make_interval(secs => v_delay) END,
                       COALESCE(v_bound, timestamptz 'infinity'));
        v_nxt := CASE WHEN v_lim = timestamptz 'infinity' THEN timestamptz 'infinity'
                      ELSE GREATEST(v_s0, date_bin(v_iv, v_lim, v_origin)) END;
        v_recheck := EXISTS (SELECT 1 FROM public.derived_data_bars d
                             WHERE d.canonical_symbol = v_sym AND d.timeframe = p_to_tf AND d.ts_utc >= v_s0
                               AND d.deleted_at IS NULL);
        -- bounded: the last source row at or after s0, and the (v_scan_rows)-th in [s0, next)
        v_se := NULL;
        IF v_derived THEN
            SELECT b.ts_utc INTO v_last FROM public.derived_data_bars b
            WHERE b.canonical_symbol = v_sym AND b.timeframe = v_tf.source_timeframe AND b.ts_utc >= v_s0
              AND b.deleted_at IS NULL AND NOT b.is_partial
            ORDER BY b.ts_utc DESC LIMIT 1;
            IF p_max_windows IS NOT NULL THEN
                SELECT b.ts_utc INTO v_se FROM public.derived_data_bars b
                WHERE b.canonical_symbol = v_sym AND b.timeframe = v_tf.source_timeframe AND b.ts_utc >= v_s0
                  AND b.ts_utc < v_nxt AND b.deleted_at IS NULL AND NOT b.is_partial
                ORDER BY b.ts_utc OFFSET v_scan_rows - 1 LIMIT 1;
            END IF;
        ELSE
            SELECT b.ts_utc INTO v_last FROM public.data_bars b
            WHERE b.canonical_symbol = v_sym AND b.timeframe = v_tf.source_timeframe AND b.ts_utc >= v_s0
              AND NOT b.is_partial
            ORDER BY b.ts_utc DESC LIMIT 1;
            IF p_max_windows IS NOT NULL THEN
                SELECT b.ts_utc INTO v_se FROM public.data_bars b
                WHERE b.canonical_symbol = v_sym AND b.timeframe = v_tf.source_timeframe AND b.ts_utc >= v_s0
                  AND b.ts_utc < v_nxt AND NOT b.is_partial
                ORDER BY b.ts_utc OFFSET v_scan_rows - 1 LIMIT 1;
            END IF;
        END IF;
        v_scan_end := CASE WHEN p_max_windows IS NULL THEN v_nxt
                           ELSE COALESCE(date_bin(v_iv, v_se, v_origin) + v_iv, v_nxt) END;
        -- windows, handled (the first p_max_windows non-empty ones)
        w_ts := NULL;
        IF v_scan_end > v_s0 THEN
            SELECT array_agg(x.ts_utc ORDER BY x.ts_utc), array_agg(x.open ORDER BY x.ts_utc),
                   array_agg(x.high ORDER BY x.ts_utc), array_agg(x.low ORDER BY x.ts_utc),
                   array_agg(x.close ORDER BY x.ts_utc), array_agg(x.vol ORDER BY x.ts_utc),
                   array_agg(x.vwap ORDER BY x.ts_utc), array_agg(x.trade_count ORDER BY x.ts_utc),
                   array_agg(x.source_candles ORDER BY x.ts_utc), array_agg(x.expected_candles ORDER BY x.ts_utc),
                   array_agg(x.quality_score ORDER BY x.ts_utc)
            INTO w_ts, w_open, w_high, w_low, w_close, w_vol, w_vwap, w_trades, w_source, w_expected, w_quality
            FROM (SELECT * FROM public._agg_window_bars(p_to_tf, v_sym, v_s0, v_scan_end, v_sparse) y
                  ORDER BY y.ts_utc LIMIT p_max_windows) x;
        END IF;
        v_handled := COALESCE(cardinality(w_ts), 0);
        v_last_ws := w_ts[v_handled];
        SELECT count(*) FILTER (WHERE q IS NULL) INTO v_skipped FROM unnest(w_quality) AS q;
        -- written: changed bars only (an equal recompute writes nothing)
        SELECT u.created, u.rewritten, u.poor INTO v_created, v_rewritten, v_poor
        FROM public._agg_citus_upsert(p_to_tf, v_sym, p_derivation_version, now(),
                                      w_ts, w_open, w_high, w_low, w_close, w_vol,
                                      w_vwap, w_trades, w_source, w_expected, w_quality) u;
        -- outcome: the new cursor
        v_new := CASE WHEN v_handled >= p_max_windows THEN v_last_ws + v_iv
                      WHEN v_scan_end < v_nxt THEN v_scan_end
                      ELSE LEAST(v_nxt, CASE WHEN v_last IS NULL THEN v_s0
                                             ELSE GREATEST(v_s0, date_bin(v_iv, v_last, v_origin) + v_iv) END)
                 END;
        v_more := COALESCE(v_handled >= p_max_windows OR v_scan_end < v_nxt, false);
        -- withdrawn: stored bars in the windows passed over that have no storable bar now
        v_withdrawn := CASE WHEN v_recheck
                            THEN public._agg_citus_withdraw(p_to_tf, v_sym, v_s0, v_new, w_ts, w_quality) ELSE 0 END;
        canonical_symbol := v_sym;
        result := jsonb_build_object(
            'success', true,
            'windows_processed', v_handled,
            'cursor_advanced_to', v_new,
            'bars_created', v_created,
            'bars_rewritten', v_rewritten,
            'bars_unchanged', v_handled - v_skipped - v_created - v_rewritten,
            'bars_withdrawn', v_withdrawn,
            'bars_quality_poor', v_poor,
            'bars_skipped', v_skipped,
            'gaps_skipped', round(extract(epoch FROM v_new - v_s0) / extract(epoch FROM v_iv))::bigint - v_handled,
            'continue', v_more,
            'agg_start_enforced', v_start);
        RETURN NEXT;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_finish_ok_citus: _agg_finish_ok on Citus (it calls this first there), task by task.
-- ---------------------------------------------------------------------------------------------
-- The same rules as _agg_finish_ok (functions/20_scheduling.sql: only rows still running and owned by
-- the caller change; cursor, counters, stats, next run; then the tasks built from the ones that moved
-- are woken), with the values computed here and each statement naming one task: Citus refuses an
-- UPDATE that joins task rows with computed rows or computes time arithmetic on its columns.
CREATE OR REPLACE FUNCTION public._agg_finish_ok_citus(p_worker_id text, p_items jsonb, p_now_utc timestamptz)
RETURNS TABLE (out_symbol text, out_timeframe text, out_cursor timestamptz, out_next_run_at timestamptz)
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_sched timestamptz := LEAST(COALESCE(p_now_utc, now()), now());
    v_item record;
    v_row public.data_agg_state%ROWTYPE;
    v_dep public.data_agg_state%ROWTYPE;
    v_interval interval;
    v_cur timestamptz;
    v_win timestamptz;
    v_len interval;
    v_st jsonb;
    v_old jsonb;
    v_stats jsonb;
    v_more boolean;
    v_moved boolean;
    v_next timestamptz;
    v_done jsonb := '[]'::jsonb;
    v_key text;
    v_kw text;
    v_sum bigint;
BEGIN
    FOR v_item IN
        SELECT e->>'canonical_symbol' AS sym, e->>'timeframe' AS tf,
               (e->>'new_cursor_utc')::timestamptz AS cur, COALESCE(e->'stats', '{}'::jsonb) AS st
        FROM jsonb_array_elements(p_items) e
        ORDER BY 1, 2
    LOOP
        SELECT * INTO v_row FROM public.data_agg_state s
        WHERE s.canonical_symbol = v_item.sym AND s.timeframe = v_item.tf
          AND s.status = 'running' AND (p_worker_id IS NULL OR s.lease_owner = p_worker_id)
        FOR UPDATE;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        v_st := v_item.st;
        v_cur := COALESCE(v_item.cur, v_row.last_agg_bar_ts_utc);
        SELECT LEAST(v_cur, min(v.window_start)) INTO v_win FROM public.agg_invalidations v
        WHERE v.canonical_symbol = v_item.sym AND v.timeframe = v_item.tf;
        SELECT t.bucket_interval INTO v_interval FROM public.agg_timeframes t WHERE t.timeframe = v_item.tf;
        v_len := CASE WHEN v_item.tf = '1mo' OR EXISTS (SELECT 1 FROM public.core_asset_registry_all r
                                                        WHERE r.session <> '24x7' AND r.canonical_symbol = v_item.sym)
                      THEN public._agg_window_length(v_item.sym, v_item.tf, v_win, v_interval)
                      ELSE v_interval END;
        v_old := COALESCE(v_row.last_run_stats, '{}'::jsonb);
        v_stats := v_old;
        FOREACH v_key IN ARRAY ARRAY['windows_processed', 'bars_created', 'bars_rewritten', 'bars_unchanged',
                                     'bars_withdrawn', 'bars_quality_poor', 'bars_skipped', 'gaps_skipped'] LOOP
            v_stats := v_stats || jsonb_build_object(v_key, COALESCE((v_old->>v_key)::bigint, 0)
                                                            + COALESCE((v_st->>v_key)::bigint, 0));
        END LOOP;
        v_stats := v_stats || jsonb_build_object('calls', COALESCE((v_old->>'calls')::bigint, 0) + 1);
        v_more := COALESCE((v_st->>'continue')::boolean, false);
        v_moved := v_cur IS DISTINCT FROM v_row.last_agg_bar_ts_utc
                   OR COALESCE((v_old->>'windows_processed')::bigint, 0)
                      + COALESCE((v_st->>'windows_processed')::bigint, 0) > 0
                   OR COALESCE((v_old->>'windows_reaggregated')::bigint, 0) > 0
                   OR COALESCE((v_old->>'cursor_moved')::boolean, false);
        v_stats := v_stats || jsonb_build_object('outcome', 'ok', 'finished_at', v_now, 'cursor_after', v_cur,
                                                 'continue', v_more, 'moved', v_moved);
        v_next := CASE
            WHEN v_more OR v_row.rerun_requested THEN v_sched
            WHEN v_win IS NULL OR v_len IS NULL
                THEN v_sched + make_interval(mins => COALESCE(v_row.run_interval_minutes, 5))
            WHEN v_win + v_len + make_interval(secs => COALESCE(v_row.aggregation_delay_seconds, 0)) <= v_sched
                THEN v_sched + interval '1 minute'
            ELSE v_win + v_len + make_interval(secs => COALESCE(v_row.aggregation_delay_seconds, 0))
        END;
        UPDATE public.data_agg_state s
        SET status = 'idle', lease_owner = NULL, lease_expires_at = NULL, lease_session = NULL,
            lease_backend_pid = NULL, rerun_requested = false,
            last_agg_bar_ts_utc = v_cur,
            last_successful_at_utc = v_now,
            hard_fail_streak = 0,
            last_error = NULL,
            total_runs = v_row.total_runs + 1,
            total_windows_processed = v_row.total_windows_processed + COALESCE((v_st->>'windows_processed')::bigint, 0),
            total_bars_created = v_row.total_bars_created + COALESCE((v_st->>'bars_created')::bigint, 0),
            total_bars_rewritten = v_row.total_bars_rewritten + COALESCE((v_st->>'bars_rewritten')::bigint, 0),
            total_bars_unchanged = v_row.total_bars_unchanged + COALESCE((v_st->>'bars_unchanged')::bigint, 0),
            total_bars_withdrawn = v_row.total_bars_withdrawn + COALESCE((v_st->>'bars_withdrawn')::bigint, 0),
            total_bars_quality_poor = v_row.total_bars_quality_poor + COALESCE((v_st->>'bars_quality_poor')::bigint, 0),
            total_bars_skipped = v_row.total_bars_skipped + COALESCE((v_st->>'bars_skipped')::bigint, 0),
            total_gaps_skipped = v_row.total_gaps_skipped + COALESCE((v_st->>'gaps_skipped')::bigint, 0),
            last_run_stats = v_stats,
            next_run_at = v_next,
            updated_at = v_sched_real.t
        FROM (SELECT now() AS t) v_sched_real
        WHERE s.canonical_symbol = v_item.sym AND s.timeframe = v_item.tf;
        v_done := v_done || jsonb_build_object('canonical_symbol', v_item.sym, 'timeframe', v_item.tf,
                                               'cursor', v_cur, 'next_run_at', v_next, 'moved', v_moved);
    END LOOP;

    -- Wake the tasks built from the ones that moved, as _agg_finish_ok does.
    FOR v_item IN
        SELECT m.canonical_symbol AS sym, m.timeframe AS tf
        FROM jsonb_to_recordset(v_done) AS m(canonical_symbol text, timeframe text, moved boolean)
        WHERE m.moved ORDER BY 1, 2
    LOOP
        FOR v_dep IN
            SELECT d.* FROM public.data_agg_state d
            WHERE d.canonical_symbol = v_item.sym AND d.source_timeframe = v_item.tf AND d.enabled
            ORDER BY d.timeframe
        LOOP
            SELECT t.bucket_interval INTO v_interval FROM public.agg_timeframes t WHERE t.timeframe = v_dep.timeframe;
            CONTINUE WHEN NOT FOUND;
            IF v_dep.last_agg_bar_ts_utc IS NOT NULL THEN
                SELECT LEAST(v_dep.last_agg_bar_ts_utc, min(v.window_start)) INTO v_win FROM public.agg_invalidations v
                WHERE v.canonical_symbol = v_dep.canonical_symbol AND v.timeframe = v_dep.timeframe;
                v_len := CASE WHEN v_dep.timeframe = '1mo' OR EXISTS (
                                  SELECT 1 FROM public.core_asset_registry_all r
                                  WHERE r.session <> '24x7' AND r.canonical_symbol = v_dep.canonical_symbol)
                              THEN public._agg_window_length(v_dep.canonical_symbol, v_dep.timeframe, v_win, v_interval)
                              ELSE v_interval END;
                CONTINUE WHEN (v_win + v_len + make_interval(secs => COALESCE(v_dep.aggregation_delay_seconds, 0))
                               <= v_now) IS NOT TRUE;
            END IF;
            UPDATE public.data_agg_state d
            SET next_run_at = CASE WHEN d.status = 'running' THEN d.next_run_at ELSE v_sched END,
                rerun_requested = d.rerun_requested OR d.status = 'running',
                updated_at = v_sched_real.t
            FROM (SELECT now() AS t) v_sched_real
            WHERE d.canonical_symbol = v_dep.canonical_symbol AND d.timeframe = v_dep.timeframe
              AND ((d.status = 'idle' AND (d.next_run_at IS NULL OR d.next_run_at > v_sched))
                   OR (d.status = 'running' AND NOT d.rerun_requested));
        END LOOP;
    END LOOP;

    RETURN QUERY
    SELECT m.canonical_symbol, m.timeframe, m.cursor, m.next_run_at
    FROM jsonb_to_recordset(v_done) AS m(canonical_symbol text, timeframe text, cursor timestamptz,
                                         next_run_at timestamptz);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_chain_bounds_citus: _agg_chain_bounds on Citus (it calls this with the chain it found), symbol
-- by symbol and level by level: the first source row at or after each level's cursor and its
-- earliest logged window; the bound is the earliest of them (infinity: none).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_chain_bounds_citus(p_symbols text[], p_tfs text[], p_tables text[],
                                                   p_sources text[])
RETURNS TABLE (canonical_symbol text, bound timestamptz)
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v_sym text;
    v_cursor timestamptz;
    v_first timestamptz;
    v_logged timestamptz;
    v_bound timestamptz;
    v_found boolean;
BEGIN
    FOREACH v_sym IN ARRAY p_symbols LOOP
        v_bound := NULL;
        FOR i IN 1 .. cardinality(p_tfs) LOOP
            SELECT s.last_agg_bar_ts_utc INTO v_cursor FROM public.data_agg_state s
            WHERE s.canonical_symbol = v_sym AND s.timeframe = p_tfs[i];
            v_found := FOUND;
            CONTINUE WHEN NOT v_found;  -- no task at this level: it holds nothing back
            IF p_tables[i] = 'data_bars' THEN
                SELECT b.ts_utc INTO v_first FROM public.data_bars b
                WHERE b.canonical_symbol = v_sym AND b.timeframe = p_sources[i]
                  AND b.ts_utc >= COALESCE(v_cursor, timestamptz '-infinity') AND NOT b.is_partial
                ORDER BY b.ts_utc LIMIT 1;
            ELSE
                SELECT b.ts_utc INTO v_first FROM public.derived_data_bars b
                WHERE b.canonical_symbol = v_sym AND b.timeframe = p_sources[i]
                  AND b.ts_utc >= COALESCE(v_cursor, timestamptz '-infinity')
                  AND b.deleted_at IS NULL AND NOT b.is_partial
                ORDER BY b.ts_utc LIMIT 1;
            END IF;
            SELECT min(v.window_start) INTO v_logged FROM public.agg_invalidations v
            WHERE v.canonical_symbol = v_sym AND v.timeframe = p_tfs[i];
            v_bound := LEAST(v_bound, COALESCE(v_first, timestamptz 'infinity'), COALESCE(v_logged, timestamptz 'infinity'));
        END LOOP;
        canonical_symbol := v_sym;
        bound := COALESCE(v_bound, timestamptz 'infinity');
        RETURN NEXT;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_citus_store_windows: the write half of a re-aggregation on Citus, for one symbol (shared by
-- _agg_reaggregate_citus and _agg_reaggregate_session_citus, which differ in how they find and
-- compute the windows): upsert the recomputed windows (f_*: one element per window, quality NULL:
-- nothing storable), soft-delete the active bars of the windows with nothing storable, add the
-- counts to data_agg_state when log entries were taken (p_taken > 0), and return the result row of
-- agg_reaggregate_tasks. Each statement names the symbol, so each runs on its node.
CREATE OR REPLACE FUNCTION public._agg_citus_store_windows(
    p_to_tf text, p_symbol text, p_derivation_version integer, p_now timestamptz,
    f_ws timestamptz[], f_open double precision[], f_high double precision[], f_low double precision[],
    f_close double precision[], f_vol double precision[], f_vwap double precision[], f_trades integer[],
    f_source integer[], f_expected integer[], f_quality integer[],
    p_windows integer, p_taken integer, p_entries bigint)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_storable bigint;
    v_created bigint;
    v_rewritten bigint;
    v_poor bigint;
    v_withdrawn bigint;
    v_old jsonb;
BEGIN
    SELECT count(*) FILTER (WHERE q IS NOT NULL) INTO v_storable FROM unnest(f_quality) AS q;
    SELECT u.created, u.rewritten, u.poor INTO v_created, v_rewritten, v_poor
    FROM public._agg_citus_upsert(p_to_tf, p_symbol, p_derivation_version, p_now,
                                  f_ws, f_open, f_high, f_low, f_close, f_vol,
                                  f_vwap, f_trades, f_source, f_expected, f_quality) u;
    WITH withdrawn AS (
        UPDATE public.derived_data_bars d
        SET deleted_at = p_now, updated_at = p_now
        WHERE d.canonical_symbol = p_symbol AND d.timeframe = p_to_tf AND d.deleted_at IS NULL
          AND d.ts_utc = ANY (COALESCE(ARRAY(SELECT k.ws FROM unnest(f_ws, f_quality) AS k(ws, q)
                                             WHERE k.q IS NULL), '{}'))
        RETURNING 1
    )
    SELECT count(*) INTO v_withdrawn FROM withdrawn;
    IF p_taken > 0 THEN
        SELECT COALESCE(s.last_run_stats, '{}'::jsonb) INTO v_old FROM public.data_agg_state s
        WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf FOR NO KEY UPDATE;
        UPDATE public.data_agg_state s
        SET total_bars_created = s.total_bars_created + v_created,
            total_bars_rewritten = s.total_bars_rewritten + v_rewritten,
            total_bars_unchanged = s.total_bars_unchanged + (v_storable - v_created - v_rewritten),
            total_bars_quality_poor = s.total_bars_quality_poor + v_poor,
            total_bars_reaggregated = s.total_bars_reaggregated + v_created + v_rewritten,
            total_bars_withdrawn = s.total_bars_withdrawn + v_withdrawn,
            last_run_stats = v_old || jsonb_build_object(
                'windows_reaggregated', COALESCE((v_old->>'windows_reaggregated')::bigint, 0) + p_windows,
                'bars_reaggregated', COALESCE((v_old->>'bars_reaggregated')::bigint, 0) + v_created + v_rewritten,
                'bars_created', COALESCE((v_old->>'bars_created')::bigint, 0) + v_created,
                'bars_rewritten', COALESCE((v_old->>'bars_rewritten')::bigint, 0) + v_rewritten,
                'bars_unchanged', COALESCE((v_old->>'bars_unchanged')::bigint, 0)
                                  + (v_storable - v_created - v_rewritten),
                'bars_quality_poor', COALESCE((v_old->>'bars_quality_poor')::bigint, 0) + v_poor,
                'bars_withdrawn', COALESCE((v_old->>'bars_withdrawn')::bigint, 0) + v_withdrawn),
            updated_at = p_now
        WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf;
    END IF;
    RETURN jsonb_build_object(
        'success', true,
        'windows', p_windows,
        'bars_created', v_created,
        'bars_rewritten', v_rewritten,
        'bars_unchanged', v_storable - v_created - v_rewritten,
        'bars_withdrawn', v_withdrawn,
        'bars_quality_poor', v_poor,
        'bars_reaggregated', v_created + v_rewritten,
        'entries_dropped', p_taken - p_windows,
        'entries_waiting', p_entries - p_taken);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_reaggregate_citus: agg_reaggregate_tasks on Citus (it calls this first there), symbol by symbol.
-- ---------------------------------------------------------------------------------------------
-- The same rules (functions/30_invalidation.sql): take the logged windows that are final or out of
-- range, recompute the final ones in range, upsert the changed bars, withdraw the ones with no
-- storable bar, add the counts to the task; one statement per step, each naming the symbol.
CREATE OR REPLACE FUNCTION public._agg_reaggregate_citus(p_to_tf text, p_symbols text[],
                                                  p_derivation_version integer, p_now_utc timestamptz)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_iv interval := v_tf.bucket_interval;
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_real_now timestamptz := now();
    v_sym text;
    v_cur timestamptz;
    v_start timestamptz;
    v_delay integer;
    v_bound timestamptz;
    v_entries bigint;
    v_take timestamptz[];
    v_due timestamptz[];
    v_taken timestamptz[];
    v_pending timestamptz[];
    f_ws timestamptz[];
    f_open double precision[];
    f_high double precision[];
    f_low double precision[];
    f_close double precision[];
    f_vol double precision[];
    f_vwap double precision[];
    f_trades integer[];
    f_source integer[];
    f_expected integer[];
    f_quality integer[];
BEGIN
    FOREACH v_sym IN ARRAY p_symbols LOOP
        -- Symbols on a trading session, and 1mo: session windows, symbol by symbol.
        IF public._agg_needs_sessions(p_to_tf, ARRAY[v_sym]) THEN
            RETURN QUERY SELECT * FROM public._agg_reaggregate_session_citus(p_to_tf, ARRAY[v_sym],
                                                                            p_derivation_version, p_now_utc);
            CONTINUE;
        END IF;
        v_cur := NULL; v_start := NULL; v_delay := NULL;
        SELECT s.last_agg_bar_ts_utc, s.agg_start_utc, s.aggregation_delay_seconds
        INTO v_cur, v_start, v_delay
        FROM public.data_agg_state s WHERE s.canonical_symbol = v_sym AND s.timeframe = p_to_tf;
        v_delay := COALESCE(v_delay, 0);
        SELECT COALESCE(b.bound, timestamptz 'infinity') INTO v_bound
        FROM public._agg_chain_bounds(p_to_tf, ARRAY[v_sym]) b;
        v_bound := COALESCE(v_bound, timestamptz 'infinity');
        -- entries: which to take (final, or out of range) and which of those to recompute
        SELECT count(*),
               COALESCE(array_agg(x.ws) FILTER (WHERE x.is_final OR NOT x.in_range), '{}'),
               COALESCE(array_agg(x.ws) FILTER (WHERE x.is_final AND x.in_range), '{}')
        INTO v_entries, v_take, v_due
        FROM (SELECT e.window_start AS ws,
                     COALESCE(e.window_start < date_bin(v_iv, v_cur, v_tf.bucket_origin)
                              AND e.window_start >= v_start, false) AS in_range,
                     v_now >= e.window_start + v_iv + make_interval(secs => v_delay)
                         AND e.window_start + v_iv <= v_bound AS is_final
              FROM public.agg_invalidations e
              WHERE e.canonical_symbol = v_sym AND e.timeframe = p_to_tf) x;
        WITH taken AS (
            DELETE FROM public.agg_invalidations i
            WHERE i.canonical_symbol = v_sym AND i.timeframe = p_to_tf AND i.window_start = ANY (v_take)
            RETURNING i.window_start
        )
        SELECT COALESCE(array_agg(t.window_start), '{}') INTO v_taken FROM taken t;
        v_pending := ARRAY(SELECT w FROM unnest(v_taken) AS w WHERE w = ANY (v_due) ORDER BY w);
        -- fresh: the windows recomputed from the current source rows (no row: nothing storable)
        SELECT array_agg(p.ws ORDER BY p.ws), array_agg(w.open ORDER BY p.ws), array_agg(w.high ORDER BY p.ws),
               array_agg(w.low ORDER BY p.ws), array_agg(w.close ORDER BY p.ws), array_agg(w.vol ORDER BY p.ws),
               array_agg(w.vwap ORDER BY p.ws), array_agg(w.trade_count ORDER BY p.ws),
               array_agg(w.source_candles ORDER BY p.ws), array_agg(w.expected_candles ORDER BY p.ws),
               array_agg(w.quality_score ORDER BY p.ws)
        INTO f_ws, f_open, f_high, f_low, f_close, f_vol, f_vwap, f_trades, f_source, f_expected, f_quality
        FROM unnest(v_pending) AS p(ws)
        LEFT JOIN LATERAL public._agg_window_bars(p_to_tf, v_sym, p.ws, p.ws + v_iv) w ON true;
        canonical_symbol := v_sym;
        result := public._agg_citus_store_windows(
            p_to_tf, v_sym, p_derivation_version, v_real_now, f_ws, f_open, f_high, f_low, f_close, f_vol,
            f_vwap, f_trades, f_source, f_expected, f_quality, cardinality(v_pending), cardinality(v_taken),
            v_entries);
        RETURN NEXT;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_catchup_session_citus: agg_catchup_session_tasks (15_sessions.sql) on Citus, symbol by symbol
-- (_agg_catchup_citus hands it the symbols on a trading session, and every 1mo task).
-- ---------------------------------------------------------------------------------------------
-- The same plan (s0, limit, next, frontier, bound, bounded scan; the same session helpers, which read
-- the trading days, a reference table) and the same writes, as one short statement per step, each
-- naming the symbol: the windows come from _agg_session_window_bars (in its Citus form above: one
-- statement on the symbol's node), the bars are upserted from arrays, the withdrawal and the counts as in
-- _agg_catchup_citus. Same result keys, same bars.
CREATE OR REPLACE FUNCTION public._agg_catchup_session_citus(p_to_tf text, p_symbols text[], p_cursors timestamptz[],
                                                      p_max_windows integer, p_now_utc timestamptz,
                                                      p_derivation_version integer, p_ignore_confirmation boolean)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_derived boolean := v_tf.source_table = 'derived_data_bars';
    v_scan_rows integer := p_max_windows * v_tf.max_source_bars;
    v_sym text;
    v_sess text;
    v_sparse boolean;
    v_delay integer;
    v_start timestamptz;
    v_chain timestamptz;
    v_cur timestamptz;
    v_s0 timestamptz;
    v_s0_end timestamptz;
    v_lim timestamptz;
    v_known timestamptz;
    v_next timestamptz;
    v_last timestamptz;
    v_frontier timestamptz;
    v_bound timestamptz;
    v_scan_end timestamptz;
    v_p timestamptz;
    v_recheck boolean;
    w_ts timestamptz[];
    w_open double precision[];
    w_high double precision[];
    w_low double precision[];
    w_close double precision[];
    w_vol double precision[];
    w_vwap double precision[];
    w_trades integer[];
    w_source integer[];
    w_expected integer[];
    w_quality integer[];
    w_end timestamptz[];
    v_handled bigint;
    v_last_we timestamptz;
    v_skipped bigint;
    v_created bigint;
    v_rewritten bigint;
    v_poor bigint;
    v_withdrawn bigint;
    v_new timestamptz;
    v_more boolean;
BEGIN
    FOR i IN 1 .. COALESCE(cardinality(p_symbols), 0) LOOP
        v_sym := p_symbols[i];
        -- input: the task's settings (defaults without a task row), the symbol's session
        v_delay := NULL; v_start := NULL; v_sess := NULL; v_sparse := NULL; v_chain := NULL;
        SELECT st.aggregation_delay_seconds, st.agg_start_utc INTO v_delay, v_start
        FROM public.data_agg_state st WHERE st.canonical_symbol = v_sym AND st.timeframe = p_to_tf;
        v_delay := COALESCE(v_delay, 0);
        v_start := COALESCE(v_start, timestamptz '-infinity');
        SELECT r.session, r.is_sparse INTO v_sess, v_sparse
        FROM public.core_asset_registry_all r WHERE r.canonical_symbol = v_sym;
        v_sess := COALESCE(v_sess, '24x7');
        v_sparse := COALESCE(v_sparse, false);
        IF v_derived THEN
            SELECT b.bound INTO v_chain FROM public._agg_chain_bounds(p_to_tf, ARRAY[v_sym]) b;
        END IF;
        v_chain := COALESCE(v_chain, timestamptz 'infinity');
        -- the plan, as agg_catchup_session_tasks makes it
        v_cur := COALESCE(p_cursors[i], public._agg_session_bootstrap(v_sym, p_to_tf, v_sess, v_start, v_now));
        v_s0 := NULL;
        v_scan_end := NULL;
        v_bound := NULL;
        IF v_cur IS NOT NULL THEN
            -- Rule 1: the first window ending after the cursor that does not start before agg_start.
            SELECT w.ws, w.we INTO v_s0, v_s0_end
            FROM public._agg_session_next_window(v_sess, p_to_tf, GREATEST(v_cur, v_start)) w;
            IF v_s0 < v_start THEN
                SELECT w.ws INTO v_s0 FROM public._agg_session_next_window(v_sess, p_to_tf, v_s0_end) w;
            END IF;
        END IF;
        IF v_s0 IS NOT NULL THEN
            -- Rules 2 and 3.
            v_lim := CASE WHEN p_ignore_confirmation THEN timestamptz 'infinity'
                          ELSE v_now - make_interval(secs => v_delay) END;
            v_lim := LEAST(v_lim, v_chain);
            v_known := public._agg_session_known_end(v_sess, p_to_tf);
            IF v_lim >= v_known THEN
                v_next := v_known;
            ELSE
                v_next := COALESCE((SELECT w.ws FROM public._agg_session_next_window(v_sess, p_to_tf, GREATEST(v_lim, v_s0)) w),
                                   v_known);
            END IF;
            -- Rule 5: the frontier is the first window starting after the last source row.
            v_last := (SELECT e.ts_utc FROM public._agg_source_edge(v_tf.source_table, v_sym, v_tf.source_timeframe, v_s0,
                                                             timestamptz 'infinity', true) e);
            v_frontier := CASE WHEN v_last IS NULL THEN v_s0
                               ELSE COALESCE(public._agg_session_window_after(v_sess, p_to_tf, v_last), v_known) END;
            v_bound := LEAST(v_next, v_frontier);
            v_scan_end := v_bound;
            IF p_max_windows IS NOT NULL THEN
                v_p := (SELECT e.ts_utc FROM public._agg_source_edge(v_tf.source_table, v_sym, v_tf.source_timeframe, v_s0,
                                                              v_bound, false, v_scan_rows - 1) e);
                IF v_p IS NOT NULL THEN
                    v_scan_end := LEAST(v_bound, COALESCE(public._agg_session_window_after(v_sess, p_to_tf, v_p), v_known));
                END IF;
            END IF;
        END IF;
        -- Stored bars at or after s0 (a cursor moved back over them): only then can a window passed
        -- over need a withdrawal. Taken before this call writes.
        v_recheck := v_s0 IS NOT NULL AND EXISTS (
            SELECT 1 FROM public.derived_data_bars d
            WHERE d.canonical_symbol = v_sym AND d.timeframe = p_to_tf AND d.ts_utc >= v_s0 AND d.deleted_at IS NULL);
        -- windows, handled (the first p_max_windows non-empty ones)
        w_ts := NULL;
        IF v_scan_end > v_s0 THEN
            SELECT array_agg(x.ts_utc ORDER BY x.ts_utc), array_agg(x.open ORDER BY x.ts_utc),
                   array_agg(x.high ORDER BY x.ts_utc), array_agg(x.low ORDER BY x.ts_utc),
                   array_agg(x.close ORDER BY x.ts_utc), array_agg(x.vol ORDER BY x.ts_utc),
                   array_agg(x.vwap ORDER BY x.ts_utc), array_agg(x.trade_count ORDER BY x.ts_utc),
                   array_agg(x.source_candles ORDER BY x.ts_utc), array_agg(x.expected_candles ORDER BY x.ts_utc),
                   array_agg(x.quality_score ORDER BY x.ts_utc), array_agg(x.window_end ORDER BY x.ts_utc)
            INTO w_ts, w_open, w_high, w_low, w_close, w_vol, w_vwap, w_trades, w_source, w_expected, w_quality,
                 w_end
            FROM (SELECT * FROM public._agg_session_window_bars(p_to_tf, v_sym, v_sess, v_s0, v_scan_end, v_sparse) y
                  ORDER BY y.ts_utc LIMIT p_max_windows) x;
        END IF;
        v_handled := COALESCE(cardinality(w_ts), 0);
        v_last_we := w_end[v_handled];
        SELECT count(*) FILTER (WHERE q IS NULL) INTO v_skipped FROM unnest(w_quality) AS q;
        -- written: changed bars only (an equal recompute writes nothing)
        SELECT u.created, u.rewritten, u.poor INTO v_created, v_rewritten, v_poor
        FROM public._agg_citus_upsert(p_to_tf, v_sym, p_derivation_version, now(),
                                      w_ts, w_open, w_high, w_low, w_close, w_vol,
                                      w_vwap, w_trades, w_source, w_expected, w_quality) u;
        -- outcome: the new cursor
        v_new := CASE WHEN v_s0 IS NULL THEN v_cur
                      WHEN v_handled >= p_max_windows
                          THEN COALESCE((SELECT n.ws FROM public._agg_session_next_window(v_sess, p_to_tf, v_last_we) n),
                                        v_last_we)
                      WHEN v_scan_end < v_bound THEN v_scan_end
                      ELSE v_bound END;
        v_more := COALESCE(v_handled >= p_max_windows OR v_scan_end < v_bound, false);
        -- withdrawn: stored bars in the windows passed over that have no storable bar now
        v_withdrawn := CASE WHEN v_recheck
                            THEN public._agg_citus_withdraw(p_to_tf, v_sym, v_s0, v_new, w_ts, w_quality) ELSE 0 END;
        canonical_symbol := v_sym;
        result := jsonb_build_object(
            'success', true,
            'windows_processed', v_handled,
            'cursor_advanced_to', v_new,
            'bars_created', v_created,
            'bars_rewritten', v_rewritten,
            'bars_unchanged', v_handled - v_skipped - v_created - v_rewritten,
            'bars_withdrawn', v_withdrawn,
            'bars_quality_poor', v_poor,
            'bars_skipped', v_skipped,
            'gaps_skipped', CASE WHEN v_s0 IS NULL THEN 0
                                 ELSE public._agg_session_window_count(v_sess, p_to_tf, v_s0, v_new) - v_handled END,
            'continue', v_more,
            'agg_start_enforced', v_start);
        RETURN NEXT;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_reaggregate_session_citus: agg_reaggregate_session_tasks (15_sessions.sql) on Citus, symbol by
-- symbol (_agg_reaggregate_citus hands it the symbols on a trading session, and 1mo).
-- ---------------------------------------------------------------------------------------------
-- The same rules: a logged window is a session window start, recomputed when the task has passed it
-- (its end <= the cursor), it does not start before agg_start_utc and it is final (its end + delay has
-- passed, nothing below it in the chain unprocessed before its end); entries outside the range are
-- dropped, others wait. The log is read first (one statement on the symbol's node), the windows are
-- found in the trading days, then take, recompute, upsert, withdraw and count, one statement each.
CREATE OR REPLACE FUNCTION public._agg_reaggregate_session_citus(p_to_tf text, p_symbols text[],
                                                          p_derivation_version integer, p_now_utc timestamptz)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_real_now timestamptz := now();
    v_sym text;
    v_sess text;
    v_cur timestamptz;
    v_start timestamptz;
    v_delay integer;
    v_bound timestamptz;
    v_logged timestamptz[];
    v_entries bigint;
    v_take timestamptz[];
    v_due timestamptz[];
    v_due_end timestamptz[];
    v_taken timestamptz[];
    p_ws timestamptz[];
    p_we timestamptz[];
    f_ws timestamptz[];
    f_open double precision[];
    f_high double precision[];
    f_low double precision[];
    f_close double precision[];
    f_vol double precision[];
    f_vwap double precision[];
    f_trades integer[];
    f_source integer[];
    f_expected integer[];
    f_quality integer[];
BEGIN
    FOREACH v_sym IN ARRAY p_symbols LOOP
        v_cur := NULL; v_start := NULL; v_delay := NULL; v_sess := NULL;
        SELECT s.last_agg_bar_ts_utc, s.agg_start_utc, s.aggregation_delay_seconds
        INTO v_cur, v_start, v_delay
        FROM public.data_agg_state s WHERE s.canonical_symbol = v_sym AND s.timeframe = p_to_tf;
        v_delay := COALESCE(v_delay, 0);
        SELECT r.session INTO v_sess FROM public.core_asset_registry_all r WHERE r.canonical_symbol = v_sym;
        v_sess := COALESCE(v_sess, '24x7');
        SELECT COALESCE(b.bound, timestamptz 'infinity') INTO v_bound
        FROM public._agg_chain_bounds(p_to_tf, ARRAY[v_sym]) b;
        v_bound := COALESCE(v_bound, timestamptz 'infinity');
        -- entries: which to take (final, or out of range) and which of those to recompute
        SELECT COALESCE(array_agg(e.window_start ORDER BY e.window_start), '{}') INTO v_logged
        FROM public.agg_invalidations e WHERE e.canonical_symbol = v_sym AND e.timeframe = p_to_tf;
        SELECT count(*),
               COALESCE(array_agg(x.ws ORDER BY x.ws) FILTER (WHERE x.is_final OR NOT x.in_range), '{}'),
               COALESCE(array_agg(x.ws ORDER BY x.ws) FILTER (WHERE x.is_final AND x.in_range), '{}'),
               COALESCE(array_agg(x.we ORDER BY x.ws) FILTER (WHERE x.is_final AND x.in_range), '{}')
        INTO v_entries, v_take, v_due, v_due_end
        FROM (SELECT e.ws, w.we,
                     COALESCE(w.ws = e.ws AND w.we <= v_cur AND e.ws >= v_start, false) AS in_range,
                     COALESCE(v_now >= w.we + make_interval(secs => v_delay) AND w.we <= v_bound, false) AS is_final
              FROM unnest(v_logged) AS e(ws)
              LEFT JOIN LATERAL public._agg_session_next_window(v_sess, p_to_tf, e.ws) w ON true) x;
        WITH taken AS (
            DELETE FROM public.agg_invalidations i
            WHERE i.canonical_symbol = v_sym AND i.timeframe = p_to_tf AND i.window_start = ANY (v_take)
            RETURNING i.window_start
        )
        SELECT COALESCE(array_agg(t.window_start), '{}') INTO v_taken FROM taken t;
        SELECT COALESCE(array_agg(d.ws ORDER BY d.ws), '{}'), COALESCE(array_agg(d.we ORDER BY d.ws), '{}')
        INTO p_ws, p_we
        FROM unnest(v_due, v_due_end) AS d(ws, we)
        WHERE d.ws = ANY (v_taken);
        -- fresh: the windows recomputed from the current source rows (no row: nothing storable)
        f_ws := NULL; f_quality := NULL;
        SELECT array_agg(p.ws ORDER BY p.ws), array_agg(w.open ORDER BY p.ws), array_agg(w.high ORDER BY p.ws),
               array_agg(w.low ORDER BY p.ws), array_agg(w.close ORDER BY p.ws), array_agg(w.vol ORDER BY p.ws),
               array_agg(w.vwap ORDER BY p.ws), array_agg(w.trade_count ORDER BY p.ws),
               array_agg(w.source_candles ORDER BY p.ws), array_agg(w.expected_candles ORDER BY p.ws),
               array_agg(w.quality_score ORDER BY p.ws)
        INTO f_ws, f_open, f_high, f_low, f_close, f_vol, f_vwap, f_trades, f_source, f_expected, f_quality
        FROM unnest(p_ws, p_we) AS p(ws, we)
        LEFT JOIN LATERAL public._agg_session_window_bars(p_to_tf, v_sym, v_sess, p.ws, p.we) w ON true;
        canonical_symbol := v_sym;
        result := public._agg_citus_store_windows(
            p_to_tf, v_sym, p_derivation_version, v_real_now, f_ws, f_open, f_high, f_low, f_close, f_vol,
            f_vwap, f_trades, f_source, f_expected, f_quality, cardinality(p_ws), cardinality(v_taken),
            v_entries);
        RETURN NEXT;
    END LOOP;
END
$$;
