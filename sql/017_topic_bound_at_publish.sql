-- 017: the topic expression means what it meant when publish() ran, whoever writes.
--
-- publish() compiles the topic expression into an SQL function (topic_<table>). Its body was
-- a string (LANGUAGE sql AS '...'), which PostgreSQL parses when the function is used: the
-- names in it (a function of the application's own, `'org:' || org_of(team_id)`, a type, an
-- operator) were looked up in the search_path of whoever wrote the row, and of the gateway
-- when it read one. A writer whose search_path lacked the function's schema failed (`function
-- org_of(integer) does not exist`), and one whose search_path found another function of that
-- name first computed another topic: the row went to the wrong subscribers. The body is now a
-- SQL-standard one (LANGUAGE sql RETURN ...), parsed once, when publish() creates it, with
-- publish()'s search_path, as the check publish() makes on the table already was; PostgreSQL
-- also records what it calls, so dropping such a function while a topic uses it is refused
-- instead of breaking every write. It is inlined as before: 340.3k and 342.5k instructions per
-- single-row UPDATE, against 342.4k with the string body (callgrind, as in sql/012).
-- publish() is patched in place by gateway.patch_function() (sql/012), which skips it when
-- it already has been (this file is idempotent).

SELECT gateway.patch_function('gateway.publish(regclass, text, text)', '017_topic_bound_at_publish', 'LANGUAGE sql RETURN', ARRAY[[
    $o$EXECUTE format('CREATE FUNCTION %s(%s) RETURNS text LANGUAGE sql AS %L',
                       topic_fn, coalesce(params, ''), format('SELECT (%s)::text', p_topic));$o$,
    $n$-- A SQL-standard body: its names are bound now, not at each write (sql/017).
        EXECUTE format('CREATE FUNCTION %s(%s) RETURNS text LANGUAGE sql RETURN (%s)::text',
                       topic_fn, coalesce(params, ''), p_topic);$n$
]]);

SELECT gateway.republish_all();
