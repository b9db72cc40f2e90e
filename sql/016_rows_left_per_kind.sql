-- 016: the insert, update and delete triggers count a statement's rows apart.
--
-- A statement of several rows locks all its topics, in sorted order, at its first row (so
-- two statements cannot deadlock on them), and counts its rows down in a transaction-local
-- setting, gateway.rows_left_<table oid>: the rows after the first find it above zero and
-- skip the locking, and the last one brings it back to zero for the next statement. The
-- three triggers of a table shared that one setting, but each counts only its own kind of
-- rows (its transition table). A MERGE or an upsert fires them interleaved, in the order its
-- rows come, and could leave the setting above zero (rows update, insert, insert, update,
-- update: 2, 1, 0, then the update trigger starts over at 2 and ends at 1). The next
-- statement of the transaction then took its first rows for the MERGE's last ones: they
-- appended their events, locking their topics one by one in row order, before the sorted
-- locking ran; that can deadlock with another transaction. Now each trigger has its own
-- setting (gateway.rows_left_<oid>_i, _u, _d), which its own rows bring back to zero
-- whatever the order. (Such a statement still locks its inserted rows' topics and its
-- updated rows' topics as two groups: docs/sql.md.) Only multi-row statements read the
-- setting: a single-row one costs the same.
-- publish() is patched in place by gateway.patch_function() (sql/012), which skips it when
-- it already has been (this file is idempotent).

SELECT gateway.patch_function('gateway.publish(regclass, text, text)', '016_rows_left_per_kind', $m$mark || '_i'$m$, ARRAY[
        [$a$(p_table, 'capture_insert'), topic_fn, coalesce(new_args, ''), mark,$a$,
         $b$(p_table, 'capture_insert'), topic_fn, coalesce(new_args, ''), mark || '_i',$b$],
        [$a$(p_table, 'capture_delete'), topic_fn, coalesce(old_args, ''), mark,$a$,
         $b$(p_table, 'capture_delete'), topic_fn, coalesce(old_args, ''), mark || '_d',$b$],
        [$a$(p_table, 'capture_update'), topic_fn, coalesce(new_args, ''), mark,$a$,
         $b$(p_table, 'capture_update'), topic_fn, coalesce(new_args, ''), mark || '_u',$b$]
]);

SELECT gateway.republish_all();
