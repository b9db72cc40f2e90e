-- 008: names that publish() gets right.
--
-- 1. Generated function names. gateway.publish() names the functions it generates after the
--    table (capture_name(), sql/001), cutting the readable schema_table part to 36
--    characters to stay within PostgreSQL's 63-byte names (max_identifier_length). That
--    limit counts bytes: with a long non-ASCII name (30 Cyrillic letters take 60 bytes, 30
--    CJK ones 90) the names came out longer, and PostgreSQL cut them, hash included, with
--    only a NOTICE. unpublish() then looked for the uncut names, found nothing and left the
--    functions behind, so publishing the table again failed ("function ... already exists"),
--    as would any migration that re-publishes every table; and two tables whose names begin
--    alike could not both be published. From here on:
--    * capture_name() cuts the readable part to 36 bytes, between two characters: every name
--      fits, and ASCII names are exactly what they were.
--    * unpublish() finds a table's generated functions from the table (generated_functions():
--      what its triggers run, the row_topic function taking its rows, the topic function
--      those call) and by name under the new and the old naming, so it drops functions made
--      under either.
--    * Every published table is re-published at the end: the functions of a non-ASCII table
--      get names that fit and the old ones are dropped. The trigger bodies are unchanged.
-- Every statement here is idempotent.

-- The longest prefix of p_text that is at most p_bytes bytes long, cut between characters
-- (byte lengths in the database's encoding, as PostgreSQL counts names).
CREATE OR REPLACE FUNCTION gateway.clip_name(p_text text, p_bytes integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN octet_length(p_text) <= p_bytes THEN p_text
                ELSE (SELECT left(p_text, max(k)) FROM generate_series(0, p_bytes) AS k
                      WHERE octet_length(left(p_text, k)) <= p_bytes)
           END
$$;

-- Name of a function publish() generates for a table: <kind>_<schema>_<table>_<hash>,
-- readable, and unique per table even where the readable part is cut. At most 63 bytes:
-- the longest kind (capture_update, 14) + '_' + 36 + '_' + 8 hex digits = 60.
CREATE OR REPLACE FUNCTION gateway.capture_name(p_table regclass, p_kind text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT p_kind || '_' || gateway.clip_name(n.nspname || '_' || c.relname, 36) || '_'
           || left(md5(n.nspname || '.' || c.relname), 8)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table
$$;

-- The functions publish() generated for a table, however they were named:
-- * the functions its capture triggers (and 003's statement trigger) run;
-- * its row_topic function: the generated function taking a row of the table;
-- * the functions named as capture_name() names them now, and as it named them before this
--   migration (cut by characters, then cut again to 63 bytes by PostgreSQL): leftovers whose
--   triggers are gone still keep publish() from creating functions of the same name;
-- * its topic function, called by name in the bodies of the others (PostgreSQL records no
--   dependency that would lead to it: its parameters are the columns' types).
CREATE OR REPLACE FUNCTION gateway.generated_functions(p_table regclass) RETURNS SETOF regprocedure
LANGUAGE sql STABLE AS $$
    WITH kinds AS (
        SELECT unnest(ARRAY['topic', 'row_topic', 'capture_insert', 'capture_update', 'capture_delete',
                            'doorbell']) AS kind
    ), names AS (
        SELECT gateway.capture_name(p_table, kinds.kind) AS name FROM kinds
        UNION
        SELECT gateway.clip_name(kinds.kind || '_' || left(n.nspname || '_' || c.relname, 36) || '_'
                                 || left(md5(n.nspname || '.' || c.relname), 8),
                                 current_setting('max_identifier_length')::integer)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, kinds
        WHERE c.oid = p_table
    ), found AS (
        SELECT p.oid, p.proname, p.prosrc
        FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
        WHERE t.tgrelid = p_table AND p.pronamespace = 'gateway'::regnamespace
          AND t.tgname IN ('gateway_capture_insert', 'gateway_capture_update', 'gateway_capture_delete',
                           'gateway_doorbell')
        UNION
        SELECT p.oid, p.proname, p.prosrc
        FROM pg_proc p JOIN pg_class c ON c.oid = p_table
        WHERE p.pronamespace = 'gateway'::regnamespace AND p.proname LIKE 'row\_topic\_%'
          AND p.pronargs = 1 AND p.proargtypes[0] = c.reltype
        UNION
        SELECT p.oid, p.proname, p.prosrc
        FROM pg_proc p
        WHERE p.pronamespace = 'gateway'::regnamespace AND p.proname IN (SELECT names.name FROM names)
    ), called AS (
        -- publish() writes the topic function's name with format('gateway.%I'), uncut: unquote
        -- it and cut it as PostgreSQL did when it created the function. Not in the topic
        -- function itself: that is the caller's expression, whose functions are the caller's.
        SELECT gateway.clip_name(CASE WHEN left(m[1], 1) = '"'
                                      THEN replace(substr(m[1], 2, length(m[1]) - 2), '""', '"')
                                      ELSE m[1] END,
                                 current_setting('max_identifier_length')::integer) AS name
        FROM found, regexp_matches(found.prosrc, 'gateway\.("(?:[^"]|"")+"|[a-z_][a-z0-9_]*)\(', 'g') AS m
        WHERE found.proname NOT LIKE 'topic\_%'
    )
    SELECT found.oid::regprocedure FROM found
    UNION
    SELECT p.oid::regprocedure
    FROM pg_proc p
    WHERE p.pronamespace = 'gateway'::regnamespace AND p.proname LIKE 'topic\_%'
      AND p.proname IN (SELECT called.name FROM called)
$$;

-- Stop publishing a table's changes: drops its triggers and generated functions.
CREATE OR REPLACE FUNCTION gateway.unpublish(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    generated regprocedure[];
    f regprocedure;
BEGIN
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'gateway.unpublish: the table must not be NULL';
    END IF;
    -- Before the triggers go: they lead to their functions.
    generated := ARRAY(SELECT gateway.generated_functions(p_table));
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_insert ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_update ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_delete ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_doorbell ON %s', p_table);
    DELETE FROM gateway.published WHERE tbl = p_table;
    FOREACH f IN ARRAY generated LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$$;

-- Regenerate the triggers of every published table: the functions of a table with a long
-- non-ASCII name get names that fit, and the old ones are dropped (see unpublish above).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl, topic, key_column FROM gateway.published ORDER BY tbl::text LOOP
        PERFORM gateway.publish(r.tbl, r.topic, r.key_column);
    END LOOP;
END
$$;
