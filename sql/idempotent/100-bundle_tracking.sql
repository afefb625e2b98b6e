-- Bundles: creating them, tracking tables, capturing changes, status.

-- Comments on this area's tables (sql/incremental creates them); here, so that an upgrade
-- applies a changed comment too.
comment on table bundle.bundle is 'bundles: name, head commit, the commit checked out';
comment on table bundle.tracked is 'the tables each bundle tracks, with their row filters and key columns';

-- A row's blob, jsonb_strip_nulls(jsonb_build_object(column, column::text, ...))::text byte for
-- byte (src/rowcodec.c; python/aquapeer/bundles/rowtext.py is the reference): one call per row
-- instead of an SQL expression per column, which took most of a first commit's time.  Its caller
-- fixes the settings of docs/bundles.md (bundle._row_hashes).
create or replace function bundle._blob(row_value record) returns text
    language c strict stable parallel safe as 'MODULE_PATHNAME', 'aquapeer_blob';
comment on function bundle._blob(record) is
    'a row''s blob: its non-null columns'' texts as a JSON object, in jsonb''s key order';

-- The id of a text's UTF-8 bytes (a key's, a row's, a tree node's): SHA-256, lower-case hex.
-- Without a SET clause, so that it is inlined.
create or replace function bundle._hash(value text) returns text
language sql stable parallel safe as $$
    select encode(sha256(convert_to(value, 'UTF8')), 'hex')
$$;
comment on function bundle._hash(text) is 'the SHA-256 of a text''s UTF-8 bytes, lower-case hex: a key''s or a row''s id';

-- The statement that yields (key, blob) for a tracked table's rows, narrowed by a condition.
-- Run it only where the settings of docs/bundles.md are fixed (bundle._row_hashes).  The whole
-- row goes to bundle._blob: every column that is not dropped, generated ones too ("t.*", because
-- a bare "t" would be a column of that name if the table has one).
create or replace function bundle._rows_query(relation regclass, filter text, key_columns name[], narrowing text)
returns text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select format(
        'select jsonb_build_array(%s) as key, bundle._blob(t.*) as blob from only %s t where (%s) and (%s)',
        (select string_agg(format('t.%I::text', k), ', ' order by n) from unnest(key_columns) with ordinality u(k, n)),
        relation, coalesce(filter, 'true'), coalesce(narrowing, 'true'))
$$;
comment on function bundle._rows_query(regclass, text, name[], text) is 'the statement that yields the key and blob of a tracked table''s rows';

-- Whether a bundle compares a tracked table as a whole: changed_key holds the JSON null key for
-- it (a real key is an array) from bundle.track until the next commit, so track need not write
-- one row per key of a table the bundle has not got yet.
create or replace function bundle._whole(bundle_name text, relation regclass) returns boolean
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select exists (select from bundle.changed_key c
                   where c.bundle = bundle_name and c.relation = _whole.relation and c.key = 'null')
$$;

-- The statement that yields (key, key hash, blob, blob id) of a tracked table's rows: all of them,
-- or those whose keys bundle.changed_key holds for the bundle changed_in (all of them again when
-- it compares the table as a whole).  One statement per table, never one per row.
create or replace function bundle._row_hashes_query(relation regclass, filter text, key_columns name[], changed_in text)
returns text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    -- "offset 0" keeps the blob one column of the subquery: flattened, each use of it would
    -- compute it again.
    select format(
        'select r.key, bundle._hash(r.key::text) as key_hash, r.blob, bundle._hash(r.blob) as blob_id from %s',
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
comment on function bundle._row_hashes_query(regclass, text, name[], text) is 'the statement bundle._row_hashes runs';

-- (key, key hash, blob, blob id) of a tracked table's rows (bundle._row_hashes_query), under the
-- settings that make a column's text the same on any server and in any session.
create or replace function bundle._row_hashes(relation regclass, filter text, key_columns name[], changed_in text)
returns table (key jsonb, key_hash text, blob text, blob_id text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C' set jit = off
as $$
begin
    return query execute bundle._row_hashes_query(relation, filter, key_columns, changed_in);
end
$$;
comment on function bundle._row_hashes(regclass, text, name[], text) is 'key, key hash, blob and blob id of a tracked table''s rows, the same on any server';

create or replace function bundle.create(name text) returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    insert into bundle.bundle (name) values ($1);
    return name;
exception when check_violation then
    raise exception 'invalid bundle name %', quote_literal(name) using errcode = '22023',
        hint = 'Use 1 to 63 lower-case letters, digits, ''_'', ''.'' or ''-'', starting with a letter or digit.';
when unique_violation then
    -- What a first pull left when it broke off after objects arrived: no head, nothing tracked
    -- or shared, only objects kept for its next attempt (loose_since).  The bundle is empty, so
    -- creating it takes it over; retention collects those objects unless a pull uses them.
    if exists (select from bundle.bundle b
               where b.name = $1 and b.head is null and b.checked_out is null and b.loose_since is not null
               and not exists (select from bundle.tracked k where k.bundle = b.name)
               and not exists (select from peer.bundle_share s where s.bundle = b.name)
               and not exists (select from bundle.merge m where m.bundle = b.name)) then
        return name;
    end if;
    raise exception 'bundle "%" already exists', name using errcode = '42710';
end
$$;
comment on function bundle.create(text) is 'create an empty bundle; returns its name';

create or replace function bundle._bundle(name text) returns bundle.bundle
language plpgsql stable set search_path = pg_catalog, pg_temp set jit = off as $$
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
comment on function bundle._bundle(text) is 'a bundle''s row; an error when there is no such bundle';

create or replace function bundle.track(bundle_name text, relation regclass, filter text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off as $$
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
comment on function bundle.track(text, regclass, text) is 'add a table with a primary key to a bundle (filter: only the rows it selects)';

-- The settings are those of bundle._row_hashes: the statements hash rows.
create or replace function bundle.status(bundle_name text)
returns table (relation regclass, key jsonb, change text)
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C' set jit = off
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
            t.relation::oid, bundle._changes_query(bundle_name, t, bundle._whole(bundle_name, t.relation)),
            bundle_name, t.relation::oid);
    end loop;
    return query select distinct c.relation, c.key, 'conflict' from bundle.conflicts c
        where c.bundle = bundle_name order by 1, 2;
end
$$;
comment on function bundle.status(text) is 'the rows of the bundle''s tables added, modified or deleted since its head, and conflicts of a merge';

-- Every row of a tree.
-- Whether a table has triggers of its own beyond the capture triggers, which may change what a
-- checkout writes.
create or replace function bundle._has_user_triggers(relation regclass) returns boolean
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select exists (select from pg_trigger g where g.tgrelid = relation and not g.tgisinternal
                   and g.tgname not like 'aquapeer\_bundle\_capture\_%' and g.tgenabled <> 'D')
$$;

-- The tracked tables under the names a root gives them.
create or replace function bundle._tracked_names(bundle_name text)
returns table (relation_name text, relation regclass, filter text, key_columns name[])
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select format('%s.%s', n.nspname, c.relname), k.relation, k.filter, k.key_columns
    from bundle.tracked k join pg_class c on c.oid = k.relation join pg_namespace n on n.oid = c.relnamespace
    where k.bundle = bundle_name
$$;

-- The key columns' values, typed, from the key (a jsonb array) that the expression source yields.
create or replace function bundle._key_values(relation regclass, key_columns name[], source text) returns text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select string_agg(format('(%s->>%s)::%s', source, u.n - 1, format_type(a.atttypid, a.atttypmod)), ', ' order by u.n)
    from unnest(key_columns) with ordinality u(k, n)
    join pg_attribute a on a.attrelid = relation and a.attname = u.k
$$;

-- Catch writes that bypassed the capture triggers: every tracked row against the head rows.  The
-- settings are those of bundle._row_hashes: the statements hash rows.
create or replace function bundle.rescan(bundle_name text) returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C' set jit = off
as $$
declare
    t bundle.tracked;
    n bigint;
    total bigint := 0;
begin
    perform bundle._bundle(bundle_name);
    for t in select * from bundle.tracked k where k.bundle = bundle_name loop
        execute format('insert into bundle.changed_key select %L, %s, c.key from (%s) c on conflict do nothing',
                       bundle_name, t.relation::oid, bundle._changes_query(bundle_name, t, true));
        get diagnostics n = row_count;
        total := total + n;
    end loop;
    return total;
end
$$;
comment on function bundle.rescan(text) is
    'find rows written without the capture triggers (e.g. session_replication_role = replica); returns how many keys it newly recorded';

create or replace function bundle._forget() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    delete from bundle.changed_key k using gone g where k.bundle = g.name;
    delete from bundle.head_node h using gone g where h.bundle = g.name;
    delete from bundle.pending p using gone g where p.bundle = g.name;
    delete from bundle.object o using gone g where o.bundle = g.name;  -- and bundle.commit, by its foreign keys
    return null;
end
$$;
create or replace trigger forget after delete on bundle.bundle referencing old table as gone
    for each statement execute function bundle._forget();

-- Renaming would leave those rows behind.
create or replace function bundle._keep_name() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    raise exception 'bundle "%" cannot be renamed', old.name using errcode = '0A000',
        hint = 'Export it and import it under another name, or create a new bundle.';
end
$$;
create or replace trigger keep_name before update of name on bundle.bundle
    for each row when (old.name is distinct from new.name) execute function bundle._keep_name();

-- Change capture: each statement on a tracked table records the keys it wrote.
create or replace function bundle._capture() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C' set jit = off
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
    -- meanwhile may not see this write, and must leave its key for the next one), locked as the
    -- foreign key did, so that none is deleted before these keys are in.
    perform from bundle.bundle b where b.name in (select k.bundle from bundle.tracked k where k.relation = TG_RELID)
        for key share;
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
comment on function bundle._capture() is 'capture trigger of tracked tables: records the keys each statement wrote';

-- A row's key (as bundle.changed_key holds it) from its fields.  Without a
-- SET clause or a subquery, so that a statement calling it inlines it: a clone computes a
-- million keys, and the function took 4.5 s for them.  Keys of more than one column take the
-- general way.
create or replace function bundle._key_of_columns(fields jsonb, key_columns name[]) returns jsonb
language sql immutable strict parallel safe set search_path = pg_catalog, pg_temp set jit = off as $$
    select jsonb_agg(fields -> k::text order by n) from unnest(key_columns) with ordinality u(k, n)
$$;

create or replace function bundle._key(fields jsonb, key_columns name[]) returns jsonb
language sql stable parallel safe as $$
    select case when fields is null or key_columns is null then null
                when cardinality(key_columns) = 1 then jsonb_build_array(fields -> key_columns[1]::text)
                else bundle._key_of_columns(fields, key_columns) end
$$;

-- Dropping a bundle.  An aquapeer_admin could not (only a superuser could delete from
-- bundle.bundle), and a table no bundle tracks any more kept its capture triggers, which keep a
-- transition table of every statement that writes it.  Whatever deletes rows of bundle.tracked
-- (bundle.drop, or deleting from bundle.bundle) now drops the capture triggers of the tables no
-- bundle tracks after it.  DROP TRIGGER locks each such table exclusively for a moment.
create or replace function bundle._untracked() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    r regclass;
    operation text;
begin
    for r in select distinct g.relation from gone g
             where exists (select from pg_class c where c.oid = g.relation)  -- (not dropped since)
               and not exists (select from bundle.tracked k where k.relation = g.relation) loop
        foreach operation in array array['ins', 'upd', 'del'] loop
            execute format('drop trigger if exists %I on %s', format('aquapeer_bundle_capture_%s_%s', r::oid, operation), r);
        end loop;
    end loop;
    return null;
end
$$;
create or replace trigger untracked after delete on bundle.tracked referencing old table as gone
    for each statement execute function bundle._untracked();

-- Forget a bundle here: its commits, objects, head rows, shares and a merge in progress.  The
-- tables keep their rows.
create or replace function bundle.drop(bundle_name text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform bundle._bundle(bundle_name);
    delete from bundle.bundle where name = bundle_name;  -- the rest goes with it (bundle.forget, foreign keys)
end
$$;
comment on function bundle.drop(text) is 'forget a bundle and its history here; its tables keep their rows';

-- The statement that yields the rows of a tracked table that differ from the bundle's head:
-- (key, key hash, blob and blob id now, head_blob), blob null for a row deleted since, head_blob
-- null for a row added since.  Unless whole, only the changed keys are looked at, each probed
-- through the primary key and its head row through head_node ("limit 1", so that statistics
-- taken before this table's rows came cannot turn it into a join that reads all of them per key).
-- Whole, every row against every head row (a deleted one's key from its text).  The rows sit
-- behind "offset 0": flattened into the join, each row's key hash and blob hash were computed
-- twice, once to join or compare and once for the output (0.8 s of a first commit of a million
-- rows).
create or replace function bundle._changes_query(bundle_name text, t bundle.tracked, whole boolean) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format(
        'select coalesce(n.key, h.key) as key, coalesce(n.key_hash, h.key_hash) as key_hash, n.blob, n.blob_id, '
        'h.row_hash as head_blob from (%s offset 0) n full join (%s) h '
        'on h.key_hash = n.key_hash where n.blob_id is distinct from h.row_hash',
        bundle._row_hashes_query(t.relation, t.filter, t.key_columns, case when not whole then bundle_name end),
        case when whole
             then format('select bundle._key(h.row_text::jsonb, %L) as key, h.key_hash, h.row_hash '
                         'from bundle._head_rows(%L, %s) h', t.key_columns, bundle_name, t.relation::oid)
             else format('select c.key, k.key_hash, h.row_hash from bundle.changed_key c '
                         'cross join lateral (select bundle._hash(c.key::text) as key_hash) k '
                         'cross join lateral bundle._head_row(%L, %s, k.key_hash) h '
                         'where c.bundle = %L and c.relation = %s',
                         bundle_name, t.relation::oid, bundle_name, t.relation::oid) end)
$$;
