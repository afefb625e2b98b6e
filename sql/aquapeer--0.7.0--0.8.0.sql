-- aquapeer 0.7.0 -> 0.8.0: a bucket whose blobs are all kept joins the store at once (a clone's buckets come with their blobs).
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- Keep objects received for a bundle, each checked against its id (see 0.5.0).  A bucket received
-- at a known place (its lines checked against it) all of whose blobs are in the store or among
-- the objects received joins the store at once: nothing below it is missing.  A clone receives
-- its buckets with their blobs (protocol 5), so it leaves no buckets pending for bundle._promote
-- to walk and check blob by blob (9 s of a clone of a million rows).  Other buckets wait among
-- the pending nodes as before (an import's, whose places the walk finds), and what they lack is
-- returned with the lacking children of roots and fan nodes.
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
    where bundle._kind(i.data) = 'blob' on conflict do nothing;
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
        on conflict do nothing
    ), nodes as (
        insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
        where r.kind <> 'bucket' or r.place is null or cardinality(r.lacking) > 0
        on conflict do nothing
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

-- Move the pending nodes below the given roots to bundle.object, once nothing below them is missing
-- (see 0.5.0).  A node the store holds is not walked again, so a node that a malformed tree lists
-- at two places of one table is refused here: a bucket kept at one place would otherwise stand
-- unchecked at the other.  (No two nodes of one table are alike: their lines start with their
-- places.  Two tracked tables with the same rows do share theirs, at the same paths.)
create or replace function bundle._promote(bundle_name text, roots text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    moving text[];
    missing text;
    twice text[];  -- [node, one place, another]
begin
    -- Garbage collection skips a bundle whose row is locked, so nothing checked here is
    -- collected before this transaction ends.
    perform from bundle.bundle b where b.name = bundle_name for key share;
    with walk as materialized (
        select * from bundle._pending_walk(bundle_name, roots, array(select '' from unnest(roots)))
    ), placed_twice as (
        select w.id, min(w.place) as one, max(w.place) as other from walk w
        where w.place is not null group by w.id having count(distinct split_part(w.place, ':', 2)) > 1 limit 1
    )
    select (select array_agg(w.id) from walk w where w.pending),
           (select min(w.id) from walk w
            where not w.pending
              and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = w.id) is null),
           (select array[t.id, t.one, t.other] from placed_twice t)
        into moving, missing, twice;
    if twice is not null then
        raise exception 'bundle "%": the tree received has node % at two places, % and %', bundle_name, twice[1],
                        twice[2], twice[3]
            using errcode = 'XX001', hint = 'The sender''s tree is malformed (or was altered); nothing below it is kept.';
    end if;
    if missing is not null then
        raise exception 'bundle "%" lacks object % of the commits received', bundle_name, missing
            using errcode = 'XX001', hint = 'Pull again: what was received is kept, and only what is missing is fetched.';
    end if;
    with moved as (
        delete from bundle.pending p where p.bundle = bundle_name and p.id = any (moving)
        returning p.*
    )
    insert into bundle.object select * from moved on conflict do nothing;
end
$$;
