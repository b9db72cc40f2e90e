-- Topic authorization for topics the token does not grant. The gateway calls it once per
-- subscription (and again on token refresh) and caches the answer briefly.
-- This default grants nothing more; replace it with your own rules, e.g.
--   CREATE OR REPLACE FUNCTION gateway.authorize(user_id text, topic text, claims jsonb)
--   RETURNS boolean LANGUAGE sql STABLE AS $$
--       SELECT EXISTS (SELECT 1 FROM room_members m
--                      WHERE 'room:' || m.room_id = topic AND m.user_id = authorize.user_id)
--   $$;
-- Later migrations never replace it (sql/README.md), so your version stays.
CREATE FUNCTION gateway.authorize(user_id text, topic text, claims jsonb) RETURNS boolean
LANGUAGE sql STABLE AS 'SELECT false';
