-- Repeatable: the worker round in SQL, for pg_cron (DESIGN.md 10b): a Supabase project can run baragg
-- with no process of its own. One round does what `baragg run --once` does (baragg/worker.py), with
-- the same functions in the same order: sync the registry; claim due tasks with leases
-- (agg_claim_tasks, so it is safe beside Python workers and other rounds); per timeframe, in due
-- order, lock the claimed rows, re-aggregate logged windows (first call), catch up set-based, and
-- checkpoint or finish, bars and cursors in one transaction; a failed batch is retried task by task so
-- a failure is recorded against its task; claim again until nothing is due or the time budget is spent.
--
-- Each step commits. A procedure cannot do that here: PostgreSQL refuses COMMIT in a procedure that
-- has a SET clause, and Supabase's linter (lint 0011) wants search_path pinned on every function and
-- procedure. So the round is a short DO block that commits between calls of one pinned function:
--
--     DO $baragg$
--     DECLARE
--         v_state jsonb := public.baragg_round_start('prod', 50);
--     BEGIN
--         WHILE v_state ->> 'phase' <> 'done' LOOP
--             COMMIT;
--             v_state := public.baragg_round_step(v_state);
--         END LOOP;
--     END
--     $baragg$;
--
-- baragg_round_command(env, budget) returns that text: `baragg db schedule` gives it to cron.schedule;
-- in psql, `SELECT public.baragg_round_command() \gexec` runs a round. Run it as its own statement
-- (autocommit), not inside a transaction block. A round cancelled mid-way (statement_timeout, a
-- stopped server) loses nothing committed: the step in flight rolls back, and the tasks it held come
-- back when their lease expires.

-- ---------------------------------------------------------------------------------------------
-- baragg_round_start: the state of a new round (nothing is done yet)
-- ---------------------------------------------------------------------------------------------
-- p_budget_seconds: no new claim after this long (wall clock), and tasks with a backlog are then
-- finished as due again (the next round continues them); keep it below the schedule's interval.
-- p_now_utc fixes the clock of the scheduling rules (tests, replays), as `run --once --now` does.
CREATE OR REPLACE FUNCTION public.baragg_round_start(p_env text DEFAULT 'prod', p_budget_seconds integer DEFAULT 50,
    p_max_windows integer DEFAULT 2000, p_batch_size integer DEFAULT 500, p_lease_seconds integer DEFAULT 300,
    p_now_utc timestamptz DEFAULT NULL, p_worker_id text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    v_session integer;
BEGIN
    IF p_budget_seconds IS NULL OR p_budget_seconds < 1 THEN
        RAISE EXCEPTION 'baragg_round_start: p_budget_seconds must be at least 1, not %', p_budget_seconds
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_max_windows IS NULL OR p_max_windows < 1 THEN
        RAISE EXCEPTION 'baragg_round_start: p_max_windows must be at least 1, not %', p_max_windows
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION 'baragg_round_start: p_batch_size must be at least 1, not %', p_batch_size
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_lease_seconds IS NULL OR p_lease_seconds < 1 THEN
        RAISE EXCEPTION 'baragg_round_start: p_lease_seconds must be at least 1, not %', p_lease_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The worker lock of this session (migration 0006), as every Python worker connection holds one:
    -- if the round dies with its session (cancelled, server restart), a claim takes its tasks over at
    -- once instead of waiting for their leases. Released when the round is done.
    FOR i IN 1 .. 8 LOOP
        v_session := 1 + pg_catalog.floor(pg_catalog.random() * 2147483646)::integer;
        EXIT WHEN pg_catalog.pg_try_advisory_lock(1650553447, v_session);
        v_session := NULL;
    END LOOP;
    RETURN pg_catalog.jsonb_build_object(
        'phase', 'sync',
        'env', COALESCE(p_env, 'prod'),
        'worker_id', COALESCE(p_worker_id, pg_catalog.format('pg_cron:%s:%s:%s', pg_catalog.current_database(),
            pg_catalog.pg_backend_pid(), pg_catalog.left(pg_catalog.md5(pg_catalog.random()::text), 6))),
        'now', p_now_utc,
        'started_at', pg_catalog.clock_timestamp(),
        'deadline', pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => p_budget_seconds),
        'max_windows', p_max_windows,
        'batch_size', p_batch_size,
        'lease_seconds', p_lease_seconds,
        'sync_attempts', 0,
        'queue', '[]'::jsonb,
        'session', v_session,
        'totals', pg_catalog.jsonb_build_object(
            'task_runs', 0, 'windows', 0, 'bars_created', 0, 'bars_rewritten', 0, 'bars_withdrawn', 0,
            'bars_unchanged', 0, 'bars_quality_poor', 0, 'bars_skipped', 0, 'gaps_skipped', 0,
            'windows_reaggregated', 0, 'bars_reaggregated', 0,
            'ok', 0, 'continue', 0, 'transient', 0, 'hard', 0, 'lease_lost', 0));
END
$$;

-- Adds n to totals[key].
CREATE OR REPLACE FUNCTION public._baragg_round_count(p_state jsonb, p_key text, p_n bigint DEFAULT 1)
RETURNS jsonb LANGUAGE sql IMMUTABLE SET search_path = '' AS $$
    SELECT pg_catalog.jsonb_set(p_state, ARRAY['totals', p_key],
                                pg_catalog.to_jsonb(COALESCE((p_state -> 'totals' ->> p_key)::bigint, 0) + p_n))
$$;

-- ---------------------------------------------------------------------------------------------
-- baragg_round_step: one step of a round, to be committed by the caller; returns the next state
-- ---------------------------------------------------------------------------------------------
-- phase sync   registry sync (a transient failure is tried three times, as the worker does)
--       claim  claim up to batch_size due tasks; queue them by timeframe in due order (5m before 1h:
--              an hour waits for its 5m source); nothing due, or past the budget: done
--       work   one catch-up transaction for the queue's head (a timeframe and its symbols)
--       done   the totals are in the state (and in the server log)
-- Transient errors are those the Python worker retries (classes 08, 40, 53, 55, 57, 58; not 54).
CREATE OR REPLACE FUNCTION public.baragg_round_step(p_state jsonb)
RETURNS jsonb LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    v_state jsonb := p_state;
    v_phase text := p_state ->> 'phase';
    v_now timestamptz := (p_state ->> 'now')::timestamptz;
    v_worker text := p_state ->> 'worker_id';
    v_deadline timestamptz := (p_state ->> 'deadline')::timestamptz;
    v_queue jsonb := COALESCE(p_state -> 'queue', '[]'::jsonb);
    v_entry jsonb;
    v_rest jsonb;
    v_tf text;
    v_symbols text[];
    v_cursors timestamptz[];
    v_first boolean;
    v_in_time boolean;
    v_row record;
    v_cursor timestamptz;
    v_stats jsonb;
    v_backlog boolean;
    v_finishing jsonb;
    v_continuing jsonb;
    v_next_symbols text[];
    v_next_cursors timestamptz[];
    v_fixed jsonb;
    v_results jsonb;
    v_calls jsonb;
    v_unchanged jsonb;
    v_answer jsonb;
    v_sqlstate text;
    v_message text;
    v_kind text;
    v_group jsonb;
    v_key text;
    i integer;
BEGIN
    IF v_phase = 'sync' THEN
        BEGIN
            PERFORM public.sync_agg_state_from_registry(p_state ->> 'env', v_now);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_sqlstate = RETURNED_SQLSTATE;
            IF left(v_sqlstate, 2) IN ('08', '40', '53', '55', '57', '58')
               AND (p_state ->> 'sync_attempts')::integer < 2 THEN
                RETURN jsonb_set(p_state, '{sync_attempts}', to_jsonb((p_state ->> 'sync_attempts')::integer + 1));
            END IF;
            RAISE;
        END;
        RETURN jsonb_set(p_state, '{phase}', '"claim"');
    END IF;

    IF v_phase = 'claim' THEN
        IF clock_timestamp() >= v_deadline THEN
            v_phase := 'done';
        ELSE
            -- Claimed rows come in due order; consecutive rows of one timeframe form one batch.
            v_group := NULL;
            FOR v_row IN
                SELECT c.canonical_symbol, c.timeframe, c.last_agg_bar_ts_utc
                FROM public.agg_claim_tasks(v_worker, (p_state ->> 'batch_size')::integer,
                                     (p_state ->> 'lease_seconds')::integer, v_now) c
            LOOP
                IF v_group IS NOT NULL AND v_group ->> 'timeframe' <> v_row.timeframe THEN
                    v_queue := v_queue || jsonb_build_array(v_group);
                    v_group := NULL;
                END IF;
                v_group := jsonb_build_object(
                    'timeframe', v_row.timeframe, 'first', true,
                    'symbols', COALESCE(v_group -> 'symbols', '[]'::jsonb) || jsonb_build_array(v_row.canonical_symbol),
                    'cursors', COALESCE(v_group -> 'cursors', '[]'::jsonb) || jsonb_build_array(v_row.last_agg_bar_ts_utc));
            END LOOP;
            IF v_group IS NULL THEN
                v_phase := 'done';
            ELSE
                v_queue := v_queue || jsonb_build_array(v_group);
                RETURN v_state || jsonb_build_object('phase', 'work', 'queue', v_queue);
            END IF;
        END IF;
    END IF;

    IF v_phase = 'done' THEN
        v_state := v_state || jsonb_build_object(
            'phase', 'done', 'seconds',
            round(extract(epoch FROM clock_timestamp() - (p_state ->> 'started_at')::timestamptz), 3));
        IF p_state ->> 'session' IS NOT NULL THEN
            PERFORM pg_advisory_unlock(1650553447, (p_state ->> 'session')::integer);
        END IF;
        RAISE LOG 'baragg round %: %', v_worker, v_state -> 'totals';
        RETURN v_state;
    END IF;

    IF v_phase <> 'work' THEN
        RAISE EXCEPTION 'baragg_round_step: unknown phase %', v_phase USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- One catch-up transaction for the head of the queue (the worker's _Claimer.catch_up, one call).
    v_entry := v_queue -> 0;
    v_rest := v_queue - 0;
    v_tf := v_entry ->> 'timeframe';
    v_symbols := ARRAY(SELECT jsonb_array_elements_text(v_entry -> 'symbols'));
    v_cursors := ARRAY(SELECT (e #>> '{}')::timestamptz FROM jsonb_array_elements(v_entry -> 'cursors') e);
    v_first := (v_entry ->> 'first')::boolean;
    v_finishing := '[]';
    v_continuing := '[]';
    v_calls := '{}';
    v_fixed := '{}';
    BEGIN
        PERFORM count(*) FROM (
            SELECT 1 FROM public.data_agg_state s
            WHERE s.canonical_symbol = ANY (v_symbols) AND s.timeframe = v_tf AND s.lease_owner = v_worker
            ORDER BY s.canonical_symbol
            FOR NO KEY UPDATE
        ) locked;
        UPDATE public.data_agg_state s SET rerun_requested = false
        WHERE s.canonical_symbol = ANY (v_symbols) AND s.timeframe = v_tf AND s.lease_owner = v_worker
          AND s.rerun_requested;
        IF v_first THEN
            SELECT COALESCE(jsonb_object_agg(r.canonical_symbol, r.result), '{}') INTO v_fixed
            FROM public.agg_reaggregate_tasks(v_tf, v_symbols, 1, v_now) r;
        END IF;
        SELECT COALESCE(jsonb_agg(jsonb_build_object('symbol', c.canonical_symbol, 'result', c.result)), '[]')
        INTO v_results
        FROM public.agg_catchup_tasks(v_tf, v_symbols, v_cursors, (p_state ->> 'max_windows')::integer, v_now) c;
        -- As the worker does: after the call, is there time for another one?
        v_in_time := clock_timestamp() < v_deadline;
        FOR v_row IN
            SELECT e ->> 'symbol' AS canonical_symbol, e -> 'result' AS result FROM jsonb_array_elements(v_results) e
        LOOP
            IF NOT COALESCE((v_row.result ->> 'success')::boolean, false) THEN
                RAISE EXCEPTION '% %: %', v_row.canonical_symbol, v_tf,
                    COALESCE(v_row.result ->> 'error', v_row.result::text);
            END IF;
            v_cursor := COALESCE((v_row.result ->> 'cursor_advanced_to')::timestamptz,
                                 v_cursors[array_position(v_symbols, v_row.canonical_symbol)]);
            -- The call's counts (the worker's STAT_KEYS), as given to agg_checkpoint / agg_finish.
            SELECT jsonb_object_agg(k, COALESCE((v_row.result ->> k)::bigint, 0)) INTO v_stats
            FROM unnest(ARRAY['windows_processed', 'bars_created', 'bars_rewritten', 'bars_unchanged',
                              'bars_withdrawn', 'bars_quality_poor', 'bars_skipped', 'gaps_skipped']) k;
            v_backlog := COALESCE((v_row.result ->> 'continue')::boolean, false);
            v_calls := v_calls || jsonb_build_object(v_row.canonical_symbol,
                                                     jsonb_build_object('stats', v_stats, 'backlog', v_backlog));
            IF v_backlog AND v_in_time THEN
                v_continuing := v_continuing || jsonb_build_array(jsonb_build_object(
                    'canonical_symbol', v_row.canonical_symbol, 'timeframe', v_tf,
                    'new_cursor_utc', v_cursor, 'stats', v_stats));
            ELSE
                v_finishing := v_finishing || jsonb_build_array(jsonb_build_object(
                    'canonical_symbol', v_row.canonical_symbol, 'timeframe', v_tf,
                    'new_cursor_utc', v_cursor, 'stats', v_stats || jsonb_build_object('continue', v_backlog)));
            END IF;
        END LOOP;
        v_unchanged := '[]';
        IF jsonb_array_length(v_finishing) > 0 THEN
            v_answer := public.agg_finish_many(v_worker, v_finishing, v_now);
            v_unchanged := v_unchanged || (v_answer -> 'unchanged');
        END IF;
        IF jsonb_array_length(v_continuing) > 0 THEN
            v_answer := public.agg_checkpoint_many(v_worker, v_continuing, v_now, (p_state ->> 'lease_seconds')::integer);
            v_unchanged := v_unchanged || (v_answer -> 'unchanged');
        END IF;
        IF jsonb_array_length(v_unchanged) > 0 THEN
            -- Another worker rescued a task we were too slow for: nothing of this call may commit.
            RAISE EXCEPTION 'lease lost: %', (SELECT string_agg(u ->> 'reason', '; ')
                                              FROM jsonb_array_elements(v_unchanged) u)
                USING ERRCODE = 'BA001';
        END IF;
    EXCEPTION WHEN OTHERS THEN
        -- Nothing of the call was written (the block's subtransaction rolled back).
        GET STACKED DIAGNOSTICS v_sqlstate = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT;
        IF array_length(v_symbols, 1) > 1 THEN
            -- Run the batch's tasks one by one, so that a failure is recorded against its own task.
            v_queue := '[]';
            FOR i IN 1 .. array_length(v_symbols, 1) LOOP
                v_queue := v_queue || jsonb_build_array(jsonb_build_object(
                    'timeframe', v_tf, 'first', true, 'symbols', jsonb_build_array(v_symbols[i]),
                    'cursors', jsonb_build_array(v_cursors[i])));
            END LOOP;
            RETURN v_state || jsonb_build_object('queue', v_queue || v_rest);
        END IF;
        v_state := public._baragg_round_count(v_state, 'task_runs');
        IF v_sqlstate = 'BA001' THEN
            v_state := public._baragg_round_count(v_state, 'lease_lost');
        ELSE
            v_kind := CASE WHEN left(v_sqlstate, 2) IN ('08', '40', '53', '55', '57', '58') THEN 'transient'
                           ELSE 'hard' END;
            PERFORM public.agg_finish(v_symbols[1], v_tf, false, NULL, NULL, v_kind,
                               format('SQLSTATE %s: %s', v_sqlstate, split_part(v_message, E'\n', 1)),
                               v_now, v_worker);
            v_state := public._baragg_round_count(v_state, v_kind);
        END IF;
        RETURN v_state || jsonb_build_object('queue', v_rest,
                                             'phase', CASE WHEN jsonb_array_length(v_rest) = 0 THEN 'claim' ELSE 'work' END);
    END;

    -- Committed with the caller's COMMIT: count what the call did.
    v_next_symbols := '{}';
    v_next_cursors := '{}';
    FOR i IN 1 .. array_length(v_symbols, 1) LOOP
        CONTINUE WHEN NOT v_calls ? v_symbols[i];
        -- The worker's task result: bar counts of both paths (catch-up and logged windows), windows
        -- of the catch-up, windows_reaggregated / bars_reaggregated of the logged windows.
        v_stats := v_calls -> v_symbols[i] -> 'stats';
        v_state := public._baragg_round_count(v_state, 'windows', (v_stats ->> 'windows_processed')::bigint);
        v_state := public._baragg_round_count(v_state, 'bars_skipped', (v_stats ->> 'bars_skipped')::bigint);
        v_state := public._baragg_round_count(v_state, 'gaps_skipped', (v_stats ->> 'gaps_skipped')::bigint);
        FOREACH v_key IN ARRAY ARRAY['bars_created', 'bars_rewritten', 'bars_withdrawn', 'bars_unchanged',
                                     'bars_quality_poor'] LOOP
            v_state := public._baragg_round_count(v_state, v_key, (v_stats ->> v_key)::bigint
                                           + COALESCE((v_fixed -> v_symbols[i] ->> v_key)::bigint, 0));
        END LOOP;
        v_state := public._baragg_round_count(v_state, 'windows_reaggregated',
                                       COALESCE((v_fixed -> v_symbols[i] ->> 'windows')::bigint, 0));
        v_state := public._baragg_round_count(v_state, 'bars_reaggregated',
                                       COALESCE((v_fixed -> v_symbols[i] ->> 'bars_reaggregated')::bigint, 0));
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(v_continuing) c WHERE c ->> 'canonical_symbol' = v_symbols[i]) THEN
            v_next_symbols := v_next_symbols || v_symbols[i];
            v_next_cursors := v_next_cursors || (SELECT (c ->> 'new_cursor_utc')::timestamptz
                                                 FROM jsonb_array_elements(v_continuing) c
                                                 WHERE c ->> 'canonical_symbol' = v_symbols[i]);
        ELSE
            v_state := public._baragg_round_count(v_state, 'task_runs');
            v_state := public._baragg_round_count(v_state,
                CASE WHEN (v_calls -> v_symbols[i] ->> 'backlog')::boolean THEN 'continue' ELSE 'ok' END);
        END IF;
    END LOOP;
    IF array_length(v_next_symbols, 1) > 0 THEN
        v_rest := jsonb_build_array(jsonb_build_object('timeframe', v_tf, 'first', false,
                                                       'symbols', to_jsonb(v_next_symbols),
                                                       'cursors', to_jsonb(v_next_cursors))) || v_rest;
    END IF;
    RETURN v_state || jsonb_build_object('queue', v_rest,
                                         'phase', CASE WHEN jsonb_array_length(v_rest) = 0 THEN 'claim' ELSE 'work' END);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- baragg_round_command: the text of a round (the DO block above), for cron.schedule or \gexec
-- ---------------------------------------------------------------------------------------------
-- Its parameters are baragg_round_start's, written into the text as literals.
CREATE OR REPLACE FUNCTION public.baragg_round_command(p_env text DEFAULT 'prod', p_budget_seconds integer DEFAULT 50,
    p_max_windows integer DEFAULT 2000, p_batch_size integer DEFAULT 500, p_lease_seconds integer DEFAULT 300,
    p_now_utc timestamptz DEFAULT NULL)
RETURNS text LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT pg_catalog.format($command$DO $baragg$
DECLARE
    v_state jsonb := public.baragg_round_start(%L, %s, %s, %s, %s, %s);
BEGIN
    WHILE v_state ->> 'phase' <> 'done' LOOP
        COMMIT;
        v_state := public.baragg_round_step(v_state);
    END LOOP;
END
$baragg$
$command$, COALESCE(p_env, 'prod'), COALESCE(p_budget_seconds, 50), COALESCE(p_max_windows, 2000),
        COALESCE(p_batch_size, 500), COALESCE(p_lease_seconds, 300),
        -- the clock in UTC, whatever the DateStyle and TimeZone of the session that reads the text
        CASE WHEN p_now_utc IS NULL THEN 'NULL'
             ELSE pg_catalog.quote_literal(pg_catalog.to_char(p_now_utc AT TIME ZONE 'UTC',
                                                              'YYYY-MM-DD"T"HH24:MI:SS.US"+00"')) || '::timestamptz'
        END)
$$;
