-- 010: TRUNCATE of a published table logs a delete of every row, like DELETE does.
--
-- TRUNCATE empties a table without firing its row triggers, so until now it logged nothing:
-- the rows were gone, every subscriber kept showing them, and a client resuming from before
-- it was told `recovered: true` with nothing missed. A TRUNCATE is a committed change like
-- any other (docs/guarantees.md), so each published table now also gets a BEFORE TRUNCATE
-- statement trigger that appends a delete event for each of its rows, in the TRUNCATE's
-- transaction, before the rows go. It costs nothing on the writers' per-row path; a TRUNCATE
-- costs what a DELETE of the same rows would cost in events (it is no longer O(1) for the log).
--
-- The trigger's function is one generic function, not generated per table: it reads the key
-- column and row_topic function of the table from gateway.published. The trigger is attached
-- and removed by a trigger on gateway.published itself, whose rows publish() inserts and
-- unpublish() deletes: so publish()/unpublish() (sql/008) stay as they are, and every table
-- published before this migration gets it at the end of this file.
-- Every statement here is idempotent.

CREATE OR REPLACE FUNCTION gateway.capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    p gateway.published;
    n bigint;
BEGIN
    SELECT * INTO p FROM gateway.published WHERE tbl = TG_RELID;
    IF NOT FOUND THEN
        RETURN NULL;  -- unpublished meanwhile
    END IF;
    -- ONLY: the rows of this table; an inheritance child truncated with it fires its own.
    -- Its topics are locked in sorted order first, like a multi-row statement's (sql/001).
    EXECUTE format('SELECT gateway.lock_topics(ARRAY(SELECT DISTINCT gateway.%I(t) FROM ONLY %s AS t))',
                   p.row_topic, p.tbl);
    -- The table as the row triggers name it (publish(): schema.table, unquoted). log_event
    -- skips rows whose topic is NULL (not published) and rings the relay when it is quiet.
    EXECUTE format('SELECT count(gateway.log_event(%L, ''d'', gateway.%I(t), (t.%I)::text)) FROM ONLY %s AS t',
                   TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, p.row_topic, p.key_column, p.tbl)
    INTO n;
    RETURN NULL;
END
$$;

-- publish() records a table in gateway.published after attaching its row triggers, and
-- unpublish() deletes the record: attach and remove the TRUNCATE trigger with it.
CREATE OR REPLACE FUNCTION gateway.published_truncate_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- A table dropped since has no triggers left to drop.
        IF EXISTS (SELECT FROM pg_class WHERE oid = OLD.tbl) THEN
            EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_truncate ON %s', OLD.tbl);
        END IF;
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE OR REPLACE TRIGGER gateway_capture_truncate BEFORE TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION gateway.capture_truncate()', NEW.tbl);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS gateway_truncate_trigger ON gateway.published;
CREATE TRIGGER gateway_truncate_trigger AFTER INSERT OR DELETE ON gateway.published
FOR EACH ROW EXECUTE FUNCTION gateway.published_truncate_trigger();

-- Tables published before this migration.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl FROM gateway.published ORDER BY tbl::text LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER gateway_capture_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION gateway.capture_truncate()', r.tbl);
    END LOOP;
END
$$;
