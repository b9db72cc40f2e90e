-- 011: a session can keep its writes from sending NOTIFY: SET gateway.ring = off.
--
-- While writes are rare, the capture triggers (and emit(), through gateway.ring()) wake the
-- relay with `NOTIFY gateway_poll` (sql/003, 004). PostgreSQL refuses to PREPARE a transaction
-- that sent a NOTIFY ("cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or
-- NOTIFY"), so an application using two-phase commit on a published table failed whenever
-- the relay was quiet. With `gateway.ring` set to `off` (per session, per transaction with
-- SET LOCAL, or for a role: ALTER ROLE app SET gateway.ring = off) nothing is sent; the
-- relay's safety-net poll (GATEWAY_RELAY_IDLE_POLL, 1 s by default) finds those events
-- instead. The setting is read only when the trigger is about to ring, so busy writers, who
-- never ring, pay nothing for it.
-- Every statement here is idempotent.

CREATE OR REPLACE FUNCTION gateway.ring() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('gateway.relay_awake_until'), 0)
       < date_part('epoch', clock_timestamp()) * 1000
       AND current_setting('gateway.ring', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_notify('gateway_poll', '');
    END IF;
END
$$;

-- publish() generates the row triggers with the ring inlined (a function call per row is
-- measurably dearer, sql/004). Its source is patched in place rather than copied here whole:
-- the one line that sends the NOTIFY gets the same condition. The patch is checked to apply
-- exactly once, and is skipped when it already has (this file is idempotent).
DO $$
DECLARE
    def text := pg_get_functiondef('gateway.publish(regclass, text, text)'::regprocedure);
    old_line text := $o$gw_x := pg_notify('gateway_poll', '');$o$;
    new_line text := $n$IF current_setting('gateway.ring', true) IS DISTINCT FROM 'off' THEN
                    gw_x := pg_notify('gateway_poll', '');
                END IF;$n$;
BEGIN
    IF position($m$current_setting('gateway.ring'$m$ IN def) > 0 THEN
        RETURN;
    END IF;
    IF (length(def) - length(replace(def, old_line, ''))) / length(old_line) <> 1 THEN
        RAISE EXCEPTION '011_ring_off: gateway.publish() is not the version this migration patches';
    END IF;
    EXECUTE replace(def, old_line, new_line);
END
$$;

-- Regenerate the triggers of every published table with the current publish(), as each
-- migration that changes them must (003, 004 and 008 did it inline; later ones call this).
CREATE OR REPLACE FUNCTION gateway.republish_all() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl, topic, key_column FROM gateway.published ORDER BY tbl::text LOOP
        PERFORM gateway.publish(r.tbl, r.topic, r.key_column);
    END LOOP;
END
$$;
SELECT gateway.republish_all();
