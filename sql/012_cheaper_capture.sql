-- 012: capture triggers that cost writers less (the writer cost of docs/performance.md).
--
-- Instruction counts of one single-row UPDATE in its own transaction on a published table
-- (callgrind, a single-user backend, 2,000 UPDATEs, each version measured twice, alike; the
-- same UPDATE without triggers is about 181k): 356.6k with the triggers of 004/011, 340.2k
-- with these. What a row trigger pays for each PL/pgSQL statement is mostly setting up its
-- expression or plan again in every new transaction, so the saving comes from running fewer
-- of them:
-- * The multi-row check `IF EXISTS (SELECT 1 FROM <transition table> OFFSET 1)` (an
--   expression with a sub-select, run through SPI as a query with a subplan) becomes
--   `PERFORM FROM <transition table> OFFSET 1; IF FOUND`: about 6k less per row.
-- * `IF gw_topic IS NULL THEN RETURN NULL` moves after the head UPDATE: a NULL topic matches
--   no head, so it is checked only when the UPDATE found none (about 1k).
-- * The update trigger computed the old row's topic on every row to see whether the row
--   moved (about 5k). It now first compares the columns the topic expression reads, and
--   computes the old topic only when one of them (or the key) changed. Equal columns give
--   the same topic only if equal means identical, which is not so for every type (numeric
--   1.0 = 1.00, but their texts differ; a case-insensitive collation), so this is done only
--   when every such column is of a type where it is (integers, boolean, uuid, date,
--   timestamps, and text or varchar under a deterministic collation); otherwise the trigger
--   computes the old topic on every row as before. (A topic is a function of the row's
--   columns: the gateway already relies on that when it checks, reading a row, that the row
--   still belongs to its event's topic.)
-- The generated triggers otherwise do exactly what they did. publish() is patched in place
-- by gateway.patch_function(), defined here for this and later migrations: each patch must
-- apply exactly once, and the whole is skipped when it already has (this file is idempotent).

-- Patch a function's source in place: each (old, new) pair of p_patches must occur exactly
-- once in it, else nothing changes and the error names the migration and the patch; skipped
-- (false) when p_marker, a text only the patched version has, is there already, so the
-- migration can run again. For migrations that change what publish() generates without
-- restating it whole (012 onwards; 011 has its own copy of this).
CREATE OR REPLACE FUNCTION gateway.patch_function(
    p_function regprocedure, p_migration text, p_marker text, p_patches text[]
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    def text := pg_get_functiondef(p_function);
    i integer;
BEGIN
    IF position(p_marker IN def) > 0 THEN
        RETURN false;
    END IF;
    FOR i IN 1 .. array_length(p_patches, 1) LOOP
        IF (length(def) - length(replace(def, p_patches[i][1], ''))) / length(p_patches[i][1]) <> 1 THEN
            RAISE EXCEPTION '%: % is not the version this migration patches (patch %)', p_migration, p_function, i;
        END IF;
        def := replace(def, p_patches[i][1], p_patches[i][2]);
    END LOOP;
    EXECUTE def;
    RETURN true;
END
$$;

SELECT gateway.patch_function('gateway.publish(regclass, text, text)', '012_cheaper_capture', 'cols_changed', ARRAY[
        -- 1. a variable for the columns' comparison
        [$a$
    key_same text;
$a$, $b$
    key_same text;
    cols_changed text;
$b$],
        -- 2. the comparison, built with the list of the columns the topic expression reads;
        --    NULL when a column's type does not allow it, '' when the key is the only one
        --    (no rows at all: a constant topic)
        [$a$
    INTO params, new_args, old_args, row_args, plain_args
    FROM pg_attribute a
$a$, $b$,
           CASE WHEN coalesce(bool_and(
                    a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'bool'::regtype,
                                   'uuid'::regtype, 'date'::regtype, 'timestamp'::regtype,
                                   'timestamptz'::regtype, 'text'::regtype, 'varchar'::regtype)
                    AND (a.attcollation = 0 OR co.collisdeterministic)), true)
                -- the other columns, each as ' OR OLD.c IS DISTINCT FROM NEW.c' (the key is
                -- compared anyway)
                THEN coalesce(string_agg(format(' OR OLD.%1$I IS DISTINCT FROM NEW.%1$I', a.attname), ''
                                         ORDER BY a.attnum) FILTER (WHERE a.attname <> p_key), '')
           END
    INTO params, new_args, old_args, row_args, plain_args, cols_changed
    FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation
$b$],
        -- 3. the multi-row check
        [$a$
            IF EXISTS (SELECT 1 FROM %5$s OFFSET 1) THEN
$a$, $b$
            PERFORM FROM %5$s OFFSET 1;
            IF FOUND THEN
$b$],
        -- 4. the NULL topic, checked only when no head was found
        [$a$
            IF gw_topic IS NULL THEN
                RETURN NULL;
            END IF;
            UPDATE gateway.topics SET pos = pos + 1 WHERE topic = gw_topic RETURNING pos INTO gw_pos;
            IF NOT FOUND THEN
$a$, $b$
            UPDATE gateway.topics SET pos = pos + 1 WHERE topic = gw_topic RETURNING pos INTO gw_pos;
            IF NOT FOUND THEN
                IF gw_topic IS NULL THEN
                    RETURN NULL;  -- not published (no head has a NULL topic)
                END IF;
$b$],
        -- 5. the moved row: the old topic computed only when a column it reads changed
        [$a$
            IF %1$s OR %2$s(%3$s) IS DISTINCT FROM gw_topic THEN
                PERFORM gateway.lock_topics(ARRAY[%2$s(%3$s), gw_topic]);
                gw_pos := gateway.log_event(%4$L, 'd', %2$s(%3$s), (OLD.%5$I)::text);
            END IF;
            $u$, key_same, topic_fn, coalesce(old_args, ''), tbl_name, p_key)
$a$, $b$
            %6$s
            IF %1$s OR %2$s(%3$s) IS DISTINCT FROM gw_topic THEN
                PERFORM gateway.lock_topics(ARRAY[%2$s(%3$s), gw_topic]);
                gw_pos := gateway.log_event(%4$L, 'd', %2$s(%3$s), (OLD.%5$I)::text);
            END IF;
            %7$s
            $u$, key_same, topic_fn, coalesce(old_args, ''), tbl_name, p_key,
               CASE WHEN cols_changed IS NOT NULL
                    THEN format('IF %s%s THEN  -- only then can the topic differ', key_same, cols_changed) END,
               CASE WHEN cols_changed IS NOT NULL THEN 'END IF;' END)
$b$]
]);

SELECT gateway.republish_all();
