-- Committing a bundle: staging changes, rebuilding its tree, the log.

-- Rebuild the buckets of the rows pg_temp.bundle_stage holds changes of: each bucket's rows
-- are those of the head's bucket at its path that did not change, and the changed ones that
-- exist now (a bucket left with none is left out).  Each path drives a probe of head_node by its
-- key ("lateral", "limit 1"), whatever the planner believes of its size: statistics taken while
-- it held another table's nodes say this table has one, and joins planned from them went through
-- all of its nodes once per bucket rebuilt.  bundle_stage is analyzed: the anti-join with it is
-- planned from what it holds.  Returns the two-digit paths of the fan nodes above them.
create or replace function bundle._rebuild_buckets(bundle_name text, relation regclass) returns text[]
language plpgsql set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
#variable_conflict use_column
declare
    fans text[];
begin
    create temporary table bundle_buckets on commit drop as
    with paths as (
        select distinct left(s.key_hash, 4) as path from pg_temp.bundle_stage s
    ), kept_rows as (
        select p.path, r.key_hash, r.row_hash, r.row_text from paths p
        cross join lateral (select n.id from bundle.head_node n where n.bundle = bundle_name
                            and n.relation = _rebuild_buckets.relation and n.path = p.path limit 1) n
        cross join lateral bundle._bucket_rows(bundle_name, (select o.data from bundle.object o
                                                             where o.bundle = bundle_name and o.id = n.id limit 1)) r
        where not exists (select from pg_temp.bundle_stage s where s.key_hash = r.key_hash)
        union all
        select left(s.key_hash, 4), s.key_hash, s.blob_id, s.blob from pg_temp.bundle_stage s where s.blob is not null
    )
    select p.path, b.data from paths p
    left join (select r.path, bundle._bucket(string_agg(r.key_hash || ' ' || r.row_text || E'\n', ''
                                                         order by r.key_hash collate "C")) as data
               from kept_rows r group by r.path) b on b.path = p.path;
    insert into bundle.object select bundle_name, encode(sha256(b.data), 'hex'), 'bucket', b.data
        from pg_temp.bundle_buckets b where b.data is not null on conflict do nothing;
    insert into bundle.head_node select bundle_name, _rebuild_buckets.relation, b.path, encode(sha256(b.data), 'hex')
        from pg_temp.bundle_buckets b where b.data is not null
        on conflict (bundle, relation, path) do update set id = excluded.id;
    delete from bundle.head_node n
    where n.ctid = any (array(
        select g.ctid from pg_temp.bundle_buckets b
        cross join lateral (select n.ctid from bundle.head_node n where n.bundle = bundle_name
                            and n.relation = _rebuild_buckets.relation and n.path = b.path limit 1) g
        where b.data is null));
    select array_agg(distinct left(b.path, 2)) into fans from pg_temp.bundle_buckets b;
    drop table pg_temp.bundle_buckets;
    return fans;
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

-- The children a tree node names (a bucket/2 names none: its rows are in it).  The older readers
-- of a node's lines read them through bundle._lines too, so that one function says how a node's
-- text is decoded.
create or replace function bundle._children(data bytea) returns setof text
language sql stable strict parallel safe set search_path = pg_catalog, pg_temp set jit = off as $$
    select right(l, 64) from unnest(bundle._lines(data)) with ordinality t(l, n)
    where n > 1 and l <> '' and substr(data, 1, 18) <> convert_to('aquapeer-bucket/2' || E'\n', 'UTF8')
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
        when substr(data, 1, 18) in (convert_to('aquapeer-bucket/2' || E'\n', 'UTF8'),
                                     convert_to('aquapeer-bucket/1' || E'\n', 'UTF8')) then 'bucket'
        when substr(data, 1, 15) = convert_to('aquapeer-fan/1' || E'\n', 'UTF8') then 'fan'
        when substr(data, 1, 16) = convert_to('aquapeer-root/1' || E'\n', 'UTF8') then 'root'
        else 'blob' end
$$;

-- A bucket/2 of the given lines (each "<key hash> <row text>\n", by key hash).
create or replace function bundle._bucket(lines text) returns bytea
language sql immutable parallel safe as $$
    select convert_to('aquapeer-bucket/2' || E'\n' || lines, 'UTF8')
$$;

-- A bucket/2's rows, split in C (src/bucket.c): none for bytes that are not a bucket/2.
create or replace function bundle._bucket_lines(data bytea) returns table (key_hash text, row_text text)
    language c strict immutable parallel safe rows 20 as 'MODULE_PATHNAME', 'aquapeer_bucket_lines';

-- The first line of a bucket/2 that does not fit (null: every line does): a key hash starting
-- with path (unless null), above the line before it, a space and a row; the bytes UTF-8.
create or replace function bundle._bucket_misfit(data bytea, path text) returns text
    language c immutable parallel safe as 'MODULE_PATHNAME', 'aquapeer_bucket_misfit';

-- A blob's text (a row of aquapeer-bundle/1, which a bucket/1 names); null for none.
create or replace function bundle._blob_text(bundle_name text, id text) returns text
language sql stable parallel safe set search_path = pg_catalog, pg_temp as $$
    select convert_from(o.data, 'UTF8') from bundle.object o where o.bundle = bundle_name and o.id = _blob_text.id
$$;

-- The rows of a bucket: key hash, row hash and row text of each line.  A bucket/2 holds the
-- texts (a row's hash is its text's); a bucket/1 (aquapeer-bundle/1) names each row's blob, whose
-- bytes are the text.  An inlined set of rows (no SET clause, not strict): a caller that never
-- reads row_text never looks a blob up, nor hashes a text when it never reads row_hash.
create or replace function bundle._bucket_rows(bundle_name text, data bytea)
returns table (key_hash text, row_hash text, row_text text)
language sql stable parallel safe rows 20 as $$
    select r.key_hash, bundle._hash(r.row_text), r.row_text
    from bundle._bucket_lines(data) r
    union all
    select left(u.l, 64), right(u.l, 64), bundle._blob_text(bundle_name, right(u.l, 64))
    from unnest(bundle._lines(data)) with ordinality u(l, n)
    where substr(data, 1, 18) = convert_to('aquapeer-bucket/1' || E'\n', 'UTF8') and u.n > 1 and u.l <> ''
$$;

-- The row the bundle's checked-out tree has under a key hash (none: no such row): a probe of
-- head_node for its bucket, and that bucket's lines.
create or replace function bundle._head_row(bundle_name text, relation regclass, key_hash text)
returns table (row_hash text, row_text text)
language sql stable rows 1 as $$
    select r.row_hash, r.row_text
    from (select n.id from bundle.head_node n where n.bundle = bundle_name and n.relation = _head_row.relation
          and n.path = left(_head_row.key_hash, 4) limit 1) n
    cross join lateral bundle._bucket_rows(bundle_name, (select o.data from bundle.object o
                                                         where o.bundle = bundle_name and o.id = n.id limit 1)) r
    where r.key_hash = _head_row.key_hash
$$;

-- Every row of a table in the bundle's checked-out tree: its buckets in head_node, each object
-- probed by its key.
create or replace function bundle._head_rows(bundle_name text, relation regclass)
returns table (key_hash text, row_hash text, row_text text)
language sql stable as $$
    select r.key_hash, r.row_hash, r.row_text from bundle.head_node n
    cross join lateral bundle._bucket_rows(bundle_name, (select o.data from bundle.object o
                                                         where o.bundle = bundle_name and o.id = n.id limit 1)) r
    where n.bundle = bundle_name and n.relation = _head_rows.relation and length(n.path) = 4
$$;

-- Move a bundle's head tree to what its tables hold now, keeping every new object; returns the
-- new root id and how many rows changed.  Set-based per table: only the changed keys, their
-- buckets, and the fan nodes above them are touched.  The settings are those of
-- bundle._row_hashes (the statements hash rows); work_mem lets a whole table's changes and the
-- sorts of its buckets stay in memory.
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
    fans text[];
    root_data bytea;
    forget text;
begin
    rows_changed := 0;
    for t in select * from bundle.tracked k where k.bundle = bundle_name order by k.relation::text loop
        -- The changed rows, read and their keys forgotten in one statement, under one snapshot:
        -- a key written by a transaction it did not see stays for the next commit.
        forget := format('delete from bundle.changed_key k where k.bundle = %L and k.relation = %s',
                         bundle_name, t.relation::oid);
        if (select h.path from bundle.head_node h where h.bundle = bundle_name and h.relation = t.relation
            and h.path > '' order by h.path limit 1) is null then
            -- No rows in the head (a first commit): every row is new, and one statement writes
            -- the buckets, in the order of their ids (the store's index then fills pages one
            -- after the other).  The rows go straight into their buckets, never kept whole
            -- (materialized, a million rows' texts spilled to disk).
            execute format(
                'with body as ('
                '    select left(c.key_hash, 4) as path, count(*) as n, bundle._bucket(string_agg('
                '               c.key_hash || '' '' || c.blob || E''\n'', '''' order by c.key_hash collate "C")) as data'
                '    from (%s) c where c.blob is not null group by 1'
                '), done as (%s'
                '), hashed as materialized (select b.path, b.n, encode(sha256(b.data), ''hex'') as id, b.data from body b'
                '), kept as (insert into bundle.object select %L, h.id, ''bucket'', h.data from hashed h '
                '            order by h.id collate "C" on conflict do nothing'
                '), placed as (insert into bundle.head_node select %L, %s, h.path, h.id from hashed h'
                '              on conflict (bundle, relation, path) do update set id = excluded.id) '
                'select coalesce((select sum(h.n) from hashed h), 0), '
                '(select array_agg(distinct left(h.path, 2)) from hashed h)',
                bundle._changes_query(bundle_name, t, true), forget, bundle_name, bundle_name, t.relation::oid)
                into n, fans;
        else
            -- Otherwise the changes go to a temporary table with statistics, which drives the
            -- rebuild of their buckets.
            if to_regclass('pg_temp.bundle_stage') is null then
                create temporary table bundle_stage (key jsonb, key_hash text, blob text, blob_id text, head_blob text)
                    on commit drop;
            end if;
            truncate pg_temp.bundle_stage;
            execute format('with c as materialized (%s), done as (%s) insert into pg_temp.bundle_stage select * from c',
                           bundle._changes_query(bundle_name, t, bundle._whole(bundle_name, t.relation)), forget);
            get diagnostics n = row_count;
            analyze pg_temp.bundle_stage;
            fans := case when n > 0 then bundle._rebuild_buckets(bundle_name, t.relation) end;
        end if;
        rows_changed := rows_changed + n;
        -- Fan nodes above the buckets rebuilt, then the table's node (also for a table with no
        -- rows: the empty fan node).
        if n > 0 then
            perform bundle._rebuild_fans(bundle_name, t.relation, fans);
        end if;
        if n > 0 or not exists (select from bundle.head_node h where h.bundle = bundle_name
                                and h.relation = t.relation and h.path = '') then
            perform bundle._rebuild_fans(bundle_name, t.relation, '{""}');
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
