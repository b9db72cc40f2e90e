-- 013: presence: a user swept with a dead replica is graced from her latest close, not only
-- from that replica's last heartbeat.
--
-- When the sweep removes a dead replica, a user it leaves with no connection enters the grace
-- from the last moment she is known to have been connected: the replica's last heartbeat (or
-- her connection's start, or her last status change, if later). But she may have been seen
-- later: she had a second tab, on a live replica (or on the dead one, before it died), and
-- closed it after that heartbeat. Nothing recorded it: closing a connection that is not the
-- user's last deleted its presence_connections row and wrote nothing else. With a grace
-- shorter than the ttl, the sweep then marked her offline at once, moments after she closed a
-- tab, and a reload at that moment made her flicker offline and back.
--
-- gateway.presence.closed_at keeps that sighting: when connections are removed and their user
-- keeps another, the time they were last known open (now() for a close or a replica shutting
-- down; for a dead replica's, its last heartbeat or the connection's start). presence_settle
-- starts the grace of a user left with no connection at the latest of that, the time its
-- caller gives and last_seen. A column of its own rather than last_seen: last_seen is
-- published to clients (events and snapshots) as "when the status took its current value",
-- and closing one of several tabs changes no status.
--
-- What it costs: a close that leaves the user another connection now also updates her row on
-- each presence topic, in the same statement for the whole batch. The rows are already locked
-- by the transition (presence_lock, in (topic, user_id) order), so no lock and no lock order
-- is added; closed_at is in no index, so the update can be HOT. Closing a user's last
-- connection writes nothing more (left_at is written then, as before), nor does opening one
-- or changing a status. Measured on the development machine (2 shared cores, PostgreSQL 15,
-- fsync off, 10 000 users online, one topic): a batch of 1 000 such closes took 10 ms before
-- and 20 ms after (10 us more per close); one close per call, 0.75 ms before and 0.8 ms
-- after (the round trip and the commit dominate); WAL per close 110 bytes before, 490 after.
-- About half of it is finding the rows, the rest writing them: the rows sit in full pages,
-- so few of these updates were HOT, and the others add an entry to each of the three indexes
-- of an online user's row. Still well under what one published status change costs (about
-- 150 us). Removing a replica (a sweep, a shutdown) likewise updates the rows of its users
-- who keep a connection on another replica, once each.
--
-- Adding the column changes only the catalog (no default: no rewrite), but takes an ACCESS
-- EXCLUSIVE lock on gateway.presence for that moment: it waits for the presence writes and
-- snapshot reads in flight, and they wait for it.
--
-- Idempotent: the column is added if missing, the functions replaced.

ALTER TABLE gateway.presence ADD COLUMN IF NOT EXISTS closed_at timestamptz;
COMMENT ON COLUMN gateway.presence.closed_at IS
    'when a connection of the user was last removed while she kept another (sql/013)';

-- As in sql/002, but a user left with no connection enters the grace at the latest of p_at,
-- her last status change and closed_at.
--
-- Derive the status of p_users (locked by the caller) from their connections and store it.
-- p_at[i] is when p_users[i] was last known connected, used as left_at for a user left
-- with no connection (now() for a disconnect, the last heartbeat for a dead replica).
-- Returns the status changes to publish; entering the grace changes no status.
CREATE OR REPLACE FUNCTION gateway.presence_settle(p_users text[], p_at timestamptz[])
RETURNS TABLE (topic text, data jsonb)
LANGUAGE sql AS $$
    WITH u AS (
        SELECT x.user_id, max(x.at) AS at
        FROM unnest(p_users, p_at) AS x(user_id, at)
        GROUP BY x.user_id
    ), d AS (
        SELECT u.user_id, u.at,
               CASE WHEN bool_or(c.status = 'online') THEN 'online'
                    WHEN bool_or(c.status = 'away') THEN 'away' END AS derived  -- NULL: no connection
        FROM u LEFT JOIN gateway.presence_connections c ON c.user_id = u.user_id
        GROUP BY u.user_id, u.at
    ), old AS (
        SELECT p.topic, p.user_id, p.status AS was, d.derived, d.at
        FROM gateway.presence p JOIN d ON d.user_id = p.user_id
    ), upd AS (
        UPDATE gateway.presence p SET
            status = coalesce(old.derived, p.status),
            last_seen = CASE WHEN old.derived IS DISTINCT FROM p.status AND old.derived IS NOT NULL
                             THEN now() ELSE p.last_seen END,
            -- GREATEST: a status change, or the close of another of her connections, after
            -- the dead replica's last heartbeat is later news (GREATEST skips a NULL closed_at).
            left_at = CASE WHEN old.derived IS NULL THEN greatest(old.at, p.last_seen, p.closed_at) END
        FROM old
        WHERE p.topic = old.topic AND p.user_id = old.user_id
          AND (   (old.derived IS NOT NULL AND (old.derived <> p.status OR p.left_at IS NOT NULL))
               OR (old.derived IS NULL AND p.status <> 'offline' AND p.left_at IS NULL))
        RETURNING p.topic, p.user_id, p.status, p.last_seen, old.was
    )
    SELECT upd.topic,
           jsonb_build_object('user', upd.user_id, 'status', upd.status,
                              'last_seen', extract(epoch FROM upd.last_seen))
    FROM upd
    WHERE upd.status <> upd.was
    ORDER BY upd.topic, upd.user_id
$$;

-- --- transitions: each one round trip and one transaction -------------------------------

-- As in sql/002, but a user who closes a connection and keeps another gets closed_at.
--
-- Apply a batch of connection changes of one replica. Element i: connection p_conn_ids[i]
-- of user p_users[i] now has status p_statuses[i] ('online' or 'away'; NULL: it closed).
-- p_topics: the presence topics the replica's users appear in (rows are created there).
-- With p_full, the batch is the replica's complete set: its other connections are removed
-- and its row is created or renewed (registration, and repair after an outage).
-- Returns the number of status changes published, or -1 when the replica is not registered
-- (it was declared dead): nothing was done, register with p_full first.
CREATE OR REPLACE FUNCTION gateway.presence_apply(
    p_replica text, p_topics text[], p_conn_ids text[], p_users text[], p_statuses text[],
    p_full boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_users text[];
    v_closed text[];
    v_topics text[];
    v_data jsonb[];
BEGIN
    IF p_replica IS NULL OR p_replica = '' THEN
        RAISE EXCEPTION 'gateway.presence_apply: replica id must be a non-empty text';
    END IF;
    p_conn_ids := coalesce(p_conn_ids, '{}');
    p_users := coalesce(p_users, '{}');
    p_statuses := coalesce(p_statuses, '{}');
    p_topics := coalesce(p_topics, '{}');
    IF cardinality(p_users) <> cardinality(p_conn_ids) OR cardinality(p_statuses) <> cardinality(p_conn_ids) THEN
        RAISE EXCEPTION 'gateway.presence_apply: conn_ids (%), users (%) and statuses (%) must have the same length',
            cardinality(p_conn_ids), cardinality(p_users), cardinality(p_statuses);
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_conn_ids, p_users) AS x(c, u) WHERE x.c IS NULL OR x.u IS NULL) THEN
        RAISE EXCEPTION 'gateway.presence_apply: conn_ids and users must not contain NULL';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_statuses) AS s WHERE s NOT IN ('online', 'away')) THEN
        RAISE EXCEPTION 'gateway.presence_apply: a status must be online, away or NULL (closed), not %',
            (SELECT s FROM unnest(p_statuses) AS s WHERE s NOT IN ('online', 'away') LIMIT 1);
    END IF;
    IF (SELECT count(DISTINCT c) FROM unnest(p_conn_ids) AS c) <> cardinality(p_conn_ids) THEN
        RAISE EXCEPTION 'gateway.presence_apply: a conn_id appears twice; send each connection''s final state once';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_topics) AS t WHERE t IS NULL OR t NOT LIKE 'presence:%') THEN
        RAISE EXCEPTION 'gateway.presence_apply: presence topics must start with presence:, got %', p_topics;
    END IF;

    -- The replica row first (lock order). KEY SHARE keeps a sweep from deleting it until we commit.
    IF p_full THEN
        INSERT INTO gateway.replicas AS r (replica_id) VALUES (p_replica)
        ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = now();
    ELSE
        PERFORM 1 FROM gateway.replicas WHERE replica_id = p_replica FOR KEY SHARE;
        IF NOT FOUND THEN
            RETURN -1;
        END IF;
    END IF;

    SELECT array_agg(DISTINCT x.u) INTO v_users FROM (
        SELECT unnest(p_users)
        UNION
        SELECT c.user_id FROM gateway.presence_connections c WHERE p_full AND c.replica_id = p_replica
    ) AS x(u);
    IF v_users IS NULL THEN
        RETURN 0;
    END IF;

    -- Rows for connecting users (offline until derived below), then lock every touched user.
    INSERT INTO gateway.presence (topic, user_id, status)
    SELECT t.topic, u.user_id, 'offline'
    FROM unnest(p_topics) AS t(topic)
    CROSS JOIN (SELECT DISTINCT x.u FROM unnest(p_users, p_statuses) AS x(u, s) WHERE x.s IS NOT NULL) AS u(user_id)
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    PERFORM gateway.presence_lock(v_users);

    IF p_full THEN
        WITH gone AS (
            DELETE FROM gateway.presence_connections c
            WHERE c.replica_id = p_replica AND NOT (c.conn_id = ANY (p_conn_ids))
            RETURNING c.user_id
        )
        SELECT array_agg(gone.user_id) INTO v_closed FROM gone;
    END IF;
    WITH gone AS (
        DELETE FROM gateway.presence_connections c
        USING unnest(p_conn_ids, p_statuses) AS x(conn_id, status)
        WHERE c.replica_id = p_replica AND c.conn_id = x.conn_id AND x.status IS NULL
        RETURNING c.user_id
    )
    SELECT coalesce(v_closed, '{}') || coalesce(array_agg(gone.user_id), '{}') INTO v_closed FROM gone;
    INSERT INTO gateway.presence_connections AS c (replica_id, conn_id, user_id, status)
    SELECT p_replica, x.conn_id, x.user_id, x.status
    FROM unnest(p_conn_ids, p_users, p_statuses) AS x(conn_id, user_id, status)
    WHERE x.status IS NOT NULL
    ON CONFLICT (replica_id, conn_id) DO UPDATE SET status = excluded.status
    WHERE c.status <> excluded.status;

    -- Users who closed a connection and keep another (on any replica): when, so that if those
    -- are on a replica that dies, the sweep counts their grace from here at the earliest.
    -- Only users of v_users, whose rows are locked already, so no lock is taken out of order
    -- (a closed connection of a user not in it means a caller that named the wrong user).
    -- A closed_at later than now() (a transaction that began after this one) is kept.
    IF cardinality(v_closed) > 0 THEN
        UPDATE gateway.presence p SET closed_at = now()
        FROM (SELECT DISTINCT x.user_id FROM unnest(v_closed) AS x(user_id)
              JOIN unnest(v_users) AS l(user_id) ON l.user_id = x.user_id) AS k
        WHERE p.user_id = k.user_id
          AND (p.closed_at IS NULL OR p.closed_at < now())
          AND EXISTS (SELECT FROM gateway.presence_connections c WHERE c.user_id = p.user_id);
    END IF;

    SELECT array_agg(s.topic), array_agg(s.data) INTO v_topics, v_data
    FROM gateway.presence_settle(v_users, array_fill(now(), ARRAY[cardinality(v_users)])) AS s;
    RETURN gateway.presence_publish(v_topics, v_data);
END
$$;

-- As in sql/002, but a user who keeps a connection elsewhere gets closed_at.
--
-- Remove replicas (rows already deleted and returned by the caller, with their last
-- heartbeat) : lock their users, delete their connections, settle. Internal.
CREATE OR REPLACE FUNCTION gateway.presence_drop_connections(
    p_replicas text[], p_heartbeats timestamptz[], p_also_lock text[], p_grace interval
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_users text[];
    v_at timestamptz[];
    v_topics text[];
    v_data jsonb[];
    t2 text[];
    d2 jsonb[];
BEGIN
    -- A user's last known connected time: the later of the replica's last heartbeat and
    -- the connection's start (it may have connected after that heartbeat).
    SELECT array_agg(s.user_id ORDER BY s.user_id), array_agg(s.at ORDER BY s.user_id) INTO v_users, v_at
    FROM (
        SELECT c.user_id, max(greatest(r.hb, c.connected_at)) AS at
        FROM gateway.presence_connections c
        JOIN unnest(p_replicas, p_heartbeats) AS r(replica_id, hb) ON r.replica_id = c.replica_id
        GROUP BY c.user_id
    ) s;
    v_users := coalesce(v_users, '{}');
    v_at := coalesce(v_at, '{}');
    IF cardinality(v_users) = 0 AND coalesce(cardinality(p_also_lock), 0) = 0 THEN
        RETURN 0;
    END IF;
    PERFORM gateway.presence_lock(v_users || coalesce(p_also_lock, '{}'));
    DELETE FROM gateway.presence_connections c WHERE c.replica_id = ANY (p_replicas);
    -- Users who keep a connection on another replica: their removed ones were last known open
    -- at v_at (now() for a replica shutting down). Should those others die later with an
    -- older last heartbeat, the grace starts from here at the earliest. Rows locked above.
    UPDATE gateway.presence p SET closed_at = u.at
    FROM unnest(v_users, v_at) AS u(user_id, at)
    WHERE p.user_id = u.user_id
      AND (p.closed_at IS NULL OR p.closed_at < u.at)
      AND EXISTS (SELECT FROM gateway.presence_connections c WHERE c.user_id = p.user_id);
    SELECT array_agg(s.topic), array_agg(s.data) INTO v_topics, v_data
    FROM gateway.presence_settle(v_users, v_at) AS s;
    IF p_grace IS NOT NULL THEN
        SELECT array_agg(s.topic), array_agg(s.data) INTO t2, d2
        FROM gateway.presence_expire(v_users || coalesce(p_also_lock, '{}'), p_grace) AS s;
        v_topics := coalesce(v_topics, '{}') || coalesce(t2, '{}');
        v_data := coalesce(v_data, '{}') || coalesce(d2, '{}');
    END IF;
    RETURN gateway.presence_publish(v_topics, v_data);
END
$$;
