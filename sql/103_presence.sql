-- 002: presence: who is online, across every gateway replica, with no ghosts after a crash.
--
-- Three tables:
--   gateway.presence              one row per (topic, user): the status subscribers see
--   gateway.presence_connections  one row per live WebSocket connection, per replica
--   gateway.replicas              one row per running gateway process, with its heartbeat
--
-- A user's status on a presence topic is derived from its connections on all replicas:
-- online if any is online, away if all are away. When the last one closes the user is
-- NOT offline at once: `left_at` records when, and the sweep marks the user offline once
-- `presence_grace` has passed with no new connection (a page reload emits nothing).
-- A replica that stops heartbeating for `heartbeat_ttl` is dead: the sweep deletes its
-- connections, so a kill -9 leaves no ghosts.
--
-- Every change of a user's status updates gateway.presence and, in the same transaction,
-- appends a hand-published event to the topic's log (op 'm', data
-- {"user": ..., "status": ..., "last_seen": <unix seconds>}), so the change reaches every
-- replica through the normal pipeline with a position: nothing missed or doubled.
--
-- Concurrency: every transition locks the gateway.presence rows of the users it touches
-- (always in (topic, user_id) order, in one statement, before anything is published), then
-- derives their status in a later statement. Under READ COMMITTED that statement sees every
-- transaction that held those locks before, so the last writer always derives from the
-- complete set of connections: concurrent connects and disconnects of one user on several
-- replicas can never leave a wrong status. Lock order everywhere: the replica row, then
-- user rows, then (inside gateway.emit_many) topic rows, so transitions cannot deadlock.
-- Row locks rather than advisory locks: a sweep of a dead replica with 50 000 users would
-- otherwise need 50 000 entries in the shared lock table.
--
-- A user once seen keeps a row in gateway.presence, offline, until gateway.presence_prune
-- deletes it (the gateway calls it with GATEWAY_PRESENCE_RETENTION). A subscribe's snapshot
-- (gateway/presence.py: WHERE topic = $1 AND status <> 'offline' ORDER BY user_id) reads only
-- the users who are not offline, through the index presence_live, however many offline rows
-- a topic has: a reconnect storm of presence subscribes must not hold every pool connection
-- for a walk over them.
--
-- gateway.presence.closed_at keeps the latest time a connection of the user was removed
-- while she kept another (on any replica). When the sweep removes a dead replica, a user it
-- leaves with no connection enters the grace from the last moment she is known to have been
-- connected: the latest of the replica's last heartbeat (or her connection's start), her last
-- status change and closed_at. Without closed_at, a user who had a second tab and closed it
-- after that heartbeat would be marked offline at once with a grace shorter than the ttl, and
-- a reload at that moment would make her flicker offline and back. A column of its own rather
-- than last_seen: last_seen is published to clients (events and snapshots) as "when the status
-- took its current value", and closing one of several tabs changes no status. What it costs:
-- docs/performance-history.md.

CREATE TABLE gateway.presence (
    topic     text NOT NULL,
    user_id   text NOT NULL,
    status    text NOT NULL CHECK (status IN ('online', 'away', 'offline')),
    -- When the status took its current value; for offline users, when the last connection closed.
    last_seen timestamptz NOT NULL DEFAULT now(),
    -- Set while the user has no connection but is not offline yet (inside the grace).
    left_at   timestamptz,
    -- When a connection of the user was last removed while she kept another (see above).
    closed_at timestamptz,
    PRIMARY KEY (topic, user_id)
);
COMMENT ON COLUMN gateway.presence.closed_at IS
    'when a connection of the user was last removed while she kept another';
CREATE INDEX presence_user_id ON gateway.presence (user_id);
-- The sweep looks for users inside the grace only: a small set, whatever the number online.
CREATE INDEX presence_left_at ON gateway.presence (left_at) WHERE left_at IS NOT NULL;
-- A subscribe's snapshot: the users who are not offline, in snapshot order, and nothing else.
-- (With `status` in index predicates no status change is a HOT update; measured as no
-- dearer per connection: docs/performance-history.md.)
CREATE INDEX presence_live ON gateway.presence (topic, user_id) WHERE status <> 'offline';
-- presence_prune's candidates, oldest first.
CREATE INDEX presence_offline ON gateway.presence (last_seen) WHERE status = 'offline';

CREATE TABLE gateway.replicas (
    replica_id   text PRIMARY KEY,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway.presence_connections (
    replica_id   text NOT NULL,
    conn_id      text NOT NULL,
    user_id      text NOT NULL,
    status       text NOT NULL CHECK (status IN ('online', 'away')),
    connected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_id, conn_id)
);
CREATE INDEX presence_connections_user_id ON gateway.presence_connections (user_id);

-- --- internal steps (each caller runs them in one transaction) ------------------------

-- Lock the presence rows of p_users, in (topic, user_id) order.
CREATE FUNCTION gateway.presence_lock(p_users text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM gateway.presence WHERE user_id = ANY (p_users) ORDER BY topic, user_id FOR UPDATE;
END
$$;

-- Derive the status of p_users (locked by the caller) from their connections and store it.
-- p_at[i] is when p_users[i] was last known connected, used as left_at for a user left
-- with no connection (now() for a disconnect, the last heartbeat for a dead replica).
-- Returns the status changes to publish; entering the grace changes no status. A user left
-- with no connection enters the grace at the latest of p_at, her last status change and
-- closed_at.
CREATE FUNCTION gateway.presence_settle(p_users text[], p_at timestamptz[])
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

-- Mark offline those of p_users (locked by the caller) whose grace has passed.
CREATE FUNCTION gateway.presence_expire(p_users text[], p_grace interval)
RETURNS TABLE (topic text, data jsonb)
LANGUAGE sql AS $$
    WITH upd AS (
        UPDATE gateway.presence p SET status = 'offline', last_seen = p.left_at, left_at = NULL
        WHERE p.user_id = ANY (p_users)
          AND p.left_at <= now() - p_grace
          AND NOT EXISTS (SELECT 1 FROM gateway.presence_connections c WHERE c.user_id = p.user_id)
        RETURNING p.topic, p.user_id, p.status, p.last_seen
    )
    SELECT upd.topic,
           jsonb_build_object('user', upd.user_id, 'status', upd.status,
                              'last_seen', extract(epoch FROM upd.last_seen))
    FROM upd
    ORDER BY upd.topic, upd.user_id
$$;

-- Append status changes to their topics' logs: one gateway.emit_many, so one doorbell.
CREATE FUNCTION gateway.presence_publish(p_topics text[], p_data jsonb[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(cardinality(p_topics), 0);
BEGIN
    IF n = 0 THEN
        RETURN 0;  -- nothing changed: no event, no doorbell
    END IF;
    PERFORM gateway.emit_many(p_topics, p_data);
    RETURN n;
END
$$;

-- --- transitions: each one round trip and one transaction -------------------------------

-- Apply a batch of connection changes of one replica. Element i: connection p_conn_ids[i]
-- of user p_users[i] now has status p_statuses[i] ('online' or 'away'; NULL: it closed).
-- p_topics: the presence topics the replica's users appear in (rows are created there).
-- With p_full, the batch is the replica's complete set: its other connections are removed
-- and its row is created or renewed (registration, and repair after an outage).
-- Returns the number of status changes published, or -1 when the replica is not registered
-- (it was declared dead): nothing was done, register with p_full first.
CREATE FUNCTION gateway.presence_apply(
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

-- One connection opened (for SQL clients and tests; the gateway batches with presence_apply).
-- Registers the replica if it has no row yet.
CREATE FUNCTION gateway.presence_connect(
    p_replica text, p_conn_id text, p_user text, p_status text DEFAULT 'online',
    p_topics text[] DEFAULT ARRAY['presence:global']
) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    IF p_status IS NULL THEN
        RAISE EXCEPTION 'gateway.presence_connect: status must be online or away, not NULL';
    END IF;
    INSERT INTO gateway.replicas (replica_id) VALUES (p_replica) ON CONFLICT DO NOTHING;
    RETURN gateway.presence_apply(p_replica, p_topics, ARRAY[p_conn_id], ARRAY[p_user], ARRAY[p_status]);
END
$$;

-- One connection closed. Returns the number of status changes (0: the user is in the grace).
CREATE FUNCTION gateway.presence_disconnect(p_replica text, p_conn_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_user text;
BEGIN
    SELECT c.user_id INTO v_user FROM gateway.presence_connections c
    WHERE c.replica_id = p_replica AND c.conn_id = p_conn_id;
    IF v_user IS NULL THEN
        RETURN 0;  -- already gone (swept, or closed twice)
    END IF;
    RETURN gateway.presence_apply(p_replica, '{}', ARRAY[p_conn_id], ARRAY[v_user], ARRAY[NULL::text]);
END
$$;

-- One connection's status set ('online' or 'away').
CREATE FUNCTION gateway.presence_set_status(p_replica text, p_conn_id text, p_status text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_user text;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('online', 'away') THEN
        RAISE EXCEPTION 'gateway.presence_set_status: status must be online or away, not %', coalesce(p_status, 'NULL');
    END IF;
    SELECT c.user_id INTO v_user FROM gateway.presence_connections c
    WHERE c.replica_id = p_replica AND c.conn_id = p_conn_id;
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'gateway.presence_set_status: no connection % on replica %', p_conn_id, p_replica;
    END IF;
    RETURN gateway.presence_apply(p_replica, '{}', ARRAY[p_conn_id], ARRAY[v_user], ARRAY[p_status]);
END
$$;

-- The replica is alive: one UPDATE of its row per interval, whatever its number of
-- connections. False when it has no row (it was declared dead and swept, or never
-- registered): the caller registers again with presence_apply(..., p_full => true).
CREATE FUNCTION gateway.presence_heartbeat(p_replica text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE gateway.replicas SET heartbeat_at = now() WHERE replica_id = p_replica;
    RETURN FOUND;
END
$$;

-- Remove replicas (rows already deleted and returned by the caller, with their last
-- heartbeat) : lock their users, delete their connections, settle. Internal.
CREATE FUNCTION gateway.presence_drop_connections(
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

-- Clean shutdown of a replica: its connections are removed and its users enter the grace
-- (another replica's sweep marks them offline after it unless they reconnect elsewhere).
-- Also the way to remove a replica by hand. Returns the number of status changes.
CREATE FUNCTION gateway.presence_unregister(p_replica text) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM gateway.replicas WHERE replica_id = p_replica;
    RETURN gateway.presence_drop_connections(ARRAY[p_replica], ARRAY[now()], '{}', NULL);
END
$$;

-- The sweep. Without p_users (every replica calls it every heartbeat_interval; only the
-- one that gets the advisory lock works, the others return -1 at once): replicas silent
-- for more than p_ttl are removed with their connections, then every user whose last
-- connection closed more than p_grace ago is marked offline.
-- With p_users: only the grace check for those users (a replica calls it when the grace
-- of a user that left it has passed, so the grace is honoured promptly).
-- Returns the number of status changes published.
CREATE FUNCTION gateway.presence_sweep(p_ttl interval, p_grace interval, p_users text[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_dead text[];
    v_hb timestamptz[];
    v_due text[];
BEGIN
    IF p_ttl IS NULL OR p_ttl <= interval '0' THEN
        RAISE EXCEPTION 'gateway.presence_sweep: ttl must be a positive interval, not %', coalesce(p_ttl::text, 'NULL');
    END IF;
    IF p_grace IS NULL OR p_grace < interval '0' THEN
        RAISE EXCEPTION 'gateway.presence_sweep: grace must be an interval of 0 or more, not %', coalesce(p_grace::text, 'NULL');
    END IF;
    IF p_users IS NOT NULL THEN
        -- Find the candidates without locking, then lock and check again (presence_expire).
        SELECT array_agg(DISTINCT p.user_id) INTO v_due FROM gateway.presence p
        WHERE p.user_id = ANY (p_users) AND p.left_at <= now() - p_grace;
        IF v_due IS NULL THEN
            RETURN 0;
        END IF;
        RETURN gateway.presence_drop_connections('{}', '{}', v_due, p_grace);
    END IF;

    -- b"gw_presn" read as an integer: one sweeper at a time across all replicas.
    IF NOT pg_try_advisory_xact_lock(7455532644695372654) THEN
        RETURN -1;
    END IF;
    WITH gone AS (
        DELETE FROM gateway.replicas WHERE heartbeat_at < now() - p_ttl RETURNING replica_id, heartbeat_at
    )
    SELECT coalesce(array_agg(replica_id), '{}'), coalesce(array_agg(heartbeat_at), '{}') INTO v_dead, v_hb FROM gone;
    SELECT coalesce(array_agg(DISTINCT p.user_id), '{}') INTO v_due FROM gateway.presence p
    WHERE p.left_at <= now() - p_grace;
    RETURN gateway.presence_drop_connections(v_dead, v_hb, v_due, p_grace);
END
$$;

-- Delete up to p_limit rows of users offline and last seen more than p_older_than ago.
-- Returns how many, or -1 when it did nothing this time (another replica is pruning, or
-- presence writes kept the table for 100 ms): call it again later. Deleting publishes
-- nothing: the user was offline for every subscriber already, and a user missing from the
-- table is offline in a snapshot too.
--
-- Why the table lock: presence_apply creates a connecting user's row (INSERT .. ON CONFLICT
-- DO NOTHING, which locks nothing when the row exists) before it locks the row. A row deleted
-- between the two would leave the user connected without a row: online, shown to nobody.
-- SHARE ROW EXCLUSIVE waits for every transaction that has written to gateway.presence (each
-- holds ROW EXCLUSIVE on it until it ends) and makes new ones wait at their first write, so
-- the delete sees every connection there is, and none is on its way. Held for one batch (a
-- few milliseconds), waited for at most 100 ms (lock_timeout): pruning can wait, presence
-- writes should not. Snapshot reads are never blocked.
CREATE FUNCTION gateway.presence_prune(p_older_than interval, p_limit integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql
SET lock_timeout = '100ms'
AS $$
DECLARE
    v_n integer;
BEGIN
    IF p_older_than IS NULL OR p_older_than <= interval '0' THEN
        RAISE EXCEPTION 'gateway.presence_prune: the age must be a positive interval, not %',
            coalesce(p_older_than::text, 'NULL');
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'gateway.presence_prune: the batch size must be 1 or more, not %',
            coalesce(p_limit::text, 'NULL');
    END IF;
    -- b"gw_prune" read as an integer: one pruner at a time across all replicas.
    IF NOT pg_try_advisory_xact_lock(7455532644696419941) THEN
        RETURN -1;
    END IF;
    -- Usually there is nothing to do: then no table lock, so no write waits.
    IF NOT EXISTS (
        SELECT FROM gateway.presence o
        WHERE o.status = 'offline' AND o.last_seen < now() - p_older_than
    ) THEN
        RETURN 0;
    END IF;
    BEGIN
        LOCK TABLE gateway.presence IN SHARE ROW EXCLUSIVE MODE;
    EXCEPTION WHEN lock_not_available THEN
        RETURN -1;
    END;
    WITH gone AS (
        DELETE FROM gateway.presence p
        WHERE p.ctid = ANY (ARRAY(
            SELECT o.ctid FROM gateway.presence o
            WHERE o.status = 'offline' AND o.left_at IS NULL AND o.last_seen < now() - p_older_than
              AND NOT EXISTS (SELECT FROM gateway.presence_connections c WHERE c.user_id = o.user_id)
            ORDER BY o.last_seen
            LIMIT p_limit
            -- A row someone else has locked is left for next time: they may be about to write
            -- to the table, so wait for this transaction, which must not wait for them.
            FOR UPDATE SKIP LOCKED))
        RETURNING 1
    )
    SELECT count(*) INTO v_n FROM gone;
    RETURN v_n;
END
$$;


-- The gateway's own (see the end of 100_event_log.sql): its role is granted them (docs/sql.md,
-- "The gateway's role"). They publish through emit_many, so a role that may call them may
-- write presence events.
REVOKE EXECUTE ON FUNCTION
    gateway.presence_lock(text[]), gateway.presence_settle(text[], timestamptz[]),
    gateway.presence_expire(text[], interval), gateway.presence_publish(text[], jsonb[]),
    gateway.presence_apply(text, text[], text[], text[], text[], boolean),
    gateway.presence_connect(text, text, text, text, text[]), gateway.presence_disconnect(text, text),
    gateway.presence_set_status(text, text, text), gateway.presence_heartbeat(text),
    gateway.presence_drop_connections(text[], timestamptz[], text[], interval),
    gateway.presence_unregister(text), gateway.presence_sweep(interval, interval, text[]),
    gateway.presence_prune(interval, integer)
FROM PUBLIC;
