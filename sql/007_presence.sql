-- 007: presence: a subscribe's snapshot reads only the users who are not offline, and
-- offline users are deleted once they have been gone long enough.
--
-- A user once seen keeps a row in gateway.presence, offline, and the snapshot
-- (gateway/presence.py: WHERE topic = $1 AND status <> 'offline' ORDER BY user_id) walked
-- every row of the topic to find the few that are not: with 200 000 offline rows and 1 000
-- users online, 35 ms a subscribe instead of 1 ms. A reconnect storm of presence subscribes
-- then held every pool connection that long each. presence_live holds the users who are not
-- offline, in snapshot order, and nothing else.
--
-- And nothing deleted offline rows: gateway.presence grew with every user ever seen.
-- gateway.presence_prune deletes the users offline and last seen longer ago than an age
-- (the gateway passes GATEWAY_PRESENCE_RETENTION), a batch per call, oldest first, found by
-- presence_offline. Deleting publishes nothing: the user was offline for every subscriber
-- already, and a user missing from the table is offline in a snapshot too.
--
-- What the two indexes cost: `status` is now in index predicates, so no status change is a
-- HOT update any more. Measured with 200 000 offline rows, batches of 1 000 connections,
-- status changes and closes cost the same per connection with or without them, within the
-- noise of a shared 2-core machine (55 to 100 us each). Creating them locks gateway.presence
-- against writes while they are built: about a second per million rows.
--
-- Idempotent.

CREATE INDEX IF NOT EXISTS presence_live ON gateway.presence (topic, user_id) WHERE status <> 'offline';
CREATE INDEX IF NOT EXISTS presence_offline ON gateway.presence (last_seen) WHERE status = 'offline';

-- Delete up to p_limit rows of users offline and last seen more than p_older_than ago.
-- Returns how many, or -1 when it did nothing this time (another replica is pruning, or
-- presence writes kept the table for 100 ms): call it again later.
--
-- Why the table lock: presence_apply creates a connecting user's row (INSERT .. ON CONFLICT
-- DO NOTHING, which locks nothing when the row exists) before it locks the row. A row deleted
-- between the two would leave the user connected without a row: online, shown to nobody.
-- SHARE ROW EXCLUSIVE waits for every transaction that has written to gateway.presence (each
-- holds ROW EXCLUSIVE on it until it ends) and makes new ones wait at their first write, so
-- the delete sees every connection there is, and none is on its way. Held for one batch (a
-- few milliseconds), waited for at most 100 ms (lock_timeout): pruning can wait, presence
-- writes should not. Snapshot reads are never blocked.
CREATE OR REPLACE FUNCTION gateway.presence_prune(p_older_than interval, p_limit integer DEFAULT 1000)
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
