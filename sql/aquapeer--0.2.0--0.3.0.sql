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
    key_hash text not null,
    key jsonb not null,
    blob text not null,
    primary key (bundle, relation, key_hash)
);

-- Keys written since each bundle's head, recorded by the capture triggers of tracked tables.
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
-- Run it only where the settings of docs/bundles.md are fixed (bundle._row_hashes).
create function bundle._rows_query(relation regclass, filter text, key_columns name[], narrowing text)
returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format(
        'select jsonb_build_array(%s) as key, jsonb_strip_nulls(jsonb_build_object(%s))::text as blob '
        'from only %s t where (%s) and (%s)',
        (select string_agg(format('t.%I::text', k), ', ' order by n) from unnest(key_columns) with ordinality u(k, n)),
        (select string_agg(format('%L, t.%I::text', a.attname, a.attname), ', ' order by a.attnum)
         from pg_attribute a where a.attrelid = relation and a.attnum > 0 and not a.attisdropped),
        relation, coalesce(filter, 'true'), coalesce(narrowing, 'true'))
$$;

-- (key, key hash, blob, blob id) of a tracked table's rows: all of them, or those whose keys
-- bundle.changed_key holds for the bundle changed_in.  One statement per table, never one per row.
create function bundle._row_hashes(relation regclass, filter text, key_columns name[], changed_in text)
returns table (key jsonb, key_hash text, blob text, blob_id text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
as $$
begin
    return query execute format(
        'select r.key, encode(sha256(convert_to(r.key::text, ''UTF8'')), ''hex''), r.blob, '
        'encode(sha256(convert_to(r.blob, ''UTF8'')), ''hex'') from %s',
        case when changed_in is null then format('(%s) r', bundle._rows_query(relation, filter, key_columns, null))
        -- The changed keys, each looked up through the primary key ("limit 1" keeps it a probe
        -- per key whatever the planner thinks of the tables' sizes).
        else format('bundle.changed_key c cross join lateral (%s limit 1) r where c.bundle = %L and c.relation = %s::regclass',
                    bundle._rows_query(relation, filter, key_columns,
                        (select string_agg(format('t.%I = (c.key->>%s)::%s', k, n - 1,
                                                  format_type(a.atttypid, a.atttypmod)), ' and ' order by n)
                         from unnest(key_columns) with ordinality u(k, n)
                         join pg_attribute a on a.attrelid = relation and a.attname = u.k)),
                    changed_in, relation::oid) end);
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
    -- For every bundle tracking the table.
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
    -- Everything there now is new to the bundle.
    insert into bundle.changed_key
        select bundle_name, relation, r.key from bundle._row_hashes(relation, filter, key_columns, null) r
        on conflict do nothing;
exception when unique_violation then
    raise exception 'bundle "%" already tracks %', bundle_name, relation using errcode = '42710';
end
$$;

create function bundle.status(bundle_name text)
returns table (relation regclass, key jsonb, change text)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    t bundle.tracked;
begin
    perform bundle._bundle(bundle_name);
    for t in select * from bundle.tracked k where k.bundle = bundle_name order by k.relation::text loop
        return query
            with now_rows as (select * from bundle._row_hashes(t.relation, t.filter, t.key_columns, bundle_name)),
                 head as (select h.key, h.blob from bundle.head_row h
                          where h.bundle = bundle_name and h.relation = t.relation
                            and h.key_hash in (select encode(sha256(convert_to(c.key::text, 'UTF8')), 'hex') from bundle.changed_key c
                                          where c.bundle = bundle_name and c.relation = t.relation))
            select t.relation, coalesce(n.key, h.key),
                   case when h.key is null then 'added' when n.key is null then 'deleted' else 'modified' end
            from now_rows n full join head h on h.key = n.key
            where n.blob_id is distinct from h.blob
            order by 2;
    end loop;
end
$$;

-- Move a bundle's head rows and head tree to what its tables hold now, keeping every
-- new object; returns the new root id and how many rows changed.  Set-based per table:
-- only the changed keys, their buckets, and the fan nodes above them are touched.
create function bundle._stage(bundle_name text, out root text, out rows_changed bigint)
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    t bundle.tracked;
    n bigint;
    root_data bytea;
begin
    rows_changed := 0;
    for t in select * from bundle.tracked k where k.bundle = bundle_name order by k.relation::text loop
        create temporary table if not exists bundle_changes
            (key jsonb, key_hash text, blob text, blob_id text, gone boolean) on commit drop;
        truncate bundle_changes;
        insert into bundle_changes
            select coalesce(n.key, h.key), coalesce(n.key_hash, h.key_hash), n.blob, n.blob_id, n.key is null
            from (select * from bundle._row_hashes(t.relation, t.filter, t.key_columns, bundle_name)) n
            full join (select h.key, h.key_hash, h.blob from bundle.head_row h
                       where h.bundle = bundle_name and h.relation = t.relation
                         and h.key_hash in (select encode(sha256(convert_to(c.key::text, 'UTF8')), 'hex') from bundle.changed_key c
                                       where c.bundle = bundle_name and c.relation = t.relation)) h on h.key = n.key
            where n.blob_id is distinct from h.blob;
        get diagnostics n = row_count;
        rows_changed := rows_changed + n;
        if n > 0 then
            insert into bundle.object select bundle_name, blob_id, 'blob', convert_to(blob, 'UTF8') from bundle_changes
                where not gone on conflict do nothing;
            delete from bundle.head_row h using bundle_changes c
                where h.bundle = bundle_name and h.relation = t.relation and h.key_hash = c.key_hash and c.gone;
            insert into bundle.head_row select bundle_name, t.relation, c.key_hash, c.key, c.blob_id
                from bundle_changes c where not c.gone
                on conflict (bundle, relation, key_hash) do update set blob = excluded.blob;
            -- Buckets, then fan nodes, then the table's node: each rebuilt from its children.
            -- Many changes: fresh statistics, and every bucket in one pass.
            if n > 10000 then
                analyze bundle.head_row;
            end if;
            perform bundle._rebuild(bundle_name, t.relation,
                                    case when n <= 10000 then
                                        array(select distinct left(c.key_hash, 4) from bundle_changes c) end);
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
    delete from bundle.changed_key c where c.bundle = bundle_name;
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
        buckets := array(select distinct left(h.key_hash, 4) from bundle.head_row h
                         where h.bundle = bundle_name and h.relation = _rebuild.relation);
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
                                     array(select distinct left(b, 2) from unnest(buckets) b));
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
    delete from bundle.head_node n using unnest(buckets) p(prefix)
        where n.bundle = bundle_name and n.relation = _rebuild.relation and n.path = p.prefix
        and not exists (select from bundle.head_row h where h.bundle = bundle_name and h.relation = _rebuild.relation
                        and h.key_hash >= n.path and h.key_hash < n.path || 'g');
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
        left join bundle.head_node n on n.bundle = bundle_name and n.relation = _rebuild_fans.relation
             and n.path > p.path and n.path < p.path || 'g' and length(n.path) = length(p.path) + 2
        group by p.path
    ), kept as (
        insert into bundle.object select bundle_name, encode(sha256(data), 'hex'), 'fan', data from body on conflict do nothing
    )
    insert into bundle.head_node select bundle_name, _rebuild_fans.relation, path, encode(sha256(data), 'hex')
        from body where path = '' or data <> convert_to('aquapeer-fan/1' || E'\n', 'UTF8')
        on conflict (bundle, relation, path) do update set id = excluded.id;
    -- an empty fan node below the table's is left out
    delete from bundle.head_node n using unnest(paths) p(path)
        where n.bundle = bundle_name and n.relation = _rebuild_fans.relation and n.path = p.path and n.path <> ''
        and not exists (select from bundle.head_node c where c.bundle = bundle_name
                        and c.relation = _rebuild_fans.relation and c.path > n.path and c.path < n.path || 'g'
                        and length(c.path) = length(n.path) + 2);
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
    bundle._rebuild_fans(text, regclass, text[]) from public;
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
-- same type.  Local columns it does not describe must be nullable or have a default, since
-- checking out inserts rows without them.  All differences are reported at once.
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
                    when j.name is null then format('%s.%s: not there, and not null without a default here',
                                                    t.relation, j.our_name)
                    else format('%s.%s: %s there, %s here', t.relation, j.name, j.type, j.our_type) end
        from theirs t cross join lateral (
            select c.name, c.type, o.name as our_name, o.type as our_type, o.optional
            from (select x->>0 as name, x->>1 as type from jsonb_array_elements(t.columns) x) c
            full join (select a.attname::text as name, format_type(a.atttypid, a.atttypmod) as type,
                              not a.attnotnull or a.atthasdef as optional
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
                         'type (columns only this side has must be nullable or have a default); then try again.';
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
