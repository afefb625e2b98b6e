-- Sending transactions no longer commit one at a time (after 0.19.0): the worker numbers messages in
-- the order of their transaction ids (peer.outbox_message.xact), so the commit-order stamp and
-- its lock go.  Messages a transaction queued under the stamp are numbered the same way.
-- None of these is in extconfig (pg_extension_config_dump), so no ALTER EXTENSION ... DROP
-- first: an extension's own script may drop its members.
drop table peer.outbox_commit;   -- and its trigger stamp_commit
drop sequence peer.commit_order;
-- A fresh install gets here before sql/idempotent would have made it.
drop function if exists peer._stamp_commit();
