-- Committing a bundle: staging changes, rebuilding its tree, the log.

-- Rebuild the buckets under the given 4-digit prefixes (null: all of them), the fan nodes
-- above them and the table's node, from bundle.head_row.  Given prefixes drive every statement,
-- each a range probe of head_row or head_node by its key ("lateral", "limit 1"), whatever the
-- planner believes of their sizes: statistics taken while head_row held another table's rows
-- say this table has one head row, and joins planned from them went through all of its rows
-- once per bucket rebuilt (8.6 s for a first commit of 10,000 rows instead of 0.2).  With
-- enable_seqscan off the probes stay on the indexes even where the planner takes a table emptied
-- and vacuumed for empty.
create or replace function bundle._rebuild(bundle_name text, relation regclass, buckets text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
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
        perform bundle._rebuild_fans(bundle_name, _rebuild.relation,
                                     array(select distinct left(n.path, 2) from bundle.head_node n
                                           where n.bundle = bundle_name and n.relation = _rebuild.relation));
        perform bundle._rebuild_fans(bundle_name, _rebuild.relation, '{""}');
        return;
    end if;
    -- buckets: the rows under each prefix, by key hash (none: an empty bucket, left out)
    with body as (
        select p.prefix, convert_to('aquapeer-bucket/1' || E'\n' || b.lines, 'UTF8') as data
        from unnest(buckets) p(prefix)
        cross join lateral (select string_agg(h.key_hash || ' ' || h.blob || E'\n', '' order by h.key_hash) as lines
                            from bundle.head_row h
                            where h.bundle = bundle_name and h.relation = _rebuild.relation
                              and h.key_hash >= p.prefix and h.key_hash < p.prefix || 'g') b
        where b.lines is not null
    ), kept as (
        insert into bundle.object select bundle_name, encode(sha256(data), 'hex'), 'bucket', data from body
        on conflict do nothing
    )
    insert into bundle.head_node select bundle_name, _rebuild.relation, prefix, encode(sha256(data), 'hex') from body
        on conflict (bundle, relation, path) do update set id = excluded.id;
    -- (Each node by its path, "limit 1" keeping it a probe: as a join, the planner could make
    -- head_node's rows drive it and probe every prefix once for each of them.)
    delete from bundle.head_node n
    where n.ctid = any (array(
        select g.ctid from unnest(buckets) p(prefix)
        cross join lateral (select n.ctid from bundle.head_node n where n.bundle = bundle_name
                            and n.relation = _rebuild.relation and n.path = p.prefix limit 1) g
        where (select h.key_hash from bundle.head_row h where h.bundle = bundle_name and h.relation = _rebuild.relation
               and h.key_hash >= p.prefix and h.key_hash < p.prefix || 'g' limit 1) is null));
    -- fan nodes: the buckets under each two-digit prefix
    perform bundle._rebuild_fans(bundle_name, _rebuild.relation, array(select distinct left(b, 2) from unnest(buckets) b));
    -- the table's node: its fan nodes
    perform bundle._rebuild_fans(bundle_name, _rebuild.relation, '{""}');
end
$$;

-- Fan nodes at the given paths ('' is the table's node): one line per child path one level
-- down, each path's children found by probes of head_node (as in bundle._rebuild).
create or replace function bundle._rebuild_fans(bundle_name text, relation regclass, paths text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
#variable_conflict use_column
begin
    with body as (
        select p.path, convert_to('aquapeer-fan/1' || E'\n' || coalesce(c.lines, ''), 'UTF8') as data
        from unnest(paths) p(path)
        cross join lateral (
            select string_agg(substr(n.path, length(p.path) + 1) || ' ' || n.id || E'\n', '' order by n.path) as lines
            from (
                -- a fan node's children: the buckets in its range of paths
                select n.path, n.id from bundle.head_node n
                where p.path <> '' and n.bundle = bundle_name and n.relation = _rebuild_fans.relation
                  and n.path > p.path and n.path < p.path || 'g'
                union all
                -- the table node's: each two-digit path probed, rather than the range that holds
                -- every node of the table
                select n.path, n.id from generate_series(0, 255) i
                cross join lateral (select n.path, n.id from bundle.head_node n where n.bundle = bundle_name
                                    and n.relation = _rebuild_fans.relation and n.path = lpad(to_hex(i), 2, '0')
                                    limit 1) n
                where p.path = ''
            ) n) c
    ), kept as (
        insert into bundle.object select bundle_name, encode(sha256(data), 'hex'), 'fan', data from body on conflict do nothing
    )
    insert into bundle.head_node select bundle_name, _rebuild_fans.relation, path, encode(sha256(data), 'hex')
        from body where path = '' or data <> convert_to('aquapeer-fan/1' || E'\n', 'UTF8')
        on conflict (bundle, relation, path) do update set id = excluded.id;
    -- an empty fan node below the table's is left out
    delete from bundle.head_node n
    where n.ctid = any (array(
        select g.ctid from unnest(paths) p(path)
        cross join lateral (select n.ctid from bundle.head_node n where n.bundle = bundle_name
                            and n.relation = _rebuild_fans.relation and n.path = p.path limit 1) g
        where p.path <> ''
          and (select c.path from bundle.head_node c where c.bundle = bundle_name and c.relation = _rebuild_fans.relation
               and c.path > p.path and c.path < p.path || 'g' and length(c.path) = length(p.path) + 2 limit 1) is null));
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
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C'
set work_mem = '256MB' set jit = off
as $$
declare
    t bundle.tracked;
    n bigint;
    buckets text[];
    root_data bytea;
    lacking text;
    blobs text;
    added text;
    forget text;
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
        -- The changed rows, read and their keys forgotten in one statement, under one snapshot:
        -- a key written by a transaction it did not see stays for the next commit.  While the
        -- bundle has no head rows of the table (a first commit) every row is new, and one
        -- statement inserts their blobs and head rows.  New rows go into the indexes in their
        -- order (hex sorts alike in every collation): many then fill pages one after the other
        -- rather than splitting pages all over indexes larger than shared_buffers.  Blobs the
        -- store lacks are inserted without "on conflict", which inserts each row speculatively (a
        -- first commit of a million rows: 2.3 s of 17-19 s); no other transaction inserts
        -- objects of the bundle meanwhile, since bundle.commit locks its row for update.
        -- Otherwise the changes go to a temporary table with statistics, and head rows are
        -- modified and deleted by their ctid: joined by key hash, as planned from head_row's
        -- statistics taken before this table's rows came, each went through all of them.
        blobs := format('insert into bundle.object select distinct on (c.blob_id collate "C") %L, c.blob_id, ''blob'', '
                        'convert_to(c.blob, ''UTF8'') from %%s c where c.blob is not null %s order by c.blob_id collate "C"',
                        bundle_name, lacking);
        added := format('insert into bundle.head_row select %L, %s, c.key_hash, c.key, c.blob_id from %%s c '
                        'where c.head_blob is null and c.blob is not null order by c.key_hash collate "C"',
                        bundle_name, t.relation::oid);
        forget := format('delete from bundle.changed_key k where k.bundle = %L and k.relation = %s',
                         bundle_name, t.relation::oid);
        if (select h.key_hash from bundle.head_row h where h.bundle = bundle_name and h.relation = t.relation
            order by h.key_hash limit 1) is null then
            execute format('with c as materialized (%s), blobs as (%s), added as (%s), done as (%s) '
                           'select (select count(*) from c), (select array_agg(distinct left(f.key_hash, 4)) '
                           'from (select c.key_hash from c limit 10001) f having count(*) <= 10000)',
                           bundle._changes_query(bundle_name, t), format(blobs, 'c'), format(added, 'c'), forget)
                into n, buckets;
        else
            if to_regclass('pg_temp.bundle_stage') is null then
                create temporary table bundle_stage (key jsonb, key_hash text collate "C", blob text, blob_id text,
                                                     head_blob text, head_row tid) on commit drop;
            end if;
            truncate pg_temp.bundle_stage;
            execute format('with c as materialized (%s), done as (%s) insert into pg_temp.bundle_stage select * from c',
                           bundle._changes_query(bundle_name, t), forget);
            analyze pg_temp.bundle_stage;
            execute format(blobs, 'pg_temp.bundle_stage');
            execute format(added, 'pg_temp.bundle_stage');
            update bundle.head_row h set blob = c.blob_id from pg_temp.bundle_stage c
                where c.blob is not null and c.head_row is not null and h.ctid = c.head_row;
            delete from bundle.head_row h
                where h.ctid = any (array(select c.head_row from pg_temp.bundle_stage c where c.blob is null));
            select count(*), (select array_agg(distinct left(f.key_hash, 4))
                              from (select c.key_hash from pg_temp.bundle_stage c limit 10001) f having count(*) <= 10000)
                into n, buckets
            from pg_temp.bundle_stage;
        end if;
        rows_changed := rows_changed + n;
        if n > 0 then
            -- Buckets, then fan nodes, then the table's node: each rebuilt from its children
            -- (many changes: every bucket in one pass).
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
