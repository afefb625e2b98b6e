-- aquapeer 0.8.0 -> 0.9.0: a clone's buckets join the store as they arrive, before the bundle tracks its tables here; the walks probe by key; objects kept in id order.
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
                  or z.n = 1 or coalesce(z.line, '') = ''  -- (filtered out below, whatever the plan's order)
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

-- Keep objects received for a bundle (see 0.8.0), each statement inserting in id order.  Two
-- requests of a pull are kept side by side, and their answers share blobs: a clone of a bundle
-- with history gets the old and the new bucket at a place, which name the same unchanged rows.
-- Two transactions inserting the same keys in different orders each wait for the other's
-- uncommitted row (a deadlock, which failed the pull); in one order, one only waits for the other.
create or replace function bundle._keep(bundle_name text, ids text[], datas bytea[], places text[])
returns table (id text, place text)
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
#variable_conflict use_column
declare
    bad record;
    child_ids text[];
    child_places text[];
    blob_ids text[];
begin
    select i.id, encode(sha256(i.data), 'hex') as actual into bad
    from unnest(ids, datas) i(id, data) where i.id is distinct from encode(sha256(i.data), 'hex') limit 1;
    if found then
        raise exception 'object % does not match its content (it hashes to %)', bad.id, bad.actual
            using errcode = 'XX001', hint = 'The sender altered or damaged it; nothing of it was kept.';
    end if;
    -- Locked as a foreign key would: the bundle stays until this transaction ends, and retention
    -- passes it by meanwhile.
    perform from bundle.bundle b where b.name = bundle_name for key share;
    if not found then
        raise exception 'bundle "%" does not exist', bundle_name using errcode = '42704';
    end if;
    -- At most hourly: retention must not collect what a running pull keeps, and a new row
    -- version per call would pile up in a long transaction (an import) and slow every lookup of
    -- the bundle.
    update bundle.bundle set loose_since = now()
    where name = bundle_name and (loose_since is null or loose_since < now() - interval '1 hour');
    -- The blobs first, so that the buckets received with them find them in the store below.
    insert into bundle.object select bundle_name, i.id, 'blob', i.data from unnest(ids, datas) i(id, data)
    where bundle._kind(i.data) = 'blob' order by i.id on conflict do nothing;
    with received as materialized (
        -- Each bucket with the blobs it names that the store lacks, of those on lines the bucket
        -- checked out at its place lacks (every lookup linear in what was received: a bucket's
        -- own probes, no join between the buckets and the blobs).
        select r.id, r.kind, r.data, r.place,
               case when r.kind = 'bucket' then array(
                   select c.id from bundle._new_children(bundle_name, 'bucket', r.data, r.place) c
                   where (select o.id from bundle.object o where o.bundle = bundle_name and o.id = c.id) is null)
               end as lacking
        from (select i.id, bundle._kind(i.data) as kind, i.data, i.place
              from unnest(ids, datas, places) i(id, data, place)) r
        where r.kind <> 'blob'
    ), complete as (
        insert into bundle.object select bundle_name, r.id, r.kind, r.data from received r
        where r.kind = 'bucket' and r.place is not null and cardinality(r.lacking) = 0
        order by r.id on conflict do nothing
    ), nodes as (
        insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
        where r.kind <> 'bucket' or r.place is null or cardinality(r.lacking) > 0
        order by r.id on conflict do nothing
    )
    select coalesce(array_agg(c.id), '{}'), coalesce(array_agg(c.place), '{}'),
           array(select distinct u.id from received r cross join lateral unnest(r.lacking) u(id))
        into child_ids, child_places, blob_ids
    from received r cross join lateral bundle._new_children(bundle_name, r.kind, r.data, r.place) c
    where r.kind in ('root', 'fan');
    return query
        select l.id, l.place from bundle._lacking(bundle_name, child_ids, child_places) l
        union all
        select u.id, null from unnest(blob_ids) u(id);
end
$$;
