-- Committing a bundle: staging changes, rebuilding its tree, the log.

-- Rebuild the buckets under the given 4-digit prefixes (null: all of them), the fan nodes
-- above them and the table's node, from bundle.head_row.
create or replace function bundle._rebuild(bundle_name text, relation regclass, buckets text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
#variable_conflict use_column
begin
    if buckets is null then
        delete from bundle.head_node n where n.bundle = bundle_name and n.relation = _rebuild.relation;
        with body as (
            select left(h.key_hash, 4) as prefix, convert_to('aquapeer-bucket/1' || E'\n' || string_agg(
                       h.key_hash || ' ' || h.blob || E'\n', '' order by h.key_hash), 'UTF8') as data
            from bundle.head_row h where h.bundle = bundle_name and h.relation = _rebuild.relation
            group by 1
        ), kept as (
            insert into bundle.object select bundle_name, encode(sha256(data), 'hex'), 'bucket', data from body
            on conflict do nothing
        )
        insert into bundle.head_node select bundle_name, _rebuild.relation, prefix, encode(sha256(data), 'hex')
            from body;
        -- Tens of thousands of new nodes: plans made for an empty head_node would scan it per path.
        analyze bundle.head_node;
        perform bundle._rebuild_fans(bundle_name, _rebuild.relation,
                                     array(select distinct left(n.path, 2) from bundle.head_node n
                                           where n.bundle = bundle_name and n.relation = _rebuild.relation));
        perform bundle._rebuild_fans(bundle_name, _rebuild.relation, '{""}');
        return;
    end if;
    -- buckets: the rows under each prefix, by key hash
    with body as (
        select p.prefix, convert_to('aquapeer-bucket/1' || E'\n' || string_agg(
                   h.key_hash || ' ' || h.blob || E'\n', '' order by h.key_hash), 'UTF8') as data
        from unnest(buckets) p(prefix)
        join bundle.head_row h on h.bundle = bundle_name and h.relation = _rebuild.relation
             and h.key_hash >= p.prefix and h.key_hash < p.prefix || 'g'
        group by p.prefix
    ), kept as (
        insert into bundle.object select bundle_name, encode(sha256(data), 'hex'), 'bucket', data from body
        on conflict do nothing
    )
    insert into bundle.head_node select bundle_name, _rebuild.relation, prefix, encode(sha256(data), 'hex') from body
        on conflict (bundle, relation, path) do update set id = excluded.id;
    -- (The emptiness test is driven by the given prefixes, each a range probe, whatever the
    -- planner believes of head_node's size.)
    delete from bundle.head_node n
        where n.bundle = bundle_name and n.relation = _rebuild.relation
        and n.path in (select p.prefix from unnest(buckets) p(prefix)
                       where not exists (select from bundle.head_row h where h.bundle = bundle_name
                                         and h.relation = _rebuild.relation
                                         and h.key_hash >= p.prefix and h.key_hash < p.prefix || 'g'));
    -- fan nodes: the buckets under each two-digit prefix
    perform bundle._rebuild_fans(bundle_name, _rebuild.relation, array(select distinct left(b, 2) from unnest(buckets) b));
    -- the table's node: its fan nodes
    perform bundle._rebuild_fans(bundle_name, _rebuild.relation, '{""}');
end
$$;

-- Fan nodes at the given paths ('' is the table's node): one line per child path one level down.
create or replace function bundle._rebuild_fans(bundle_name text, relation regclass, paths text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
#variable_conflict use_column
begin
    with body as (
        select p.path, convert_to('aquapeer-fan/1' || E'\n' || coalesce(string_agg(
                   substr(n.path, length(p.path) + 1) || ' ' || n.id || E'\n', '' order by n.path), ''),
                   'UTF8') as data
        from unnest(paths) p(path)
        -- The range finds a few paths' children through the index; the equality lets many
        -- paths' children be found by hashing (without it, a merge join on lengths is quadratic).
        left join bundle.head_node n on n.bundle = bundle_name and n.relation = _rebuild_fans.relation
             and n.path > p.path and n.path < p.path || 'g' and left(n.path, -2) = p.path
        group by p.path
    ), kept as (
        insert into bundle.object select bundle_name, encode(sha256(data), 'hex'), 'fan', data from body on conflict do nothing
    )
    insert into bundle.head_node select bundle_name, _rebuild_fans.relation, path, encode(sha256(data), 'hex')
        from body where path = '' or data <> convert_to('aquapeer-fan/1' || E'\n', 'UTF8')
        on conflict (bundle, relation, path) do update set id = excluded.id;
    -- an empty fan node below the table's is left out
    delete from bundle.head_node n
        where n.bundle = bundle_name and n.relation = _rebuild_fans.relation
        and n.path in (select p.path from unnest(paths) p(path)
                       where p.path <> ''
                       and not exists (select from bundle.head_node c where c.bundle = bundle_name
                                       and c.relation = _rebuild_fans.relation and c.path > p.path
                                       and c.path < p.path || 'g' and left(c.path, -2) = p.path));
end
$$;

create or replace function bundle.commit(bundle_name text, message text) returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp set jit = off as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].bundle_commit(bundle_name, message)
$$;
comment on function bundle.commit(text, text) is 'commit what changed in the bundle''s tables; returns the commit id';

create or replace function bundle.log(bundle_name text)
returns table (commit_id text, parent_ids text[], author text, message text, committed_at timestamptz,
               rows_changed bigint)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    with recursive history as (
        select c.*, 0 as depth from bundle.commit c
        where c.bundle = bundle_name and c.id = (select head from bundle._bundle(bundle_name))
        union
        select c.*, h.depth + 1 from history h join bundle.commit c on c.bundle = bundle_name and c.id = any (h.parents)
    )
    select id, parents, author, message, committed_at, rows_changed from history
    order by committed_at desc, depth
$$;
comment on function bundle.log(text) is 'the bundle''s history from its head back, newest first';

-- Comparing tree nodes line by line.  Two versions of a node at the same place in a tree (a fan
-- node of 256 children, a bucket of its rows) mostly share their lines, in the same order, so
-- comparing line n with line n is a string comparison per line instead of parsing both nodes
-- and joining their entries by name (a quarter of the time, measured on the 253 fan nodes of a
-- pull of 1,000 scattered rows).  A line added or removed shifts those below it; they compare
-- unlike too, which only costs a closer look at them.
-- A tree node's lines (the first names its kind).  The text takes the database's collation:
-- convert_from's ("C", that of the encoding's name) would pass on to the ids read from it, and
-- an id of another collation than an index's cannot use that index.
create or replace function bundle._lines(data bytea) returns text[]
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

-- Move a bundle's head rows and head tree to what its tables hold now, keeping every
-- new object; returns the new root id and how many rows changed.  Set-based per table:
-- only the changed keys, their buckets, and the fan nodes above them are touched; the
-- blobs the store lacks are inserted without "on conflict".  The settings are those of
-- bundle._row_hashes (the statements hash rows); work_mem lets a whole table's changes
-- and the sorts of its buckets stay in memory.
create or replace function bundle._stage(bundle_name text, out root text, out rows_changed bigint)
language plpgsql
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
set work_mem = '256MB' set jit = off
as $$
declare
    t bundle.tracked;
    n bigint;
    buckets text[];
    root_data bytea;
    lacking text;
begin
    rows_changed := 0;
    for t in select * from bundle.tracked k where k.bundle = bundle_name order by k.relation::text loop
        -- The blobs the store lacks: all of them while it holds none of the bundle's objects (a
        -- first commit), else each probed by its key.  A join would be planned from statistics
        -- that may predate the bundle's objects (a first commit after a clone), and one planned
        -- so scanned all of them per blob: 8.6 s instead of 0.15 for 1,000 rows after a clone of
        -- 20,000.
        lacking := case when exists (select from bundle.object o where o.bundle = bundle_name)
                        then format('and (select o.id from bundle.object o where o.bundle = %L and o.id = c.blob_id '
                                    'limit 1) is null', bundle_name)
                        else '' end;
        -- One statement: the changed rows, their blobs, and head_row's rows added, modified
        -- and deleted (three disjoint sets of keys); the buckets they hang in, when few.  The
        -- keys it read are forgotten under the same snapshot, so a key written by a transaction
        -- it did not see stays for the next commit.  New rows go into the indexes in their order
        -- (hex sorts alike in every collation): many then fill pages one after the other rather
        -- than splitting pages all over indexes larger than shared_buffers.  Blobs the store
        -- lacks are inserted without "on conflict", which inserts each row speculatively (a
        -- first commit of a million rows: 2.3 s of 17-19 s); no other transaction inserts
        -- objects of the bundle meanwhile, since bundles.commit locks its row for update.
        execute format(
            'with c as materialized (%s), '
            'blobs as (insert into bundle.object select distinct on (c.blob_id collate "C") %L, c.blob_id, ''blob'', '
            '          convert_to(c.blob, ''UTF8'') from c where c.blob is not null %s order by c.blob_id collate "C"), '
            'added as (insert into bundle.head_row select %L, %s, c.key_hash, c.key, c.blob_id from c '
            '          where c.head_blob is null order by c.key_hash collate "C"), '
            'modified as (update bundle.head_row h set blob = c.blob_id from c where c.blob is not null '
            '             and c.head_blob is not null and h.bundle = %L and h.relation = %s and h.key_hash = c.key_hash), '
            'deleted as (delete from bundle.head_row h using c where c.blob is null '
            '            and h.bundle = %L and h.relation = %s and h.key_hash = c.key_hash), '
            'done as (delete from bundle.changed_key k where k.bundle = %L and k.relation = %s) '
            'select (select count(*) from c), (select array_agg(distinct left(f.key_hash, 4)) '
            '                                  from (select c.key_hash from c limit 10001) f having count(*) <= 10000)',
            bundle._changes_query(bundle_name, t), bundle_name, lacking, bundle_name, t.relation::oid,
            bundle_name, t.relation::oid, bundle_name, t.relation::oid, bundle_name, t.relation::oid)
            into n, buckets;
        rows_changed := rows_changed + n;
        if n > 0 then
            -- Buckets, then fan nodes, then the table's node: each rebuilt from its children.
            -- Many changes: fresh statistics, and every bucket in one pass.
            if buckets is null then
                analyze bundle.head_row;
            end if;
            perform bundle._rebuild(bundle_name, t.relation, buckets);
        end if;
        if not exists (select from bundle.head_node h where h.bundle = bundle_name and h.relation = t.relation
                       and h.path = '') then
            perform bundle._rebuild(bundle_name, t.relation, '{}');
        end if;
    end loop;
    -- The root: every tracked table's node, by name.
    select convert_to('aquapeer-root/1' || E'\n' || coalesce(string_agg(
               format('%s.%s %s', n.nspname, c.relname, h.id) || E'\n', '' order by n.nspname, c.relname), ''),
                      'UTF8') into root_data
    from bundle.tracked k join bundle.head_node h on h.bundle = k.bundle and h.relation = k.relation and h.path = ''
    join pg_class c on c.oid = k.relation join pg_namespace n on n.oid = c.relnamespace
    where k.bundle = bundle_name;
    root := encode(sha256(root_data), 'hex');
    insert into bundle.object values (bundle_name, root, 'root', root_data) on conflict do nothing;
end
$$;
