-- aquapeer 0.10.0 -> 0.11.0: keeping, promoting and importing objects probe the store by key, whatever the planner believes of its size.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- A store emptied and vacuumed (a bundle dropped, then autovacuum or VACUUM) has relpages = 0
-- and reltuples = 0, and the planner takes it for empty.  A plan made then, and kept by a
-- long-lived session (an executor, a pooled connection), read bundle.object whole for each
-- object or bucket it then kept: a clone of a million rows into a store emptied after an
-- earlier clone took over 10 minutes instead of 32 s, and an import probed the store with a
-- sequential scan per document.  These functions only look objects up by key (as
-- bundle._pending_walk, 0.9.0), so they never scan.
alter function bundle._keep(text, text[], bytea[], text[]) set enable_seqscan = off;
alter function bundle._lacking(text, text[], text[]) set enable_seqscan = off;
alter function bundle._promote(text, text[]) set enable_seqscan = off;
alter function bundle.import(jsonb) set enable_seqscan = off;
