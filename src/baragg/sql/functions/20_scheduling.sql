-- Repeatable: scheduling, claiming and failures (DESIGN.md sections 6 and 7); the columns they use are
-- added by migration 0003.

-- Helpers of earlier versions, now written into the statements that used them (below).
DROP FUNCTION IF EXISTS public._agg_lease_end(timestamptz, timestamptz);
DROP FUNCTION IF EXISTS public._agg_schedule_clock(timestamptz);
DROP FUNCTION IF EXISTS public._agg_is_due(boolean, text, timestamptz, timestamptz, timestamptz, timestamptz);
DROP FUNCTION IF EXISTS public._agg_owner_gone(text, integer, integer[]);
DROP FUNCTION IF EXISTS public._agg_stats_add(jsonb, jsonb);
DROP FUNCTION IF EXISTS public._agg_next_run(timestamptz, interval, integer, integer, boolean, timestamptz);

-- ---------------------------------------------------------------------------------------------
-- Rules written into the statements that use them (not helper functions)
-- ---------------------------------------------------------------------------------------------
-- Every function here pins search_path (SET search_path = '': Supabase's linter, lint 0011), and
-- PostgreSQL never inlines a SQL function that has a SET clause; a helper evaluated per task row
-- would then run through the function executor once per row (a claim reads every task row). So these
-- small rules are written out where they are used, each with its name in a comment:
--
--   schedule clock  LEAST(COALESCE(p_now_utc, now()), now())
--       The clock of scheduling (when a task is due, its next run, retries, leases): the caller's
--       fixed clock (p_now_utc, for replays and tests), but never one ahead of the database's real
--       clock. A run with a clock in the future (`baragg run --once --now ... --force`) must not leave
--       next runs or leases in that future, where a later real-time worker would wait for them. The
--       caller's clock still decides finality (which windows are built).
--   lease end       COALESCE(s.lease_expires_at, s.running_started_at_utc + interval '5 minutes', '-infinity')
--       When a running task's claim ends: its lease, or for a row claimed by the seed's agg_start (no
--       lease column then) five minutes after it started.
--   due             s.enabled AND (s.next_run_at IS NULL OR s.next_run_at <= clock)
--                   AND (s.status IN ('idle', 'hard_failed') OR (s.status = 'running' AND lease end <= clock))
--       DESIGN.md 6: enabled, idle (or hard_failed: still retried) or running with an expired lease,
--       and next_run_at reached (NULL: never scheduled, so due), by the schedule clock.
--   owner gone      s.status = 'running' AND s.lease_session IS NOT NULL AND NOT (s.lease_session = ANY (live keys))
--       A running task whose owner's database session has ended (its worker lock is gone).
--   next run        see _agg_finish_ok.

-- Worker sessions (migration 0006): every baragg worker connection holds the session-level advisory
-- lock pg_advisory_lock(1650553447, key) for its lifetime; a claim records the key in lease_session.
-- The lock dies with the session (process killed, connection cut, server restarted), so a running
-- task whose lease_session holds no lock any more has no one working on it and is claimable at once.
-- Keys of the worker locks held in this database now (one scan of pg_locks per statement).
CREATE OR REPLACE FUNCTION public._agg_live_sessions()
RETURNS integer[] LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT COALESCE(array_agg(l.objid::text::bigint::integer), '{}')
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.classid = 1650553447::oid AND l.objsubid = 2 AND l.granted
      AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
$$;

-- The key of the worker lock this session holds, or NULL (a caller without one: lease only).
CREATE OR REPLACE FUNCTION public._agg_my_session()
RETURNS integer LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT min(l.objid::text::bigint)::integer
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.classid = 1650553447::oid AND l.objsubid = 2 AND l.granted
      AND l.pid = pg_backend_pid()
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_get_due_tasks: the seed's signature (new parameter last), read-only
-- ---------------------------------------------------------------------------------------------
-- p_env_name is kept for the seed's callers; the environment decides which tasks exist and are
-- enabled (sync_agg_state_from_registry), so due tasks need no second filter.
-- Order: mandatory first, then timeframe by duration (the ladder's bucket_interval: 5m before 1h,
-- where text order put '1h' first), task_priority ascending, least recently successful first.
CREATE OR REPLACE FUNCTION public.agg_get_due_tasks(p_env_name text DEFAULT 'prod', p_limit integer DEFAULT 10,
    p_now_utc timestamptz DEFAULT now())
RETURNS TABLE (canonical_symbol text, timeframe text, source_timeframe text, last_agg_bar_ts_utc timestamptz,
               run_interval_minutes integer, aggregation_delay_seconds integer, is_mandatory boolean,
               task_priority integer)
LANGUAGE sql STABLE SET search_path = '' AS $$
    WITH live AS MATERIALIZED (
        SELECT public._agg_live_sessions() AS keys, LEAST(COALESCE(p_now_utc, now()), now()) AS clock
    )
    SELECT s.canonical_symbol, s.timeframe, s.source_timeframe, s.last_agg_bar_ts_utc, s.run_interval_minutes,
           s.aggregation_delay_seconds, s.is_mandatory, s.task_priority
    FROM public.data_agg_state s
    JOIN public.agg_timeframes t ON t.timeframe = s.timeframe
    CROSS JOIN live
    WHERE s.enabled
      AND (  -- due
             ((s.next_run_at IS NULL OR s.next_run_at <= live.clock)
              AND (s.status IN ('idle', 'hard_failed')
                   OR (s.status = 'running'
                       AND COALESCE(s.lease_expires_at, s.running_started_at_utc + interval '5 minutes',
                                    '-infinity') <= live.clock)))
             -- or its owner is gone
          OR (s.status = 'running' AND s.lease_session IS NOT NULL AND NOT (s.lease_session = ANY (live.keys))))
    ORDER BY s.is_mandatory DESC, t.bucket_interval, s.task_priority, s.last_successful_at_utc NULLS FIRST,
             s.canonical_symbol
    LIMIT p_limit
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_claim_tasks: claim up to p_limit due tasks in one statement, each with a lease
-- ---------------------------------------------------------------------------------------------
-- FOR UPDATE SKIP LOCKED: concurrent claimers never wait for each other and never take the same
-- row (a row claimed meanwhile is re-checked against the WHERE and dropped). A claim of a running
-- task whose lease expired, or whose owner's database session ended (owner gone), is a rescue:
-- counted, and the reason kept in last_rescue and last_error (and returned as rescue_reason). The
-- claim records this session's worker lock (lease_session) and backend pid with the lease.
-- Rows come back in due order.
DROP FUNCTION IF EXISTS public.agg_claim_tasks(text, integer, integer, timestamptz, text[], text[]);
CREATE OR REPLACE FUNCTION public.agg_claim_tasks(p_worker_id text, p_limit integer DEFAULT 10,
    p_lease_seconds integer DEFAULT 300, p_now_utc timestamptz DEFAULT now(),
    p_symbols text[] DEFAULT NULL, p_timeframes text[] DEFAULT NULL)
RETURNS TABLE (canonical_symbol text, timeframe text, source_timeframe text, last_agg_bar_ts_utc timestamptz,
               run_interval_minutes integer, aggregation_delay_seconds integer, is_mandatory boolean,
               task_priority integer, agg_start_utc timestamptz, lease_expires_at timestamptz,
               rescued_from text, rescue_reason text)
LANGUAGE plpgsql SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    -- This session's worker lock and the live ones, read here, where the worker's session is: on
    -- Citus the statement below runs on the node holding the symbol's shard.
    v_keys integer[] := public._agg_live_sessions();
    v_mine integer := public._agg_my_session();
    v_backend integer := pg_backend_pid();
BEGIN
    RETURN QUERY
    WITH live AS MATERIALIZED (
        SELECT v_keys AS keys, v_mine AS mine, v_backend AS backend,
               LEAST(COALESCE(p_now_utc, now()), now()) AS clock,  -- the schedule clock
               COALESCE(p_now_utc, now()) AS at,
               LEAST(COALESCE(p_now_utc, now()), now()) + make_interval(secs => p_lease_seconds) AS lease_until
    ), due AS (
        SELECT s.canonical_symbol, s.timeframe, s.status AS old_status,
               CASE WHEN s.status <> 'running' THEN NULL
                    WHEN l.lease_end > COALESCE(p_now_utc, now())
                         AND s.lease_session IS NOT NULL AND NOT (s.lease_session = ANY (live.keys))  -- owner gone
                    THEN format('the database session of worker %s (backend pid %s) ended before its lease ran out'
                                || ' at %s; reclaimed by %s at %s',
                                COALESCE(s.lease_owner, '(unknown)'), COALESCE(s.lease_backend_pid::text, '?'),
                                l.lease_end, p_worker_id, COALESCE(p_now_utc, now()))
                    ELSE format('lease of worker %s expired at %s; reclaimed by %s at %s',
                                COALESCE(s.lease_owner, '(unknown)'), l.lease_end, p_worker_id,
                                COALESCE(p_now_utc, now()))
               END AS reason,
               s.lease_owner AS old_owner,
               -- (built here, not in the UPDATE: Citus allows no stable function of a column there)
               jsonb_build_object('worker', p_worker_id, 'claimed_at', live.at,
                                  'cursor_before', s.last_agg_bar_ts_utc) AS stats
        FROM public.data_agg_state s
        JOIN public.agg_timeframes t ON t.timeframe = s.timeframe
        CROSS JOIN live
        CROSS JOIN LATERAL (SELECT COALESCE(s.lease_expires_at, s.running_started_at_utc + interval '5 minutes',
                                            '-infinity') AS lease_end) l
        WHERE s.enabled
          AND (  -- due
                 ((s.next_run_at IS NULL OR s.next_run_at <= live.clock)
                  AND (s.status IN ('idle', 'hard_failed') OR (s.status = 'running' AND l.lease_end <= live.clock)))
                 -- or its owner is gone
              OR (s.status = 'running' AND s.lease_session IS NOT NULL AND NOT (s.lease_session = ANY (live.keys))))
          AND (p_symbols IS NULL OR s.canonical_symbol = ANY (p_symbols))
          AND (p_timeframes IS NULL OR s.timeframe = ANY (p_timeframes))
        ORDER BY s.is_mandatory DESC, t.bucket_interval, s.task_priority, s.last_successful_at_utc NULLS FIRST,
                 s.canonical_symbol
        LIMIT p_limit
        FOR UPDATE OF s SKIP LOCKED
    ), claimed AS (
        UPDATE public.data_agg_state s
        SET status = 'running',
            lease_owner = p_worker_id,
            lease_expires_at = live.lease_until,
            lease_session = live.mine,
            lease_backend_pid = live.backend,
            running_started_at_utc = live.at,
            last_attempted_at_utc = live.at,
            rerun_requested = false,
            last_run_stats = due.stats,
            total_rescues = s.total_rescues + CASE WHEN due.old_status = 'running' THEN 1 ELSE 0 END,
            last_rescue = COALESCE(due.reason, s.last_rescue),
            last_error = COALESCE(due.reason, s.last_error),
            updated_at = now()
        FROM due, live
        WHERE s.canonical_symbol = due.canonical_symbol AND s.timeframe = due.timeframe
          AND (p_symbols IS NULL OR s.canonical_symbol = ANY (p_symbols))  -- (Citus: the symbol's shard only)
        RETURNING s.canonical_symbol, s.timeframe, s.source_timeframe, s.last_agg_bar_ts_utc,
                  s.run_interval_minutes, s.aggregation_delay_seconds, s.is_mandatory, s.task_priority,
                  s.agg_start_utc, s.lease_expires_at,
                  CASE WHEN due.old_status = 'running' THEN COALESCE(due.old_owner, '(unknown)') END AS rescued_from,
                  due.reason AS rescue_reason,
                  s.last_successful_at_utc
    )
    SELECT c.canonical_symbol, c.timeframe, c.source_timeframe, c.last_agg_bar_ts_utc, c.run_interval_minutes,
           c.aggregation_delay_seconds, c.is_mandatory, c.task_priority, c.agg_start_utc, c.lease_expires_at,
           c.rescued_from, c.rescue_reason
    FROM claimed c
    JOIN public.agg_timeframes t ON t.timeframe = c.timeframe
    ORDER BY c.is_mandatory DESC, t.bucket_interval, c.task_priority, c.last_successful_at_utc NULLS FIRST,
             c.canonical_symbol;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_start: claim one task (the seed's signature, new parameters last)
-- ---------------------------------------------------------------------------------------------
-- Returns {"success": won, "claimed": won, ...}; when the claim is lost it says why (not found,
-- disabled, held by a live lease, not due yet, busy). Without p_worker_id the owner is named after
-- the database session, as the seed's RPC callers know no worker id.
CREATE OR REPLACE FUNCTION public.agg_start(p_symbol text, p_to_tf text, p_now_utc timestamptz DEFAULT now(),
    p_worker_id text DEFAULT NULL, p_lease_seconds integer DEFAULT 300)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_owner text := COALESCE(p_worker_id, format('session:%s', pg_backend_pid()));
    v_claim record;
    v_row public.data_agg_state%ROWTYPE;
    v_reason text;
BEGIN
    SELECT * INTO v_claim
    FROM public.agg_claim_tasks(v_owner, 1, p_lease_seconds, v_now, ARRAY[p_symbol], ARRAY[p_to_tf]);
    IF FOUND THEN
        RETURN jsonb_build_object('success', true, 'claimed', true, 'worker_id', v_owner,
            'lease_expires_at', v_claim.lease_expires_at, 'cursor', v_claim.last_agg_bar_ts_utc,
            'rescued_from', v_claim.rescued_from);
    END IF;
    SELECT * INTO v_row FROM public.data_agg_state s WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf;
    IF NOT FOUND THEN
        v_reason := 'no such task';
    ELSIF NOT EXISTS (SELECT 1 FROM public.agg_timeframes t WHERE t.timeframe = p_to_tf) THEN
        v_reason := format('timeframe %s is not in agg_timeframes', p_to_tf);
    ELSIF NOT v_row.enabled THEN
        v_reason := 'task is not enabled';
    ELSIF v_row.status = 'disabled' THEN
        v_reason := 'task was disabled after repeated hard failures';
    ELSIF v_row.status = 'running'
          AND COALESCE(v_row.lease_expires_at, v_row.running_started_at_utc + interval '5 minutes', '-infinity')
              > LEAST(v_now, now()) THEN
        v_reason := format('held by %s until %s', COALESCE(v_row.lease_owner, '(unknown)'),
                           COALESCE(v_row.lease_expires_at, v_row.running_started_at_utc + interval '5 minutes'));
    ELSIF v_row.next_run_at > LEAST(v_now, now()) THEN
        v_reason := format('not due until %s', v_row.next_run_at);
    ELSE
        v_reason := 'being claimed by another worker';
    END IF;
    RETURN jsonb_build_object('success', false, 'claimed', false, 'reason', v_reason,
                              'status', v_row.status, 'lease_owner', v_row.lease_owner);
END $$;

-- ---------------------------------------------------------------------------------------------
-- agg_checkpoint: store progress of a running task (call it in the transaction of the bars)
-- ---------------------------------------------------------------------------------------------
-- Moves the cursor, adds the call's counters, renews the lease. Changes nothing unless the caller
-- still owns the task; the worker then rolls back, so bars and cursor commit together or not at all.
CREATE OR REPLACE FUNCTION public.agg_checkpoint(p_symbol text, p_to_tf text, p_worker_id text,
    p_new_cursor_utc timestamptz, p_stats jsonb DEFAULT NULL, p_now_utc timestamptz DEFAULT now(),
    p_lease_seconds integer DEFAULT 300)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_lease timestamptz;
BEGIN
    UPDATE public.data_agg_state s
    SET last_agg_bar_ts_utc = COALESCE(p_new_cursor_utc, s.last_agg_bar_ts_utc),
        total_windows_processed = s.total_windows_processed + COALESCE((p_stats->>'windows_processed')::bigint, 0),
        total_bars_created = s.total_bars_created + COALESCE((p_stats->>'bars_created')::bigint, 0),
        total_bars_rewritten = s.total_bars_rewritten + COALESCE((p_stats->>'bars_rewritten')::bigint, 0),
        total_bars_unchanged = s.total_bars_unchanged + COALESCE((p_stats->>'bars_unchanged')::bigint, 0),
        total_bars_withdrawn = s.total_bars_withdrawn + COALESCE((p_stats->>'bars_withdrawn')::bigint, 0),
        total_bars_quality_poor = s.total_bars_quality_poor + COALESCE((p_stats->>'bars_quality_poor')::bigint, 0),
        total_bars_skipped = s.total_bars_skipped + COALESCE((p_stats->>'bars_skipped')::bigint, 0),
        total_gaps_skipped = s.total_gaps_skipped + COALESCE((p_stats->>'gaps_skipped')::bigint, 0),
        -- stats add: the call's counters added to the claim's running sum (as in _agg_finish_ok)
        last_run_stats = COALESCE(s.last_run_stats, '{}'::jsonb) || jsonb_build_object(
            'windows_processed', COALESCE((s.last_run_stats->>'windows_processed')::bigint, 0) + COALESCE((p_stats->>'windows_processed')::bigint, 0),
            'bars_created', COALESCE((s.last_run_stats->>'bars_created')::bigint, 0) + COALESCE((p_stats->>'bars_created')::bigint, 0),
            'bars_rewritten', COALESCE((s.last_run_stats->>'bars_rewritten')::bigint, 0) + COALESCE((p_stats->>'bars_rewritten')::bigint, 0),
            'bars_unchanged', COALESCE((s.last_run_stats->>'bars_unchanged')::bigint, 0) + COALESCE((p_stats->>'bars_unchanged')::bigint, 0),
            'bars_withdrawn', COALESCE((s.last_run_stats->>'bars_withdrawn')::bigint, 0) + COALESCE((p_stats->>'bars_withdrawn')::bigint, 0),
            'bars_quality_poor', COALESCE((s.last_run_stats->>'bars_quality_poor')::bigint, 0) + COALESCE((p_stats->>'bars_quality_poor')::bigint, 0),
            'bars_skipped', COALESCE((s.last_run_stats->>'bars_skipped')::bigint, 0) + COALESCE((p_stats->>'bars_skipped')::bigint, 0),
            'gaps_skipped', COALESCE((s.last_run_stats->>'gaps_skipped')::bigint, 0) + COALESCE((p_stats->>'gaps_skipped')::bigint, 0),
            'calls', COALESCE((s.last_run_stats->>'calls')::bigint, 0) + 1),
        lease_expires_at = GREATEST(s.lease_expires_at, LEAST(v_now, now()) + make_interval(secs => p_lease_seconds)),
        updated_at = now()
    WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf
      AND s.status = 'running' AND s.lease_owner = p_worker_id
    RETURNING s.lease_expires_at INTO v_lease;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('changed', false, 'reason', format('task %s %s is not held by %s',
                                                                     p_symbol, p_to_tf, p_worker_id));
    END IF;
    RETURN jsonb_build_object('changed', true, 'lease_expires_at', v_lease);
END $$;

-- ---------------------------------------------------------------------------------------------
-- Successful finishes, set-based (agg_finish and agg_finish_many share this)
-- ---------------------------------------------------------------------------------------------
-- Finishes the successful claims in p_items ({"canonical_symbol", "timeframe", "new_cursor_utc",
-- "stats"}) held by p_worker_id (NULL: by anyone), in two statements whatever their number, and
-- wakes the tasks built from those that moved. Returns the tasks it finished.
CREATE OR REPLACE FUNCTION public._agg_finish_ok(p_worker_id text, p_items jsonb, p_now_utc timestamptz)
RETURNS TABLE (out_symbol text, out_timeframe text, out_cursor timestamptz, out_next_run_at timestamptz)
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_sched timestamptz := LEAST(COALESCE(p_now_utc, now()), now());  -- schedule clock: next runs never after the real clock
    v_items jsonb;
    v_symbols text[];
    v_timeframes text[];
    v_owned jsonb;
    v_done jsonb;
    v_moved text[];
BEGIN
    -- Citus (`baragg db distribute`): task by task, each statement on one shard (50_citus.sql).
    IF public._agg_on_citus() THEN
        RETURN QUERY SELECT * FROM public._agg_finish_ok_citus(p_worker_id, p_items, p_now_utc);
        RETURN;
    END IF;
    SELECT jsonb_object_agg((e->>'canonical_symbol') || ' ' || (e->>'timeframe'), e),
           array_agg(DISTINCT e->>'canonical_symbol'), array_agg(DISTINCT e->>'timeframe')
    INTO v_items, v_symbols, v_timeframes
    FROM jsonb_array_elements(p_items) e;
    -- Lock the rows still held by the caller, in key order. Looked up by key (= ANY), so the
    -- planner never pairs the two sets in a nested loop (a million comparisons for a thousand
    -- tasks), and the UPDATE below joins on the key alone.
    SELECT COALESCE(jsonb_agg(v_items -> (o.canonical_symbol || ' ' || o.timeframe)), '[]'::jsonb)
    INTO v_owned
    FROM (SELECT s.canonical_symbol, s.timeframe
          FROM public.data_agg_state s
          WHERE s.canonical_symbol = ANY (v_symbols) AND s.timeframe = ANY (v_timeframes)
            AND v_items ? (s.canonical_symbol || ' ' || s.timeframe)
            AND s.status = 'running' AND (p_worker_id IS NULL OR s.lease_owner = p_worker_id)
          ORDER BY s.canonical_symbol, s.timeframe
          FOR UPDATE OF s) o;

    WITH items AS (
        SELECT e->>'canonical_symbol' AS sym, e->>'timeframe' AS tf,
               (e->>'new_cursor_utc')::timestamptz AS cur, COALESCE(e->'stats', '{}'::jsonb) AS st
        FROM jsonb_array_elements(v_owned) e
    ), input AS (
        -- The next window to become final: the one at the cursor, or an earlier logged window still
        -- waiting (DESIGN.md 5), whichever comes first; and its length: a session's window may be
        -- clipped or shorter (24x7 symbols are told apart inline: a function call per task would cost
        -- ~0.1 ms). The rows are locked above, so these are the values the UPDATE sees.
        SELECT it.*, nx.win,
               CASE WHEN it.tf = '1mo' OR EXISTS (SELECT 1 FROM public.core_asset_registry_all r
                                                  WHERE r.session <> '24x7' AND r.canonical_symbol = it.sym)
                    THEN public._agg_window_length(it.sym, it.tf, nx.win, t.bucket_interval)
                    ELSE t.bucket_interval END AS win_length
        FROM items it
        JOIN public.data_agg_state s0 ON s0.canonical_symbol = it.sym AND s0.timeframe = it.tf
        LEFT JOIN public.agg_timeframes t ON t.timeframe = it.tf
        CROSS JOIN LATERAL (
            SELECT LEAST(COALESCE(it.cur, s0.last_agg_bar_ts_utc),
                         (SELECT min(v.window_start) FROM public.agg_invalidations v
                          WHERE v.canonical_symbol = it.sym AND v.timeframe = it.tf)) AS win
        ) nx
    ), upd AS (
        UPDATE public.data_agg_state s
        SET status = 'idle',
            lease_owner = NULL,
            lease_expires_at = NULL,
            lease_session = NULL,
            lease_backend_pid = NULL,
            rerun_requested = false,
            last_agg_bar_ts_utc = COALESCE(i.cur, s.last_agg_bar_ts_utc),
            last_successful_at_utc = v_now,
            hard_fail_streak = 0,
            last_error = NULL,
            total_runs = s.total_runs + 1,
            total_windows_processed = s.total_windows_processed + COALESCE((i.st->>'windows_processed')::bigint, 0),
            total_bars_created = s.total_bars_created + COALESCE((i.st->>'bars_created')::bigint, 0),
            total_bars_rewritten = s.total_bars_rewritten + COALESCE((i.st->>'bars_rewritten')::bigint, 0),
            total_bars_unchanged = s.total_bars_unchanged + COALESCE((i.st->>'bars_unchanged')::bigint, 0),
            total_bars_withdrawn = s.total_bars_withdrawn + COALESCE((i.st->>'bars_withdrawn')::bigint, 0),
            total_bars_quality_poor = s.total_bars_quality_poor + COALESCE((i.st->>'bars_quality_poor')::bigint, 0),
            total_bars_skipped = s.total_bars_skipped + COALESCE((i.st->>'bars_skipped')::bigint, 0),
            total_gaps_skipped = s.total_gaps_skipped + COALESCE((i.st->>'gaps_skipped')::bigint, 0),
            -- 'moved' (from the old row: the cursor moved, windows were handled or logged windows
            -- re-aggregated during this claim; catchup_aggregation_range notes a cursor it stored
            -- itself) decides below whether the tasks built from this one are woken.
            -- stats add (as in agg_checkpoint)
            last_run_stats = COALESCE(s.last_run_stats, '{}'::jsonb)
                || jsonb_build_object(
                    'windows_processed', COALESCE((s.last_run_stats->>'windows_processed')::bigint, 0) + COALESCE((i.st->>'windows_processed')::bigint, 0),
                    'bars_created', COALESCE((s.last_run_stats->>'bars_created')::bigint, 0) + COALESCE((i.st->>'bars_created')::bigint, 0),
                    'bars_rewritten', COALESCE((s.last_run_stats->>'bars_rewritten')::bigint, 0) + COALESCE((i.st->>'bars_rewritten')::bigint, 0),
                    'bars_unchanged', COALESCE((s.last_run_stats->>'bars_unchanged')::bigint, 0) + COALESCE((i.st->>'bars_unchanged')::bigint, 0),
                    'bars_withdrawn', COALESCE((s.last_run_stats->>'bars_withdrawn')::bigint, 0) + COALESCE((i.st->>'bars_withdrawn')::bigint, 0),
                    'bars_quality_poor', COALESCE((s.last_run_stats->>'bars_quality_poor')::bigint, 0) + COALESCE((i.st->>'bars_quality_poor')::bigint, 0),
                    'bars_skipped', COALESCE((s.last_run_stats->>'bars_skipped')::bigint, 0) + COALESCE((i.st->>'bars_skipped')::bigint, 0),
                    'gaps_skipped', COALESCE((s.last_run_stats->>'gaps_skipped')::bigint, 0) + COALESCE((i.st->>'gaps_skipped')::bigint, 0),
                    'calls', COALESCE((s.last_run_stats->>'calls')::bigint, 0) + 1)
                || jsonb_build_object('outcome', 'ok', 'finished_at', v_now,
                                      'cursor_after', COALESCE(i.cur, s.last_agg_bar_ts_utc),
                                      'continue', COALESCE((i.st->>'continue')::boolean, false),
                                      'moved', COALESCE(i.cur, s.last_agg_bar_ts_utc) IS DISTINCT FROM s.last_agg_bar_ts_utc
                                               OR COALESCE((s.last_run_stats->>'windows_processed')::bigint, 0)
                                                  + COALESCE((i.st->>'windows_processed')::bigint, 0) > 0
                                               OR COALESCE((s.last_run_stats->>'windows_reaggregated')::bigint, 0) > 0
                                               OR COALESCE((s.last_run_stats->>'cursor_moved')::boolean, false)),
            -- next run: now when a backlog remains or its source advanced meanwhile; else when the next
            -- window (input.win) becomes final: its end (win + win_length) plus the delay; one minute
            -- from now when that moment has passed already (the window is final but could not be built:
            -- no source data yet, or the source task is behind, whose finish wakes this task anyway);
            -- without a cursor, after the task's run interval.
            next_run_at = CASE
                WHEN COALESCE((i.st->>'continue')::boolean, false) OR s.rerun_requested THEN v_sched
                WHEN i.win IS NULL OR i.win_length IS NULL
                    THEN v_sched + make_interval(mins => COALESCE(s.run_interval_minutes, 5))
                WHEN i.win + i.win_length + make_interval(secs => COALESCE(s.aggregation_delay_seconds, 0)) <= v_sched
                    THEN v_sched + interval '1 minute'
                ELSE i.win + i.win_length + make_interval(secs => COALESCE(s.aggregation_delay_seconds, 0))
            END,
            updated_at = now()
        FROM input i
        WHERE s.canonical_symbol = i.sym AND s.timeframe = i.tf
        RETURNING s.canonical_symbol, s.timeframe, s.last_agg_bar_ts_utc, s.next_run_at,
                  (s.last_run_stats->>'moved')::boolean AS moved
    )
    SELECT COALESCE(jsonb_agg(jsonb_build_object('canonical_symbol', u.canonical_symbol, 'timeframe', u.timeframe,
                                                 'cursor', u.last_agg_bar_ts_utc, 'next_run_at', u.next_run_at,
                                                 'moved', u.moved)), '[]'::jsonb)
    INTO v_done FROM upd u;

    -- Wake the tasks built from the ones that moved (new source rows may exist), if their next
    -- window (at the cursor, or an earlier logged one that may have waited for this task: rule 3)
    -- is final already (else they are scheduled for that moment anyway): idle ones become due now,
    -- running ones run again right after their finish (no lost wake-up).
    -- Looked up by key (= ANY on the primary key's first column, then a hashed key test), not
    -- joined: a join was planned as a nested loop over both sets (a million comparisons).
    SELECT array_agg(m.canonical_symbol), array_agg(m.canonical_symbol || ' ' || m.timeframe)
    INTO v_symbols, v_moved
    FROM jsonb_to_recordset(v_done) AS m(canonical_symbol text, timeframe text, moved boolean)
    WHERE m.moved;
    UPDATE public.data_agg_state d
    SET next_run_at = CASE WHEN d.status = 'running' THEN d.next_run_at ELSE v_sched END,
        rerun_requested = d.rerun_requested OR d.status = 'running',
        updated_at = now()
    FROM public.agg_timeframes t
    WHERE d.canonical_symbol = ANY (v_symbols) AND (d.canonical_symbol || ' ' || d.source_timeframe) = ANY (v_moved)
      AND d.enabled AND t.timeframe = d.timeframe
      AND (d.last_agg_bar_ts_utc IS NULL
           OR LEAST(d.last_agg_bar_ts_utc,
                    (SELECT min(v.window_start) FROM public.agg_invalidations v
                     WHERE v.canonical_symbol = d.canonical_symbol AND v.timeframe = d.timeframe))
              + CASE WHEN d.timeframe = '1mo' OR EXISTS (
                         SELECT 1 FROM public.core_asset_registry_all r
                         WHERE r.session <> '24x7' AND r.canonical_symbol = d.canonical_symbol)
                     THEN public._agg_window_length(d.canonical_symbol, d.timeframe,
                                             LEAST(d.last_agg_bar_ts_utc,
                                                   (SELECT min(v.window_start) FROM public.agg_invalidations v
                                                    WHERE v.canonical_symbol = d.canonical_symbol
                                                      AND v.timeframe = d.timeframe)),
                                             t.bucket_interval)
                     ELSE t.bucket_interval END
              + make_interval(secs => COALESCE(d.aggregation_delay_seconds, 0)) <= v_now)
      AND ((d.status = 'idle' AND (d.next_run_at IS NULL OR d.next_run_at > v_sched))
           OR (d.status = 'running' AND NOT d.rerun_requested));

    RETURN QUERY
    SELECT m.canonical_symbol, m.timeframe, m.cursor, m.next_run_at
    FROM jsonb_to_recordset(v_done) AS m(canonical_symbol text, timeframe text, cursor timestamptz,
                                         next_run_at timestamptz);
END $$;

-- ---------------------------------------------------------------------------------------------
-- agg_finish: end a claim (the seed's signature, new parameters last)
-- ---------------------------------------------------------------------------------------------
-- Success: idle, cursor, counters (p_stats: the keys of catchup_aggregation_range, for the call not
-- yet checkpointed), streak 0, and next_run_at = now when a backlog remains (p_stats->'continue') or
-- the source advanced meanwhile, else the moment the next window becomes final: the window at the
-- cursor or the task's earliest logged window still waiting (agg_invalidations), whichever is
-- earlier (window start + interval + delay); one minute from now when that moment has passed
-- already (the window is final by the clock but could not be built: no source data yet, or a task
-- below it is behind; that task's finish wakes us). A task with logged windows is never scheduled
-- past them. A success that moved the cursor (or re-aggregated logged windows) wakes the tasks
-- built from this one (same symbol).
--
-- Failure (p_fail_kind 'transient' or anything else = hard; the cursor stays where the last
-- checkpoint put it): transient → retry in 1 minute, streak unchanged; hard → streak + 1, retry in
-- 5 then 15 minutes; at 3: mandatory → 'hard_failed' (retried hourly, an alert), optional →
-- 'disabled' until re-enabled (agg_reenable_task, or the registry flag cleared and set again).
--
-- Only a running row owned by p_worker_id changes (without p_worker_id: any running row, as the seed's
-- callers know no worker id); otherwise {"changed": false, "reason": ...}.
CREATE OR REPLACE FUNCTION public.agg_finish(p_symbol text, p_to_tf text, p_success boolean,
    p_new_cursor_utc timestamptz DEFAULT null, p_stats jsonb DEFAULT null, p_fail_kind text DEFAULT null,
    p_error text DEFAULT null, p_now_utc timestamptz DEFAULT now(), p_worker_id text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_sched timestamptz := LEAST(COALESCE(p_now_utc, now()), now());  -- schedule clock: retries never after the real clock
    v_row public.data_agg_state%ROWTYPE;
    v_cursor timestamptz;
    v_next timestamptz;
    v_status text;
    v_streak integer;
    v_transient boolean := p_fail_kind = 'transient';
BEGIN
    SELECT * INTO v_row FROM public.data_agg_state s
    WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', false, 'changed', false, 'reason', 'no such task');
    END IF;
    IF v_row.status <> 'running' OR (p_worker_id IS NOT NULL AND v_row.lease_owner IS DISTINCT FROM p_worker_id) THEN
        RETURN jsonb_build_object('success', false, 'changed', false,
            'reason', format('task %s %s is %s%s, not held by %s', p_symbol, p_to_tf, v_row.status,
                             CASE WHEN v_row.lease_owner IS NOT NULL THEN ' by ' || v_row.lease_owner ELSE '' END,
                             COALESCE(p_worker_id, 'the caller')),
            'status', v_row.status, 'lease_owner', v_row.lease_owner);
    END IF;

    IF p_success THEN
        SELECT f.out_cursor, f.out_next_run_at INTO v_cursor, v_next
        FROM public._agg_finish_ok(p_worker_id, jsonb_build_array(jsonb_build_object(
            'canonical_symbol', p_symbol, 'timeframe', p_to_tf, 'new_cursor_utc', p_new_cursor_utc,
            'stats', p_stats)), v_now) f;
        RETURN jsonb_build_object('success', true, 'changed', true, 'status', 'idle',
                                  'cursor', v_cursor, 'next_run_at', v_next);
    END IF;

    v_streak := v_row.hard_fail_streak + CASE WHEN v_transient THEN 0 ELSE 1 END;
    v_status := CASE
        WHEN v_streak >= 3 AND v_row.is_mandatory THEN 'hard_failed'
        WHEN v_streak >= 3 AND NOT v_transient THEN 'disabled'
        ELSE 'idle' END;
    v_next := CASE
        WHEN v_status = 'disabled' THEN NULL
        WHEN v_transient THEN v_sched + interval '1 minute'
        WHEN v_status = 'hard_failed' THEN v_sched + interval '1 hour'
        WHEN v_streak = 1 THEN v_sched + interval '5 minutes'
        ELSE v_sched + interval '15 minutes' END;
    UPDATE public.data_agg_state s
    SET status = v_status,
        lease_owner = NULL,
        lease_expires_at = NULL,
        lease_session = NULL,
        lease_backend_pid = NULL,
        rerun_requested = false,
        hard_fail_streak = v_streak,
        last_error = left(COALESCE(p_error, 'unknown error'), 2000),
        total_transient_failures = s.total_transient_failures + CASE WHEN v_transient THEN 1 ELSE 0 END,
        total_hard_failures = s.total_hard_failures + CASE WHEN v_transient THEN 0 ELSE 1 END,
        last_run_stats = COALESCE(s.last_run_stats, '{}'::jsonb)
            || jsonb_build_object('outcome', CASE WHEN v_transient THEN 'transient' ELSE 'hard' END,
                                  'finished_at', v_now, 'error', left(p_error, 500)),
        next_run_at = v_next,
        updated_at = now()
    WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf;
    RETURN jsonb_build_object('success', true, 'changed', true, 'status', v_status,
                              'hard_fail_streak', v_streak, 'next_run_at', v_next);
END $$;

-- ---------------------------------------------------------------------------------------------
-- agg_finish_many: finish many successful claims in one statement
-- ---------------------------------------------------------------------------------------------
-- p_results: a jsonb array of {"canonical_symbol", "timeframe", "new_cursor_utc", "stats"}. Each
-- element is finished as agg_finish(success) would; returns the elements that changed nothing (not
-- held by p_worker_id any more), with the reason, so the caller can roll back.
CREATE OR REPLACE FUNCTION public.agg_finish_many(p_worker_id text, p_results jsonb, p_now_utc timestamptz DEFAULT now())
RETURNS jsonb LANGUAGE sql SET search_path = '' AS $$
    WITH finished AS MATERIALIZED (
        SELECT f.out_symbol, f.out_timeframe FROM public._agg_finish_ok(p_worker_id, p_results, p_now_utc) f
    )
    SELECT jsonb_build_object(
        'finished', (SELECT count(*) FROM finished),
        'unchanged', (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                          'canonical_symbol', e->>'canonical_symbol', 'timeframe', e->>'timeframe',
                          'reason', format('task %s %s is not held by %s', e->>'canonical_symbol',
                                           e->>'timeframe', COALESCE(p_worker_id, 'the caller')))), '[]'::jsonb)
                      FROM jsonb_array_elements(p_results) e
                      WHERE NOT EXISTS (SELECT 1 FROM finished f
                                        WHERE f.out_symbol = e->>'canonical_symbol'
                                          AND f.out_timeframe = e->>'timeframe')))
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_checkpoint_many: agg_checkpoint for many tasks in one statement
-- ---------------------------------------------------------------------------------------------
-- p_items: a jsonb array of {"canonical_symbol", "timeframe", "new_cursor_utc", "stats"}; returns
-- {"checkpointed": n, "unchanged": [elements not held by p_worker_id, with the reason]}.
CREATE OR REPLACE FUNCTION public.agg_checkpoint_many(p_worker_id text, p_items jsonb,
    p_now_utc timestamptz DEFAULT now(), p_lease_seconds integer DEFAULT 300)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_item jsonb;
    v_out jsonb;
    v_unchanged jsonb := '[]'::jsonb;
BEGIN
    FOR v_item IN
        SELECT e FROM jsonb_array_elements(p_items) e
        ORDER BY e->>'canonical_symbol', e->>'timeframe'
    LOOP
        v_out := public.agg_checkpoint(v_item->>'canonical_symbol', v_item->>'timeframe', p_worker_id,
                                (v_item->>'new_cursor_utc')::timestamptz, v_item->'stats', p_now_utc,
                                p_lease_seconds);
        IF NOT (v_out->>'changed')::boolean THEN
            v_unchanged := v_unchanged || jsonb_build_object('canonical_symbol', v_item->>'canonical_symbol',
                'timeframe', v_item->>'timeframe', 'reason', v_out->>'reason');
        END IF;
    END LOOP;
    RETURN jsonb_build_object('checkpointed', jsonb_array_length(p_items) - jsonb_array_length(v_unchanged),
                              'unchanged', v_unchanged);
END $$;

-- ---------------------------------------------------------------------------------------------
-- agg_release: give back a claimed task untouched (shutdown before its work began)
-- ---------------------------------------------------------------------------------------------
-- Idle again and due at once; no run is counted. Only the owner's running row changes.
CREATE OR REPLACE FUNCTION public.agg_release(p_symbol text, p_to_tf text, p_worker_id text,
    p_now_utc timestamptz DEFAULT now())
RETURNS jsonb LANGUAGE sql SET search_path = '' AS $$
    WITH changed AS (
        UPDATE public.data_agg_state s
        SET status = CASE WHEN s.hard_fail_streak >= 3 AND s.is_mandatory THEN 'hard_failed' ELSE 'idle' END,
            lease_owner = NULL, lease_expires_at = NULL, lease_session = NULL, lease_backend_pid = NULL,
            rerun_requested = false,
            next_run_at = LEAST(s.next_run_at, LEAST(COALESCE(p_now_utc, now()), now())), updated_at = now()  -- schedule clock
        WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf
          AND s.status = 'running' AND s.lease_owner = p_worker_id
        RETURNING 1
    )
    SELECT jsonb_build_object('changed', EXISTS (SELECT 1 FROM changed))
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_reenable_task: the operator's "try again now" for a failing task
-- ---------------------------------------------------------------------------------------------
-- Any task that is not running and is failing: hard_failed, disabled after three hard failures, not
-- enabled, or backing off after one or two (a streak, or the last run's error). It becomes idle with
-- streak 0 and due at once under any clock (next_run_at NULL, as the invalidation triggers do, so a
-- replay with `--now` in the past runs it too); last_error stays until the next success clears it.
-- p_now_utc is kept for the seed-style signature.
CREATE OR REPLACE FUNCTION public.agg_reenable_task(p_symbol text, p_to_tf text, p_now_utc timestamptz DEFAULT now())
RETURNS jsonb LANGUAGE sql SET search_path = '' AS $$
    WITH changed AS (
        UPDATE public.data_agg_state s
        SET status = 'idle', enabled = true, hard_fail_streak = 0, next_run_at = NULL,
            updated_at = now()
        WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf
          AND s.status <> 'running'
          AND (s.status IN ('disabled', 'hard_failed') OR NOT s.enabled
               OR s.hard_fail_streak > 0 OR s.last_error IS NOT NULL)
        RETURNING 1
    )
    SELECT jsonb_build_object('changed', EXISTS (SELECT 1 FROM changed))
$$;

-- The tasks the registry asks for in an environment (DESIGN.md 7), with their source and kind.
CREATE OR REPLACE FUNCTION public._agg_wanted_tasks(p_env_name text)
RETURNS TABLE (canonical_symbol text, timeframe text, source_timeframe text, is_mandatory boolean)
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT r.canonical_symbol, w.timeframe, t.source_timeframe, w.mandatory
    FROM public.core_asset_registry_all r
    CROSS JOIN LATERAL (VALUES
        ('5m', true, true),
        ('1h', true, true),
        ('15m', false, COALESCE(r.calc_15m, false)),
        ('4h', false, COALESCE(r.calc_4h, false)),
        ('1d', false, COALESCE(r.calc_1d, false) OR COALESCE(r.calc_1w, false) OR COALESCE(r.calc_1mo, false)),
        ('1w', false, COALESCE(r.calc_1w, false)),
        ('1mo', false, COALESCE(r.calc_1mo, false))
    ) AS w(timeframe, mandatory, wanted)
    JOIN public.agg_timeframes t ON t.timeframe = w.timeframe
    WHERE w.wanted
      AND CASE WHEN p_env_name = 'prod' THEN COALESCE(r.active, false) ELSE COALESCE(r.test_active, false) END
$$;

-- ---------------------------------------------------------------------------------------------
-- sync_agg_state_from_registry (DESIGN.md 7)
-- ---------------------------------------------------------------------------------------------
-- For every asset active in the environment (`active` for 'prod', `test_active` otherwise):
-- mandatory 5m<-1m and 1h<-5m; optional 15m<-5m, 4h<-1h, 1d<-1h (calc_15m, calc_4h, calc_1d),
-- 1w<-1d (calc_1w) and 1mo<-1d (calc_1mo), which also need the 1d task, so they imply 1d.
-- * creates missing tasks (interval = the timeframe's, delay 30 s for 5m and 60 s above, due now,
--   agg_start_utc = the registry's agg_start_utc, else from the first source row);
-- * disables (enabled = false) tasks of inactive or unknown assets and of cleared flags;
-- * re-enables them when the asset/flag is set again; a task that was 'disabled' after three hard
--   failures starts over then (idle, streak 0): clearing and setting the flag is the operator's
--   "try again". A disabled-by-failures task whose flag stayed set is left alone, or every sync would
--   undo the rule;
-- * corrects source_timeframe / is_mandatory of existing tasks to the ladder.
-- It never touches cursors or operator settings (agg_start_utc, task_priority, interval, delay).
-- Idempotent: a second call changes nothing and returns empty lists. Serialised by an advisory lock.
-- _agg_sync_tasks: the sync's statements, for every symbol (p_symbol NULL) or one (on Citus, where a
-- statement that locks or changes task rows must name its symbol to reach that symbol's shard).
CREATE OR REPLACE FUNCTION public._agg_sync_tasks(p_env_name text, p_now_utc timestamptz, p_symbol text)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_created jsonb;
    v_enabled jsonb;
    v_disabled jsonb;
    v_corrected jsonb;
    v_w_syms text[];
    v_w_tfs text[];
    v_w_srcs text[];
    v_w_mand boolean[];
    v_sched timestamptz := LEAST(v_now, now());  -- (a value: Citus allows no now() inside CASE)
BEGIN
    -- The wanted tasks first, by a statement of their own (registry and ladder only): the statements
    -- below then join task rows with plain arrays, which Citus routes to the symbol's shard.
    SELECT COALESCE(array_agg(w.canonical_symbol), '{}'), COALESCE(array_agg(w.timeframe), '{}'),
           COALESCE(array_agg(w.source_timeframe), '{}'), COALESCE(array_agg(w.is_mandatory), '{}')
    INTO v_w_syms, v_w_tfs, v_w_srcs, v_w_mand
    FROM public._agg_wanted_tasks(p_env_name) w
    WHERE p_symbol IS NULL OR w.canonical_symbol = p_symbol;
    -- Lock the rows about to change in key order, so concurrent finishers cannot deadlock with us.
    PERFORM 1 FROM public.data_agg_state s
    JOIN public.agg_timeframes t ON t.timeframe = s.timeframe
    LEFT JOIN unnest(v_w_syms, v_w_tfs, v_w_srcs, v_w_mand) AS w(canonical_symbol, timeframe, source_timeframe, is_mandatory) ON w.canonical_symbol = s.canonical_symbol AND w.timeframe = s.timeframe
    WHERE (p_symbol IS NULL OR s.canonical_symbol = p_symbol)
      AND ((w.timeframe IS NULL AND s.enabled)
       OR (w.timeframe IS NOT NULL AND (NOT s.enabled OR s.source_timeframe IS DISTINCT FROM w.source_timeframe
                                        OR s.is_mandatory IS DISTINCT FROM w.is_mandatory)))
    ORDER BY s.canonical_symbol, s.timeframe
    FOR UPDATE OF s;

    WITH ins AS (
        INSERT INTO public.data_agg_state (canonical_symbol, timeframe, source_timeframe, is_mandatory,
                                    run_interval_minutes, aggregation_delay_seconds, enabled, status, next_run_at,
                                    agg_start_utc)
        SELECT w.canonical_symbol, w.timeframe, w.source_timeframe, w.is_mandatory,
               (extract(epoch FROM t.bucket_interval) / 60)::integer,
               CASE WHEN w.timeframe = '5m' THEN 30 ELSE 60 END,
               true, 'idle', NULL,
               -- the symbol's explicit start (registry add --agg-start), else the column's default:
               -- '-infinity', i.e. from its first source row (migration 0007)
               COALESCE(r.agg_start_utc, timestamptz '-infinity')
        FROM unnest(v_w_syms, v_w_tfs, v_w_srcs, v_w_mand) AS w(canonical_symbol, timeframe, source_timeframe, is_mandatory)
        JOIN public.agg_timeframes t ON t.timeframe = w.timeframe
        JOIN public.core_asset_registry_all r ON r.canonical_symbol = w.canonical_symbol
        -- Only the missing ones (an anti-join is far cheaper than a conflict per existing task);
        -- ON CONFLICT still covers a task inserted meanwhile by a caller not taking the lock.
        WHERE (p_symbol IS NULL OR w.canonical_symbol = p_symbol)
          AND NOT EXISTS (SELECT 1 FROM public.data_agg_state s
                          WHERE s.canonical_symbol = w.canonical_symbol AND s.timeframe = w.timeframe)
        ORDER BY w.canonical_symbol, w.timeframe
        ON CONFLICT (canonical_symbol, timeframe) DO NOTHING
        RETURNING canonical_symbol || ' ' || timeframe AS task
    )
    SELECT COALESCE(jsonb_agg(task ORDER BY task), '[]') INTO v_created FROM ins;

    WITH upd AS (
        UPDATE public.data_agg_state s
        SET enabled = true,
            status = CASE WHEN s.status = 'disabled' THEN 'idle' ELSE s.status END,
            hard_fail_streak = CASE WHEN s.status = 'disabled' THEN 0 ELSE s.hard_fail_streak END,
            next_run_at = CASE WHEN s.status = 'disabled' THEN v_sched ELSE s.next_run_at END,  -- schedule clock
            updated_at = now()
        FROM unnest(v_w_syms, v_w_tfs, v_w_srcs, v_w_mand) AS w(canonical_symbol, timeframe, source_timeframe, is_mandatory)
        WHERE w.canonical_symbol = s.canonical_symbol AND w.timeframe = s.timeframe AND NOT s.enabled
          AND (p_symbol IS NULL OR s.canonical_symbol = p_symbol)
        RETURNING s.canonical_symbol || ' ' || s.timeframe AS task
    )
    SELECT COALESCE(jsonb_agg(task ORDER BY task), '[]') INTO v_enabled FROM upd;

    WITH upd AS (
        UPDATE public.data_agg_state s
        SET enabled = false, updated_at = now()
        WHERE s.enabled AND (p_symbol IS NULL OR s.canonical_symbol = p_symbol)
          AND EXISTS (SELECT 1 FROM public.agg_timeframes t WHERE t.timeframe = s.timeframe)
          AND NOT EXISTS (SELECT 1 FROM unnest(v_w_syms, v_w_tfs, v_w_srcs, v_w_mand) AS w(canonical_symbol, timeframe, source_timeframe, is_mandatory)
                          WHERE w.canonical_symbol = s.canonical_symbol AND w.timeframe = s.timeframe)
        RETURNING s.canonical_symbol || ' ' || s.timeframe AS task
    )
    SELECT COALESCE(jsonb_agg(task ORDER BY task), '[]') INTO v_disabled FROM upd;

    WITH upd AS (
        UPDATE public.data_agg_state s
        SET source_timeframe = w.source_timeframe, is_mandatory = w.is_mandatory, updated_at = now()
        FROM unnest(v_w_syms, v_w_tfs, v_w_srcs, v_w_mand) AS w(canonical_symbol, timeframe, source_timeframe, is_mandatory)
        WHERE w.canonical_symbol = s.canonical_symbol AND w.timeframe = s.timeframe
          AND (p_symbol IS NULL OR s.canonical_symbol = p_symbol)
          AND (s.source_timeframe IS DISTINCT FROM w.source_timeframe OR s.is_mandatory IS DISTINCT FROM w.is_mandatory)
        RETURNING s.canonical_symbol || ' ' || s.timeframe AS task
    )
    SELECT COALESCE(jsonb_agg(task ORDER BY task), '[]') INTO v_corrected FROM upd;

    RETURN jsonb_build_object('env', p_env_name, 'created', v_created, 'enabled', v_enabled,
                              'disabled', v_disabled, 'corrected', v_corrected);
END $$;

CREATE OR REPLACE FUNCTION public.sync_agg_state_from_registry(p_env_name text DEFAULT 'prod',
    p_now_utc timestamptz DEFAULT now())
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_sym text;
    v_one jsonb;
    v_all jsonb := jsonb_build_object('env', p_env_name, 'created', '[]'::jsonb, 'enabled', '[]'::jsonb,
                                      'disabled', '[]'::jsonb, 'corrected', '[]'::jsonb);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('baragg.sync_agg_state_from_registry'));
    IF NOT public._agg_on_citus() THEN
        RETURN public._agg_sync_tasks(p_env_name, p_now_utc, NULL);
    END IF;
    -- Citus (data_agg_state distributed by symbol): symbol by symbol, in key order.
    FOR v_sym IN
        SELECT r.canonical_symbol FROM public.core_asset_registry_all r
        UNION
        SELECT DISTINCT s.canonical_symbol FROM public.data_agg_state s
        ORDER BY 1
    LOOP
        v_one := public._agg_sync_tasks(p_env_name, p_now_utc, v_sym);
        v_all := jsonb_build_object('env', p_env_name,
            'created', (v_all->'created') || (v_one->'created'), 'enabled', (v_all->'enabled') || (v_one->'enabled'),
            'disabled', (v_all->'disabled') || (v_one->'disabled'),
            'corrected', (v_all->'corrected') || (v_one->'corrected'));
    END LOOP;
    RETURN v_all;
END $$;
