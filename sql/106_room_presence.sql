-- 106: presence per room, with each connection's state (docs/presence.md, "Rooms").
--
-- A connection that tracks a room (the `track` frame) is one row of gateway.room_presence:
-- its replica, its connection id, the room topic (room:7), its user and its state (a JSON
-- object the client chose, at most 1 KB, checked by the gateway). Every change of the table
-- appends, in the same transaction, an event to the room's presence topic (presence:room:7):
--   {"op": "join"|"update", "user": ..., "conn": ..., "state": {...}}  or
--   {"op": "leave", "user": ..., "conn": ...}
-- so the changes reach subscribers on every replica through the normal pipeline, with
-- positions: in commit order, nothing missed or doubled, replayed after a snapshot.
--
-- Unlike global presence (103_presence.sql) a room member is a connection, not a user, and
-- there is no grace: a closed connection leaves at once (its id will never come back, a
-- reload is a new connection). A user with two tabs is two rows, shown as one member with
-- two connections (gateway/rooms.py groups them).
--
-- No ghosts: a row lives only as long as its replica's row in gateway.replicas. Whatever
-- deletes a replica (the sweep of one silent for GATEWAY_HEARTBEAT_TTL, a clean shutdown's
-- presence_unregister, an operator) fires room_presence_replicas_gone, which deletes the
-- replica's members and publishes their leaves in that same transaction. So a killed
-- replica's members leave within the bound of global presence, and no function of
-- 103_presence.sql had to be restated. room_presence_apply holds the replica's row
-- (FOR KEY SHARE) while it writes, so a sweep cannot delete the replica between the check and
-- the insert and leave rows behind; a replica whose row is gone gets -1 and registers again.
--
-- Lock order (as in 103_presence.sql, no cycle): the replica row, then this table's rows of
-- that replica, then (inside gateway.emit_many) the room presence topics' rows. Room presence
-- never locks gateway.presence rows, and global presence never locks room presence topics, so
-- the sweep, which takes room topics (this trigger) before users, waits for nobody who waits
-- for it.

CREATE TABLE gateway.room_presence (
    replica_id text NOT NULL,
    conn_id    text NOT NULL,
    room       text NOT NULL,  -- the room topic (room:7); its presence topic is 'presence:' || room
    user_id    text NOT NULL,
    state      jsonb NOT NULL CHECK (jsonb_typeof(state) = 'object'),
    joined_at  timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_id, conn_id, room)
);
-- A subscribe's snapshot and the HTTP API read one room's members, in this order.
CREATE INDEX room_presence_room ON gateway.room_presence (room, user_id, conn_id);

-- Apply a batch of one replica's room changes. Element i: connection p_conn_ids[i] of user
-- p_users[i] is in room p_rooms[i] with state p_states[i] (a JSON object), or left it (NULL).
-- With p_full, the batch is the replica's complete set: its other rows are removed (repair
-- after an outage, or after the replica was declared dead and registered again).
-- Returns the number of changes published, or -1 when the replica has no row in
-- gateway.replicas (it was declared dead): nothing was done; register it
-- (gateway.presence_apply with p_full) and call again with p_full.
CREATE FUNCTION gateway.room_presence_apply(
    p_replica text, p_conn_ids text[], p_rooms text[], p_users text[], p_states jsonb[],
    p_full boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_topics text[];
    v_data jsonb[];
    t2 text[];
    d2 jsonb[];
    v_bad text;
BEGIN
    IF p_replica IS NULL OR p_replica = '' THEN
        RAISE EXCEPTION 'gateway.room_presence_apply: replica id must be a non-empty text';
    END IF;
    p_conn_ids := coalesce(p_conn_ids, '{}');
    p_rooms := coalesce(p_rooms, '{}');
    p_users := coalesce(p_users, '{}');
    p_states := coalesce(p_states, '{}');
    IF cardinality(p_rooms) <> cardinality(p_conn_ids) OR cardinality(p_users) <> cardinality(p_conn_ids)
       OR cardinality(p_states) <> cardinality(p_conn_ids) THEN
        RAISE EXCEPTION 'gateway.room_presence_apply: conn_ids (%), rooms (%), users (%) and states (%) must have the same length',
            cardinality(p_conn_ids), cardinality(p_rooms), cardinality(p_users), cardinality(p_states);
    END IF;
    IF EXISTS (SELECT FROM unnest(p_conn_ids, p_rooms, p_users) AS x(c, r, u)
               WHERE x.c IS NULL OR x.r IS NULL OR x.u IS NULL) THEN
        RAISE EXCEPTION 'gateway.room_presence_apply: conn_ids, rooms and users must not contain NULL';
    END IF;
    IF (SELECT count(DISTINCT (x.c, x.r)) FROM unnest(p_conn_ids, p_rooms) AS x(c, r)) <> cardinality(p_conn_ids) THEN
        RAISE EXCEPTION 'gateway.room_presence_apply: a (conn_id, room) pair appears twice; send each one''s final state once';
    END IF;
    SELECT format('%L: %s', r, coalesce(gateway.invalid_topic_reason('presence:' || r), 'a room is not a presence topic'))
    INTO v_bad
    FROM unnest(p_rooms) AS r
    WHERE r LIKE 'presence:%' OR gateway.invalid_topic_reason(r) IS NOT NULL
       OR gateway.invalid_topic_reason('presence:' || r) IS NOT NULL
    LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'gateway.room_presence_apply: bad room %', v_bad;
    END IF;
    IF EXISTS (SELECT FROM unnest(p_states) AS s WHERE s IS NOT NULL AND jsonb_typeof(s) <> 'object') THEN
        RAISE EXCEPTION 'gateway.room_presence_apply: a state must be a JSON object, or NULL (left the room)';
    END IF;

    -- The replica row first (lock order). KEY SHARE keeps a sweep from deleting it until we commit.
    PERFORM FROM gateway.replicas WHERE replica_id = p_replica FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN -1;
    END IF;

    -- Leaves: the rows named with a NULL state and, with p_full, every row not named with a state.
    WITH x AS (
        SELECT * FROM unnest(p_conn_ids, p_rooms, p_states) AS x(conn_id, room, state)
    ), gone AS (
        DELETE FROM gateway.room_presence m
        WHERE m.replica_id = p_replica
          AND (EXISTS (SELECT FROM x WHERE x.conn_id = m.conn_id AND x.room = m.room AND x.state IS NULL)
               OR (p_full AND NOT EXISTS (SELECT FROM x WHERE x.conn_id = m.conn_id AND x.room = m.room
                                                           AND x.state IS NOT NULL)))
        RETURNING m.room, m.user_id, m.conn_id
    )
    SELECT array_agg('presence:' || gone.room ORDER BY gone.room, gone.user_id, gone.conn_id),
           array_agg(jsonb_build_object('op', 'leave', 'user', gone.user_id, 'conn', gone.conn_id)
                     ORDER BY gone.room, gone.user_id, gone.conn_id)
    INTO v_topics, v_data
    FROM gone;

    -- Joins and updates; a state equal to the stored one changes nothing and publishes nothing.
    WITH x AS (
        SELECT * FROM unnest(p_conn_ids, p_rooms, p_users, p_states) AS x(conn_id, room, user_id, state)
        WHERE x.state IS NOT NULL
    ), old AS (
        SELECT m.conn_id, m.room FROM gateway.room_presence m
        JOIN x ON x.conn_id = m.conn_id AND x.room = m.room
        WHERE m.replica_id = p_replica
    ), up AS (
        INSERT INTO gateway.room_presence AS m (replica_id, conn_id, room, user_id, state)
        SELECT p_replica, x.conn_id, x.room, x.user_id, x.state FROM x
        ORDER BY x.conn_id, x.room
        ON CONFLICT (replica_id, conn_id, room) DO UPDATE
            SET state = excluded.state, user_id = excluded.user_id, updated_at = now()
            WHERE m.state IS DISTINCT FROM excluded.state OR m.user_id IS DISTINCT FROM excluded.user_id
        RETURNING m.room, m.user_id, m.conn_id, m.state
    )
    SELECT array_agg('presence:' || up.room ORDER BY up.room, up.user_id, up.conn_id),
           array_agg(jsonb_build_object(
                         'op', CASE WHEN old.conn_id IS NULL THEN 'join' ELSE 'update' END,
                         'user', up.user_id, 'conn', up.conn_id, 'state', up.state)
                     ORDER BY up.room, up.user_id, up.conn_id)
    INTO t2, d2
    FROM up LEFT JOIN old ON old.conn_id = up.conn_id AND old.room = up.room;

    v_topics := coalesce(v_topics, '{}') || coalesce(t2, '{}');
    v_data := coalesce(v_data, '{}') || coalesce(d2, '{}');
    IF cardinality(v_topics) = 0 THEN
        RETURN 0;  -- nothing changed: no event, no doorbell
    END IF;
    PERFORM gateway.emit_many(v_topics, v_data);
    RETURN cardinality(v_topics);
END
$$;

-- Whatever deletes replicas deletes their room members and publishes their leaves, in the
-- same transaction (see the top of this file). One statement, one emit_many, one doorbell.
-- SECURITY DEFINER: it runs as the schema's owner whoever deletes the replica, so a gateway
-- role granted only what the previous release needed (a replica of that release during a
-- rolling upgrade) still sweeps and shuts down.
CREATE FUNCTION gateway.room_presence_replicas_gone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_topics text[];
    v_data jsonb[];
BEGIN
    WITH gone AS (
        DELETE FROM gateway.room_presence m
        USING (SELECT DISTINCT g.replica_id FROM gone_replicas g) AS g
        WHERE m.replica_id = g.replica_id
        RETURNING m.room, m.user_id, m.conn_id
    )
    SELECT array_agg('presence:' || gone.room ORDER BY gone.room, gone.user_id, gone.conn_id),
           array_agg(jsonb_build_object('op', 'leave', 'user', gone.user_id, 'conn', gone.conn_id)
                     ORDER BY gone.room, gone.user_id, gone.conn_id)
    INTO v_topics, v_data
    FROM gone;
    IF v_topics IS NOT NULL THEN
        PERFORM gateway.emit_many(v_topics, v_data);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER room_presence_replicas_gone
    AFTER DELETE ON gateway.replicas
    REFERENCING OLD TABLE AS gone_replicas
    FOR EACH STATEMENT EXECUTE FUNCTION gateway.room_presence_replicas_gone();

-- Who may do what (see the end of 100_event_log.sql and docs/sql.md, "The gateway's role").
-- Both functions are SECURITY DEFINER (fixed search_path, every name with its schema): the
-- gateway's role needs EXECUTE on room_presence_apply and SELECT on the table (snapshots), and
-- no write privilege on it. room_presence_apply publishes presence events on any room's
-- presence topic, so it is the gateway's alone.
REVOKE EXECUTE ON FUNCTION
    gateway.room_presence_apply(text, text[], text[], text[], jsonb[], boolean),
    gateway.room_presence_replicas_gone()
FROM PUBLIC;
