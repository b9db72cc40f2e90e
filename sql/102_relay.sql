-- The relay: writers do not pay for NOTIFY under load.
--
-- PostgreSQL lets only one notifying transaction commit at a time (a cluster-wide lock held
-- across the commit's WAL flush), so if every writing statement rang its own NOTIFY, writers
-- would queue behind each other under load. Instead:
--
-- * Every event records the id of the transaction that wrote it (gateway.events.xid).
-- * One gateway replica at a time, the relay (its lease is the row of gateway.relay), reads
--   the events whose transactions committed since it last looked (visible in its snapshot,
--   not in the previous one, as PgQ does) and rings their doorbells on channel `gateway`,
--   many events per NOTIFY, from its own transaction: writers never wait for it.
-- * Under load the relay looks every few milliseconds and says so by keeping
--   gateway.relay_awake_until (unix milliseconds) in the future; writers then send nothing.
--   When it is quiet, a writing transaction sends one NOTIFY on channel `gateway_poll`
--   (empty payload; PostgreSQL sends a transaction's identical notifications once), which
--   wakes the relay at once. Either way every committed event is rung: see gateway/relay.py
--   for why none can slip between the two modes.
-- * A session can keep its writes from sending NOTIFY: SET gateway.ring = off (per session,
--   per transaction with SET LOCAL, or for a role: ALTER ROLE app SET gateway.ring = off).
--   PostgreSQL refuses to PREPARE a transaction that sent a NOTIFY, so an application using
--   two-phase commit on a published table needs it; the relay's safety-net poll
--   (GATEWAY_RELAY_IDLE_POLL, 1 s by default) then finds those events. The setting is read
--   only when a writer is about to ring, so busy writers, who never ring, pay nothing for it.
--
-- The flag is a sequence because a sequence's value is not transactional: a writer sees the
-- current value whatever its snapshot (a REPEATABLE READ transaction that began long ago
-- included), and reading it takes no lock that could make writers wait on each other.

CREATE SEQUENCE gateway.relay_awake_until MINVALUE 0 START 0;

-- The relay's lease, and the snapshot of its last poll: the events of every transaction
-- visible in it have been rung. A replica that takes the lease over starts there, so a relay
-- that died loses nothing (ringing an event twice is harmless: the gateway delivers each
-- position once).
-- The lease covers a holder that stalls. A holder that dies (kill -9, OOM, a node lost) also
-- loses its database session: backend_pid records that session, and another replica takes
-- the lease over as soon as no such backend exists, on its next try (about every second)
-- instead of after the whole lease. A pid PostgreSQL has since given to another session only
-- delays the takeover to the lease's end.
CREATE TABLE gateway.relay (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    holder      text,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    snapshot    pg_snapshot,
    backend_pid integer
);
INSERT INTO gateway.relay DEFAULT VALUES;

-- The relay's read (gateway/relay.py): the snapshot now, and the events of every transaction
-- visible in it but not in p_since (at most p_limit of them), as a JSON array of
-- [topic, epoch, pos, op, tbl, key, created_at].
-- p_wait defaults to 0 so that a replica of the previous version, which calls relay_poll(since,
-- limit), still polls during a rolling upgrade (tests/test_rolling_upgrade.py).
-- With p_wait > 0 (seconds: the busy relay's poll interval, with GATEWAY_RELAY_WAIT) it
-- first waits, looking about every millisecond (pg_sleep's resolution), until such a
-- transaction has committed or p_wait has passed. Looking here costs a fresh snapshot and one
-- index probe, where looking from the relay costs a round trip and a statement: the busy
-- relay can wait for the next commit instead of sleeping through a poll interval, and an
-- event waits a millisecond or so for its poll, not half the interval. Each assignment and
-- query of a VOLATILE PL/pgSQL function takes a new snapshot under READ COMMITTED, so the
-- loop sees commits.
-- The events are read after the snapshot is taken: every transaction visible in it has
-- committed by then, so its events are visible to the read.
-- Sequential scans are off inside it: it runs every few milliseconds and must be an index
-- range on events.xid, but gateway.events grows faster than autovacuum refreshes its
-- statistics, and with stale ones the planner scans the table whole.
-- In PL/pgSQL with one generic plan: a LANGUAGE sql function with a SET clause is planned
-- again at every call, and so is a PL/pgSQL query whose custom plans look cheaper than the
-- generic one; planning cost more than running (docs/performance-history.md).
CREATE FUNCTION gateway.relay_poll(
    p_since text, p_limit integer, p_wait double precision DEFAULT 0, OUT snapshot text, OUT events text
)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_since pg_snapshot := p_since::pg_snapshot;
    v_now pg_snapshot := pg_current_snapshot();
    v_until timestamptz;
BEGIN
    IF p_wait > 0 THEN
        v_until := clock_timestamp() + make_interval(secs => p_wait);
        WHILE NOT EXISTS (SELECT FROM gateway.events AS ev
                          WHERE ev.xid >= pg_snapshot_xmin(v_since)
                            AND pg_visible_in_snapshot(ev.xid, v_now)
                            AND NOT pg_visible_in_snapshot(ev.xid, v_since))
              AND clock_timestamp() < v_until LOOP
            PERFORM pg_sleep(0.001);
            v_now := pg_current_snapshot();
        END LOOP;
    END IF;
    snapshot := v_now::text;
    -- The epoch as a subquery per event, not a join: a join's generic plan hashes the whole
    -- of gateway.topics (one row per topic: millions with per-user topics) at every poll.
    SELECT coalesce(json_agg(json_build_array(
               e.topic, (SELECT t.epoch FROM gateway.topics AS t WHERE t.topic = e.topic),
               e.pos, e.op, e.tbl, e.key, date_part('epoch', e.created_at))), '[]')::text
    INTO events
    FROM (SELECT ev.topic, ev.pos, ev.op, ev.tbl, ev.key, ev.created_at FROM gateway.events AS ev
          WHERE ev.xid >= pg_snapshot_xmin(v_since)
            AND pg_visible_in_snapshot(ev.xid, v_now)
            AND NOT pg_visible_in_snapshot(ev.xid, v_since)
          LIMIT p_limit) AS e;
END
$$;

-- Ring for the events this transaction wrote, unless the relay is polling anyway or the
-- session said gateway.ring = off. date_part, not extract: a float, not a numeric, is cheaper
-- to compute. The capture triggers inline the same test (101_capture.sql).
CREATE FUNCTION gateway.ring() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('gateway.relay_awake_until'), 0)
       < date_part('epoch', clock_timestamp()) * 1000
       AND current_setting('gateway.ring', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_notify('gateway_poll', '');
    END IF;
END
$$;

-- The gateway's own (see the end of 100_event_log.sql): the relay's role is granted them
-- (docs/sql.md, "The gateway's role"); emit and the capture triggers ring as the owner.
REVOKE EXECUTE ON FUNCTION gateway.relay_poll(text, integer, double precision), gateway.ring() FROM PUBLIC;
