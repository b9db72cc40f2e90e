-- 005: a relay whose process died is replaced at once, not when its lease runs out.
--
-- The relay's lease (sql/003) covers a holder that stalls. A holder that dies (kill -9, OOM,
-- a node lost) also loses its database session: the row now records that session's backend
-- pid, and another replica takes the lease over as soon as no such backend exists, on its
-- next try (about every second) instead of after the whole lease. A pid PostgreSQL has
-- since given to another session only delays the takeover to the lease's end, as before.
-- Idempotent.
ALTER TABLE gateway.relay ADD COLUMN IF NOT EXISTS backend_pid integer;
