-- The capture trigger queues changes itself, in C (after 0.20.0): its SQL half goes.  A fresh
-- install gets here before sql/idempotent would have made it.
drop function if exists peer._queue_changes(oid, jsonb, bigint, text);
