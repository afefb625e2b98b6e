-- aquapeer 0.5.0 -> 0.6.0: received blobs looked up without a walk; checkouts without "on conflict"; bundle.drop.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- Keep objects received for a bundle (see 0.5.0).
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
    with received as materialized (
        select i.id, bundle._kind(i.data) as kind, i.data, i.place from unnest(ids, datas, places) i(id, data, place)
    ), blobs as (
        insert into bundle.object select bundle_name, r.id, 'blob', r.data from received r
        where r.kind = 'blob' on conflict do nothing
    ), nodes as (
        insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
        where r.kind <> 'blob' on conflict do nothing
    )
    -- A bucket's children are blobs, which are never pending: they are looked up in the store
    -- directly.  (Through the walk, each cost two lookups among the pending nodes as well: a
    -- clone's million, 5 s.)
    select coalesce(array_agg(c.id) filter (where r.kind <> 'bucket'), '{}'),
           coalesce(array_agg(c.place) filter (where r.kind <> 'bucket'), '{}'),
           coalesce(array_agg(c.id) filter (where r.kind = 'bucket'), '{}')
        into child_ids, child_places, blob_ids
    from received r cross join lateral bundle._new_children(bundle_name, r.kind, r.data, r.place) c
    where r.kind <> 'blob';
    return query
        select l.id, l.place from bundle._lacking(bundle_name, child_ids, child_places) l
        union all
        -- in id order, so that the probes read the store's index in order
        select b.id, null from (select distinct u.id from unnest(blob_ids) u(id) order by 1) b
        where (select o.id from bundle.object o where o.bundle = bundle_name and o.id = b.id) is null;
end
$$;

-- The statement that writes pg_temp.bundle_apply's rows of a tracked table: an update of the rows
-- whose keys the table has, and an insert of the others.  "insert ... on conflict do update"
-- inserts each row speculatively: a clone's million rows took 7.0 s so, and 5.1 s this way.  One
-- statement, so that foreign keys are checked at its end (a row may now refer to a row of the
-- same table inserted with it).  The insert is a common table expression the update does not
-- read, which PostgreSQL runs once the update is done: a unique value an updated row gives up can
-- go to an inserted one.
-- (A row with one of the keys that another transaction inserts meanwhile makes the insert fail,
-- and the checkout with it, instead of being overwritten.)
create function bundle._write_statement(relation regclass, key_columns name[]) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    with c as (
        select a.attnum, a.attname, a.attname = any (key_columns) as is_key,
               format('(a.fields->>%L)::%s', a.attname, format_type(a.atttypid, a.atttypmod)) as value
        from pg_attribute a
        where a.attrelid = relation and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
    ), s as (
        select format('pg_temp.bundle_apply a where a.relation = %s::regclass and a.fields is not null',
                      relation::oid) as source,
               (select string_agg(format('t.%I = %s', c.attname, c.value), ' and ' order by c.attnum)
                from c where c.is_key) as same_key
    )
    select format('with inserted as (insert into %s as t (%s) overriding system value select %s from %s '
                  'and not exists (select from only %s t where %s) returning 1) ',
                  relation, string_agg(format('%I', c.attname), ', ' order by c.attnum),
                  string_agg(c.value, ', ' order by c.attnum), s.source, relation, s.same_key)
           || case when bool_and(c.is_key) then 'select from inserted'  -- key columns only: no update
                   else format('update only %s as t set %s from %s and %s', relation,
                               string_agg(format('%I = %s', c.attname, c.value), ', ' order by c.attnum)
                                   filter (where not c.is_key), s.source, s.same_key) end
    from c, s
    group by s.source, s.same_key
$$;

-- Write pg_temp.bundle_apply's rows to the bundle's tables (see 0.3.0), each table's through
-- bundle._write_statement.
create or replace function bundle._apply(bundle_name text, doing text) returns void
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
            execute bundle._write_statement(t.relation, t.key_columns);
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

revoke all on function bundle._write_statement(regclass, name[]) from public;

-- Dropping a bundle.  An aquapeer_admin could not (only a superuser could delete from
-- bundle.bundle), and a table no bundle tracks any more kept its capture triggers, which keep a
-- transition table of every statement that writes it.  Whatever deletes rows of bundle.tracked
-- (bundle.drop, or deleting from bundle.bundle) now drops the capture triggers of the tables no
-- bundle tracks after it.  DROP TRIGGER locks each such table exclusively for a moment.
create function bundle._untracked() returns trigger
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
create trigger untracked after delete on bundle.tracked referencing old table as gone
    for each statement execute function bundle._untracked();

-- Forget a bundle here: its commits, objects, head rows, shares and a merge in progress.  The
-- tables keep their rows.
create function bundle.drop(bundle_name text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform bundle._bundle(bundle_name);
    delete from bundle.bundle where name = bundle_name;  -- the rest goes with it (bundle.forget, foreign keys)
end
$$;
comment on function bundle.drop(text) is 'forget a bundle and its history here; its tables keep their rows';
revoke all on function bundle._untracked(), bundle.drop(text) from public;
grant execute on function bundle.drop(text) to aquapeer_admin;
