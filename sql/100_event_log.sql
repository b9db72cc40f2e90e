-- The event log: topics, their positions and epochs, the events, and publishing by hand.
--
-- A change on a published table appends one event per changed row to gateway.events, in the
-- same transaction as the change (the capture triggers, 101_capture.sql). Hand-published
-- events (gateway.emit) go to the same log. The gateway learns that events exist from a
-- doorbell (a NOTIFY rung by the relay, 102_relay.sql) and reads them from here.
--
-- Positions are gap-free and in commit order per topic: appending to a topic updates that
-- topic's row in gateway.topics and holds its row lock until the transaction commits or
-- rolls back, so the next writer to the same topic waits and then sees the committed
-- position. A rolled-back transaction leaves no event and no hole.
--
-- A topic's first epoch is derived from its name and a random salt made once per
-- installation (gateway.first_epoch), so a topic nobody has written to has a known head
-- (first epoch, position 0) without a row: subscribing writes nothing, and a user allowed
-- `room:*` cannot grow gateway.topics by subscribing to room:1, room:2, ... The row a writer
-- creates later starts with that same epoch, so the subscriber's first event continues the
-- stream it was told about. The salt makes a new installation's first epochs differ from an
-- old one's: a client resuming against a database set up again from scratch is told "not
-- recovered". Rows of gateway.topics are never deleted (reset_topic() gives a row a new
-- random epoch): do not delete them by hand, or the topic starts over at position 1 under its
-- first epoch again.
--
-- Topics are names, compared byte by byte (COLLATE "C") everywhere: a topic made from a
-- column of another collation (`'person:' || name` with `name text COLLATE "POSIX"`) would
-- otherwise fail to compare with gateway.topics.topic ("could not determine which collation
-- to use"), and under a case-insensitive collation 'person:Ann' and 'person:ann' would be
-- one topic.

-- `gateway migrate` has created the schema already, for gateway.migrations.
CREATE SCHEMA IF NOT EXISTS gateway;

CREATE FUNCTION gateway.new_epoch() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT substr(md5(random()::text || clock_timestamp()::text), 1, 8)
$$;

-- One row: the salt of every topic's first epoch.
CREATE TABLE gateway.installation (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),  -- at most one row
    salt text NOT NULL
);
INSERT INTO gateway.installation (salt) VALUES (md5(random()::text || clock_timestamp()::text));

-- The epoch of a topic's stream until it is first reset.
CREATE FUNCTION gateway.first_epoch(p_topic text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT substr(md5(i.salt || ':' || p_topic), 1, 8) FROM gateway.installation AS i
$$;

-- One row per topic written to: its epoch (the identity of its stream) and the last position
-- used. COLLATE "C" also spares every index comparison a locale-aware strcoll(). Every writer
-- of a topic updates its row, so rows are spread over pages (fillfactor): writers of
-- different topics then seldom wait on the same page, and each update finds room on its page
-- for the new version (a HOT update, no index change). No default epoch: the trigger below
-- gives a new row its first epoch.
CREATE TABLE gateway.topics (
    topic text COLLATE "C" PRIMARY KEY,
    epoch text NOT NULL,
    pos   bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 10);

-- A new row starts with the topic's first epoch unless its INSERT names one (reset_topic).
-- Only INSERTs fire this, so the writers' hot path (an UPDATE of an existing row) does not.
CREATE FUNCTION gateway.topic_first_epoch() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.epoch IS NULL THEN
        NEW.epoch := gateway.first_epoch(NEW.topic);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER gateway_first_epoch BEFORE INSERT ON gateway.topics
FOR EACH ROW EXECUTE FUNCTION gateway.topic_first_epoch();
-- ALWAYS: also in sessions with session_replication_role = replica (a logical replication
-- apply worker, some bulk loaders), where a capture trigger enabled ALWAYS or gateway.emit()
-- may create a topic's row: without it the row's epoch would be NULL and the write would
-- fail. It only fills an epoch left NULL, so a row that names its epoch (replicated, or
-- reset_topic()'s) is kept as it is.
ALTER TABLE gateway.topics ENABLE ALWAYS TRIGGER gateway_first_epoch;

-- The durable log. `tbl`/`key` name the changed row; `data` holds hand-published events.
-- `op` is 'i', 'u', 'd' (row changes) or 'm' (gateway.emit). Only the functions of the
-- gateway write it and they write nothing else; there is no CHECK constraint because every
-- INSERT statement prepares its CHECK expressions anew, which costs every captured row.
-- `xid` is the transaction that wrote the event: the relay (102_relay.sql) reads the events
-- of the transactions committed since it last looked through the index on it, and pruning by
-- age (gateway/log.py) walks the log from its oldest transaction id up, through the same
-- index, stopping at the first event still inside the window. Transaction ids are taken at a
-- transaction's first write, so that order is the age order (created_at is the transaction's
-- start) except where a transaction began before an older one's first write: its events are
-- pruned with the one in front. There is deliberately no index on created_at: every event
-- INSERT, so every captured row change, would pay for it, while only pruning would read it,
-- once a minute; and a BRIN index would not stay useful (pruning frees space at the front of
-- the table, new events fill it, and then every block range spans old to new times).
CREATE TABLE gateway.events (
    topic      text COLLATE "C" NOT NULL,
    pos        bigint NOT NULL,
    op         "char" NOT NULL,
    tbl        text,
    key        text,
    data       jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- The user a durable client message came from (sql/105_rooms.sql): written only by
    -- gateway.publish_message; NULL for rows of emit, emit_many and the capture triggers.
    sender     text,
    PRIMARY KEY (topic, pos)
);
CREATE INDEX events_xid ON gateway.events (xid);

-- Takes the next position of a topic (creating its head row), holding the head's row lock
-- until the transaction ends. The generated row triggers do the same inline, because a
-- function call per changed row is measurable in the writer's cost; the rarer paths call this.
CREATE FUNCTION gateway.advance(p_topic text, OUT epoch text, OUT pos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE gateway.topics AS h SET pos = h.pos + 1 WHERE h.topic = p_topic COLLATE "C"
    RETURNING h.epoch, h.pos INTO epoch, pos;
    IF NOT FOUND THEN
        INSERT INTO gateway.topics AS h (topic, pos) VALUES (p_topic, 1)
        ON CONFLICT (topic) DO UPDATE SET pos = h.pos + 1
        RETURNING h.epoch, h.pos INTO epoch, pos;
    END IF;
END
$$;

-- Lock the heads of every topic a statement will append to, in sorted order, creating the
-- missing ones. The row triggers call it at a statement's first row when the statement
-- touches several topics: the heads are then locked in one global order, so two statements
-- writing the same topics in different row orders cannot deadlock on them. (Transactions of
-- several statements still lock statement by statement, as with any row locks.)
-- The topics are taken as bytes first: under a case-insensitive collation DISTINCT would
-- also have merged 'Ann' and 'ann', two topics. Only the missing rows are inserted: the
-- first-epoch trigger would otherwise run for every topic, only to be discarded.
CREATE FUNCTION gateway.lock_topics(p_topics text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_topics text[] COLLATE "C" := ARRAY(SELECT DISTINCT t COLLATE "C" FROM unnest(p_topics) AS t WHERE t IS NOT NULL);
BEGIN
    IF cardinality(v_topics) < 2 THEN
        RETURN;  -- one topic: its row trigger locks it, nothing to order
    END IF;
    INSERT INTO gateway.topics (topic)
    SELECT t FROM unnest(v_topics) AS t
    WHERE NOT EXISTS (SELECT FROM gateway.topics AS h WHERE h.topic = t)
    ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM gateway.topics WHERE topic = ANY (v_topics) ORDER BY topic FOR UPDATE;
END
$$;

-- The head of each topic: its epoch and last position, (first epoch, 0) for a topic that has
-- no row. One index lookup per topic (the LIMIT keeps the planner from joining the whole of
-- gateway.topics, which has a row per topic ever written to). The gateway's own read: a plain
-- SQL function, inlined into the calling query, so that a prepared statement is planned once.
CREATE FUNCTION gateway.topic_heads(p_topics text[], OUT topic text, OUT epoch text, OUT pos bigint)
RETURNS SETOF record
LANGUAGE sql STABLE AS $$
    SELECT u.topic, coalesce(h.epoch, gateway.first_epoch(u.topic)), coalesce(h.pos, 0)
    FROM (SELECT DISTINCT n.name FROM unnest(p_topics) AS n(name) WHERE n.name IS NOT NULL) AS u(topic)
    LEFT JOIN LATERAL (SELECT r.epoch, r.pos FROM gateway.topics AS r WHERE r.topic = u.topic LIMIT 1) AS h ON true
$$;

-- The same for applications (a consistent initial load: docs/guarantees.md), whose roles may
-- not read gateway.topics: SECURITY DEFINER (see "Who may do what" at the end of this file).
-- That costs what the gateway's reads should not pay: a function with a SET clause is not
-- inlined, and its query is planned again at every call (about twice topic_heads' time).
CREATE FUNCTION gateway.heads(p_topics text[], OUT topic text, OUT epoch text, OUT pos bigint)
RETURNS SETOF record
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT h.topic, h.epoch, h.pos FROM gateway.topic_heads(p_topics) AS h
$$;

-- Start a topic's stream over: its events are deleted and its next event is position 1 of a
-- new random epoch, so clients resuming with the old epoch are told they cannot be recovered.
-- The head row is updated first: waiting for its lock waits out a writer still appending to
-- the topic, whose event the DELETE (a statement of its own, so a new snapshot) then sees.
-- Deleting first would miss that event, and the new stream would later collide with it.
CREATE FUNCTION gateway.reset_topic(p_topic text) RETURNS void
LANGUAGE sql AS $$
    UPDATE gateway.topics SET epoch = gateway.new_epoch(), pos = 0 WHERE topic = p_topic COLLATE "C";
    DELETE FROM gateway.events WHERE topic = p_topic COLLATE "C";
$$;

-- Why no client could subscribe to a topic, or NULL if one can. This is the gateway's own
-- rule for subscribe (validate_topic() in gateway/authz.py, which answers bad_topic
-- otherwise; docs/protocol.md): kind:id, at most 200 characters, printable ASCII without
-- spaces (! to ~), no *. The checks run in the same order, and tests/test_sql_names.py
-- checks that both sides agree.
CREATE FUNCTION gateway.invalid_topic_reason(p_topic text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_topic IS NULL THEN 'the topic is NULL'
        WHEN p_topic = '' THEN 'the topic is empty'
        WHEN length(p_topic) > 200 THEN 'the topic is longer than 200 characters'
        -- COLLATE "C": the range is by character code, whatever the database's collation.
        WHEN p_topic COLLATE "C" !~ '^[!-~]+$'
            THEN 'the topic may only contain printable ASCII characters without spaces'
        WHEN strpos(p_topic, '*') > 0
            THEN 'the topic contains ''*'': wildcards are only for grants in tokens'
        WHEN strpos(p_topic, ':') IN (0, 1) OR strpos(p_topic, ':') = length(p_topic)
            THEN 'the topic must look like kind:id, such as user:42 or room:7'
    END
$$;

-- The error of emit() and emit_many() for a topic no client could subscribe to: its events
-- would sit in the log, never delivered. p_caller names the function (and the element).
-- (The capture triggers do not check the topics of rows: a check per row would cost every
-- writer, and the topic expression is written once, by whoever publishes the table.)
CREATE FUNCTION gateway.refuse_topic(p_caller text, p_topic text, p_problem text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%: bad topic %: %. No client can subscribe to it: a topic is kind:id, such as room:7, of at most 200 printable ASCII characters, without spaces or *',
        p_caller,
        CASE WHEN length(p_topic) > 60 THEN quote_literal(left(p_topic, 60)) || '...' ELSE quote_nullable(p_topic) END,
        p_problem;
END
$$;

-- Publish an event by hand: `SELECT gateway.emit('room:7', '{"text": "hello"}');`
-- Returns the event's position in the topic. The topic must be one a client can subscribe
-- to; it is checked as bytes (invalid_topic_reason's strpos() refuses a nondeterministic
-- collation). gateway.ring() (102_relay.sql) wakes the relay unless it polls anyway.
CREATE FUNCTION gateway.emit(p_topic text, p_data jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_pos bigint;
    v_topic text COLLATE "C" := p_topic;
    v_problem text := gateway.invalid_topic_reason(v_topic);
BEGIN
    IF v_problem IS NOT NULL THEN
        PERFORM gateway.refuse_topic('gateway.emit', p_topic, v_problem);
    END IF;
    SELECT a.pos INTO v_pos FROM gateway.advance(p_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, data) VALUES (p_topic, v_pos, 'm', p_data);
    PERFORM gateway.ring();
    RETURN v_pos;
END
$$;

-- Publish several events by hand in one call: element i of p_data goes to topic p_topics[i]
-- (NULL topics are skipped). Topics are locked in sorted order, so concurrent calls cannot
-- deadlock on each other. Used by presence (103_presence.sql). Every topic must be one a
-- client can subscribe to: else nothing is published. The topics are taken as bytes where
-- they are checked and where they meet the heads.
CREATE FUNCTION gateway.emit_many(p_topics text[], p_data jsonb[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_topics text[] COLLATE "C" := p_topics;
    v_count bigint;
    v_bad record;
BEGIN
    SELECT u.n, u.topic, u.problem INTO v_bad
    FROM (SELECT t.n, t.topic, gateway.invalid_topic_reason(t.topic) AS problem
          FROM unnest(v_topics) WITH ORDINALITY AS t(topic, n)
          WHERE t.topic IS NOT NULL) AS u
    WHERE u.problem IS NOT NULL
    ORDER BY u.n
    LIMIT 1;
    IF FOUND THEN
        PERFORM gateway.refuse_topic(format('gateway.emit_many (element %s)', v_bad.n), v_bad.topic, v_bad.problem);
    END IF;
    WITH ch AS (
        SELECT u.topic, u.data, row_number() OVER (PARTITION BY u.topic ORDER BY u.n) AS rn
        FROM unnest(v_topics, p_data) WITH ORDINALITY AS u(topic, data, n)
        WHERE u.topic IS NOT NULL
    ), counts AS (
        SELECT ch.topic, count(*) AS c FROM ch GROUP BY ch.topic
    ), heads AS (
        INSERT INTO gateway.topics AS h (topic, pos)
        SELECT counts.topic, counts.c FROM counts ORDER BY counts.topic
        ON CONFLICT (topic) DO UPDATE SET pos = h.pos + excluded.pos
        RETURNING h.topic, h.pos
    ), ins AS (
        INSERT INTO gateway.events (topic, pos, op, data)
        SELECT ch.topic, heads.pos - counts.c + ch.rn, 'm', ch.data
        FROM ch JOIN counts USING (topic) JOIN heads USING (topic)
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM ins;
    IF v_count > 0 THEN
        PERFORM gateway.ring();
    END IF;
END
$$;

-- Who may do what. Only the gateway's own functions write the log: the capture triggers
-- (101_capture.sql), emit and emit_many are SECURITY DEFINER, so they run as the role that
-- owns the schema (the one that ran `gateway migrate`), and a role writing a published table
-- needs no privilege on any table here. A role that could INSERT into gateway.events or UPDATE
-- gateway.topics could break a topic for everyone: an event at the next position makes every
-- later write to the topic fail as a duplicate, a head moved back hides later events from
-- live subscribers without saying so (docs/security.md, "What a database role can and cannot
-- do"). Each SECURITY DEFINER function has a fixed search_path and names every object with its
-- schema: with the caller's search_path, a role could put its own operator or function in
-- front of pg_catalog's and have it run as the owner. pg_temp comes last, so that no temporary
-- table or function can stand in for anything. The generated row triggers are the exception
-- (no SET clause: it costs every changed row; every name in them is qualified instead, see
-- publish() in 101_capture.sql), so what they call without naming it (lock_topics, and the
-- first-epoch trigger on gateway.topics) fixes its own search_path.
-- PostgreSQL lets everyone EXECUTE a new function: the internal ones are kept for the owner.
-- emit and emit_many are granted explicitly to the roles that publish by hand (docs/sql.md,
-- "Writer roles"): such a role may write any event to any topic. heads() and
-- invalid_topic_reason() stay callable by everyone: applications use them.
REVOKE EXECUTE ON FUNCTION
    gateway.new_epoch(), gateway.topic_first_epoch(), gateway.advance(text), gateway.lock_topics(text[]),
    gateway.topic_heads(text[]),
    gateway.reset_topic(text), gateway.refuse_topic(text, text, text),
    gateway.emit(text, jsonb), gateway.emit_many(text[], jsonb[])
FROM PUBLIC;
