-- Rooms: messages that clients publish on a topic, and the replica bus that carries the
-- ephemeral ones between gateway processes (gateway/publish.py, gateway/bus.py).
--
-- Durable messages go to the event log like gateway.emit's, with one difference: the user who
-- sent them, which the gateway alone sets, is kept in a column of its own, gateway.events.sender.
-- emit, emit_many and the capture triggers leave it NULL, so a role that may call emit can
-- publish an event on any topic but can never make it look as if a user sent it: a client sees
-- "from" only on events the gateway wrote for an authenticated user.

ALTER TABLE gateway.events ADD COLUMN sender text;

-- Publish a durable message on behalf of a user: the next position of the topic, like emit,
-- with the sender recorded. Only the gateway calls it (EXECUTE revoked from PUBLIC below): it
-- has checked the user's right to publish on the topic and the message's size before.
CREATE FUNCTION gateway.publish_message(p_topic text, p_data jsonb, p_sender text, OUT epoch text, OUT pos bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_topic text COLLATE "C" := p_topic;
    v_problem text := gateway.invalid_topic_reason(v_topic);
BEGIN
    IF v_problem IS NOT NULL THEN
        PERFORM gateway.refuse_topic('gateway.publish_message', p_topic, v_problem);
    END IF;
    IF p_sender IS NULL THEN
        RAISE EXCEPTION 'gateway.publish_message: the sender is NULL; only messages of a user are published here (use gateway.emit otherwise)';
    END IF;
    SELECT a.epoch, a.pos INTO epoch, pos FROM gateway.advance(p_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, data, sender) VALUES (p_topic, pos, 'm', p_data, p_sender);
    PERFORM gateway.ring();
END
$$;

-- Who may publish on a topic that the token's publish claim does not grant. The gateway asks it
-- once per (connection, topic) and again when the token is refreshed. This default grants
-- nothing: reading a topic never implies the right to write to it. Replace it with your rules:
--   CREATE OR REPLACE FUNCTION gateway.authorize_publish(user_id text, topic text, claims jsonb)
--   RETURNS boolean LANGUAGE sql STABLE AS $$
--       SELECT EXISTS (SELECT 1 FROM room_members m
--                      WHERE 'room:' || m.room_id = topic AND m.user_id = authorize_publish.user_id
--                        AND m.may_write)
--   $$;
-- Later migrations never replace it, as gateway.authorize.
CREATE FUNCTION gateway.authorize_publish(user_id text, topic text, claims jsonb) RETURNS boolean
LANGUAGE sql STABLE AS 'SELECT false';

-- The replica bus (gateway/bus.py): without a broker, gateway processes tell each other
-- ephemeral things (a client's ephemeral message, a disconnect order) with NOTIFY on channel
-- gateway_bus. Any role that can log in may NOTIFY that channel, so a receiver believes a
-- notification only when the backend that sent it is registered here, as the doorbells are
-- believed only from the relay's backend (102_relay.sql). A process registers the backend of
-- its sending connection, and only that: gateway.bus_register() records pg_backend_pid() of its
-- caller, and only the gateway's role may call it. backend_start tells a live sender from
-- another session that was later given the same pid.
CREATE TABLE gateway.bus_senders (
    pid           integer PRIMARY KEY,
    backend_start timestamptz,
    replica       text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);

-- The sessions registered here that still exist (the same pid, started at the same time).
-- backend_start is read as the owner: NULL on both sides when the owner may not see the
-- gateway's sessions, and the pid alone is then compared.
CREATE FUNCTION gateway.bus_live_senders() RETURNS SETOF integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.pid FROM gateway.bus_senders AS s
    WHERE EXISTS (SELECT FROM pg_catalog.pg_stat_get_activity(s.pid) AS a
                  WHERE a.pid = s.pid AND a.backend_start IS NOT DISTINCT FROM s.backend_start)
$$;

-- Register the caller's own backend as a bus sender of p_replica (forgetting senders whose
-- sessions are gone, so the table stays as small as the number of live processes).
CREATE FUNCTION gateway.bus_register(p_replica text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM gateway.bus_senders AS s WHERE s.pid NOT IN (SELECT gateway.bus_live_senders());
    INSERT INTO gateway.bus_senders (pid, backend_start, replica)
    SELECT a.pid, a.backend_start, p_replica
    FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) AS a
    ON CONFLICT (pid) DO UPDATE
        SET backend_start = excluded.backend_start, replica = excluded.replica, registered_at = now();
END
$$;

REVOKE EXECUTE ON FUNCTION
    gateway.publish_message(text, jsonb, text),
    gateway.bus_register(text), gateway.bus_live_senders()
FROM PUBLIC;
