-- aquapeer 0.2.0 -> 0.3.0: bundles, version-controlled sets of rows (schema bundle).
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- Work in progress (branch issue-5-bundles): create, track, change capture,
-- row hashing and status.  See docs/bundles.md for the format.

create schema bundle;
grant usage on schema bundle to aquapeer_admin;

-- Settings (peer._config_single_row replaces a restored row whole, so it needs no change).
alter table peer.config
    add column object_retention interval not null default '7 days'
        check (object_retention >= '0'::interval);
comment on column peer.config.object_retention is
    'objects no commit references (a pull or import that broke off) are deleted after this long';

-- head: the newest commit of the bundle's branch; checked_out: the commit its tables were last
-- made equal to (bundle.head_row holds its rows).  They differ after a friend pushed, until
-- bundle.checkout.
create table bundle.bundle (
    name text primary key check (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    head text,
    checked_out text,
    created_at timestamptz not null default now(),
    -- When objects were last received (to within an hour) that no commit may ever reference (a
    -- pull that broke off); retention looks for unreferenced objects once this is older than
    -- object_retention.
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
-- (The id checks avoid a {64} repetition: PostgreSQL's regex engine matches it slowly.)
-- Each bundle has its own store, so a friend a bundle is shared with can ask for objects of that
-- bundle only.  An object is here only with everything below it: a tree node's children, a commit's
-- tree and parents.
create table bundle.object (
    bundle text not null references bundle.bundle on delete cascade,
    id text not null check (id ~ '^[0-9a-f]+$' and length(id) = 64),
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
    id text not null check (id ~ '^[0-9a-f]+$' and length(id) = 64),
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
    -- A checkout (bundle.checkout sets bundle.checking_out) writes exactly its target's rows, so
    -- they are no change to its bundle, unless a user trigger alters them on the way in or
    -- another bundle tracks the table too.
    if coalesce(current_setting('bundle.checking_out', true), '') <> '' and not bundle._has_user_triggers(TG_RELID)
       and not exists (select from bundle.tracked k where k.relation = TG_RELID
                       and k.bundle <> current_setting('bundle.checking_out', true)) then
        return null;
    end if;
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
    merging record;
begin
    perform bundle._bundle(bundle_name);
    -- A merge in progress (bundle.merge, bundle.conflicts are defined with the merge below): said
    -- in a notice, and each row with unresolved conflicts listed once as 'conflict'.
    select m.theirs, (select count(*) from bundle.conflicts c where c.bundle = m.bundle) as conflicts into merging
    from bundle.merge m where m.bundle = bundle_name;
    if found then
        raise notice 'bundle "%": merge of commit % in progress, % unresolved conflict(s)', bundle_name, merging.theirs,
            merging.conflicts using hint = case when merging.conflicts > 0
                then 'Resolve them with bundle.resolve (see bundle.conflicts), then bundle.commit; or bundle.merge_abort.'
                else 'bundle.commit makes the merge commit; bundle.merge_abort gives the merge up.' end;
    end if;
    for t in select * from bundle.tracked k where k.bundle = bundle_name order by k.relation::text loop
        return query execute format(
            'select %s::regclass, c.key, case when c.head_blob is null then ''added'' '
            'when c.blob is null then ''deleted'' else ''modified'' end from (%s) c '
            'where not exists (select from bundle.conflicts f where f.bundle = %L and f.relation = %s '
            'and f.key = c.key) order by 2',
            t.relation::oid, bundle._changes_query(bundle_name, t), bundle_name, t.relation::oid);
    end loop;
    return query select distinct c.relation, c.key, 'conflict' from bundle.conflicts c
        where c.bundle = bundle_name order by 1, 2;
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
    select case
        when substr(data, 1, 18) = convert_to('aquapeer-bucket/1' || E'\n', 'UTF8') then 'bucket'
        when substr(data, 1, 15) = convert_to('aquapeer-fan/1' || E'\n', 'UTF8') then 'fan'
        when substr(data, 1, 16) = convert_to('aquapeer-root/1' || E'\n', 'UTF8') then 'root'
        else 'blob' end
$$;

-- Keep objects received for a bundle, each checked against its id: blobs in bundle.object,
-- tree nodes in bundle.pending until bundle._promote.  Returns what the bundle still lacks below
-- the nodes (what to ask for next).
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
    -- At most hourly: retention must not collect what a running pull keeps, and a new row
    -- version per call would pile up in a long transaction (an import) and slow every lookup of
    -- the bundle, its foreign keys' included.
    update bundle.bundle set loose_since = now()
    where name = bundle_name and (loose_since is null or loose_since < now() - interval '1 hour');
    -- One statement: a node's children never come in the same batch as the node (they are
    -- asked for after it is kept), so what it inserts need not be visible to _lacking.
    return query
        with received as materialized (
            select i.id, bundle._kind(i.data) as kind, i.data from unnest(ids, datas) i(id, data)
        ), blobs as (
            insert into bundle.object select bundle_name, r.id, 'blob', r.data from received r
            where r.kind = 'blob' on conflict do nothing
        ), nodes as (
            insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
            where r.kind <> 'blob' on conflict do nothing
        )
        select * from bundle._lacking(bundle_name, array(
            select c.child from received r cross join lateral bundle._children(r.data) c(child)
            where r.kind <> 'blob'));
end
$$;

-- Of the given ids, those the bundle lacks, and the children of those held only as pending
-- nodes that it lacks in turn (what a pull that broke off still has to ask for).
create function bundle._lacking(bundle_name text, ids text[]) returns setof text
language sql stable set search_path = pg_catalog, pg_temp as $$
    -- Probes by key ("limit 1", scalar subqueries): within one long transaction (an import) the
    -- store has no statistics, and a join hashing all of it on each call would be quadratic.
    with recursive walk(id) as (
        select distinct i from unnest(ids) i
        where (select o.id from bundle.object o where o.bundle = bundle_name and o.id = i) is null
        union
        select c.child from walk w
        cross join lateral (select p.data from bundle.pending p where p.bundle = bundle_name and p.id = w.id
                            limit 1) p
        cross join lateral bundle._children(p.data) c(child)
        where (select o.id from bundle.object o where o.bundle = bundle_name and o.id = c.child) is null
    )
    select w.id from walk w
    where (select p.id from bundle.pending p where p.bundle = bundle_name and p.id = w.id) is null
$$;

-- Move the pending nodes below the given roots to bundle.object, once nothing below them is missing.
create function bundle._promote(bundle_name text, roots text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    missing text;
begin
    -- Garbage collection skips a bundle whose row is locked, so nothing checked here is
    -- collected before this transaction ends.
    perform from bundle.bundle b where b.name = bundle_name for key share;
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

-- Sharing and transfers between friends ------------------------------------------------------

-- Which friend may pull (and push to) which bundle; nothing is shared by default.
create table peer.bundle_share (
    bundle text not null references bundle.bundle on delete cascade on update cascade,
    friend text not null references peer.friend on delete cascade on update cascade,
    can_push boolean not null default false,
    shared_at timestamptz not null default now(),
    primary key (bundle, friend)
);
revoke all on peer.bundle_share from public;
grant select on peer.bundle_share to aquapeer_admin;
select pg_catalog.pg_extension_config_dump('peer.bundle_share', '');

-- Transfers, written by executors in their own transactions as they go, so every session sees
-- their progress while they run (never in the puller's transaction).
create table peer.transfer (
    id uuid primary key,
    friend text not null,
    bundle text not null,
    direction text not null check (direction in ('pull', 'push', 'pushed to us')),
    state text not null default 'running' check (state in ('running', 'done', 'failed', 'cancelled')),
    bytes_done bigint not null default 0,
    rows_done bigint not null default 0,
    rows_total bigint,
    objects_done bigint not null default 0,
    commits bigint not null default 0,
    started_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    finished_at timestamptz,
    error text
);
revoke all on peer.transfer from public;

create view peer.transfers as
    select id, friend, bundle, direction, state, bytes_done, rows_done, rows_total, objects_done, commits,
           started_at, finished_at, error
    from peer.transfer where state = 'running' or finished_at > now() - interval '1 day'
    order by started_at desc;
comment on view peer.transfers is 'bundle transfers running now or ended in the last day, with their progress';
grant select on peer.transfers to aquapeer_admin;

create function peer.share_bundle(bundle_name text, friend text, can_push boolean default false) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform bundle._bundle(bundle_name);
    if not exists (select from peer.friend f where f.name = share_bundle.friend) then
        raise exception 'no friend named "%"', friend using errcode = '42704',
            hint = 'See select name from peer.friend.';
    end if;
    insert into peer.bundle_share as s (bundle, friend, can_push) values (bundle_name, $2, $3)
        on conflict on constraint bundle_share_pkey do update set can_push = excluded.can_push;
end
$$;
comment on function peer.share_bundle(text, text, boolean) is 'let a friend pull (and with can_push, push to) a bundle';

create function peer.unshare_bundle(bundle_name text, friend text) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.bundle_share s where s.bundle = bundle_name and s.friend = unshare_bundle.friend
                  returning 1)
    select exists (select from gone)
$$;
comment on function peer.unshare_bundle(text, text) is 'take back what peer.share_bundle gave; true if it was shared';

-- What a friend may read, checked in the serving executor: shared with it, or (granted) it is
-- pulling what we asked it to take in a push.  The same error whether the bundle exists or not.
create function peer._check_bundle_served(bundle_name text, friend text, granted boolean, push boolean default false)
returns void
language plpgsql stable security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform peer._executor_nonce();
    if not granted and not exists (select from peer.bundle_share s where s.bundle = bundle_name
                                   and s.friend = _check_bundle_served.friend and (s.can_push or not push)) then
        raise exception 'bundle "%" is not shared with you%', bundle_name, case when push then ' for pushing' else '' end
            using errcode = '42501', hint = 'Its owner shares it with peer.share_bundle(bundle, friend, can_push).';
    end if;
end
$$;

create function peer._serve_bundle_head(bundle_name text, friend text, granted boolean) returns jsonb
language plpgsql stable security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    return (select jsonb_build_object('head', b.head, 'tables', bundle._describe(b.name))
            from bundle.bundle b where b.name = bundle_name);
end
$$;

-- The signed commits reachable from the head that the friend does not have (it sent their ids).
create function peer._serve_bundle_commits(bundle_name text, friend text, granted boolean, have text[])
returns setof jsonb
language plpgsql stable security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    return query
        with recursive history(id) as (
            select b.head from bundle.bundle b where b.name = bundle_name and b.head <> all (have)
            union
            select p from history h join bundle.commit c on c.bundle = bundle_name and c.id = h.id
            cross join unnest(c.parents) p where p <> all (have)
        )
        select c.document from history h join bundle.commit c on c.bundle = bundle_name and c.id = h.id;
end
$$;

create function peer._serve_bundle_objects(bundle_name text, friend text, granted boolean, ids text[])
returns table (id text, data bytea)
language plpgsql stable security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    return query select o.id, o.data from unnest(ids) i join bundle.object o on o.bundle = bundle_name and o.id = i;
end
$$;

create function peer.pull_bundle(friend text, bundle_name text, checkout boolean default true) returns jsonb
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].pull_bundle(friend, bundle_name, checkout)
$$;
comment on function peer.pull_bundle(text, text, boolean) is
    'fetch what a friend committed to a bundle that this database lacks, then fast-forward or merge, and check out';

create function peer.push_bundle(friend text, bundle_name text) returns jsonb
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].push_bundle(friend, bundle_name)
$$;
comment on function peer.push_bundle(text, text) is
    'send a friend (who granted can_push) the commits of a bundle it lacks, fast-forwarding its head';

revoke all on function peer.share_bundle(text, text, boolean), peer.unshare_bundle(text, text),
    peer._check_bundle_served(text, text, boolean, boolean), peer._serve_bundle_head(text, text, boolean),
    peer._serve_bundle_commits(text, text, boolean, text[]), peer._serve_bundle_objects(text, text, boolean, text[]),
    peer.pull_bundle(text, text, boolean), peer.push_bundle(text, text) from public;
-- Serving runs in executors connected as the friend's role; _executor_nonce refuses anybody else.
grant execute on function peer._check_bundle_served(text, text, boolean, boolean), peer._serve_bundle_head(text, text, boolean),
    peer._serve_bundle_commits(text, text, boolean, text[]), peer._serve_bundle_objects(text, text, boolean, text[]) to public;
grant execute on function peer.share_bundle(text, text, boolean), peer.unshare_bundle(text, text),
    peer.pull_bundle(text, text, boolean), peer.push_bundle(text, text) to aquapeer_admin;

-- Describe, adopt, export, import -------------------------------------------------------------

-- A bundle's tracked tables as another database needs them to take the bundle in (the header of
-- bundle.export, and what a pull's server sends): relation as regclass prints it qualified, the
-- primary key columns in key order, every column with its type, by relation name.
create function bundle._describe(bundle_name text) returns jsonb
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select coalesce(jsonb_agg(jsonb_build_object(
               'relation', t.relation::text,
               'key_columns', to_jsonb(t.key_columns),
               'columns', (select jsonb_agg(jsonb_build_array(a.attname, format_type(a.atttypid, a.atttypmod))
                                            order by a.attnum)
                           from pg_attribute a where a.attrelid = t.relation and a.attnum > 0 and not a.attisdropped))
           order by n.nspname, c.relname), '[]')
    from bundle._bundle(bundle_name) b
    join bundle.tracked t on t.bundle = b.name
    join pg_class c on c.oid = t.relation join pg_namespace n on n.oid = c.relnamespace
$$;

-- Take in a bundle described elsewhere (bundle._describe there): create it if missing and track
-- its tables here, once each exists with the same primary key and every described column with the
-- same type.  Local columns it does not describe must be nullable (or generated): checking out
-- writes them NULL, whatever their default, so that rows hash as the bundle's.  All differences
-- are reported at once.
create function bundle._adopt(bundle_name text, tables jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    differences text[];
begin
    if jsonb_typeof(tables) is distinct from 'array' or exists (
        select from jsonb_array_elements(tables) e
        where jsonb_typeof(e->'relation') is distinct from 'string' or jsonb_typeof(e->'key_columns') is distinct from 'array'
           or jsonb_typeof(e->'columns') is distinct from 'array'
           or cardinality(parse_ident(e->>'relation')) <> 2) then
        raise exception 'not a description of bundle "%"''s tables: %', bundle_name, left(tables::text, 200)
            using errcode = '22023',
                  hint = 'Give what bundle._describe returns: [{"relation": "schema.table", "key_columns": [...], "columns": [[name, type], ...]}, ...].';
    end if;
    with theirs as (
        select e->>'relation' as relation, e->'columns' as columns,
               array(select jsonb_array_elements_text(e->'key_columns')) as key_columns,
               (select c.oid from pg_class c where c.oid = to_regclass(e->>'relation') and c.relkind in ('r', 'p')) as here
        from jsonb_array_elements(tables) e
    ), problems as (
        select t.relation, 0 as rank, '' as col, format('%s: no such table here', t.relation) as problem
        from theirs t where t.here is null
        union all
        select t.relation, 1, '', format('%s: primary key (%s) there, %s here', t.relation, array_to_string(t.key_columns, ', '),
                                         coalesce('(' || array_to_string(k.key_columns, ', ') || ')', 'none'))
        from theirs t cross join lateral (
            select array_agg(a.attname::text order by i.n) as key_columns
            from pg_index x cross join unnest(x.indkey) with ordinality i(attnum, n)
            join pg_attribute a on a.attrelid = x.indrelid and a.attnum = i.attnum
            where x.indrelid = t.here and x.indisprimary) k
        where t.here is not null and k.key_columns is distinct from t.key_columns
        union all
        select t.relation, 2, coalesce(j.name, j.our_name),
               case when j.our_name is null then format('%s.%s: %s there, missing here', t.relation, j.name, j.type)
                    when j.name is null then format('%s.%s: not there, and not null here', t.relation, j.our_name)
                    else format('%s.%s: %s there, %s here', t.relation, j.name, j.type, j.our_type) end
        from theirs t cross join lateral (
            select c.name, c.type, o.name as our_name, o.type as our_type, o.optional
            from (select x->>0 as name, x->>1 as type from jsonb_array_elements(t.columns) x) c
            full join (select a.attname::text as name, format_type(a.atttypid, a.atttypmod) as type,
                              not a.attnotnull or a.attgenerated <> '' as optional
                       from pg_attribute a where a.attrelid = t.here and a.attnum > 0 and not a.attisdropped) o
                 on o.name = c.name) j
        where t.here is not null
          and (j.our_name is null or (j.name is null and not j.optional) or (j.name is not null and j.type <> j.our_type))
    )
    select array_agg(problem order by relation, rank, col) into differences from problems;
    if differences is not null then
        raise exception 'the tables here do not match bundle "%": %', bundle_name, array_to_string(differences, '; ')
            using errcode = '42804',
                  hint = 'Create or alter the tables here to match: the same primary key and every column with the same '
                         'type (columns only this side has must be nullable); then try again.';
    end if;
    if not exists (select from bundle.bundle b where b.name = bundle_name) then
        perform bundle.create(bundle_name);
    end if;
    perform bundle.track(bundle_name, to_regclass(e->>'relation'))
    from jsonb_array_elements(tables) e
    where not exists (select from bundle.tracked k where k.bundle = bundle_name and k.relation = to_regclass(e->>'relation'));
end
$$;

-- The ids of the objects the bundle's commits reach, with their depth below a root (0: roots,
-- then table nodes, fan nodes, buckets, blobs): a walk over the stored tree nodes' children.
create function bundle._reachable(bundle_name text) returns table (id text, depth integer)
language sql stable set search_path = pg_catalog, pg_temp as $$
    with recursive walk(id, depth) as (
        select distinct c.tree, 0 from bundle.commit c where c.bundle = bundle_name
        union
        select ch.child, w.depth + 1 from walk w
        join bundle.object o on o.bundle = bundle_name and o.id = w.id and o.kind <> 'blob'
        cross join lateral bundle._children(o.data) ch(child)
    )
    select id, depth from walk
$$;

-- The bundle as a stream of JSON documents (docs/bundles.md, "Export format"): the header, the
-- objects children first, the commits parents first.  One query, so one snapshot; called in a
-- select list it is read row by row, so no part of it has to fit in memory at once.  (The parts
-- come in the order of the union's branches.)
create function bundle.export(bundle_name text) returns setof jsonb
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select jsonb_build_object('type', 'bundle', 'format', 'aquapeer-bundle/1', 'name', b.name, 'head', b.head,
                              'tables', bundle._describe(b.name))
    from bundle._bundle(bundle_name) b
    union all
    (select jsonb_build_object('type', 'object', 'id', o.id, 'data', translate(encode(o.data, 'base64'), E'\n', ''))
     from bundle._reachable(bundle_name) r join bundle.object o on o.bundle = bundle_name and o.id = r.id
     order by r.depth desc, r.id)
    union all
    -- Parents first: by the longest way down from a commit nobody has as a parent, deepest first.
    (with recursive up(id, depth) as (
         select t.id, 0 from (select c.id from bundle.commit c where c.bundle = bundle_name
                              except select unnest(c.parents) from bundle.commit c where c.bundle = bundle_name) t
         union
         select p.parent, u.depth + 1 from up u
         join bundle.commit c on c.bundle = bundle_name and c.id = u.id
         cross join unnest(c.parents) p(parent)
     )
     select c.document from (select u.id, max(u.depth) as depth from up u group by u.id) u
     join bundle.commit c on c.bundle = bundle_name and c.id = u.id
     order by u.depth desc, c.id)
$$;

-- Load one document of bundle.export's stream; returns 'new' when it added something here, else
-- 'known'.  The header names the bundle the later documents belong to (kept for the session in
-- the setting bundle.importing, undone with the transaction); a bundle that has no head here gets
-- the exported head once that commit is kept; bundle.checkout then applies it to the tables.
create function bundle.import(document jsonb) returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    state jsonb := nullif(current_setting('bundle.importing', true), '')::jsonb;
    target text := state->>'bundle';
    known boolean;
    our_head text;
begin
    if document->>'type' = 'bundle' then
        if document->>'format' is distinct from 'aquapeer-bundle/1' or jsonb_typeof(document->'name') is distinct from 'string' then
            raise exception 'not the header of a bundle export of format aquapeer-bundle/1: %', left(document::text, 200)
                using errcode = '22023', hint = 'It may come from a newer aquapeer; update this one.';
        end if;
        select b.head into our_head from bundle.bundle b where b.name = document->>'name';
        known := found;
        perform bundle._adopt(document->>'name', document->'tables');
        if our_head is not null and our_head is distinct from document->>'head' then
            raise notice 'bundle "%" exists here: its head stays at % (the import''s is %)', document->>'name', our_head,
                coalesce(document->>'head', 'none')
                using hint = 'The imported commits are kept; merge or check them out to use them.';
        end if;
        perform set_config('bundle.importing', jsonb_build_object(
            'bundle', document->>'name', 'head', case when our_head is null then document->'head' end)::text, false);
        return case when known then 'known' else 'new' end;
    end if;
    if target is null or document->>'type' not in ('object', 'commit') then
        raise exception '%', case when document->>'type' in ('object', 'commit')
                                  then 'a bundle document came before the bundle''s header'
                                  else format('not a bundle document: %s', left(document::text, 200)) end
            using errcode = '22023', hint = 'Import the documents of bundle.export in order, from its header on.';
    end if;
    if document->>'type' = 'object' then
        known := exists (select from bundle.object o where o.bundle = target and o.id = document->>'id')
                 or exists (select from bundle.pending p where p.bundle = target and p.id = document->>'id');
        -- Checked against its id even when known: a tampered copy is an error, not a no-op.
        perform bundle._keep(target, array[document->>'id'], array[decode(document->>'data', 'base64')]);
        return case when known then 'known' else 'new' end;
    end if;
    if coalesce(document->'commit'->>'tree', '') !~ '^[0-9a-f]{64}$' then
        raise exception 'not a commit document: %', left(document::text, 200) using errcode = '22023';
    end if;
    begin
        perform bundle._promote(target, array[document->'commit'->>'tree']);
    exception when data_corrupted then
        raise exception 'commit % of bundle "%" refers to objects the import did not bring', document->>'id', target
            using errcode = 'XX001', detail = sqlerrm,
                  hint = 'The export is incomplete or out of order (objects come before the commits); export it again.';
    end;
    known := bundle._keep_commits(target, jsonb_build_array(document)) = 0;
    if state->>'head' = document->>'id' then
        update bundle.bundle b set head = document->>'id' where b.name = target and b.head is null;
    end if;
    return case when known then 'known' else 'new' end;
end
$$;

-- Garbage collection, run by retention: in each bundle whose loose objects are older than
-- peer.config.object_retention, drop the pending nodes and the objects no commit reaches.  A bundle
-- a transaction is keeping objects in or promoting a tree of right now (its row is locked, by the
-- foreign keys or bundle._promote) waits for the next run.
create function bundle._collect_garbage() returns table (bundle_name text, pending bigint, objects bigint)
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    for bundle_name in
        select b.name from bundle.bundle b, peer.config c where b.loose_since < now() - c.object_retention
        order by b.name for update of b skip locked
    loop
        delete from bundle.pending p where p.bundle = bundle_name;
        get diagnostics pending = row_count;
        delete from bundle.object o where o.bundle = bundle_name and o.kind <> 'commit'
            and not exists (select from bundle._reachable(bundle_name) r where r.id = o.id);
        get diagnostics objects = row_count;
        update bundle.bundle b set loose_since = null where b.name = bundle_name;
        return next;
    end loop;
end
$$;

comment on function bundle.export(text) is
    'the bundle as a stream of JSON documents: header, objects, commits (docs/bundles.md, "Export format")';
comment on function bundle.import(jsonb) is
    'load one document of a bundle export, header first; returns new or known';

revoke all on function bundle._describe(text), bundle._adopt(text, jsonb), bundle._reachable(text),
    bundle.export(text), bundle.import(jsonb), bundle._collect_garbage() from public;
grant execute on function bundle.export(text), bundle.import(jsonb) to aquapeer_admin;

-- Reading trees, checkout, diff, rescan, merge ------------------------------------------------

-- The entries of a tree node: what each line after the header names (a root's
-- '<schema>.<table>', a fan node's index, a bucket's key hash) and the id it ends with.
-- It and bundle._node_diff have no SET clause so that the planner inlines them into a tree walk
-- (half the time of calling them per node); their callers fix search_path.  rows 10: with the
-- default of 1000 a walk looks huge to the planner, which then spends longer JIT-compiling it
-- than running it.
create function bundle._entries(data bytea) returns table (name text, id text)
language sql immutable parallel safe rows 10 as $$
    select left(l, -65), right(l, 64) from string_to_table(convert_from(data, 'UTF8'), E'\n') with ordinality t(l, n)
    where n > 1 and l <> ''
$$;

-- The entries of two nodes that differ, side by side (a missing or null node has none).
create function bundle._node_diff(bundle_name text, a_node text, b_node text)
returns table (name text, a_id text, b_id text)
language sql stable rows 10 as $$
    select coalesce(a.name, b.name), a.id, b.id
    from (select e.* from bundle.object o cross join bundle._entries(o.data) e
          where o.bundle = bundle_name and o.id = a_node) a
    full join (select e.* from bundle.object o cross join bundle._entries(o.data) e
               where o.bundle = bundle_name and o.id = b_node) b on b.name = a.name
    where a.id is distinct from b.id
$$;

-- The rows whose blobs differ between two trees (a null root is the empty tree).  It descends
-- only into nodes whose ids differ: root, table node, fan node, bucket.
create function bundle._tree_diff(bundle_name text, a_root text, b_root text)
returns table (relation_name text, key_hash text, a_blob text, b_blob text)
language sql stable set search_path = pg_catalog, pg_temp as $$
    select t.name, k.name, k.a_id, k.b_id
    from bundle._node_diff(bundle_name, a_root, b_root) t
    cross join lateral bundle._node_diff(bundle_name, t.a_id, t.b_id) f
    cross join lateral bundle._node_diff(bundle_name, f.a_id, f.b_id) u
    cross join lateral bundle._node_diff(bundle_name, u.a_id, u.b_id) k
$$;

-- Every row of a tree.
-- Whether a table has triggers of its own beyond the capture triggers, which may change what a
-- checkout writes.
create function bundle._has_user_triggers(relation regclass) returns boolean
language sql stable set search_path = pg_catalog, pg_temp as $$
    select exists (select from pg_trigger g where g.tgrelid = relation and not g.tgisinternal
                   and g.tgname not like 'aquapeer\_bundle\_capture\_%' and g.tgenabled <> 'D')
$$;

-- The nodes of a tree by table and path, as bundle.head_node keeps them: '' a table's node, two
-- hex digits a fan node, four a bucket.
create function bundle._tree_nodes(bundle_name text, root text)
returns table (relation_name text, path text, id text)
language sql stable set search_path = pg_catalog, pg_temp as $$
    with tables as (
        select d.name, d.b_id as id from bundle._node_diff(bundle_name, null, root) d
    ), fans as (
        select t.name, f.name as path, f.b_id as id from tables t
        cross join lateral bundle._node_diff(bundle_name, null, t.id) f
    )
    select name, '', id from tables
    union all
    select name, path, id from fans
    union all
    select f.name, f.path || u.name, u.b_id from fans f cross join lateral bundle._node_diff(bundle_name, null, f.id) u
$$;


-- The tracked tables under the names a root gives them.
create function bundle._tracked_names(bundle_name text)
returns table (relation_name text, relation regclass, filter text, key_columns name[])
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format('%s.%s', n.nspname, c.relname), k.relation, k.filter, k.key_columns
    from bundle.tracked k join pg_class c on c.oid = k.relation join pg_namespace n on n.oid = c.relnamespace
    where k.bundle = bundle_name
$$;

-- A commit's root (null for null: the empty tree).
create function bundle._tree(bundle_name text, commit_id text) returns text
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    root text;
begin
    if commit_id is null then
        return null;
    end if;
    select c.tree into root from bundle.commit c where c.bundle = bundle_name and c.id = commit_id;
    if not found then
        raise exception 'bundle "%" has no commit %', bundle_name, commit_id using errcode = '42704',
            hint = 'See select * from bundle.log(name).';
    end if;
    return root;
end
$$;

-- Refuse a tree with rows of tables the bundle does not track here.
create function bundle._check_root(bundle_name text, root text) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    missing text;
begin
    select e.name into missing from bundle.object o cross join bundle._entries(o.data) e
    where o.bundle = bundle_name and o.id = root
      and e.name not in (select n.relation_name from bundle._tracked_names(bundle_name) n)
    order by 1 limit 1;
    if found then
        raise exception 'bundle "%" has rows of table %, which it does not track in this database', bundle_name, missing
            using errcode = '55000',
            hint = format('Create the table if need be and track it: select bundle.track(%L, %L), then try again.',
                          bundle_name, missing);
    end if;
end
$$;

-- A row's key (as bundle.changed_key and bundle.head_row hold it) from its fields.
create function bundle._key(fields jsonb, key_columns name[]) returns jsonb
language sql immutable strict parallel safe set search_path = pg_catalog, pg_temp as $$
    select jsonb_agg(fields -> k::text order by n) from unnest(key_columns) with ordinality u(k, n)
$$;

-- The key columns' values, typed, from the key (a jsonb array) that the expression source yields.
create function bundle._key_values(relation regclass, key_columns name[], source text) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select string_agg(format('(%s->>%s)::%s', source, u.n - 1, format_type(a.atttypid, a.atttypmod)), ', ' order by u.n)
    from unnest(key_columns) with ordinality u(k, n)
    join pg_attribute a on a.attrelid = relation and a.attname = u.k
$$;

create function bundle.diff(bundle_name text, from_commit text, to_commit text default null)
returns table (relation regclass, key jsonb, column_name text, old text, new text)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with changed as (
        select n.relation, n.key_columns,
               (select convert_from(o.data, 'UTF8')::jsonb from bundle.object o
                where o.bundle = bundle_name and o.id = d.a_blob) as old_fields,
               (select convert_from(o.data, 'UTF8')::jsonb from bundle.object o
                where o.bundle = bundle_name and o.id = d.b_blob) as new_fields
        from bundle._tree_diff(bundle_name, bundle._tree(bundle_name, from_commit),
                               bundle._tree(bundle_name, coalesce(to_commit, (select b.head from bundle._bundle(bundle_name) b)))) d
        join bundle._tracked_names(bundle_name) n using (relation_name)
    )
    select c.relation, bundle._key(coalesce(c.new_fields, c.old_fields), c.key_columns), f.column_name,
           c.old_fields ->> f.column_name, c.new_fields ->> f.column_name
    from changed c
    cross join lateral jsonb_object_keys(coalesce(c.old_fields, '{}') || coalesce(c.new_fields, '{}')) f(column_name)
    where c.old_fields ->> f.column_name is distinct from c.new_fields ->> f.column_name
    order by c.relation::text, 2, 3
$$;
comment on function bundle.diff(text, text, text) is
    'the fields that differ between two commits (from null: the empty bundle; to null: the head)';

-- A merge in progress (bundle.commit then makes a commit with the parents ours and theirs)
-- and its conflicts, which keep our value in the table until bundle.resolve.
create table bundle.merge (
    bundle text primary key references bundle.bundle on delete cascade,
    theirs text not null,
    ours text not null,
    base text,
    started_at timestamptz not null default now()
);

-- column_name null: the whole row (deleted on one side, changed on the other); base, ours and
-- theirs are then the rows as JSON, null where there is none.
create table bundle.conflicts (
    bundle text not null references bundle.merge on delete cascade,
    relation regclass not null,
    key jsonb not null,
    column_name text,
    base text,
    ours text,
    theirs text
);
create unique index on bundle.conflicts (bundle, relation, key, coalesce(column_name, ''));

revoke all on bundle.merge, bundle.conflicts from public;
grant select on bundle.merge, bundle.conflicts to aquapeer_admin;
select pg_catalog.pg_extension_config_dump('bundle.merge', '');
select pg_catalog.pg_extension_config_dump('bundle.conflicts', '');

-- Refuse to write a bundle's tables over uncommitted changes or a merge in progress.
create function bundle._refuse_uncommitted(bundle_name text, advice text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    theirs text;
    n bigint;
begin
    select m.theirs into theirs from bundle.merge m where m.bundle = bundle_name;
    if found then
        raise exception 'bundle "%" has a merge of commit % in progress', bundle_name, theirs using errcode = '55000',
            hint = 'Finish it (bundle.resolve each conflict, then bundle.commit) or give it up: select bundle.merge_abort(name).';
    end if;
    select count(*) into n from bundle.status(bundle_name);
    if n > 0 then
        raise exception 'bundle "%" has % uncommitted change(s) in its tables', bundle_name, n using errcode = '55000',
            hint = 'See select * from bundle.status(name). ' || advice;
    end if;
end
$$;

-- The rows to write to a bundle's tables (bundle._apply): fields null deletes the row.  key_hash
-- and blob_id are set for rows whose head row moves with them (a checkout).
create function bundle._apply_begin() returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    if to_regclass('pg_temp.bundle_apply') is null then
        create temporary table bundle_apply (relation regclass not null, key jsonb not null, fields jsonb,
                                             key_hash text, blob_id text) on commit drop;
    end if;
    truncate pg_temp.bundle_apply;
end
$$;

-- The given tables in foreign-key order (rank: how many of them each refers to, directly or
-- not), and for each, a non-deferrable foreign key of it that is part of a cycle, if any.
-- Deferrable foreign keys do not count: they are deferred while the rows are written.
create function bundle._fk_order(relations regclass[])
returns table (relation regclass, rank bigint, cycle_constraint text)
language sql stable set search_path = pg_catalog, pg_temp as $$
    with recursive edge as (
        select c.conrelid as child, c.confrelid as parent, format('%I on %s', c.conname, c.conrelid::regclass) as name
        from pg_constraint c
        where c.contype = 'f' and not c.condeferrable and c.conrelid <> c.confrelid
          and c.conrelid = any (relations::oid[]) and c.confrelid = any (relations::oid[])
    ), reach(child, ancestor) as (
        select e.child, e.parent from edge e
        union
        select r.child, e.parent from reach r join edge e on e.child = r.ancestor
    )
    select r, (select count(*) from reach x where x.child = r),
           (select min(e.name) from edge e where e.child = r
            and exists (select from reach x where x.child = e.parent and x.ancestor = e.child))
    from unnest(relations) r
$$;

-- Write pg_temp.bundle_apply's rows to the bundle's tables: one statement per table and
-- operation; inserts and updates parents first, then deletes children first, so every row
-- written refers only to rows that are there (a table referring to itself is written in one
-- statement, and foreign keys are checked at its end).  Triggers fire as usual.  Sequences
-- owned by the tables' columns are moved past the highest value.  doing names the operation
-- in errors.
create function bundle._apply(bundle_name text, doing text) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
as $$
declare
    changed regclass[] := array(select distinct a.relation from pg_temp.bundle_apply a);
    cycle text;
    deferred text;
    t record;
    message text;
    detail text;
    state text;
begin
    select o.cycle_constraint into cycle from bundle._fk_order(changed) o
    where o.cycle_constraint is not null order by o.relation::text limit 1;
    if cycle is not null then
        raise exception 'cannot % in bundle "%": foreign key % is part of a cycle of tables and is not deferrable',
            doing, bundle_name, cycle using errcode = '55000',
            hint = 'Make it deferrable (ALTER TABLE ... ALTER CONSTRAINT ... DEFERRABLE); it is then checked after all rows are written.';
    end if;
    -- Deferrable constraints checked at once by default: checked after all rows are written.
    select string_agg(format('%I.%I', n.nspname, c.conname), ', ') into deferred
    from pg_constraint c join pg_namespace n on n.oid = c.connamespace
    where c.condeferrable and not c.condeferred
      and (c.conrelid = any (changed::oid[]) or c.confrelid = any (changed::oid[]));
    begin
        if deferred is not null then
            execute 'set constraints ' || deferred || ' deferred';
        end if;
        for t in select o.relation, k.key_columns from bundle._fk_order(changed) o
                 join bundle.tracked k on k.bundle = bundle_name and k.relation = o.relation
                 order by o.rank, o.relation::text loop
            execute (
                select format('insert into %s as t (%s) overriding system value select %s from pg_temp.bundle_apply a '
                              'where a.relation = %s::regclass and a.fields is not null on conflict (%s) do %s',
                              t.relation, string_agg(format('%I', a.attname), ', ' order by a.attnum),
                              string_agg(format('(a.fields->>%L)::%s', a.attname, format_type(a.atttypid, a.atttypmod)),
                                         ', ' order by a.attnum),
                              t.relation::oid,
                              (select string_agg(format('%I', k), ', ') from unnest(t.key_columns) k),
                              coalesce('update set ' || string_agg(format('%I = excluded.%I', a.attname, a.attname), ', '
                                                                   order by a.attnum) filter (where a.attname <> all (t.key_columns)),
                                       'nothing'))
                from pg_attribute a
                where a.attrelid = t.relation and a.attnum > 0 and not a.attisdropped and a.attgenerated = '');
        end loop;
        for t in select o.relation, k.key_columns, k.filter from bundle._fk_order(changed) o
                 join bundle.tracked k on k.bundle = bundle_name and k.relation = o.relation
                 order by o.rank desc, o.relation::text desc loop
            execute format('delete from only %s t where (%s) and (%s) in (select %s from pg_temp.bundle_apply a '
                           'where a.relation = %s::regclass and a.fields is null)',
                           t.relation, coalesce(t.filter, 'true'),
                           (select string_agg(format('t.%I', k), ', ') from unnest(t.key_columns) k),
                           bundle._key_values(t.relation, t.key_columns, 'a.key'), t.relation::oid);
        end loop;
        if deferred is not null then
            execute 'set constraints ' || deferred || ' immediate';
        end if;
    exception when integrity_constraint_violation then
        get stacked diagnostics message = message_text, detail = pg_exception_detail, state = returned_sqlstate;
        raise exception 'cannot % in bundle "%": %', doing, bundle_name, message using errcode = state, detail = detail,
            hint = 'The rows do not satisfy a constraint of this database, so nothing was changed. '
                   'Change the local rows or the constraint, then try again.';
    end;
    -- Sequences owned by the tables' columns (serial and identity): past the highest value, never back.
    for t in select d.objid::regclass as seq, a.attname, a.attrelid::regclass as relation
             from pg_depend d join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
             where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass
               and d.deptype in ('a', 'i') and d.refobjid = any (changed::oid[])
               and exists (select from pg_class s where s.oid = d.objid and s.relkind = 'S') loop
        execute format('select pg_catalog.setval(%L, x.m) from (select max(t.%I)::bigint as m from only %s t) x, %s s '
                       'where x.m > s.last_value or (x.m = s.last_value and not s.is_called)',
                       t.seq, t.attname, t.relation, t.seq);
    end loop;
end
$$;

create function bundle.checkout(bundle_name text, commit_id text default null, force boolean default false)
returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    b bundle.bundle;
    target text;
    target_root text;
    t record;
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
    -- The rows that differ between the commit checked out and the target; head_row moves with them.
    insert into pg_temp.bundle_apply
        select n.relation, coalesce(h.key, bundle._key(r.fields, n.key_columns)), r.fields, d.key_hash, d.b_blob
        from bundle._tree_diff(bundle_name, bundle._tree(bundle_name, b.checked_out), target_root) d
        join bundle._tracked_names(bundle_name) n using (relation_name)
        left join bundle.head_row h on h.bundle = bundle_name and h.relation = n.relation and h.key_hash = d.key_hash
        left join lateral (select convert_from(o.data, 'UTF8')::jsonb from bundle.object o
                           where o.bundle = bundle_name and o.id = d.b_blob) r(fields) on true;
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
    insert into bundle.head_row
        select bundle_name, a.relation, a.key_hash, a.key, a.blob_id from pg_temp.bundle_apply a
        where a.key_hash is not null and a.blob_id is not null
        on conflict (bundle, relation, key_hash) do update set blob = excluded.blob;
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
    for t in select n.relation, n.relation_name, count(a.key_hash) as moved,
                    coalesce(array_agg(distinct left(a.key_hash, 4)) filter (where a.key_hash is not null), '{}') as buckets
             from bundle._tracked_names(bundle_name) n left join pg_temp.bundle_apply a on a.relation = n.relation
             group by n.relation, n.relation_name loop
        -- Many rows: the target's nodes as they are (rebuilding up to 65,536 buckets costs seconds),
        -- and fresh statistics for what comes next.
        if t.moved > 10000 then
            analyze bundle.head_row;
            delete from bundle.head_node h where h.bundle = bundle_name and h.relation = t.relation;
            insert into bundle.head_node
                select bundle_name, t.relation, n.path, n.id from bundle._tree_nodes(bundle_name, target_root) n
                where n.relation_name = t.relation_name;
            insert into bundle.head_node  -- a table the target lacks is empty
                values (bundle_name, t.relation, '', encode(sha256(convert_to('aquapeer-fan/1' || E'\n', 'UTF8')), 'hex'))
                on conflict do nothing;
            analyze bundle.head_node;  -- the next small checkout's plans depend on it
        elsif t.moved > 0 or not exists (select from bundle.head_node h where h.bundle = bundle_name
                                         and h.relation = t.relation and h.path = '') then
            perform bundle._rebuild(bundle_name, t.relation, t.buckets);
        end if;
    end loop;
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
comment on function bundle.checkout(text, text, boolean) is
    'make the bundle''s tables equal to a commit (default: the head); force => true overwrites uncommitted changes';

-- Catch writes that bypassed the capture triggers: every tracked row against the head rows.
create function bundle.rescan(bundle_name text) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    t bundle.tracked;
    n bigint;
    total bigint := 0;
begin
    perform bundle._bundle(bundle_name);
    for t in select * from bundle.tracked k where k.bundle = bundle_name loop
        insert into bundle.changed_key
            select bundle_name, t.relation, coalesce(r.key, h.key)
            from bundle._row_hashes(t.relation, t.filter, t.key_columns, null) r
            full join (select h.key, h.key_hash, h.blob from bundle.head_row h
                       where h.bundle = bundle_name and h.relation = t.relation) h on h.key_hash = r.key_hash
            where r.blob_id is distinct from h.blob
            on conflict do nothing;
        get diagnostics n = row_count;
        total := total + n;
    end loop;
    return total;
end
$$;
comment on function bundle.rescan(text) is
    'find rows written without the capture triggers (e.g. session_replication_role = replica); returns how many keys it newly recorded';

-- The commits a commit descends from, itself included.
create function bundle._ancestors(bundle_name text, commit_id text) returns setof text
language sql stable set search_path = pg_catalog, pg_temp as $$
    with recursive walk(id) as (
        select commit_id where commit_id is not null
        union
        select p.id from walk w join bundle.commit c on c.bundle = bundle_name and c.id = w.id
        cross join unnest(c.parents) p(id)
    )
    select id from walk
$$;

-- The newest common ancestor of two commits (null: none, the empty tree is the base).
create function bundle._merge_base(bundle_name text, a text, b text) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select c.id from bundle._ancestors(bundle_name, a) x(id)
    join bundle._ancestors(bundle_name, b) y(id) on y.id = x.id
    join bundle.commit c on c.bundle = bundle_name and c.id = x.id
    order by c.committed_at desc, c.id limit 1
$$;

-- Start a merge: the rows only theirs changed since the base go to pg_temp.bundle_apply (which
-- it begins); the rows both sides changed differently are returned, with their fields at the
-- base, ours and theirs (null: no row), for the field merge.
create function bundle._merge_rows(bundle_name text, base_commit text, our_commit text, their_commit text)
returns table (relation regclass, key jsonb, base_fields jsonb, our_fields jsonb, their_fields jsonb)
language plpgsql set search_path = pg_catalog, pg_temp as $$
#variable_conflict use_column
declare
    base_root text := bundle._tree(bundle_name, base_commit);
begin
    perform bundle._check_root(bundle_name, bundle._tree(bundle_name, their_commit));
    perform bundle._apply_begin();
    return query
    with ours as (select * from bundle._tree_diff(bundle_name, base_root, bundle._tree(bundle_name, our_commit))),
    theirs as (select * from bundle._tree_diff(bundle_name, base_root, bundle._tree(bundle_name, their_commit))),
    plan as (
        select n.relation, n.key_columns, o.relation_name is not null as both_changed,
               t.a_blob as base_blob, o.b_blob as our_blob, t.b_blob as their_blob
        from theirs t join bundle._tracked_names(bundle_name) n on n.relation_name = t.relation_name
        left join ours o on o.relation_name = t.relation_name and o.key_hash = t.key_hash
        where o.relation_name is null or o.b_blob is distinct from t.b_blob
    ), loaded as (
        select p.relation, p.key_columns, p.both_changed,
               (select convert_from(x.data, 'UTF8')::jsonb from bundle.object x
                where x.bundle = bundle_name and x.id = p.base_blob) as b_fields,
               (select convert_from(x.data, 'UTF8')::jsonb from bundle.object x
                where x.bundle = bundle_name and x.id = p.our_blob) as o_fields,
               (select convert_from(x.data, 'UTF8')::jsonb from bundle.object x
                where x.bundle = bundle_name and x.id = p.their_blob) as t_fields
        from plan p
    ), only_theirs as (
        insert into pg_temp.bundle_apply (relation, key, fields)
        select l.relation, bundle._key(coalesce(l.t_fields, l.b_fields), l.key_columns), l.t_fields
        from loaded l where not l.both_changed
    )
    select l.relation, bundle._key(coalesce(l.t_fields, l.o_fields, l.b_fields), l.key_columns),
           l.b_fields, l.o_fields, l.t_fields
    from loaded l where l.both_changed;
end
$$;

-- Bring a commit kept from elsewhere (all its objects in bundle.object) into the bundle:
-- fast-forward, up to date, or (with checkout) a three-way merge.  See docs/bundles.md.
create function bundle._integrate(bundle_name text, theirs text, checkout boolean) returns jsonb
language plpython3u set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].bundle_integrate(bundle_name, theirs, checkout)
$$;

create function bundle.resolve(bundle_name text, relation regclass, key jsonb, column_name text, choice text,
                               value text default null)
returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
as $$
declare
    c bundle.conflicts;
    chosen text;
    key_columns name[];
begin
    perform bundle._bundle(bundle_name);
    select * into c from bundle.conflicts k where k.bundle = bundle_name and k.relation = resolve.relation
        and k.key = resolve.key and k.column_name is not distinct from resolve.column_name;
    if not found then
        raise exception 'bundle "%" has no unresolved conflict in % at key % %', bundle_name, relation, key,
            coalesce('column ' || column_name, '(whole row)') using errcode = '42704',
            hint = format('See select * from bundle.conflicts where bundle = %L (a whole-row conflict has column_name null).', bundle_name);
    end if;
    if choice is null or choice not in ('ours', 'theirs', 'value') then
        raise exception 'a conflict is resolved by ''ours'', ''theirs'' or ''value'', not %', coalesce(quote_literal(choice), 'null')
            using errcode = '22023';
    end if;
    chosen := case choice when 'ours' then c.ours when 'theirs' then c.theirs else value end;
    select k.key_columns into key_columns from bundle.tracked k where k.bundle = bundle_name and k.relation = c.relation;
    if c.column_name is null then
        -- The whole row: the chosen row as JSON (column -> text), or null for none.
        if chosen is not null and bundle._key(chosen::jsonb, key_columns) is distinct from c.key then
            raise exception 'the row given has the key %, not the conflict''s key %', bundle._key(chosen::jsonb, key_columns), c.key
                using errcode = '22023', hint = 'Give the whole row as JSON (column -> text) with the same key, or null to delete it.';
        end if;
        perform bundle._apply_begin();
        insert into pg_temp.bundle_apply (relation, key, fields) values (c.relation, c.key, chosen::jsonb);
        perform bundle._apply(bundle_name, 'resolve a conflict');
    else
        execute format('update only %s t set %I = $1::%s where (%s) = (%s)', c.relation, c.column_name,
                       (select format_type(a.atttypid, a.atttypmod) from pg_attribute a
                        where a.attrelid = c.relation and a.attname = c.column_name and not a.attisdropped),
                       (select string_agg(format('t.%I', k), ', ') from unnest(key_columns) k),
                       bundle._key_values(c.relation, key_columns, '$2'))
            using chosen, c.key;
    end if;
    delete from bundle.conflicts k where k.bundle = bundle_name and k.relation = c.relation and k.key = c.key
        and k.column_name is not distinct from c.column_name;
    return (select count(*) from bundle.conflicts k where k.bundle = bundle_name);
end
$$;
comment on function bundle.resolve(text, regclass, jsonb, text, text, text) is
    'resolve a merge conflict with ''ours'', ''theirs'' or ''value'' (a whole row''s value: the row as JSON); returns the conflicts left';

create function bundle.merge_abort(bundle_name text) returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    b bundle.bundle := bundle._bundle(bundle_name);
begin
    if not exists (select from bundle.merge m where m.bundle = bundle_name) then
        raise exception 'bundle "%" has no merge in progress', bundle_name using errcode = '55000';
    end if;
    -- A forced checkout of the commit the merge started from gives the merge up.
    return bundle.checkout(bundle_name, b.checked_out, true);
end
$$;
comment on function bundle.merge_abort(text) is 'give up the merge in progress: the tables return to the head';

revoke all on function bundle._entries(bytea), bundle._node_diff(text, text, text), bundle._tree_diff(text, text, text),
    bundle._has_user_triggers(regclass), bundle._tree_nodes(text, text),
    bundle._tracked_names(text), bundle._tree(text, text), bundle._check_root(text, text),
    bundle._key(jsonb, name[]), bundle._key_values(regclass, name[], text), bundle.diff(text, text, text),
    bundle._refuse_uncommitted(text, text), bundle._apply_begin(), bundle._fk_order(regclass[]),
    bundle._apply(text, text), bundle.checkout(text, text, boolean), bundle.rescan(text),
    bundle._ancestors(text, text), bundle._merge_base(text, text, text), bundle._merge_rows(text, text, text, text),
    bundle._integrate(text, text, boolean), bundle.resolve(text, regclass, jsonb, text, text, text),
    bundle.merge_abort(text) from public;
grant execute on function bundle.diff(text, text, text), bundle.checkout(text, text, boolean), bundle.rescan(text),
    bundle.resolve(text, regclass, jsonb, text, text, text), bundle.merge_abort(text) to aquapeer_admin;
