-- aquapeer 0.9.0 -> 0.10.0: checkouts into empty tables and empty head rows are linear again; a clone's skips the recorded keys and keeps faster; a commit hashes each row once.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- The statement that writes pg_temp.bundle_apply's rows to one table: each row inserted unless
-- a row of its key is there, else updated.  Into a table that is empty when it starts (a clone,
-- a table emptied), a plain insert: emptied and vacuumed, a table looks empty to the planner,
-- which then scanned it whole for each row the statement inserted (rows it cannot see, but
-- reads), quadratic in the rows: 71 s for 100,000.
create function bundle._write_statement(relation regclass, key_columns name[], empty boolean) returns text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
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
    select case when empty then format('insert into %s as t (%s) overriding system value select %s from %s',
                                       relation, string_agg(format('%I', c.attname), ', ' order by c.attnum),
                                       string_agg(c.value, ', ' order by c.attnum), s.source)
           else format('with inserted as (insert into %s as t (%s) overriding system value select %s from %s '
                       'and not exists (select from only %s t where %s) returning 1) ',
                       relation, string_agg(format('%I', c.attname), ', ' order by c.attnum),
                       string_agg(c.value, ', ' order by c.attnum), s.source, relation, s.same_key)
                || case when bool_and(c.is_key) then 'select from inserted'  -- key columns only: no update
                        else format('update only %s as t set %s from %s and %s', relation,
                                    string_agg(format('%I = %s', c.attname, c.value), ', ' order by c.attnum)
                                        filter (where not c.is_key), s.source, s.same_key) end end
    from c, s
    group by s.source, s.same_key
$$;

revoke all on function bundle._write_statement(regclass, name[], boolean) from public;
drop function bundle._write_statement(regclass, name[]);

-- Write pg_temp.bundle_apply's rows to the bundle's tables (see 0.3.0), each table's through
-- bundle._write_statement, told whether the table is empty.
create or replace function bundle._apply(bundle_name text, doing text) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set jit = off
as $$
declare
    changed regclass[] := array(select distinct a.relation from pg_temp.bundle_apply a);
    cycle text;
    deferred text;
    t record;
    message text;
    detail text;
    state text;
    empty boolean;
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
            execute format('select not exists (select from only %s)', t.relation) into empty;
            execute bundle._write_statement(t.relation, t.key_columns, empty);
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

-- Check out a commit (see 0.6.0); a bundle without head rows inserts them without probing, and
-- the keys recorded while writing are looked for only when there are any.
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
    -- nothing else writes them meanwhile.)  A bundle without head rows (a clone, a first
    -- checkout) has none to update or to probe: a head_row emptied and vacuumed looks empty to
    -- the planner, which then scanned it whole for each row inserted, quadratic in the rows.
    if exists (select from bundle.head_row h where h.bundle = bundle_name) then
        update bundle.head_row h set blob = a.blob_id from pg_temp.bundle_apply a
            where h.bundle = bundle_name and h.relation = a.relation and h.key_hash = a.key_hash
              and a.blob_id is not null;
        insert into bundle.head_row
            select bundle_name, a.relation, a.key_hash, a.key, a.blob_id from pg_temp.bundle_apply a
            where a.key_hash is not null and a.blob_id is not null
              and not exists (select from bundle.head_row h
                              where h.bundle = bundle_name and h.relation = a.relation and h.key_hash = a.key_hash);
    else
        insert into bundle.head_row
            select bundle_name, a.relation, a.key_hash, a.key, a.blob_id from pg_temp.bundle_apply a
            where a.key_hash is not null and a.blob_id is not null;
    end if;
    -- Many rows (a clone): fresh statistics for what comes next.
    if (select count(*) > 10000 from pg_temp.bundle_apply a where a.key_hash is not null) then
        analyze bundle.head_row;
        analyze bundle.head_node;
    end if;
    -- The capture triggers recorded every key written.  Those rows now match the target unless a
    -- user trigger changed them on the way in, so only tables with user triggers keep the keys for
    -- bundle.status to compare.  Without force, the check for uncommitted changes has compared
    -- the rest, so a whole-table comparison pending since bundle.track is done too.
    -- (Most often none are recorded, a clone's never: then the join of a million rows, 0.9 s, is
    -- not needed.)
    if exists (select from bundle.changed_key c where c.bundle = bundle_name and c.key <> 'null'::jsonb) then
        analyze pg_temp.bundle_apply;
        delete from bundle.changed_key c using pg_temp.bundle_apply a
        where c.bundle = bundle_name and c.relation = a.relation and c.key = a.key
          and a.relation in (select k.relation from bundle.tracked k
                             where k.bundle = bundle_name and not bundle._has_user_triggers(k.relation));
    end if;
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

-- Keep objects received for a bundle (see 0.9.0): a bucket's blobs received with it are not
-- looked for in the store.
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
    -- The blobs first, so that the buckets received with them find them in the store below.
    insert into bundle.object select bundle_name, i.id, 'blob', i.data from unnest(ids, datas) i(id, data)
    where bundle._kind(i.data) = 'blob' order by i.id on conflict do nothing;
    with received as materialized (
        -- Each bucket with the blobs it names that the store lacks, of those on lines the bucket
        -- checked out at its place lacks (every lookup linear in what was received: a bucket's
        -- own probes, no join between the buckets and the blobs).  A blob received with it is in
        -- the store now: a hashed look at the blobs received says so without a probe of the
        -- store (a clone's request of 500 buckets and 7,500 blobs: 32 ms instead of 45).  Only
        -- blobs: a tree node received is not in the store yet.
        select r.id, r.kind, r.data, r.place,
               case when r.kind = 'bucket' then array(
                   select c.id from bundle._new_children(bundle_name, 'bucket', r.data, r.place) c
                   where c.id not in (select u.id from unnest(ids, datas) u(id, data)
                                      where bundle._kind(u.data) = 'blob')
                     and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = c.id) is null)
               end as lacking
        from (select i.id, bundle._kind(i.data) as kind, i.data, i.place
              from unnest(ids, datas, places) i(id, data, place)) r
        where r.kind <> 'blob'
    ), complete as (
        insert into bundle.object select bundle_name, r.id, r.kind, r.data from received r
        where r.kind = 'bucket' and r.place is not null and cardinality(r.lacking) = 0
        order by r.id on conflict do nothing
    ), nodes as (
        insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
        where r.kind <> 'bucket' or r.place is null or cardinality(r.lacking) > 0
        order by r.id on conflict do nothing
    )
    select coalesce(array_agg(c.id), '{}'), coalesce(array_agg(c.place), '{}'),
           array(select distinct u.id from received r cross join lateral unnest(r.lacking) u(id))
        into child_ids, child_places, blob_ids
    from received r cross join lateral bundle._new_children(bundle_name, r.kind, r.data, r.place) c
    where r.kind in ('root', 'fan');
    return query
        select l.id, l.place from bundle._lacking(bundle_name, child_ids, child_places) l
        union all
        select u.id, null from unnest(blob_ids) u(id);
end
$$;

-- The rows of a tracked table that differ from the bundle's head rows (see 0.2.0 -> 0.3.0).  The
-- rows now sit behind "offset 0": flattened into the join, each row's key hash and blob hash were
-- computed twice, once to join or compare and once for the output (0.8 s of a first commit of a
-- million rows).
create or replace function bundle._changes_query(bundle_name text, t bundle.tracked) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format(
        'select coalesce(n.key, h.key) as key, coalesce(n.key_hash, h.key_hash) as key_hash, n.blob, n.blob_id, '
        'h.blob as head_blob from (%s offset 0) n '
        'full join (select h.key, h.key_hash, h.blob from bundle.head_row h where h.bundle = %L and h.relation = %s %s) h '
        'on h.key_hash = n.key_hash where n.blob_id is distinct from h.blob',
        bundle._row_hashes_query(t.relation, t.filter, t.key_columns, bundle_name), bundle_name, t.relation::oid,
        case when not bundle._whole(bundle_name, t.relation) then format(
            'and h.key_hash in (select encode(sha256(convert_to(c.key::text, ''UTF8'')), ''hex'') '
            'from bundle.changed_key c where c.bundle = %L and c.relation = %s)', bundle_name, t.relation::oid) end)
$$;
