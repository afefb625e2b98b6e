-- aquapeer 0.4.0 -> 0.5.0: pulls and checkouts that cost what changed, not what a changed node lists.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- Comparing tree nodes line by line.  Two versions of a node at the same place in a tree (a fan
-- node of 256 children, a bucket of its rows) mostly share their lines, in the same order, so
-- comparing line n with line n is a string comparison per line instead of parsing both nodes
-- and joining their entries by name (a quarter of the time, measured on the 253 fan nodes of a
-- pull of 1,000 scattered rows).  A line added or removed shifts those below it; they compare
-- unlike too, which only costs a closer look at them.

-- A tree node's lines (the first names its kind).  The text takes the database's collation:
-- convert_from's ("C", that of the encoding's name) would pass on to the ids read from it, and
-- an id of another collation than an index's cannot use that index.
create function bundle._lines(data bytea) returns text[]
language sql stable parallel safe as $$
    select string_to_array(convert_from(data, 'UTF8') collate "default", E'\n')
$$;

-- The older readers of a node's lines read them through bundle._lines too, so that one
-- function says how a node's text is decoded.
create or replace function bundle._children(data bytea) returns setof text
language sql stable strict parallel safe set search_path = pg_catalog, pg_temp set jit = off as $$
    select right(l, 64) from unnest(bundle._lines(data)) with ordinality t(l, n) where n > 1 and l <> ''
$$;
create or replace function bundle._entries(data bytea) returns table (name text, id text)
language sql stable parallel safe rows 10 as $$
    select left(l, -65), right(l, 64) from unnest(bundle._lines(data)) with ordinality t(l, n) where n > 1 and l <> ''
$$;

-- What an object is, from its first line (a blob is a JSON object, so never starts so).  Without
-- a SET clause, so that it is inlined: a clone asks it a million times.
create or replace function bundle._kind(data bytea) returns text
language sql stable parallel safe as $$
    select case
        when substr(data, 1, 18) = convert_to('aquapeer-bucket/1' || E'\n', 'UTF8') then 'bucket'
        when substr(data, 1, 15) = convert_to('aquapeer-fan/1' || E'\n', 'UTF8') then 'fan'
        when substr(data, 1, 16) = convert_to('aquapeer-root/1' || E'\n', 'UTF8') then 'root'
        else 'blob' end
$$;

-- The entries of two nodes that differ, side by side (a missing or null node has none): of the
-- lines that differ from the other node's line at the same position, those whose name the other
-- node lacks or lists with another id.  Against no node at all, every line (a clone walks 65,536
-- buckets so, a third faster without the join).
create or replace function bundle._node_diff(bundle_name text, a_node text, b_node text)
returns table (name text, a_id text, b_id text)
language sql stable rows 10 as $$
    with unlike as (
        select z.a, z.b
        from unnest(bundle._lines((select o.data from bundle.object o where o.bundle = bundle_name and o.id = a_node)),
                    bundle._lines((select o.data from bundle.object o where o.bundle = bundle_name and o.id = b_node)))
             with ordinality z(a, b, n)
        where a_node is not null and b_node is not null and z.n > 1 and z.a is distinct from z.b
    )
    select coalesce(a.name, b.name), a.id, b.id
    from (select left(u.a, -65) as name, right(u.a, 64) as id from unlike u where u.a <> '') a
    full join (select left(u.b, -65) as name, right(u.b, 64) as id from unlike u where u.b <> '') b on b.name = a.name
    where a.id is distinct from b.id
    union all
    select left(z.line, -65), case when b_node is null then right(z.line, 64) end,
           case when a_node is null then right(z.line, 64) end
    from unnest(bundle._lines((select o.data from bundle.object o
                               where o.bundle = bundle_name and o.id = coalesce(a_node, b_node))))
         with ordinality z(line, n)
    where (a_node is null) <> (b_node is null) and z.n > 1 and z.line <> ''
$$;

-- What differs between two trees (a null root is the empty tree), by table and path: '' a
-- table's node, two hex digits a fan node, four a bucket (as bundle.head_node keeps them), and
-- a row's key hash its blob.  It descends only into nodes whose ids differ.
create function bundle._tree_changes(bundle_name text, a_root text, b_root text)
returns table (relation_name text, path text, a_id text, b_id text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    with tables as (
        select t.name, t.a_id, t.b_id from bundle._node_diff(bundle_name, a_root, b_root) t
    ), fans as (
        select t.name, f.name as path, f.a_id, f.b_id from tables t
        cross join lateral bundle._node_diff(bundle_name, t.a_id, t.b_id) f
    ), buckets as (
        select f.name, f.path || u.name as path, u.a_id, u.b_id from fans f
        cross join lateral bundle._node_diff(bundle_name, f.a_id, f.b_id) u
    )
    select name, '', a_id, b_id from tables
    union all
    select name, path, a_id, b_id from fans
    union all
    select name, path, a_id, b_id from buckets
    union all
    select b.name, k.name, k.a_id, k.b_id from buckets b cross join lateral bundle._node_diff(bundle_name, b.a_id, b.b_id) k
$$;

-- The rows whose blobs differ between two trees.
create or replace function bundle._tree_diff(bundle_name text, a_root text, b_root text)
returns table (relation_name text, key_hash text, a_blob text, b_blob text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select d.relation_name, d.path, d.a_id, d.b_id from bundle._tree_changes(bundle_name, a_root, b_root) d
    where length(d.path) = 64
$$;

-- Walking a tree received from elsewhere, node by node, beside the tree checked out here.
-- A node's place says where it hangs: '' a root; a tracked table's node its relation's oid and
-- ':'; a fan node or bucket that and its path ('16384:3f', '16384:3f2a'); null a blob, or a node
-- of a table not tracked here.  The node the checked-out tree has at the same place is in the
-- store with everything below it, and so is every child listed on the same line of both: of
-- the 65,536 children of the 256 fan nodes a pull of 1,000 scattered rows receives, only the
-- lines that differ (about 1,000) need a look in the store.

-- The node the bundle's checked-out tree has at a place (no row: none, or no place).  A set of
-- rows with a FROM clause, so that the planner inlines it: a call per child of a clone's buckets
-- cost 15 us as a function.
create function bundle._node_at(bundle_name text, place text) returns table (id text)
language sql stable rows 1 as $$
    select c.tree from bundle.bundle b join bundle.commit c on c.bundle = b.name and c.id = b.checked_out
    where place = '' and b.name = bundle_name
    union all
    select h.id from bundle.head_node h
    where h.bundle = bundle_name and h.relation = nullif(split_part(place, ':', 1), '')::oid::regclass
      and h.path = split_part(place, ':', 2)
$$;

-- A node received that does not fit its place is refused: otherwise a sender could hang one
-- node at many places and make the walk below them as long as it likes.  (Stable, not
-- immutable, so that the planner never calls it ahead of time.)
create function bundle._misplaced(kind text, place text, line text) returns text
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    raise exception 'a % node received does not fit its place % in the tree: it has the line "%"', kind, place, left(line, 80)
        using errcode = 'XX001', hint = 'The sender''s tree is malformed (or was altered); nothing below it is kept.';
end
$$;

-- The children of a tree node at a place that are not on the same line of the node the
-- checked-out tree has there, with their places.  Where the place is known, each such line
-- must fit it: a root hangs at '', a fan node at a table's place or one two-hex-digit step below,
-- naming its children by two hex digits; a bucket four digits down, its key hashes starting so.
create function bundle._new_children(bundle_name text, kind text, data bytea, place text)
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
           case when kind = 'root' then (select k.relation::oid || ':' from bundle.tracked k
                                         join pg_class c on c.oid = k.relation
                                         join pg_namespace s on s.oid = c.relnamespace
                                         where k.bundle = bundle_name
                                           and format('%s.%s', s.nspname, c.relname) = left(z.line, -65))
                when kind = 'fan' then place || left(z.line, -65) end
    from unnest(bundle._lines(data),
                bundle._lines((select o.data from bundle.object o where o.bundle = bundle_name
                               and o.id = (select n.id from bundle._node_at(bundle_name, place) n))))
         with ordinality z(line, old, n)
    where z.n > 1 and z.line <> '' and z.line is distinct from z.old
$$;

-- The given nodes (ids at places) other than those the checked-out tree has at their places,
-- and what lies below those held only as pending nodes, down to what the store may hold, each
-- with its place and whether it is pending: the walk bundle._lacking and bundle._promote share.
-- Probes are by key ("limit 1", scalar subqueries): within one long transaction (an import) the
-- store has no statistics, and a join hashing all of it on each call would be quadratic.
create function bundle._pending_walk(bundle_name text, ids text[], places text[])
returns table (id text, place text, pending boolean)
language sql stable set search_path = pg_catalog, pg_temp set jit = off set work_mem = '256MB' as $$
    -- The walk goes down through pending roots and fan nodes, each once per place ("union": a
    -- node whose place is unknown once however often it is listed; bundle._new_children bounds
    -- the rest).  The blobs below pending buckets (a clone has a million) are listed after it,
    -- without being walked or looked for among the pending nodes.
    with recursive walk(id, place) as (
        select i.id, i.place from unnest(ids, places) i(id, place)
        where i.place is null or i.id is distinct from (select n.id from bundle._node_at(bundle_name, i.place) n)
        union
        select c.id, c.place from walk w
        cross join lateral (select p.kind, p.data from bundle.pending p
                            where p.bundle = bundle_name and p.id = w.id and p.kind <> 'bucket' limit 1) p
        cross join lateral bundle._new_children(bundle_name, p.kind, p.data, w.place) c
    ), found as (
        select w.id, w.place, p.kind, p.data from walk w
        left join lateral (select p.kind, p.data from bundle.pending p where p.bundle = bundle_name and p.id = w.id
                           limit 1) p on true
    ), below as (
        select f.id, f.place, f.kind is not null as pending from found f
        union all
        select c.id, c.place, false from found f
        cross join lateral bundle._new_children(bundle_name, f.kind, f.data, f.place) c
        where f.kind = 'bucket'
    )
    -- In the order of ids, so that the caller's probes walk the store's index in order: twice as
    -- fast as at random.
    select * from below order by id
$$;

-- Of the given nodes, those the bundle lacks, and the children of those held only as pending
-- nodes that it lacks in turn (what a pull that broke off still has to ask for), with their places.
create function bundle._lacking(bundle_name text, ids text[], places text[]) returns table (id text, place text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select w.id, w.place from bundle._pending_walk(bundle_name, ids, places) w
    where not w.pending and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = w.id) is null
$$;

-- Move the pending nodes below the given roots to bundle.object, once nothing below them is missing.
create or replace function bundle._promote(bundle_name text, roots text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    moving text[];
    missing text;
begin
    -- Garbage collection skips a bundle whose row is locked, so nothing checked here is
    -- collected before this transaction ends.
    perform from bundle.bundle b where b.name = bundle_name for key share;
    select array_agg(w.id) filter (where w.pending),
           min(w.id) filter (where not w.pending
                             and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = w.id) is null)
        into moving, missing
    from bundle._pending_walk(bundle_name, roots, array(select '' from unnest(roots))) w;
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

-- Keep objects received for a bundle, each checked against its id: blobs in bundle.object,
-- tree nodes in bundle.pending until bundle._promote.  places gives each object's place (null
-- where unknown).  Returns what the bundle still lacks below the nodes, with places (what to ask
-- for next).
create function bundle._keep(bundle_name text, ids text[], datas bytea[], places text[])
returns table (id text, place text)
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
#variable_conflict use_column
declare
    bad record;
    child_ids text[];
    child_places text[];
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
    with received as materialized (
        select i.id, bundle._kind(i.data) as kind, i.data, i.place from unnest(ids, datas, places) i(id, data, place)
    ), blobs as (
        insert into bundle.object select bundle_name, r.id, 'blob', r.data from received r
        where r.kind = 'blob' on conflict do nothing
    ), nodes as (
        insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
        where r.kind <> 'blob' on conflict do nothing
    )
    select coalesce(array_agg(c.id), '{}'), coalesce(array_agg(c.place), '{}') into child_ids, child_places
    from received r cross join lateral bundle._new_children(bundle_name, r.kind, r.data, r.place) c
    where r.kind <> 'blob';
    return query select l.id, l.place from bundle._lacking(bundle_name, child_ids, child_places) l;
end
$$;

-- The same, for objects whose places are unknown (bundle.import's, one at a time).
create or replace function bundle._keep(bundle_name text, ids text[], datas bytea[]) returns setof text
language sql set search_path = pg_catalog, pg_temp set jit = off as $$
    select k.id from bundle._keep(bundle_name, ids, datas, array_fill(null::text, array[cardinality(ids)])) k
$$;

drop function bundle._lacking(text, text[]);
drop function bundle._pending_walk(text, text[]);
drop index bundle.head_node_id;  -- what probed it is gone
revoke all on function bundle._lines(bytea), bundle._misplaced(text, text, text), bundle._tree_changes(text, text, text),
    bundle._node_at(text, text),
    bundle._new_children(text, text, bytea, text), bundle._pending_walk(text, text[], text[]),
    bundle._lacking(text, text[], text[]), bundle._keep(text, text[], bytea[], text[]) from public;

-- The objects a friend asked for, looked up in the order of their ids (the asker's are in the
-- order of its walk): the index is then read in order.
create or replace function peer._serve_bundle_objects(bundle_name text, friend text, granted boolean, ids text[])
returns table (id text, data bytea)
language plpgsql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    return query select o.id, o.data from (select distinct i from unnest(ids) i order by i) a
        cross join lateral (select o.id, o.data from bundle.object o where o.bundle = bundle_name and o.id = a.i limit 1) o;
end
$$;

-- A row's key (as bundle.changed_key and bundle.head_row hold it) from its fields.  Without a
-- SET clause or a subquery, so that a statement calling it inlines it: a clone computes a
-- million keys, and the function took 4.5 s for them.  Keys of more than one column take the
-- general way.
create function bundle._key_of_columns(fields jsonb, key_columns name[]) returns jsonb
language sql immutable strict parallel safe set search_path = pg_catalog, pg_temp set jit = off as $$
    select jsonb_agg(fields -> k::text order by n) from unnest(key_columns) with ordinality u(k, n)
$$;
create or replace function bundle._key(fields jsonb, key_columns name[]) returns jsonb
language sql stable parallel safe as $$
    select case when fields is null or key_columns is null then null
                when cardinality(key_columns) = 1 then jsonb_build_array(fields -> key_columns[1]::text)
                else bundle._key_of_columns(fields, key_columns) end
$$;
revoke all on function bundle._key_of_columns(jsonb, name[]) from public;

-- A checkout takes the target's tree nodes from the same walk that finds the rows to write,
-- instead of rebuilding the changed buckets and fan nodes from the rows (0.2 s for 1,000
-- scattered rows of a table of a million), or, for many rows, walking the target's tree again.
drop function bundle._tree_nodes(text, text);

create or replace function bundle.checkout(bundle_name text, commit_id text default null, force boolean default false)
returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off set work_mem = '256MB' as $$
declare
    b bundle.bundle;
    target text;
    target_root text;
    wrong text;
begin
    perform bundle._bundle(bundle_name);
    select * into b from bundle.bundle where name = bundle_name for update;
    target := coalesce(commit_id, b.head);
    if target is null then
        raise exception 'bundle "%" has no commit to check out', bundle_name using errcode = '55000',
            hint = 'Commit its rows first: select bundle.commit(name, message).';
    end if;
    target_root := bundle._tree(bundle_name, target);
    perform bundle._check_root(bundle_name, target_root);
    if force then
        delete from bundle.merge m where m.bundle = bundle_name;  -- given up, with its conflicts
    else
        perform bundle._refuse_uncommitted(bundle_name, 'Commit them, or pass force => true to overwrite them.');
    end if;
    perform bundle._apply_begin();
    -- What differs between the commit checked out and the target, with statistics: a clone's
    -- million rows then read their blobs in one pass over the store instead of a lookup each
    -- (2 s instead of 9).  The head tree (bundle.head_node) takes the target's nodes; the rows go
    -- to bundle_apply, and their head rows move with them below (so the head tree and the head
    -- rows stay the same commit's).
    if to_regclass('pg_temp.bundle_changes') is null then
        create temporary table bundle_changes (relation regclass not null, key_columns name[] not null,
                                               is_row boolean not null, path text not null, b_id text) on commit drop;
    end if;
    truncate pg_temp.bundle_changes;
    insert into pg_temp.bundle_changes
        select n.relation, n.key_columns, length(d.path) = 64, d.path, d.b_id
        from bundle._tree_changes(bundle_name, bundle._tree(bundle_name, b.checked_out), target_root) d
        join bundle._tracked_names(bundle_name) n using (relation_name);
    analyze pg_temp.bundle_changes;
    insert into bundle.head_node select bundle_name, c.relation, c.path, c.b_id from pg_temp.bundle_changes c
        where not c.is_row and c.b_id is not null
        on conflict (bundle, relation, path) do update set id = excluded.id;
    delete from bundle.head_node h using pg_temp.bundle_changes c
        where not c.is_row and c.b_id is null
          and h.bundle = bundle_name and h.relation = c.relation and h.path = c.path;
    insert into pg_temp.bundle_apply
        select r.relation, coalesce(r.key, bundle._key(r.fields, r.key_columns)), r.fields, r.path, r.b_id
        from (select c.relation, c.key_columns, c.path, c.b_id, h.key, convert_from(o.data, 'UTF8')::jsonb as fields
              from pg_temp.bundle_changes c
              left join bundle.head_row h on h.bundle = bundle_name and h.relation = c.relation and h.key_hash = c.path
              left join bundle.object o on o.bundle = bundle_name and o.id = c.b_id
              where c.is_row offset 0) r;  -- (offset 0: each blob parsed once)
    -- A table the target lacks is empty.
    insert into bundle.head_node
        select bundle_name, n.relation, '', encode(sha256(convert_to('aquapeer-fan/1' || E'\n', 'UTF8')), 'hex')
        from bundle._tracked_names(bundle_name) n
        on conflict do nothing;
    if force then
        -- The other rows changed since: back to the head rows (the target has them unchanged).
        insert into pg_temp.bundle_apply (relation, key, fields)
            select c.relation, c.key, convert_from(o.data, 'UTF8')::jsonb
            from bundle.changed_key c
            left join bundle.head_row h on h.bundle = c.bundle and h.relation = c.relation
                 and h.key_hash = encode(sha256(convert_to(c.key::text, 'UTF8')), 'hex')
            left join bundle.object o on o.bundle = c.bundle and o.id = h.blob
            where c.bundle = bundle_name
              and not exists (select from pg_temp.bundle_apply a where a.relation = c.relation and a.key = c.key);
    end if;
    if not force then  -- (forced, it also writes back rows whose keys must stay recorded)
        perform set_config('bundle.checking_out', bundle_name, true);
    end if;
    perform bundle._apply(bundle_name, format('check out commit %s', target));
    perform set_config('bundle.checking_out', '', true);
    delete from bundle.head_row h using pg_temp.bundle_apply a
        where h.bundle = bundle_name and h.relation = a.relation and h.key_hash = a.key_hash and a.blob_id is null;
    -- (An update, then an insert of the rest, rather than an insert "on conflict": a clone
    -- inserts a million head rows, 1.5 s so instead of 3.4 s.  The bundle's row is locked, so
    -- nothing else writes them meanwhile.)
    update bundle.head_row h set blob = a.blob_id from pg_temp.bundle_apply a
        where h.bundle = bundle_name and h.relation = a.relation and h.key_hash = a.key_hash and a.blob_id is not null;
    insert into bundle.head_row
        select bundle_name, a.relation, a.key_hash, a.key, a.blob_id from pg_temp.bundle_apply a
        where a.key_hash is not null and a.blob_id is not null
          and not exists (select from bundle.head_row h
                          where h.bundle = bundle_name and h.relation = a.relation and h.key_hash = a.key_hash);
    -- Many rows (a clone): fresh statistics for what comes next.
    if (select count(*) > 10000 from pg_temp.bundle_apply a where a.key_hash is not null) then
        analyze bundle.head_row;
        analyze bundle.head_node;
    end if;
    -- The capture triggers recorded every key written.  Those rows now match the target unless a
    -- user trigger changed them on the way in, so only tables with user triggers keep the keys for
    -- bundle.status to compare.  Without force, the check for uncommitted changes has compared
    -- the rest, so a whole-table comparison pending since bundle.track is done too.
    analyze pg_temp.bundle_apply;
    delete from bundle.changed_key c using pg_temp.bundle_apply a
    where c.bundle = bundle_name and c.relation = a.relation and c.key = a.key
      and a.relation in (select k.relation from bundle.tracked k
                         where k.bundle = bundle_name and not bundle._has_user_triggers(k.relation));
    if not force then
        delete from bundle.changed_key c
        where c.bundle = bundle_name and c.key = 'null'::jsonb and not bundle._has_user_triggers(c.relation);
    end if;
    -- The head tree must now be the target's, table by table (a table it lacks is empty).
    select n.relation_name into wrong from bundle._tracked_names(bundle_name) n
    left join bundle.head_node h on h.bundle = bundle_name and h.relation = n.relation and h.path = ''
    left join (select e.* from bundle.object o cross join bundle._entries(o.data) e
               where o.bundle = bundle_name and o.id = target_root) e on e.name = n.relation_name
    where h.id is distinct from coalesce(e.id, encode(sha256(convert_to('aquapeer-fan/1' || E'\n', 'UTF8')), 'hex'))
    limit 1;
    if found then
        raise exception 'bundle "%": the rows kept for % do not match commit % after the checkout', bundle_name, wrong, target
            using errcode = 'XX000', hint = 'Nothing was changed. This is a bug in aquapeer; please report it.';
    end if;
    update bundle.bundle set checked_out = target where name = bundle_name;
    if target is distinct from b.head then
        raise notice 'the tables of bundle "%" now hold commit %, not its head %', bundle_name, target, b.head
            using hint = 'bundle.commit is refused until the head is checked out again: select bundle.checkout(name).';
    end if;
    return target;
end
$$;
