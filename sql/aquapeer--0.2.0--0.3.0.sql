-- aquapeer 0.2.0 -> 0.3.0: bundles, version-controlled sets of rows (schema bundle).
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- Work in progress (branch issue-5-bundles): create, track, change capture,
-- row hashing and status.  See docs/bundles.md for the format.

create schema bundle;
grant usage on schema bundle to aquapeer_admin;

create table bundle.bundle (
    name text primary key check (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    head text,
    created_at timestamptz not null default now()
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

-- Keys written since the head, recorded by the capture triggers of tracked tables.
create table bundle.changed_key (
    relation regclass not null,
    key jsonb not null,
    primary key (relation, key)
);

revoke all on bundle.bundle, bundle.tracked, bundle.head_row, bundle.changed_key from public;
grant select on bundle.bundle, bundle.tracked to aquapeer_admin;
select pg_catalog.pg_extension_config_dump('bundle.bundle', '');
select pg_catalog.pg_extension_config_dump('bundle.tracked', '');
select pg_catalog.pg_extension_config_dump('bundle.head_row', '');
select pg_catalog.pg_extension_config_dump('bundle.changed_key', '');

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
-- are in bundle.changed_key.  One statement per table, never one per row.
create function bundle._row_hashes(relation regclass, filter text, key_columns name[], changed_only boolean)
returns table (key jsonb, key_hash text, blob text, blob_id text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex'
as $$
begin
    return query execute format(
        'select r.key, encode(sha256(convert_to(r.key::text, ''UTF8'')), ''hex''), r.blob, '
        'encode(sha256(convert_to(r.blob, ''UTF8'')), ''hex'') from (%s) r',
        bundle._rows_query(relation, filter, key_columns,
                           case when changed_only then format(
                               'jsonb_build_array(%s) in (select c.key from bundle.changed_key c where c.relation = %s::regclass)',
                               (select string_agg(format('t.%I::text', k), ', ' order by n)
                                from unnest(key_columns) with ordinality u(k, n)),
                               relation::oid) end));
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
    if TG_OP in ('INSERT', 'UPDATE') then
        execute format('insert into bundle.changed_key select %s::regclass, jsonb_build_array(%s) from new_rows t '
                       'on conflict do nothing', TG_RELID, key_expression);
    end if;
    if TG_OP in ('UPDATE', 'DELETE') then
        execute format('insert into bundle.changed_key select %s::regclass, jsonb_build_array(%s) from old_rows t '
                       'on conflict do nothing', TG_RELID, key_expression);
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
        select relation, r.key from bundle._row_hashes(relation, filter, key_columns, false) r
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
            with now_rows as (select * from bundle._row_hashes(t.relation, t.filter, t.key_columns, true)),
                 head as (select h.key, h.blob from bundle.head_row h
                          where h.bundle = bundle_name and h.relation = t.relation
                            and h.key in (select c.key from bundle.changed_key c where c.relation = t.relation))
            select t.relation, coalesce(n.key, h.key),
                   case when h.key is null then 'added' when n.key is null then 'deleted' else 'modified' end
            from now_rows n full join head h on h.key = n.key
            where n.blob_id is distinct from h.blob
            order by 2;
    end loop;
end
$$;

revoke all on function bundle.create(text), bundle.track(text, regclass, text), bundle.status(text) from public;
grant execute on function bundle.create(text), bundle.track(text, regclass, text), bundle.status(text)
    to aquapeer_admin;
