-- aquapeer 0.2.0 -> 0.3.0: bundles, version-controlled sets of rows (schema bundle).
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- Work in progress (branch issue-5-bundles): create, track, change capture,
-- row hashing and status.  See docs/bundles.md for the format.

create schema bundle;
grant usage on schema bundle to aquapeer_admin;

-- head: the newest commit of the bundle's branch; checked_out: the commit its tables were last
-- made equal to (bundle.head_row holds its rows).  They differ after a friend pushed, until
-- bundle.checkout.
create table bundle.bundle (
    name text primary key check (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    head text,
    checked_out text,
    created_at timestamptz not null default now(),
    -- Set when objects were received that no commit may ever reference (a pull that broke off);
    -- retention then looks for unreferenced objects once this is older than object_retention.
    loose_since timestamptz
);

create table bundle.tracked (
    bundle text not null references bundle.bundle on delete cascade,
    relation regclass not null,
    filter text,
    key_columns name[] not null,
    primary key (bundle, relation)
);

-- The rows of each bundle's head commit: what status compares with and what
-- a commit changes (one row per tracked row, whatever the number of commits).
create table bundle.head_row (
    bundle text not null references bundle.bundle on delete cascade,
    relation regclass not null,
    -- "C": hex digits sort the same in every collation, and comparing bytes is cheaper.
    key_hash text collate "C" not null,
    key jsonb not null,
    blob text not null,
    primary key (bundle, relation, key_hash)
);

-- Keys written since each bundle's head, recorded by the capture triggers of tracked tables.
-- The JSON null key stands for every key of the table (bundle._whole).
create table bundle.changed_key (
    bundle text not null references bundle.bundle on delete cascade,
    relation regclass not null,
    key jsonb not null,
    primary key (bundle, relation, key)
);

-- Immutable, content-addressed objects (docs/bundles.md): blobs, buckets, fan nodes, roots, commits.
-- Each bundle has its own store, so a friend a bundle is shared with can ask for objects of that
-- bundle only.  An object is here only with everything below it: a tree node's children, a commit's
-- tree and parents.
create table bundle.object (
    bundle text not null references bundle.bundle on delete cascade,
    id text not null check (id ~ '^[0-9a-f]{64}$'),
    kind text not null check (kind in ('blob', 'bucket', 'fan', 'root', 'commit')),
    data bytea not null,
    primary key (bundle, id)
);

-- Tree nodes received (from a friend or bundle.import) whose subtrees may be incomplete: checked
-- against their ids and kept, so a pull that broke off resumes without fetching them again.
-- bundle._promote moves them to bundle.object once everything below them is there.  (Blobs, which
-- have nothing below them, go to bundle.object at once.)
create table bundle.pending (
    bundle text not null references bundle.bundle on delete cascade,
    id text not null check (id ~ '^[0-9a-f]{64}$'),
    kind text not null check (kind in ('bucket', 'fan', 'root')),
    data bytea not null,
    primary key (bundle, id)
);

-- Commits, as bundle.log shows them; the signed document is kept with them.
create table bundle.commit (
    bundle text not null,
    id text not null,
    parents text[] not null,
    tree text not null,
    author text not null,
    message text not null,
    committed_at timestamptz not null,
    rows_changed bigint not null,
    document jsonb not null,
    primary key (bundle, id),
    foreign key (bundle, id) references bundle.object on delete cascade,
    foreign key (bundle, tree) references bundle.object on delete cascade
);

-- The nodes of each bundle's head tree by path: '' a table's node, two hex digits a
-- fan node, four a bucket; so a commit rewrites only the paths its rows hang on.
create table bundle.head_node (
    bundle text not null references bundle.bundle on delete cascade,
    relation regclass not null,
    path text not null,
    id text not null,
    primary key (bundle, relation, path)
);

revoke all on bundle.bundle, bundle.tracked, bundle.head_row, bundle.changed_key, bundle.object,
    bundle.pending, bundle.commit, bundle.head_node from public;
grant select on bundle.bundle, bundle.tracked to aquapeer_admin;
select pg_catalog.pg_extension_config_dump('bundle.bundle', '');
select pg_catalog.pg_extension_config_dump('bundle.tracked', '');
select pg_catalog.pg_extension_config_dump('bundle.head_row', '');
select pg_catalog.pg_extension_config_dump('bundle.changed_key', '');
select pg_catalog.pg_extension_config_dump('bundle.object', '');
select pg_catalog.pg_extension_config_dump('bundle.commit', '');
select pg_catalog.pg_extension_config_dump('bundle.pending', '');
select pg_catalog.pg_extension_config_dump('bundle.head_node', '');

-- The statement that yields (key, blob) for a tracked table's rows, narrowed by a condition.
-- Run it only where the settings of docs/bundles.md are fixed (bundle._row_hashes).  The blob,
-- jsonb_strip_nulls(jsonb_build_object(column, text, ...))::text, is written out directly, which
-- spares building and printing a jsonb value per row: the columns in jsonb's key order (shorter
-- names first, then bytewise), each value escaped by to_json as jsonb prints it, NULL columns
-- left out by array_to_string (an array, unlike a function's arguments, has no limit of 100).
create function bundle._rows_query(relation regclass, filter text, key_columns name[], narrowing text)
returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format(
        'select jsonb_build_array(%s) as key, ''{'' || array_to_string(array[%s], '', '') || ''}'' as blob '
        'from only %s t where (%s) and (%s)',
        (select string_agg(format('t.%I::text', k), ', ' order by n) from unnest(key_columns) with ordinality u(k, n)),
        (select string_agg(format('%L || to_json(t.%I::text)::text', to_json(a.attname::text)::text || ': ', a.attname),
                           ', ' order by octet_length(a.attname), a.attname::text collate "C")
         from pg_attribute a where a.attrelid = relation and a.attnum > 0 and not a.attisdropped),
        relation, coalesce(filter, 'true'), coalesce(narrowing, 'true'))
$$;

-- Whether a bundle compares a tracked table as a whole: changed_key holds the JSON null key for
-- it (a real key is an array) from bundle.track until the next commit, so track need not write
-- one row per key of a table the bundle has not got yet.
create function bundle._whole(bundle_name text, relation regclass) returns boolean
language sql stable set search_path = pg_catalog, pg_temp as $$
    select exists (select from bundle.changed_key c
                   where c.bundle = bundle_name and c.relation = _whole.relation and c.key = 'null')
$$;

-- The statement that yields (key, key hash, blob, blob id) of a tracked table's rows: all of them,
-- or those whose keys bundle.changed_key holds for the bundle changed_in (all of them again when
-- it compares the table as a whole).  One statement per table, never one per row.
create function bundle._row_hashes_query(relation regclass, filter text, key_columns name[], changed_in text)
returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    -- "offset 0" keeps the blob one column of the subquery: flattened, each use of it would
    -- compute it again.
    select format(
        'select r.key, encode(sha256(convert_to(r.key::text, ''UTF8'')), ''hex'') as key_hash, r.blob, '
        'encode(sha256(convert_to(r.blob, ''UTF8'')), ''hex'') as blob_id from %s',
        case when changed_in is null or bundle._whole(changed_in, relation)
             then format('(%s offset 0) r', bundle._rows_query(relation, filter, key_columns, null))
        -- The changed keys, each looked up through the primary key ("limit 1" keeps it a probe
        -- per key whatever the planner thinks of the tables' sizes).
        else format('bundle.changed_key c cross join lateral (%s limit 1) r where c.bundle = %L and c.relation = %s::regclass',
                    bundle._rows_query(relation, filter, key_columns,
                        (select string_agg(format('t.%I = (c.key->>%s)::%s', k, n - 1,
                                                  format_type(a.atttypid, a.atttypmod)), ' and ' order by n)
                         from unnest(key_columns) with ordinality u(k, n)
                         join pg_attribute a on a.attrelid = relation and a.attname = u.k)),
                    changed_in, relation::oid) end)
$$;

-- (key, key hash, blob, blob id) of a tracked table's rows (bundle._row_hashes_query), under the
-- settings that make a column's text the same on any server and in any session.
create function bundle._row_hashes(relation regclass, filter text, key_columns name[], changed_in text)
returns table (key jsonb, key_hash text, blob text, blob_id text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
as $$
begin
    return query execute bundle._row_hashes_query(relation, filter, key_columns, changed_in);
end
$$;

-- Change capture: each statement on a tracked table records the keys it wrote.
create function bundle._capture() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
as $$
declare
    key_expression text := (select string_agg(format('t.%I::text', k), ', ' order by n)
                            from unnest(TG_ARGV) with ordinality u(k, n));
begin
    -- For every bundle tracking the table (also one comparing it whole: a commit running
    -- meanwhile may not see this write, and must leave its key for the next one).
    if TG_OP in ('INSERT', 'UPDATE') then
        execute format('insert into bundle.changed_key select b.bundle, %s::regclass, jsonb_build_array(%s) '
                       'from new_rows t, bundle.tracked b where b.relation = %s::regclass on conflict do nothing',
                       TG_RELID, key_expression, TG_RELID);
    end if;
    if TG_OP in ('UPDATE', 'DELETE') then
        execute format('insert into bundle.changed_key select b.bundle, %s::regclass, jsonb_build_array(%s) '
                       'from old_rows t, bundle.tracked b where b.relation = %s::regclass on conflict do nothing',
                       TG_RELID, key_expression, TG_RELID);
    end if;
    return null;
end
$$;

create function bundle.create(name text) returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    insert into bundle.bundle (name) values ($1);
    return name;
exception when check_violation then
    raise exception 'invalid bundle name %', quote_literal(name) using errcode = '22023',
        hint = 'Use 1 to 63 lower-case letters, digits, ''_'', ''.'' or ''-'', starting with a letter or digit.';
when unique_violation then
    raise exception 'bundle "%" already exists', name using errcode = '42710';
end
$$;

create function bundle._bundle(name text) returns bundle.bundle
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    b bundle.bundle;
begin
    select * into b from bundle.bundle where bundle.name = _bundle.name;
    if not found then
        raise exception 'bundle "%" does not exist', name using errcode = '42704',
            hint = 'See select * from bundle.bundle; create one with bundle.create(name).';
    end if;
    return b;
end
$$;

create function bundle.track(bundle_name text, relation regclass, filter text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    key_columns name[];
    trigger_name text := format('aquapeer_bundle_capture_%s', relation::oid);
begin
    perform bundle._bundle(bundle_name);
    select array_agg(a.attname order by k.n) into key_columns
    from pg_index i cross join unnest(i.indkey) with ordinality k(attnum, n)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
    where i.indrelid = relation and i.indisprimary;
    if key_columns is null then
        raise exception 'table % has no primary key, so its rows cannot be told apart', relation
            using errcode = '42P16', hint = format('ALTER TABLE %s ADD PRIMARY KEY (...) first.', relation);
    end if;
    insert into bundle.tracked values (bundle_name, relation, filter, key_columns);
    -- One set of capture triggers per table, whatever the number of bundles tracking it.
    if not exists (select from pg_trigger where tgrelid = relation and tgname = trigger_name || '_ins') then
        execute format('create trigger %I after insert on %s referencing new table as new_rows '
                       'for each statement execute function bundle._capture(%s)',
                       trigger_name || '_ins', relation, array_to_string(array(select quote_literal(c) from unnest(key_columns) c), ', '));
        execute format('create trigger %I after update on %s referencing old table as old_rows new table as new_rows '
                       'for each statement execute function bundle._capture(%s)',
                       trigger_name || '_upd', relation, array_to_string(array(select quote_literal(c) from unnest(key_columns) c), ', '));
        execute format('create trigger %I after delete on %s referencing old table as old_rows '
                       'for each statement execute function bundle._capture(%s)',
                       trigger_name || '_del', relation, array_to_string(array(select quote_literal(c) from unnest(key_columns) c), ', '));
    end if;
    -- Everything there now is new to the bundle: the next status or commit compares the whole table.
    insert into bundle.changed_key values (bundle_name, relation, 'null');
exception when unique_violation then
    raise exception 'bundle "%" already tracks %', bundle_name, relation using errcode = '42710';
end
$$;

-- The statement that yields the rows of a tracked table that differ from the bundle's head rows:
-- (key, key hash, blob and blob id now, head_blob), blob null for a row deleted since and head_blob
-- null for a row added since.  Only the changed keys are looked at, through the primary key and
-- head_row's key hashes, unless the bundle compares the whole table.
create function bundle._changes_query(bundle_name text, t bundle.tracked) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format(
        'select coalesce(n.key, h.key) as key, coalesce(n.key_hash, h.key_hash) as key_hash, n.blob, n.blob_id, '
        'h.blob as head_blob from (%s) n '
        'full join (select h.key, h.key_hash, h.blob from bundle.head_row h where h.bundle = %L and h.relation = %s %s) h '
        'on h.key_hash = n.key_hash where n.blob_id is distinct from h.blob',
        bundle._row_hashes_query(t.relation, t.filter, t.key_columns, bundle_name), bundle_name, t.relation::oid,
        case when not bundle._whole(bundle_name, t.relation) then format(
            'and h.key_hash in (select encode(sha256(convert_to(c.key::text, ''UTF8'')), ''hex'') '
            'from bundle.changed_key c where c.bundle = %L and c.relation = %s)', bundle_name, t.relation::oid) end)
$$;

-- The settings are those of bundle._row_hashes: the statements hash rows.
create function bundle.status(bundle_name text)
returns table (relation regclass, key jsonb, change text)
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
as $$
declare
    t bundle.tracked;
begin
    perform bundle._bundle(bundle_name);
    for t in select * from bundle.tracked k where k.bundle = bundle_name order by k.relation::text loop
        return query execute format(
            'select %s::regclass, c.key, case when c.head_blob is null then ''added'' '
            'when c.blob is null then ''deleted'' else ''modified'' end from (%s) c order by 2',
            t.relation::oid, bundle._changes_query(bundle_name, t));
    end loop;
end
$$;

-- Move a bundle's head rows and head tree to what its tables hold now, keeping every
-- new object; returns the new root id and how many rows changed.  Set-based per table:
-- only the changed keys, their buckets, and the fan nodes above them are touched.  The
-- settings are those of bundle._row_hashes (the statements hash rows); work_mem lets a
-- whole table's changes and the sorts of its buckets stay in memory; no JIT, which the
-- planner's guesses at key-hash ranges trigger on small commits (150 ms to compile).
create function bundle._stage(bundle_name text, out root text, out rows_changed bigint)
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
begin
    rows_changed := 0;
    for t in select * from bundle.tracked k where k.bundle = bundle_name order by k.relation::text loop
        -- One statement: the changed rows, their blobs, and head_row's rows added, modified
        -- and deleted (three disjoint sets of keys); the buckets they hang in, when few.  The
        -- keys it read are forgotten under the same snapshot, so a key written by a transaction
        -- it did not see stays for the next commit.  New rows go into the indexes in their order
        -- (hex sorts alike in every collation): many then fill pages one after the other rather
        -- than splitting pages all over indexes larger than shared_buffers.
        execute format(
            'with c as materialized (%s), '
            'blobs as (insert into bundle.object select %L, c.blob_id, ''blob'', convert_to(c.blob, ''UTF8'') from c '
            '          where c.blob is not null order by c.blob_id collate "C" on conflict do nothing), '
            'added as (insert into bundle.head_row select %L, %s, c.key_hash, c.key, c.blob_id from c '
            '          where c.head_blob is null order by c.key_hash collate "C"), '
            'modified as (update bundle.head_row h set blob = c.blob_id from c where c.blob is not null '
            '             and c.head_blob is not null and h.bundle = %L and h.relation = %s and h.key_hash = c.key_hash), '
            'deleted as (delete from bundle.head_row h using c where c.blob is null '
            '            and h.bundle = %L and h.relation = %s and h.key_hash = c.key_hash), '
            'done as (delete from bundle.changed_key k where k.bundle = %L and k.relation = %s) '
            'select (select count(*) from c), (select array_agg(distinct left(f.key_hash, 4)) '
            '                                  from (select c.key_hash from c limit 10001) f having count(*) <= 10000)',
            bundle._changes_query(bundle_name, t), bundle_name, bundle_name, t.relation::oid,
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

-- Rebuild the buckets under the given 4-digit prefixes (null: all of them), the fan nodes
-- above them and the table's node, from bundle.head_row.
create function bundle._rebuild(bundle_name text, relation regclass, buckets text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
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
create function bundle._rebuild_fans(bundle_name text, relation regclass, paths text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
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

create function bundle.commit(bundle_name text, message text) returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].bundle_commit(bundle_name, message)
$$;
comment on function bundle.commit(text, text) is 'commit what changed in the bundle''s tables; returns the commit id';

create function bundle.log(bundle_name text)
returns table (commit_id text, parent_ids text[], author text, message text, committed_at timestamptz,
               rows_changed bigint)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with recursive history as (
        select c.*, 0 as depth from bundle.commit c
        where c.bundle = bundle_name and c.id = (select head from bundle._bundle(bundle_name))
        union
        select c.*, h.depth + 1 from history h join bundle.commit c on c.bundle = bundle_name and c.id = any (h.parents)
    )
    select id, parents, author, message, committed_at, rows_changed from history
    order by committed_at desc, depth
$$;

revoke all on function bundle.create(text), bundle.track(text, regclass, text), bundle.status(text),
    bundle.commit(text, text), bundle.log(text), bundle._stage(text), bundle._rebuild(text, regclass, text[]),
    bundle._rebuild_fans(text, regclass, text[]), bundle._whole(text, regclass),
    bundle._changes_query(text, bundle.tracked) from public;
grant execute on function bundle.create(text), bundle.track(text, regclass, text), bundle.status(text),
    bundle.commit(text, text), bundle.log(text) to aquapeer_admin;

-- Objects from elsewhere ---------------------------------------------------------------------

-- The ids a tree node refers to: the last 64 characters of each line after the header.
create function bundle._children(data bytea) returns setof text
language sql immutable strict parallel safe set search_path = pg_catalog, pg_temp as $$
    select right(l, 64) from string_to_table(convert_from(data, 'UTF8'), E'\n') with ordinality t(l, n)
    where n > 1 and l <> ''
$$;

-- What an object is, from its first line (a blob is a JSON object, so never starts so).
create function bundle._kind(data bytea) returns text
language sql immutable strict parallel safe set search_path = pg_catalog, pg_temp as $$
    select case substr(data, 1, 18)
        when convert_to('aquapeer-bucket/1' || E'\n', 'UTF8') then 'bucket'
        else case substr(data, 1, 15)
            when convert_to('aquapeer-fan/1' || E'\n', 'UTF8') then 'fan'
            when convert_to('aquapeer-root/1' || E'\n', 'UTF8') then 'root'
            else 'blob' end end
$$;

-- Keep objects received for a bundle, each checked against its id: blobs in bundle.object,
-- tree nodes in bundle.pending until bundle._promote.  Returns the ids of the nodes' children
-- that are in neither store (what to ask for next).
create function bundle._keep(bundle_name text, ids text[], datas bytea[]) returns setof text
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    bad record;
begin
    select i.id, encode(sha256(i.data), 'hex') as actual into bad
    from unnest(ids, datas) i(id, data) where i.id is distinct from encode(sha256(i.data), 'hex') limit 1;
    if found then
        raise exception 'object % does not match its content (it hashes to %)', bad.id, bad.actual
            using errcode = 'XX001', hint = 'The sender altered or damaged it; nothing of it was kept.';
    end if;
    update bundle.bundle set loose_since = coalesce(loose_since, now()) where name = bundle_name;
    insert into bundle.object
        select bundle_name, i.id, 'blob', i.data from unnest(ids, datas) i(id, data)
        where bundle._kind(i.data) = 'blob' on conflict do nothing;
    insert into bundle.pending
        select bundle_name, i.id, bundle._kind(i.data), i.data from unnest(ids, datas) i(id, data)
        where bundle._kind(i.data) <> 'blob' on conflict do nothing;
    return query
        select distinct c.child from unnest(ids, datas) i(id, data)
        cross join lateral bundle._children(i.data) c(child)
        where bundle._kind(i.data) <> 'blob'
          and not exists (select from bundle.object o where o.bundle = bundle_name and o.id = c.child)
          and not exists (select from bundle.pending p where p.bundle = bundle_name and p.id = c.child);
end
$$;

-- Of the given ids, those the bundle lacks, and the children of those held only as pending
-- nodes that it lacks in turn (what a pull that broke off still has to ask for).
create function bundle._lacking(bundle_name text, ids text[]) returns setof text
language sql stable set search_path = pg_catalog, pg_temp as $$
    with recursive walk(id) as (
        select distinct i from unnest(ids) i
        where not exists (select from bundle.object o where o.bundle = bundle_name and o.id = i)
        union
        select c.child from walk w join bundle.pending p on p.bundle = bundle_name and p.id = w.id
        cross join lateral bundle._children(p.data) c(child)
        where not exists (select from bundle.object o where o.bundle = bundle_name and o.id = c.child)
    )
    select w.id from walk w where not exists (select from bundle.pending p where p.bundle = bundle_name and p.id = w.id)
$$;

-- Move the pending nodes below the given roots to bundle.object, once nothing below them is missing.
create function bundle._promote(bundle_name text, roots text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    missing text;
begin
    select l into missing from bundle._lacking(bundle_name, roots) l limit 1;
    if found then
        raise exception 'bundle "%" lacks object % of the commits received', bundle_name, missing
            using errcode = 'XX001', hint = 'Pull again: what was received is kept, and only what is missing is fetched.';
    end if;
    with recursive walk(id) as (
        select p.id from bundle.pending p where p.bundle = bundle_name and p.id = any (roots)
        union
        select p.id from walk w join bundle.pending n on n.bundle = bundle_name and n.id = w.id
        cross join lateral bundle._children(n.data) c(child)
        join bundle.pending p on p.bundle = bundle_name and p.id = c.child
    ), moved as (
        delete from bundle.pending p using walk w where p.bundle = bundle_name and p.id = w.id
        returning p.*
    )
    insert into bundle.object select * from moved on conflict do nothing;
end
$$;

-- Commit documents received for a bundle, each checked (its id, its author's signature, its
-- tree and parents present) and kept in parent order; returns how many were new.
create function bundle._keep_commits(bundle_name text, documents jsonb) returns integer
language plpython3u set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].bundle_keep_commits(bundle_name, documents)
$$;

revoke all on function bundle._children(bytea), bundle._kind(bytea), bundle._keep(text, text[], bytea[]),
    bundle._lacking(text, text[]), bundle._promote(text, text[]), bundle._keep_commits(text, jsonb) from public;
