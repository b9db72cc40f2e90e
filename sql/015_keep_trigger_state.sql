-- 015: publish() keeps how a table's capture triggers were enabled when it runs again.
--
-- Triggers do not fire in sessions with session_replication_role = replica (the apply worker
-- of a logical replication subscriber, some bulk loaders) unless enabled ALWAYS. Such writes
-- log nothing, so a gateway serving a subscriber database sends nothing of what replication
-- applies; the way to capture them is ALTER TABLE ... ENABLE ALWAYS TRIGGER on the capture
-- triggers (docs/sql.md says when that is right and when it doubles events). But publish()
-- drops and creates the triggers, and every migration that changes them re-publishes every
-- table (republish_all()): each quietly set the triggers back to the default (fire only
-- outside replica sessions), and from then on replicated writes were lost to subscribers;
-- likewise a trigger an operator had disabled came back. Now publish() notes the state of the
-- table's gateway_capture_* triggers before replacing them and sets it again on the new ones
-- (ENABLE ALWAYS, ENABLE REPLICA or DISABLE). unpublish() then publish() starts afresh.
-- It costs publish() one catalog read; the row triggers are unchanged.
--
-- And gateway.topics' own trigger (gateway_first_epoch, sql/009), which gives a new topic its
-- first epoch, now fires in replica sessions too (ENABLE ALWAYS): it did not, so in such a
-- session the first event of a topic (an enabled-ALWAYS capture trigger's, or gateway.emit()'s)
-- failed with `null value in column "epoch" of relation "topics"`. It only fills an epoch left
-- NULL, so a row that names its epoch (replicated, or reset_topic()'s) is kept as it is. It
-- fires only on INSERT into gateway.topics, as before: nothing changes for other sessions.
-- publish() is patched in place by gateway.patch_function() (sql/012), which skips it when
-- it already has been (this file is idempotent).

SELECT gateway.patch_function('gateway.publish(regclass, text, text)', '015_keep_trigger_state', 'trigger_states', ARRAY[
        -- 1. a variable for the states
        [$a$
    probe text;
$a$, $b$
    probe text;
    trigger_states jsonb;
    trigger_name text;
    trigger_state text;
$b$],
        -- 2. the states, read before unpublish() drops the triggers (the TRUNCATE trigger
        --    is created again by the INSERT into gateway.published, sql/010)
        [$a$
    PERFORM gateway.unpublish(p_table);
$a$, $b$
    -- How the triggers are enabled when not as by default ('O'), kept below (sql/015).
    SELECT coalesce(jsonb_object_agg(t.tgname, t.tgenabled::text), '{}') INTO trigger_states
    FROM pg_trigger t
    WHERE t.tgrelid = p_table AND t.tgenabled <> 'O'
      AND t.tgname IN ('gateway_capture_insert', 'gateway_capture_update', 'gateway_capture_delete',
                       'gateway_capture_truncate');
    PERFORM gateway.unpublish(p_table);
$b$],
        -- 3. set them again on the new triggers
        [$a$
                   p_table, gateway.capture_name(p_table, 'capture_delete'));
$a$, $b$
                   p_table, gateway.capture_name(p_table, 'capture_delete'));
    FOR trigger_name, trigger_state IN SELECT e.key, e.value FROM jsonb_each_text(trigger_states) AS e LOOP
        EXECUTE format('ALTER TABLE %s %s TRIGGER %I', p_table,
                       CASE trigger_state WHEN 'A' THEN 'ENABLE ALWAYS' WHEN 'R' THEN 'ENABLE REPLICA' ELSE 'DISABLE' END,
                       trigger_name);
    END LOOP;
$b$]
]);

ALTER TABLE gateway.topics ENABLE ALWAYS TRIGGER gateway_first_epoch;

SELECT gateway.republish_all();
