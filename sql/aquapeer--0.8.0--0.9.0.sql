-- aquapeer 0.8.0 -> 0.9.0: a clone's buckets join the store as they arrive, before the bundle tracks its tables here; the walks probe by key.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- The children of a tree node at a place (see 0.5.0).  A root's child hangs at its table's place:
-- the tracked table's oid, or none ('' before the ':') where the bundle tracks no such table that
-- this transaction can see.  A clone is such a case: the caller's transaction tracks the tables
-- (bundle._adopt) while executors keep what arrives in their own, so its places were unknown
-- (null), every bucket waited among the pending nodes, and bundle._promote walked and checked
-- them all at the end (9 s for a million rows).  A place's table only finds the node checked out
-- there, and a bundle has none of a table it does not track.
create or replace function bundle._new_children(bundle_name text, kind text, data bytea, place text)
returns table (id text, place text)
language sql stable rows 100 as $$
    select case when place is null
                  or case kind when 'root' then place = ''
                               when 'fan' then place <> '' and length(split_part(place, ':', 2)) < 4
                                               and left(z.line, -65) ~ '^[0-9a-f]{2}$'
                               else length(split_part(place, ':', 2)) = 4
                                    and left(z.line, 4) = split_part(place, ':', 2) end
                then right(z.line, 64)
                else bundle._misplaced(kind, place, z.line) end,
           case when kind = 'root' then coalesce((select k.relation::oid::text from bundle.tracked k
                                                  join pg_class c on c.oid = k.relation
                                                  join pg_namespace s on s.oid = c.relnamespace
                                                  where k.bundle = bundle_name
                                                    and format('%s.%s', s.nspname, c.relname) = left(z.line, -65)),
                                                 '') || ':'
                when kind = 'fan' then place || left(z.line, -65) end
    from unnest(bundle._lines(data),
                bundle._lines((select o.data from bundle.object o where o.bundle = bundle_name
                               and o.id = (select n.id from bundle._node_at(bundle_name, place) n))))
         with ordinality z(line, old, n)
    where z.n > 1 and z.line <> '' and z.line is distinct from z.old
$$;

-- The walk of received nodes (see 0.5.0), its probes held to the indexes: bundle.pending is
-- small during a clone (its ~260 fan nodes), and the planner then scanned it whole for each of
-- the 65,000 buckets below them (17 µs each instead of 1).
alter function bundle._pending_walk(text, text[], text[]) set enable_seqscan = off;

