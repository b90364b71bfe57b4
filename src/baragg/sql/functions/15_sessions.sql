-- Repeatable: the engine for symbols on a trading session (DESIGN.md 3b). The tables are created by
-- migration 0009; the days in agg_session_days are materialised by baragg's Python side.
--
-- A symbol on the 24x7 session keeps the date_bin engine of 10_engine.sql, untouched, for every level
-- but 1mo. Every other symbol, and every 1mo task, goes through the functions below, which cut windows
-- from the session's trading days:
--   interval levels (5m, 15m, 1h, 4h): open + k * interval, the last one clipped at the close;
--   1d: one session [open, close);  1w: the sessions of one ISO week of trading dates;
--   1mo: the sessions of one calendar month of trading dates.
-- Source rows outside every session belong to no window. A window expects the source windows inside
-- it (proportionally fewer when clipped), a day its hours, a week or month its trading days (24x7:
-- Monday-Friday only). For 24x7 the cut equals date_bin's buckets (tests compare the two engines).
--
-- Cursor semantics are those of DESIGN.md 4: the cursor is the start of the next window (at the end of
-- the materialised days: the last known window's end, until the days are extended); gaps (windows
-- without source rows, with later data) are passed over, the frontier stops.

-- ---------------------------------------------------------------------------------------------
-- Window primitives
-- ---------------------------------------------------------------------------------------------
-- The window of p_tf that contains p_ts, or the next one after it: the first window with end > p_ts.
-- No row when it is not known yet (past the materialised days, or a week/month not wholly inside them).
-- Days last at most 48 hours (a CHECK of agg_session_days), so the day around p_ts opens after
-- p_ts - 48 hours: one ordered index probe.
CREATE OR REPLACE FUNCTION public._agg_session_next_window(p_session text, p_tf text, p_ts timestamptz)
RETURNS TABLE (ws timestamptz, we timestamptz, expected integer)
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT w.ws, w.we,
           CASE tf.window_kind
               WHEN 'week' THEN d.week_days::integer
               WHEN 'month' THEN d.month_days::integer
               ELSE ceil(extract(epoch FROM w.we - w.ws)
                         / extract(epoch FROM COALESCE(src.bucket_interval, interval '1 minute')))::integer
           END
    FROM public.agg_timeframes tf
    LEFT JOIN public.agg_timeframes src ON src.timeframe = tf.source_timeframe
    CROSS JOIN LATERAL (
        SELECT x.* FROM public.agg_session_days x
        WHERE x.session = p_session AND x.open_utc > p_ts - interval '48 hours' AND x.close_utc > p_ts
          AND CASE tf.window_kind WHEN 'week' THEN x.week_open IS NOT NULL
                                  WHEN 'month' THEN x.month_open IS NOT NULL ELSE true END
        ORDER BY x.open_utc
        LIMIT 1
    ) d
    CROSS JOIN LATERAL (
        SELECT CASE WHEN p_ts > d.open_utc THEN date_bin(tf.bucket_interval, p_ts, d.open_utc)
                    ELSE d.open_utc END AS start
    ) k
    CROSS JOIN LATERAL (
        SELECT CASE tf.window_kind WHEN 'interval' THEN k.start WHEN 'session' THEN d.open_utc
                                   WHEN 'week' THEN d.week_open ELSE d.month_open END AS ws,
               CASE tf.window_kind WHEN 'interval' THEN LEAST(k.start + tf.bucket_interval, d.close_utc)
                                   WHEN 'session' THEN d.close_utc
                                   WHEN 'week' THEN d.week_close ELSE d.month_close END AS we
    ) w
    WHERE tf.timeframe = p_tf
$$;

-- The window after the one containing p_ts (or the next window when p_ts lies between windows): the
-- first window that starts after p_ts. Used for "the window after the last source row" (the frontier)
-- and for where a bounded scan may stop.
CREATE OR REPLACE FUNCTION public._agg_session_window_after(p_session text, p_tf text, p_ts timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE WHEN a.ws > p_ts THEN a.ws
                ELSE (SELECT b.ws FROM public._agg_session_next_window(p_session, p_tf, a.we) b) END
    FROM public._agg_session_next_window(p_session, p_tf, p_ts) a
$$;

-- Where the known windows end: the end of the last window the materialised days make (NULL: no days).
CREATE OR REPLACE FUNCTION public._agg_session_known_end(p_session text, p_tf text)
RETURNS timestamptz LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE tf.window_kind
               WHEN 'week' THEN (SELECT x.week_close FROM public.agg_session_days x
                                 WHERE x.session = p_session AND x.week_open IS NOT NULL
                                 ORDER BY x.open_utc DESC LIMIT 1)
               WHEN 'month' THEN (SELECT x.month_close FROM public.agg_session_days x
                                  WHERE x.session = p_session AND x.month_open IS NOT NULL
                                  ORDER BY x.open_utc DESC LIMIT 1)
               ELSE (SELECT x.close_utc FROM public.agg_session_days x
                     WHERE x.session = p_session ORDER BY x.open_utc DESC LIMIT 1)
           END
    FROM public.agg_timeframes tf
    WHERE tf.timeframe = p_tf
$$;

-- How many windows start in [p_from, p_to), without making them (a day's interval windows are
-- counted arithmetically).
CREATE OR REPLACE FUNCTION public._agg_session_window_count(p_session text, p_tf text, p_from timestamptz,
                                                     p_to timestamptz)
RETURNS bigint LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT COALESCE(sum(
               CASE tf.window_kind
                   WHEN 'interval' THEN GREATEST(0,
                       LEAST(ceil(extract(epoch FROM d.close_utc - d.open_utc) / extract(epoch FROM tf.bucket_interval)),
                             ceil(extract(epoch FROM p_to - d.open_utc) / extract(epoch FROM tf.bucket_interval)))
                       - GREATEST(0, ceil(extract(epoch FROM p_from - d.open_utc) / extract(epoch FROM tf.bucket_interval))))
                   WHEN 'session' THEN CASE WHEN d.open_utc >= p_from THEN 1 ELSE 0 END
                   WHEN 'week' THEN CASE WHEN d.open_utc = d.week_open AND d.open_utc >= p_from THEN 1 ELSE 0 END
                   ELSE CASE WHEN d.open_utc = d.month_open AND d.open_utc >= p_from THEN 1 ELSE 0 END
               END), 0)::bigint
    FROM public.agg_timeframes tf
    JOIN public.agg_session_days d ON d.session = p_session AND d.open_utc > p_from - interval '48 hours'
                           AND d.open_utc < p_to AND d.close_utc > p_from
    WHERE tf.timeframe = p_tf AND p_to > p_from
$$;

-- ---------------------------------------------------------------------------------------------
-- The aggregation core for sessions: one bar per non-empty window whose source rows lie in
-- [p_from, p_to), which the caller makes window-aligned (a window start or a known window end).
-- Rows are read per trading day (one index range per day) and cut into the day's windows, so a row
-- outside every session is never read. Columns as _agg_window_bars, plus the window's end.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_session_window_bars(p_to_tf text, p_symbol text, p_session text,
                                                    p_from timestamptz, p_to timestamptz,
                                                    p_is_sparse boolean DEFAULT NULL)
RETURNS TABLE (ts_utc timestamptz, open double precision, high double precision, low double precision,
               close double precision, vol double precision, vwap double precision, trade_count integer,
               source_candles integer, expected_candles integer, quality_score integer, window_end timestamptz)
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT w.ws,
           (array_agg(s.open ORDER BY s.ts_utc))[1],
           max(s.high),
           min(s.low),
           (array_agg(s.close ORDER BY s.ts_utc))[count(*)],
           sum(s.vol),
           sum(s.vwap * s.vol) / NULLIF(sum(s.vol) FILTER (WHERE s.vwap IS NOT NULL), 0),
           sum(s.trade_count)::integer,
           count(*)::integer,
           w.expected,
           CASE  -- agg_quality_score(count(*), expected, is_sparse), written out: no function call per bar
               WHEN count(*) >= w.expected THEN 2
               WHEN 5 * count(*) >= 4 * w.expected THEN 1
               WHEN 5 * count(*) >= 3 * w.expected THEN 0
               WHEN 20 * count(*) >= 11 * w.expected THEN -1
               WHEN sp.is_sparse AND count(*) >= 1 THEN -1
           END,
           w.we
    FROM public.agg_timeframes tf
    CROSS JOIN (SELECT COALESCE(p_is_sparse, (SELECT r.is_sparse FROM public.core_asset_registry_all r
                                              WHERE r.canonical_symbol = p_symbol), false) AS is_sparse) sp
    LEFT JOIN public.agg_timeframes src ON src.timeframe = tf.source_timeframe
    JOIN public.agg_session_days d ON d.session = p_session AND d.open_utc > p_from - interval '48 hours'
                           AND d.open_utc < p_to AND d.close_utc > p_from
    CROSS JOIN LATERAL public._agg_source_bars(tf.source_table, p_symbol, tf.source_timeframe,
                                        GREATEST(d.open_utc, p_from), LEAST(d.close_utc, p_to)) s
    CROSS JOIN LATERAL (
        SELECT date_bin(tf.bucket_interval, s.ts_utc, d.open_utc) AS start
    ) k
    CROSS JOIN LATERAL (
        SELECT CASE tf.window_kind WHEN 'interval' THEN k.start WHEN 'session' THEN d.open_utc
                                   WHEN 'week' THEN d.week_open ELSE d.month_open END AS ws,
               CASE tf.window_kind WHEN 'interval' THEN LEAST(k.start + tf.bucket_interval, d.close_utc)
                                   WHEN 'session' THEN d.close_utc
                                   WHEN 'week' THEN d.week_close ELSE d.month_close END AS we,
               CASE tf.window_kind
                   WHEN 'week' THEN d.week_days::integer
                   WHEN 'month' THEN d.month_days::integer
                   WHEN 'session' THEN ceil(extract(epoch FROM d.close_utc - d.open_utc)
                                            / extract(epoch FROM COALESCE(src.bucket_interval, interval '1 minute')))::integer
                   ELSE ceil(extract(epoch FROM LEAST(k.start + tf.bucket_interval, d.close_utc) - k.start)
                             / extract(epoch FROM COALESCE(src.bucket_interval, interval '1 minute')))::integer
               END AS expected
    ) w
    WHERE tf.timeframe = p_to_tf AND w.ws IS NOT NULL
    GROUP BY w.ws, w.we, w.expected, sp.is_sparse
$$;

-- ---------------------------------------------------------------------------------------------
-- Bootstrap (DESIGN.md 4) on a session: the window containing max(agg_start_utc, the first source row
-- at or after it), or the next window when that instant lies between sessions; with no source data,
-- the window containing now (or the next one). NULL when the days do not reach that far yet.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_session_bootstrap(p_symbol text, p_tf text, p_session text,
                                                  p_agg_start timestamptz, p_now timestamptz)
RETURNS timestamptz LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v_first timestamptz;
BEGIN
    v_first := public._agg_chain_first_ts(p_symbol, p_tf, p_agg_start);
    RETURN (SELECT w.ws FROM public._agg_session_next_window(p_session, p_tf, COALESCE(v_first, p_now)) w);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_catchup_session_tasks: agg_catchup_tasks (same parameters and result) for symbols on a
-- session, and for 1mo. Planned per task (a few index probes each), then ONE statement aggregates and
-- writes every task's windows: no call per window.
--
--   s0       = the first window with end > cursor and start >= agg_start_utc       (rule 1)
--   limit    = min(now - delay, first unprocessed input of the source task)        (rules 2, 3)
--   next     = the first window from s0 ending after limit, or the end of the known windows
--   frontier = the first window starting after the last source row (s0 without any)  (rule 5)
--   bound    = min(next, frontier): every window starting in [s0, bound) is final and has later data
--              or is non-empty; the non-empty ones are aggregated (the first p_max_windows), the
--              empty ones are gaps (rules 4-6)
--   scan     = with p_max_windows, rows are read only up to the window after the
--              (p_max_windows * max_source_bars)-th source row (at least that many windows' worth)
--   cursor   = the window after the p_max_windows-th non-empty one when the bound was reached
--              (continue), the scan's end when the scan stopped short (continue), else bound.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.agg_catchup_session_tasks(p_to_tf text, p_symbols text[], p_cursors timestamptz[],
                                                     p_max_windows integer DEFAULT 100,
                                                     p_now_utc timestamptz DEFAULT NULL,
                                                     p_derivation_version integer DEFAULT 1,
                                                     p_ignore_confirmation boolean DEFAULT false)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' SET plan_cache_mode = 'force_custom_plan' AS $$
#variable_conflict use_column
DECLARE
    -- RETURNING xmax cannot tell an insert from an update on a partitioned table: a bar whose id was
    -- drawn after this (monotonic sequence) is new.
    v_id_floor bigint := pg_catalog.nextval('public.derived_data_bars_id_seq'::regclass);
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_derived boolean := v_tf.source_table = 'derived_data_bars';
    v_scan_rows integer := p_max_windows * v_tf.max_source_bars;
    r record;
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
    a_sym text[] := '{}';
    a_ord bigint[] := '{}';
    a_sess text[] := '{}';
    a_sparse boolean[] := '{}';
    a_start timestamptz[] := '{}';
    a_cur timestamptz[] := '{}';
    a_s0 timestamptz[] := '{}';
    a_scan timestamptz[] := '{}';
    a_bound timestamptz[] := '{}';
    a_recheck boolean[] := '{}';
BEGIN
    IF p_max_windows IS NOT NULL AND p_max_windows < 1 THEN
        RAISE EXCEPTION 'p_max_windows must be at least 1 (or NULL for no bound), got %', p_max_windows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_symbols) IS DISTINCT FROM cardinality(p_cursors) THEN
        RAISE EXCEPTION 'p_symbols and p_cursors differ in length (% vs %)',
            cardinality(p_symbols), cardinality(p_cursors) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT count(DISTINCT x) FROM unnest(p_symbols) x) <> cardinality(p_symbols) THEN
        RAISE EXCEPTION 'p_symbols must be distinct and not NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR r IN
        SELECT u.sym, u.ord, u.cur,
               COALESCE(st.aggregation_delay_seconds, 0) AS delay_seconds,
               COALESCE(st.agg_start_utc, timestamptz '-infinity') AS agg_start_utc,
               COALESCE(reg.is_sparse, false) AS is_sparse,
               COALESCE(reg.session, '24x7') AS sess,
               COALESCE(cb.bound, timestamptz 'infinity') AS chain_bound
        FROM unnest(p_symbols, p_cursors) WITH ORDINALITY AS u(sym, cur, ord)
        LEFT JOIN public.data_agg_state st ON st.canonical_symbol = u.sym AND st.timeframe = p_to_tf
        LEFT JOIN public.core_asset_registry_all reg ON reg.canonical_symbol = u.sym
        -- Rule 3, recursive down the chain (10_engine.sql): one bound per task, cursors and rows only.
        LEFT JOIN public._agg_chain_bounds(p_to_tf, p_symbols) cb ON v_derived AND cb.canonical_symbol = u.sym
        ORDER BY u.ord
    LOOP
        v_cur := COALESCE(r.cur, public._agg_session_bootstrap(r.sym, p_to_tf, r.sess, r.agg_start_utc, v_now));
        v_s0 := NULL;
        v_scan_end := NULL;
        v_bound := NULL;
        IF v_cur IS NOT NULL THEN
            -- Rule 1: the first window ending after the cursor that does not start before agg_start.
            SELECT w.ws, w.we INTO v_s0, v_s0_end
            FROM public._agg_session_next_window(r.sess, p_to_tf, GREATEST(v_cur, r.agg_start_utc)) w;
            IF v_s0 < r.agg_start_utc THEN
                SELECT w.ws INTO v_s0 FROM public._agg_session_next_window(r.sess, p_to_tf, v_s0_end) w;
            END IF;
        END IF;
        IF v_s0 IS NOT NULL THEN
            -- Rules 2 and 3.
            v_lim := CASE WHEN p_ignore_confirmation THEN timestamptz 'infinity'
                          ELSE v_now - make_interval(secs => r.delay_seconds) END;
            v_lim := LEAST(v_lim, r.chain_bound);
            v_known := public._agg_session_known_end(r.sess, p_to_tf);
            IF v_lim >= v_known THEN
                v_next := v_known;
            ELSE
                v_next := COALESCE((SELECT w.ws FROM public._agg_session_next_window(r.sess, p_to_tf, GREATEST(v_lim, v_s0)) w),
                                   v_known);
            END IF;
            -- Rule 5: the frontier is the first window starting after the last source row.
            v_last := (SELECT e.ts_utc FROM public._agg_source_edge(v_tf.source_table, r.sym, v_tf.source_timeframe, v_s0,
                                                             timestamptz 'infinity', true) e);
            v_frontier := CASE WHEN v_last IS NULL THEN v_s0
                               ELSE COALESCE(public._agg_session_window_after(r.sess, p_to_tf, v_last), v_known) END;
            v_bound := LEAST(v_next, v_frontier);
            v_scan_end := v_bound;
            IF p_max_windows IS NOT NULL THEN
                v_p := (SELECT e.ts_utc FROM public._agg_source_edge(v_tf.source_table, r.sym, v_tf.source_timeframe, v_s0,
                                                              v_bound, false, v_scan_rows - 1) e);
                IF v_p IS NOT NULL THEN
                    v_scan_end := LEAST(v_bound, COALESCE(public._agg_session_window_after(r.sess, p_to_tf, v_p), v_known));
                END IF;
            END IF;
        END IF;
        a_sym := a_sym || r.sym;
        a_ord := a_ord || r.ord;
        a_sess := a_sess || r.sess;
        a_sparse := a_sparse || r.is_sparse;
        a_start := a_start || r.agg_start_utc;
        a_cur := a_cur || v_cur;
        a_s0 := a_s0 || v_s0;
        a_scan := a_scan || v_scan_end;
        a_bound := a_bound || v_bound;
        -- Stored bars at or after s0 (a cursor moved back over them): only then can a window passed
        -- over need a withdrawal (as the date_bin engine does). Taken before this call writes.
        a_recheck := a_recheck || COALESCE(v_s0 IS NOT NULL AND EXISTS (
            SELECT 1 FROM public.derived_data_bars d
            WHERE d.canonical_symbol = r.sym AND d.timeframe = p_to_tf AND d.ts_utc >= v_s0
              AND d.deleted_at IS NULL), false);
    END LOOP;

    RETURN QUERY
    WITH plan AS (
        SELECT * FROM unnest(a_sym, a_ord, a_sess, a_sparse, a_start, a_cur, a_s0, a_scan, a_bound, a_recheck)
            AS p(sym, ord, sess, is_sparse, agg_start_utc, cur, s0, scan_end, bound, recheck)
    ),
    windows AS (
        SELECT p.sym, w.*
        FROM (SELECT * FROM plan ORDER BY sym) p  -- neighbouring symbols share heap pages (10_engine.sql)
        CROSS JOIN LATERAL (
            SELECT x.*, row_number() OVER (ORDER BY x.ts_utc) AS rn
            FROM public._agg_session_window_bars(p_to_tf, p.sym, p.sess, p.s0, p.scan_end, p.is_sparse) x
        ) w
        WHERE p.scan_end > p.s0
    ),
    handled AS (
        SELECT w.* FROM windows w WHERE p_max_windows IS NULL OR w.rn <= p_max_windows
    ),
    written AS (
        INSERT INTO public.derived_data_bars AS d (
            canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
            is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
            quality_score, derivation_version, raw, deleted_at)
        SELECT h.sym, p_to_tf, h.ts_utc, h.open, h.high, h.low, h.close, h.vol, h.vwap, h.trade_count,
               false, 'agg', now(), v_tf.source_timeframe, h.source_candles, h.expected_candles,
               h.quality_score, p_derivation_version, '{}'::jsonb, NULL
        FROM handled h
        WHERE h.quality_score IS NOT NULL
        ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
        DO UPDATE SET
            open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
            vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
            is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
            source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
            expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
            derivation_version = excluded.derivation_version, raw = excluded.raw, updated_at = now()
        -- (a recomputed window equal to its stored bar writes nothing: counted as unchanged)
        WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial,
               d.source_timeframe, d.source_candles, d.expected_candles, d.quality_score,
               d.derivation_version)
              IS DISTINCT FROM
              (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,
               excluded.trade_count, false, excluded.source_timeframe, excluded.source_candles,
               excluded.expected_candles, excluded.quality_score, excluded.derivation_version)
        RETURNING d.canonical_symbol, d.quality_score, (d.id > v_id_floor) AS inserted
    ),
    handled_counts AS (
        SELECT h.sym, count(*) AS n_handled, max(h.window_end) AS last_we,
               count(*) FILTER (WHERE h.quality_score IS NULL) AS n_skipped
        FROM handled h GROUP BY h.sym
    ),
    written_counts AS (
        SELECT w.canonical_symbol AS sym, count(*) FILTER (WHERE w.inserted) AS n_created,
               count(*) FILTER (WHERE NOT w.inserted) AS n_rewritten,
               count(*) FILTER (WHERE w.quality_score <= 0) AS n_poor
        FROM written w GROUP BY w.canonical_symbol
    ),
    outcome AS (
        SELECT p.sym, p.ord, p.sess, p.s0, p.agg_start_utc, p.recheck,
               COALESCE(hc.n_handled, 0) AS n_handled, COALESCE(hc.n_skipped, 0) AS n_skipped,
               COALESCE(wc.n_created, 0) AS n_created, COALESCE(wc.n_rewritten, 0) AS n_rewritten,
               COALESCE(wc.n_poor, 0) AS n_poor,
               CASE WHEN p.s0 IS NULL THEN p.cur
                    WHEN hc.n_handled >= p_max_windows
                        THEN COALESCE((SELECT n.ws FROM public._agg_session_next_window(p.sess, p_to_tf, hc.last_we) n),
                                      hc.last_we)
                    WHEN p.scan_end < p.bound THEN p.scan_end
                    ELSE p.bound
               END AS new_cursor,
               COALESCE(hc.n_handled >= p_max_windows OR p.scan_end < p.bound, false) AS more
        FROM plan p
        LEFT JOIN handled_counts hc ON hc.sym = p.sym
        LEFT JOIN written_counts wc ON wc.sym = p.sym
    ),
    withdrawn AS (
        -- Stored bars in the windows this call passed over that no longer have a storable bar (a gap
        -- now, too few source rows, or no window there any more): soft-deleted. Only a cursor moved
        -- back over stored bars finds any (recheck).
        UPDATE public.derived_data_bars d
        SET deleted_at = now(), updated_at = now()
        FROM outcome o
        WHERE o.recheck AND d.canonical_symbol = o.sym AND d.timeframe = p_to_tf
          AND d.ts_utc >= o.s0 AND d.ts_utc < o.new_cursor AND d.deleted_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM handled h
                          WHERE h.sym = o.sym AND h.ts_utc = d.ts_utc AND h.quality_score IS NOT NULL)
        RETURNING d.canonical_symbol
    ),
    withdrawn_counts AS (
        SELECT w.canonical_symbol AS sym, count(*) AS n_withdrawn FROM withdrawn w GROUP BY 1
    )
    SELECT o.sym, jsonb_build_object(
               'success', true,
               'windows_processed', o.n_handled,
               'cursor_advanced_to', o.new_cursor,
               'bars_created', o.n_created,
               'bars_rewritten', o.n_rewritten,
               'bars_unchanged', o.n_handled - o.n_skipped - o.n_created - o.n_rewritten,
               'bars_withdrawn', COALESCE(wd.n_withdrawn, 0),
               'bars_quality_poor', o.n_poor,
               'bars_skipped', o.n_skipped,
               'gaps_skipped', CASE WHEN o.s0 IS NULL THEN 0
                                    ELSE public._agg_session_window_count(o.sess, p_to_tf, o.s0, o.new_cursor) - o.n_handled
                               END,
               'continue', o.more,
               'agg_start_enforced', o.agg_start_utc)
    FROM outcome o
    LEFT JOIN withdrawn_counts wd ON wd.sym = o.sym
    ORDER BY o.ord;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The split: agg_catchup_tasks hands the symbols on a session (and every 1mo task) to
-- agg_catchup_session_tasks and keeps the 24x7 ones on its date_bin path. Rows in input order.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_catchup_split(p_to_tf text, p_symbols text[], p_cursors timestamptz[],
                                              p_max_windows integer, p_now_utc timestamptz,
                                              p_derivation_version integer, p_ignore_confirmation boolean)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    v_plain_syms text[];
    v_plain_curs timestamptz[];
    v_sess_syms text[];
    v_sess_curs timestamptz[];
    v_out_syms text[] := '{}';
    v_out jsonb[] := '{}';
    v_syms text[];
    v_res jsonb[];
BEGIN
    SELECT COALESCE(array_agg(u.sym ORDER BY u.ord) FILTER (WHERE NOT u.on_session), '{}'),
           COALESCE(array_agg(u.cur ORDER BY u.ord) FILTER (WHERE NOT u.on_session), '{}'),
           COALESCE(array_agg(u.sym ORDER BY u.ord) FILTER (WHERE u.on_session), '{}'),
           COALESCE(array_agg(u.cur ORDER BY u.ord) FILTER (WHERE u.on_session), '{}')
    INTO v_plain_syms, v_plain_curs, v_sess_syms, v_sess_curs
    FROM (SELECT x.sym, x.cur, x.ord,
                 p_to_tf = '1mo' OR COALESCE(r.session, '24x7') <> '24x7' AS on_session
          FROM unnest(p_symbols, p_cursors) WITH ORDINALITY AS x(sym, cur, ord)
          LEFT JOIN public.core_asset_registry_all r ON r.canonical_symbol = x.sym) u;
    IF cardinality(v_plain_syms) > 0 THEN
        SELECT array_agg(c.canonical_symbol), array_agg(c.result) INTO v_syms, v_res
        FROM public.agg_catchup_tasks(p_to_tf, v_plain_syms, v_plain_curs, p_max_windows, p_now_utc,
                               p_derivation_version, p_ignore_confirmation) c;
        v_out_syms := v_out_syms || v_syms;
        v_out := v_out || v_res;
    END IF;
    IF cardinality(v_sess_syms) > 0 THEN
        SELECT array_agg(c.canonical_symbol), array_agg(c.result) INTO v_syms, v_res
        FROM public.agg_catchup_session_tasks(p_to_tf, v_sess_syms, v_sess_curs, p_max_windows, p_now_utc,
                                       p_derivation_version, p_ignore_confirmation) c;
        v_out_syms := v_out_syms || v_syms;
        v_out := v_out || v_res;
    END IF;
    RETURN QUERY
    SELECT t.sym, t.res
    FROM unnest(v_out_syms, v_out) AS t(sym, res)
    JOIN unnest(p_symbols) WITH ORDINALITY AS x(sym, ord) ON x.sym = t.sym
    ORDER BY x.ord;
END
$$;

-- Whether a catch-up of these symbols needs the session engine (the hook in agg_catchup_tasks).
CREATE OR REPLACE FUNCTION public._agg_needs_sessions(p_to_tf text, p_symbols text[])
RETURNS boolean LANGUAGE sql STABLE SET search_path = '' AS $$
    -- The registry's partial index on symbols off 24x7 (migration 0009) makes this free when every
    -- symbol is on 24x7.
    SELECT p_to_tf = '1mo'
        OR EXISTS (SELECT 1 FROM public.core_asset_registry_all r
                   WHERE r.session <> '24x7' AND r.canonical_symbol = ANY (p_symbols))
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_rebuild_symbol: after a symbol's session (or is_sparse) changed, rebuild what it affects from
-- the stored sources, in the caller's transaction (registry add/set call it with the change).
-- ---------------------------------------------------------------------------------------------
-- Level by level up the ladder (5m before 1h before 1d ...), for the windows each task has passed
-- (from its first window at or after agg_start_utc to its cursor): recompute every window of the
-- symbol's current session from the current source rows, write the bars that differ (an equal bar is
-- not rewritten, so levels the change does not affect stay as they were), and soft-delete every other
-- active bar of the level: windows that no longer exist, windows now empty or below the quality
-- threshold, and the window the cursor is in (the catch-up builds it). Cursors are not moved: an
-- unaligned cursor counts from the window it lies in. Nothing is hard-deleted.
-- The symbol's task rows are locked first (key order), so no catch-up of the old windows runs
-- meanwhile and late rows written meanwhile are logged after this commits; the symbol's invalidation
-- log entries are then superseded and removed, and its tasks become due.
-- Result: {"symbol", "session", "levels": {tf: {"written": n, "withdrawn": n}}}.
CREATE OR REPLACE FUNCTION public.agg_rebuild_symbol(p_symbol text, p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_session text;
    v_sparse boolean;
    t record;
    v_on_session boolean;
    v_from timestamptz;
    v_s0_end timestamptz;
    v_to timestamptz;
    v_written bigint;
    v_withdrawn bigint;
    v_levels jsonb := '{}'::jsonb;
BEGIN
    SELECT COALESCE(r.session, '24x7'), COALESCE(r.is_sparse, false) INTO v_session, v_sparse
    FROM public.core_asset_registry_all r WHERE r.canonical_symbol = p_symbol;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown symbol %', p_symbol USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM public.data_agg_state s WHERE s.canonical_symbol = p_symbol
    ORDER BY s.canonical_symbol, s.timeframe FOR NO KEY UPDATE;

    FOR t IN
        SELECT s.timeframe, s.last_agg_bar_ts_utc AS cur, s.agg_start_utc, tf.bucket_interval, tf.bucket_origin,
               tf.window_kind, tf.source_timeframe
        FROM public.data_agg_state s JOIN public.agg_timeframes tf ON tf.timeframe = s.timeframe
        WHERE s.canonical_symbol = p_symbol
        ORDER BY tf.duration_rank
    LOOP
        v_on_session := v_session <> '24x7' OR t.window_kind = 'month';
        IF v_on_session THEN
            SELECT w.ws, w.we INTO v_from, v_s0_end FROM public._agg_session_next_window(v_session, t.timeframe, t.agg_start_utc) w;
            IF v_from < t.agg_start_utc THEN
                SELECT w.ws INTO v_from FROM public._agg_session_next_window(v_session, t.timeframe, v_s0_end) w;
            END IF;
            v_to := LEAST(t.cur, COALESCE((SELECT w.ws FROM public._agg_session_next_window(v_session, t.timeframe, t.cur) w),
                                          t.cur));
        ELSE
            IF t.agg_start_utc = '-infinity' THEN
                v_from := t.agg_start_utc;  -- no explicit start: from the first source row
            ELSE
                v_from := date_bin(t.bucket_interval, t.agg_start_utc, t.bucket_origin);
                IF v_from < t.agg_start_utc THEN
                    v_from := v_from + t.bucket_interval;
                END IF;
            END IF;
            v_to := date_bin(t.bucket_interval, t.cur, t.bucket_origin);
        END IF;
        IF v_from IS NULL OR v_to IS NULL OR v_to < v_from THEN
            v_to := v_from;
        END IF;
        WITH fresh AS (
            SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count, b.source_candles,
                   b.expected_candles, b.quality_score
            FROM public._agg_session_window_bars(t.timeframe, p_symbol, v_session, v_from, v_to, v_sparse) b
            WHERE v_on_session AND v_from < v_to AND b.quality_score IS NOT NULL
            UNION ALL
            SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count, b.source_candles,
                   b.expected_candles, b.quality_score
            FROM public._agg_window_bars(t.timeframe, p_symbol, v_from, v_to, v_sparse) b
            WHERE NOT v_on_session AND v_from < v_to AND b.quality_score IS NOT NULL
        ),
        written AS (
            INSERT INTO public.derived_data_bars AS d (
                canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
                is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
                quality_score, derivation_version, raw, deleted_at)
            SELECT p_symbol, t.timeframe, f.ts_utc, f.open, f.high, f.low, f.close, f.vol, f.vwap, f.trade_count,
                   false, 'agg', now(), t.source_timeframe, f.source_candles, f.expected_candles,
                   f.quality_score, p_derivation_version, '{}'::jsonb, NULL
            FROM fresh f
            ORDER BY f.ts_utc
            ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
            DO UPDATE SET
                open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
                vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
                is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
                source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
                expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
                derivation_version = excluded.derivation_version, updated_at = excluded.ingested_at  -- (= now(); Citus: no function here)
            WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial,
                   d.source_timeframe, d.source_candles, d.expected_candles, d.quality_score,
                   d.derivation_version)
                  IS DISTINCT FROM
                  (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,
                   excluded.trade_count, false, excluded.source_timeframe, excluded.source_candles,
                   excluded.expected_candles, excluded.quality_score, excluded.derivation_version)
            RETURNING 1
        ),
        withdrawn AS (
            UPDATE public.derived_data_bars d
            SET deleted_at = now(), updated_at = now()
            WHERE d.canonical_symbol = p_symbol AND d.timeframe = t.timeframe AND d.deleted_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM fresh f WHERE f.ts_utc = d.ts_utc)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM withdrawn) INTO v_written, v_withdrawn;
        v_levels := v_levels || jsonb_build_object(t.timeframe,
                                                   jsonb_build_object('written', v_written, 'withdrawn', v_withdrawn));
    END LOOP;

    -- Everything logged for the symbol so far (including by the writes above) is rebuilt already.
    DELETE FROM public.agg_invalidations i WHERE i.canonical_symbol = p_symbol;
    UPDATE public.data_agg_state s SET next_run_at = NULL, updated_at = now()
    WHERE s.canonical_symbol = p_symbol AND s.status = 'idle';
    RETURN jsonb_build_object('symbol', p_symbol, 'session', v_session, 'levels', v_levels);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Hooks for the other function files: the same questions for a 24x7 symbol (date_bin, as before)
-- and for a symbol on a session. "Is the symbol off 24x7" is an index probe that the registry's
-- partial index (migration 0009) answers at once while every symbol is on 24x7.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_session_of(p_symbol text, p_tf text)
RETURNS text LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE WHEN p_tf = '1mo' THEN COALESCE((SELECT r.session FROM public.core_asset_registry_all r
                                                 WHERE r.canonical_symbol = p_symbol), '24x7')
                ELSE (SELECT r.session FROM public.core_asset_registry_all r
                      WHERE r.session <> '24x7' AND r.canonical_symbol = p_symbol) END
$$;

-- How long the window at p_cursor is, i.e. when it ends (cursor + length): p_interval for 24x7,
-- the session window's end otherwise (NULL when it is not known yet). For scheduling (20_scheduling.sql).
CREATE OR REPLACE FUNCTION public._agg_window_length(p_symbol text, p_tf text, p_cursor timestamptz, p_interval interval)
RETURNS interval LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE WHEN p_cursor IS NULL OR s.sess IS NULL THEN p_interval
                ELSE (SELECT w.we FROM public._agg_session_next_window(s.sess, p_tf, p_cursor) w) - p_cursor END
    FROM (SELECT public._agg_session_of(p_symbol, p_tf) AS sess) s
$$;

-- The window of a changed source row at p_ts, if the dependent task (cursor p_cursor) has passed it
-- already: for the invalidation triggers (30_invalidation.sql). No row when it has not, or when the
-- row lies outside every session window.
CREATE OR REPLACE FUNCTION public._agg_passed_window(p_symbol text, p_tf text, p_interval interval, p_origin timestamptz,
                                              p_ts timestamptz, p_cursor timestamptz)
RETURNS TABLE (ws timestamptz) LANGUAGE sql STABLE SET search_path = '' AS $$
    -- (_agg_session_of written out: this function is inlined into the triggers' queries, and a scalar
    -- SQL function with sub-selects would be a function call per row)
    SELECT x.ws
    FROM (SELECT CASE WHEN p_tf = '1mo'
                      THEN COALESCE((SELECT r.session FROM public.core_asset_registry_all r
                                     WHERE r.canonical_symbol = p_symbol), '24x7')
                      ELSE (SELECT r.session FROM public.core_asset_registry_all r
                            WHERE r.session <> '24x7' AND r.canonical_symbol = p_symbol) END AS sess) s
    CROSS JOIN LATERAL (
        SELECT date_bin(p_interval, p_ts, p_origin) AS ws
        WHERE s.sess IS NULL
          AND date_bin(p_interval, p_ts, p_origin) < date_bin(p_interval, p_cursor, p_origin)
        UNION ALL
        SELECT w.ws FROM public._agg_session_next_window(s.sess, p_tf, p_ts) w
        WHERE s.sess IS NOT NULL AND w.ws <= p_ts AND w.we <= p_cursor
    ) x
$$;

-- ---------------------------------------------------------------------------------------------
-- Re-aggregation of logged windows (DESIGN.md 5) for symbols on a session: agg_reaggregate_tasks
-- (30_invalidation.sql, same parameters, result and finality) hands them here. A logged window is a
-- session window start; it is recomputed when the task has passed it (its end <= the cursor), it does
-- not start before agg_start_utc, and it is final (its end + delay has passed and nothing below it in
-- the chain is unprocessed before its end); entries outside the range are dropped, others wait.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION IF EXISTS public.agg_reaggregate_session_tasks(text, text[], integer);
CREATE OR REPLACE FUNCTION public.agg_reaggregate_session_tasks(p_to_tf text, p_symbols text[],
                                                         p_derivation_version integer DEFAULT 1,
                                                         p_now_utc timestamptz DEFAULT NULL)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' SET plan_cache_mode = 'force_custom_plan' AS $$
#variable_conflict use_column
DECLARE
    -- RETURNING xmax cannot tell an insert from an update on a partitioned table: a bar whose id was
    -- drawn after this (monotonic sequence) is new.
    v_id_floor bigint := pg_catalog.nextval('public.derived_data_bars_id_seq'::regclass);
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_now timestamptz := COALESCE(p_now_utc, now());
BEGIN
    RETURN QUERY
    WITH input AS (
        SELECT u.sym, u.ord, COALESCE(r.session, '24x7') AS sess
        FROM unnest(p_symbols) WITH ORDINALITY AS u(sym, ord)
        LEFT JOIN public.core_asset_registry_all r ON r.canonical_symbol = u.sym
    ),
    settings AS (
        SELECT i.sym, i.sess, s.last_agg_bar_ts_utc AS cur, s.agg_start_utc,
               COALESCE(s.aggregation_delay_seconds, 0) AS delay_seconds,
               COALESCE(b.bound, timestamptz 'infinity') AS bound
        FROM input i
        LEFT JOIN public.data_agg_state s ON s.canonical_symbol = i.sym AND s.timeframe = p_to_tf
        LEFT JOIN public._agg_chain_bounds(p_to_tf, p_symbols) b ON b.canonical_symbol = i.sym
    ),
    entries AS (
        -- A logged window is a session window start; it ends where the session says (w.we).
        SELECT st.sym, st.sess, e.window_start AS ws, w.we,
               COALESCE(w.ws = e.window_start AND w.we <= st.cur AND e.window_start >= st.agg_start_utc,
                        false) AS in_range,
               COALESCE(v_now >= w.we + make_interval(secs => st.delay_seconds) AND w.we <= st.bound,
                        false) AS is_final
        FROM settings st
        JOIN public.agg_invalidations e ON e.canonical_symbol = st.sym AND e.timeframe = p_to_tf
        LEFT JOIN LATERAL public._agg_session_next_window(st.sess, p_to_tf, e.window_start) w ON true
    ),
    taken AS (
        DELETE FROM public.agg_invalidations i
        USING entries e
        WHERE i.canonical_symbol = e.sym AND i.timeframe = p_to_tf AND i.window_start = e.ws
          AND (e.is_final OR NOT e.in_range)
        RETURNING i.canonical_symbol AS sym, i.window_start AS ws
    ),
    pending AS (
        SELECT k.sym, k.ws, e.we, e.sess
        FROM taken k
        JOIN entries e ON e.sym = k.sym AND e.ws = k.ws
        WHERE e.in_range AND e.is_final
    ),
    fresh AS (
        SELECT p.sym, p.ws, w.open, w.high, w.low, w.close, w.vol, w.vwap, w.trade_count,
               w.source_candles, w.expected_candles, w.quality_score
        FROM pending p
        LEFT JOIN LATERAL public._agg_session_window_bars(p_to_tf, p.sym, p.sess, p.ws, p.we) w ON true
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
            derivation_version = excluded.derivation_version, updated_at = now()
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

-- The split for agg_reaggregate_tasks: session symbols (and 1mo) here, the others on its date_bin path.
DROP FUNCTION IF EXISTS public._agg_reaggregate_split(text, text[], integer);
CREATE OR REPLACE FUNCTION public._agg_reaggregate_split(p_to_tf text, p_symbols text[], p_derivation_version integer,
                                                  p_now_utc timestamptz)
RETURNS TABLE (canonical_symbol text, result jsonb)
LANGUAGE plpgsql SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    v_plain text[];
    v_sess text[];
    v_out_syms text[] := '{}';
    v_out jsonb[] := '{}';
    v_syms text[];
    v_res jsonb[];
BEGIN
    SELECT COALESCE(array_agg(x.sym ORDER BY x.ord) FILTER (WHERE public._agg_session_of(x.sym, p_to_tf) IS NULL), '{}'),
           COALESCE(array_agg(x.sym ORDER BY x.ord) FILTER (WHERE public._agg_session_of(x.sym, p_to_tf) IS NOT NULL), '{}')
    INTO v_plain, v_sess
    FROM unnest(p_symbols) WITH ORDINALITY AS x(sym, ord);
    IF cardinality(v_plain) > 0 THEN
        SELECT array_agg(c.canonical_symbol), array_agg(c.result) INTO v_syms, v_res
        FROM public.agg_reaggregate_tasks(p_to_tf, v_plain, p_derivation_version, p_now_utc) c;
        v_out_syms := v_out_syms || v_syms;
        v_out := v_out || v_res;
    END IF;
    IF cardinality(v_sess) > 0 THEN
        SELECT array_agg(c.canonical_symbol), array_agg(c.result) INTO v_syms, v_res
        FROM public.agg_reaggregate_session_tasks(p_to_tf, v_sess, p_derivation_version, p_now_utc) c;
        v_out_syms := v_out_syms || v_syms;
        v_out := v_out || v_res;
    END IF;
    RETURN QUERY
    SELECT t.sym, t.res
    FROM unnest(v_out_syms, v_out) AS t(sym, res)
    JOIN unnest(p_symbols) WITH ORDINALITY AS x(sym, ord) ON x.sym = t.sym
    ORDER BY x.ord;
END
$$;

-- A task's frontier (status and the status page): the start of the first window that the source data
-- does not cover completely, given the end of the newest source bar. 24x7: date_bin, as before.
CREATE OR REPLACE FUNCTION public._agg_frontier(p_symbol text, p_tf text, p_newest_end timestamptz,
                                         p_interval interval, p_origin timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT CASE WHEN s.sess IS NULL THEN date_bin(p_interval, p_newest_end, p_origin)
                ELSE (SELECT w.ws FROM public._agg_session_next_window(s.sess, p_tf, p_newest_end) w) END
    FROM (SELECT public._agg_session_of(p_symbol, p_tf) AS sess) s
$$;

-- ---------------------------------------------------------------------------------------------
-- The seed's single-window functions for a symbol on a session (aggregate_window and
-- agg_recompute_windows hand them over): a window is one of the session's windows.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_session_aggregate_window(p_symbol text, p_to_tf text, p_session text,
                                                         p_from_utc timestamptz, p_to_utc timestamptz,
                                                         p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_bar record;
BEGIN
    IF p_from_utc IS NULL OR p_to_utc IS NULL OR NOT EXISTS (
        SELECT 1 FROM public._agg_session_next_window(p_session, p_to_tf, p_from_utc) w
        WHERE w.ws = p_from_utc AND w.we = p_to_utc) THEN
        RAISE EXCEPTION 'window [%, %) is not one % window of session %', p_from_utc, p_to_utc, p_to_tf, p_session
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_bar FROM public._agg_session_window_bars(p_to_tf, p_symbol, p_session, p_from_utc, p_to_utc);
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', true, 'stored', false, 'source_count', 0,
                                  'quality_score', NULL, 'reason', 'no_source_bars');
    END IF;
    IF v_bar.quality_score IS NULL THEN
        RETURN jsonb_build_object('success', true, 'stored', false, 'source_count', v_bar.source_candles,
                                  'quality_score', NULL, 'reason', 'insufficient_source_bars');
    END IF;
    PERFORM public._upsert_derived_bar(p_symbol, p_to_tf, v_bar.ts_utc, v_bar.open, v_bar.high, v_bar.low,
        v_bar.close, v_bar.vol, v_bar.vwap, v_bar.trade_count, 'agg', v_tf.source_timeframe,
        v_bar.source_candles, v_bar.expected_candles, v_bar.quality_score, p_derivation_version, '{}');
    RETURN jsonb_build_object('success', true, 'stored', true, 'source_count', v_bar.source_candles,
                              'quality_score', v_bar.quality_score);
END
$$;

CREATE OR REPLACE FUNCTION public._agg_session_recompute_windows(p_symbol text, p_to_tf text, p_session text,
                                                          p_window_starts timestamptz[],
                                                          p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_result jsonb;
BEGIN
    WITH wanted AS (
        -- the session window containing each instant (instants outside every window: none)
        SELECT DISTINCT w.ws, w.we
        FROM unnest(p_window_starts) AS x(ts)
        CROSS JOIN LATERAL public._agg_session_next_window(p_session, p_to_tf, x.ts) w
        WHERE x.ts IS NOT NULL AND w.ws <= x.ts
    ),
    fresh AS (
        SELECT b.*
        FROM wanted x
        CROSS JOIN LATERAL public._agg_session_window_bars(p_to_tf, p_symbol, p_session, x.ws, x.we) b
        WHERE b.quality_score IS NOT NULL
    ),
    written AS (
        INSERT INTO public.derived_data_bars AS d (
            canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
            is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
            quality_score, derivation_version, raw, deleted_at)
        SELECT p_symbol, p_to_tf, f.ts_utc, f.open, f.high, f.low, f.close, f.vol, f.vwap, f.trade_count,
               false, 'agg', now(), v_tf.source_timeframe, f.source_candles, f.expected_candles,
               f.quality_score, p_derivation_version, '{}'::jsonb, NULL
        FROM fresh f
        ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
        DO UPDATE SET
            open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
            vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
            is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
            source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
            expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
            derivation_version = excluded.derivation_version, raw = excluded.raw, updated_at = excluded.ingested_at  -- (= now(); Citus: no function here)
        RETURNING d.quality_score
    ),
    removed AS (
        UPDATE public.derived_data_bars d
        SET deleted_at = now(), updated_at = now()
        FROM wanted x
        WHERE d.canonical_symbol = p_symbol AND d.timeframe = p_to_tf AND d.ts_utc = x.ws
          AND d.deleted_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM fresh f WHERE f.ts_utc = x.ws)
        RETURNING d.ts_utc
    )
    SELECT jsonb_build_object(
               'success', true,
               'windows', (SELECT count(*) FROM wanted),
               'bars_written', (SELECT count(*) FROM written),
               'bars_deleted', (SELECT count(*) FROM removed),
               'bars_quality_poor', (SELECT count(*) FROM written w WHERE w.quality_score <= 0))
    INTO v_result;
    RETURN v_result;
END
$$;
