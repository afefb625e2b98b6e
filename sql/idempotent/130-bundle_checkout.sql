-- Diffs between trees, and checking a commit out into the tracked tables.

create or replace function bundle.diff(bundle_name text, from_commit text, to_commit text default null)
returns table (relation regclass, key jsonb, column_name text, old text, new text)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    with changed as (
        select n.relation, n.key_columns, d.a_row::jsonb as old_fields, d.b_row::jsonb as new_fields
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

-- Refuse to write a bundle's tables over uncommitted changes or a merge in progress.
create or replace function bundle._refuse_uncommitted(bundle_name text, advice text) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
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

-- The rows to write to a bundle's tables (bundle._apply): each row's text (a JSON object, column
-- -> text), or none and its key to delete it.  (A row written needs no key here: its columns
-- hold it.)
create or replace function bundle._apply_begin() returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    if to_regclass('pg_temp.bundle_apply') is null then
        create temporary table bundle_apply (relation regclass not null, key jsonb, row_text text,
                                             check (key is not null or row_text is not null))
            on commit drop;
    end if;
    truncate pg_temp.bundle_apply;
end
$$;

-- The given tables in foreign-key order (rank: how many of them each refers to, directly or
-- not), and for each, a non-deferrable foreign key of it that is part of a cycle, if any.
-- Deferrable foreign keys do not count: they are deferred while the rows are written.
create or replace function bundle._fk_order(relations regclass[])
returns table (relation regclass, rank bigint, cycle_constraint text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
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

-- The entries of two nodes that differ, side by side (a missing or null node has none): of the
-- lines that differ from the other node's line at the same position, those whose name the other
-- node lacks or lists with another id.  Against no node at all, every line (a clone walks 65,536
-- buckets so, a third faster without the join).  An entry is a child's name and id, or in a
-- bucket a row's key hash and row hash (in a bucket/2 its text's, with the text); so a bucket/1
-- and a bucket/2 of the same rows differ in no entry.  Against no node, a bucket/2's rows come
-- with their texts and no hashes: a clone's checkout needs none (bundle._tree_diff computes them).
create or replace function bundle._node_diff(bundle_name text, a_node text, b_node text)
returns table (name text, a_id text, b_id text, a_row text, b_row text)
language sql stable rows 10 as $$
    with nodes as (
        select a.lines as a, b.lines as b, a.lines[1] = 'aquapeer-bucket/2' as a2, b.lines[1] = 'aquapeer-bucket/2' as b2
        from (select bundle._lines((select o.data from bundle.object o where o.bundle = bundle_name and o.id = a_node))
                     as lines) a,
             (select bundle._lines((select o.data from bundle.object o where o.bundle = bundle_name and o.id = b_node))
                     as lines) b
    ), unlike as (
        select z.a, z.b, x.a2, x.b2
        from nodes x cross join lateral unnest(x.a, x.b) with ordinality z(a, b, n)
        where a_node is not null and b_node is not null and z.n > 1 and z.a is distinct from z.b
    ), one as (
        select z.line, case when a_node is null then x.b2 else x.a2 end as v2
        from nodes x cross join lateral unnest(case when a_node is null then x.b else x.a end) with ordinality z(line, n)
        where (a_node is null) <> (b_node is null) and z.n > 1 and z.line <> ''
    )
    select coalesce(a.name, b.name), a.id, b.id, a.row, b.row
    from (select case when u.a2 then left(u.a, 64) else left(u.a, -65) end as name,
                 case when u.a2 then bundle._hash(substr(u.a, 66)) else right(u.a, 64) end as id,
                 case when u.a2 then substr(u.a, 66) end as row
          from unlike u where u.a <> '') a
    full join (select case when u.b2 then left(u.b, 64) else left(u.b, -65) end as name,
                      case when u.b2 then bundle._hash(substr(u.b, 66)) else right(u.b, 64) end as id,
                      case when u.b2 then substr(u.b, 66) end as row
               from unlike u where u.b <> '') b on b.name = a.name
    where a.id is distinct from b.id
    union all
    select case when o.v2 then left(o.line, 64) else left(o.line, -65) end,
           case when b_node is null and not o.v2 then right(o.line, 64) end,
           case when a_node is null and not o.v2 then right(o.line, 64) end,
           case when b_node is null and o.v2 then substr(o.line, 66) end,
           case when a_node is null and o.v2 then substr(o.line, 66) end
    from one o
$$;

-- The tree nodes that differ between two trees (a null root is the empty tree), by table and
-- path: '' a table's node, two hex digits a fan node, four a bucket (as bundle.head_node keeps
-- them).  It descends only into nodes whose ids differ.
create or replace function bundle._tree_nodes(bundle_name text, a_root text, b_root text)
returns table (relation_name text, path text, a_id text, b_id text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    with tables as (
        select t.name, t.a_id, t.b_id from bundle._node_diff(bundle_name, a_root, b_root) t
    ), fans as (
        select t.name, f.name as path, f.a_id, f.b_id from tables t
        cross join lateral bundle._node_diff(bundle_name, t.a_id, t.b_id) f
    )
    select name, '', a_id, b_id from tables
    union all
    select name, path, a_id, b_id from fans
    union all
    select f.name, f.path || u.name, u.a_id, u.b_id from fans f
    cross join lateral bundle._node_diff(bundle_name, f.a_id, f.b_id) u
$$;

-- The rows that differ between two versions of a bucket (null: none): key hash, row hashes and
-- texts.  A bucket/2 the other side lacks (all of a clone's) gives its rows straight from its
-- lines (in C), without hashes and without a call of bundle._node_diff (a third of a clone's
-- walk); the rest goes through bundle._node_diff.
create or replace function bundle._bucket_changes(bundle_name text, a_bucket text, b_bucket text)
returns table (key_hash text, a_id text, b_id text, a_row text, b_row text)
language sql stable rows 20 as $$
    with b as (
        select case when a_bucket is null then (select o.data from bundle.object o
                                                 where o.bundle = bundle_name and o.id = b_bucket) end as data
    )
    select l.key_hash, null, null, null, l.row_text from b cross join lateral bundle._bucket_lines(b.data) l
    union all
    select k.name, k.a_id, k.b_id, k.a_row, k.b_row from b
    cross join lateral bundle._node_diff(bundle_name, a_bucket, b_bucket) k
    where b.data is null or substr(b.data, 1, 18) <> convert_to('aquapeer-bucket/2' || E'\n', 'UTF8')
$$;

-- What differs between two trees: the nodes (bundle._tree_nodes) and, under a row's key hash, its
-- row hashes and, from a bucket/2, its texts.
create or replace function bundle._tree_changes(bundle_name text, a_root text, b_root text)
returns table (relation_name text, path text, a_id text, b_id text, a_row text, b_row text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    with nodes as materialized (
        select * from bundle._tree_nodes(bundle_name, a_root, b_root)
    )
    select n.relation_name, n.path, n.a_id, n.b_id, null, null from nodes n
    union all
    select n.relation_name, r.key_hash, r.a_id, r.b_id, r.a_row, r.b_row from nodes n
    cross join lateral bundle._bucket_changes(bundle_name, n.a_id, n.b_id) r
    where length(n.path) = 4
$$;

-- The rows that differ between two trees, with their hashes and texts (null: no such row).
create or replace function bundle._tree_diff(bundle_name text, a_root text, b_root text)
returns table (relation_name text, key_hash text, a_blob text, b_blob text, a_row text, b_row text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select d.relation_name, d.path,
           coalesce(d.a_id, bundle._hash(d.a_row)), coalesce(d.b_id, bundle._hash(d.b_row)),
           coalesce(d.a_row, bundle._blob_text(bundle_name, d.a_id)),
           coalesce(d.b_row, bundle._blob_text(bundle_name, d.b_id))
    from bundle._tree_changes(bundle_name, a_root, b_root) d
    where length(d.path) = 64
$$;

-- The statement that writes pg_temp.bundle_apply's rows to one table: each row inserted unless
-- a row of its key is there, else updated.  Into a table that is empty when it starts (a clone,
-- a table emptied), a plain insert: emptied and vacuumed, a table looks empty to the planner,
-- which then scanned it whole for each row the statement inserted (rows it cannot see, but
-- reads), quadratic in the rows: 71 s for 100,000.
create or replace function bundle._write_statement(relation regclass, key_columns name[], empty boolean) returns text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    with c as (
        select a.attnum, a.attname, a.attname = any (key_columns) as is_key,
               format('(f.fields->>%L)::%s', a.attname, format_type(a.atttypid, a.atttypmod)) as value
        from pg_attribute a
        where a.attrelid = relation and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
    ), s as (
        -- (each row's text parsed once: "offset 0" keeps the parse from being copied into each column)
        select format('pg_temp.bundle_apply a cross join lateral (select a.row_text::jsonb as fields offset 0) f '
                      'where a.relation = %s::regclass and a.row_text is not null', relation::oid) as source,
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

-- Sequences owned by the given tables' columns (serial and identity) move past the highest value
-- written, never back.
create or replace function bundle._advance_sequences(tables regclass[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    t record;
begin
    for t in select d.objid::regclass as seq, a.attname, a.attrelid::regclass as relation
             from pg_depend d join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
             where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass
               and d.deptype in ('a', 'i') and d.refobjid = any (tables::oid[])
               and exists (select from pg_class s where s.oid = d.objid and s.relkind = 'S') loop
        execute format('select pg_catalog.setval(%L, x.m) from (select max(t.%I)::bigint as m from only %s t) x, %s s '
                       'where x.m > s.last_value or (x.m = s.last_value and not s.is_called)',
                       t.seq, t.attname, t.relation, t.seq);
    end loop;
end
$$;

-- Write pg_temp.bundle_apply's rows to the bundle's tables: one statement per table and
-- operation, each through bundle._write_statement, told whether the table is empty; inserts and
-- updates parents first, then deletes children first, so every row written refers only to rows
-- that are there (a table referring to itself is written in one statement, and foreign keys are
-- checked at its end).  Triggers fire as usual; then bundle._advance_sequences.  doing names the
-- operation in errors.
create or replace function bundle._apply(bundle_name text, doing text) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C' set jit = off
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
                           'where a.relation = %s::regclass and a.row_text is null)',
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
    perform bundle._advance_sequences(changed);
end
$$;

-- What differs between the commit checked out and the target: the head tree (bundle.head_node)
-- takes the target's nodes, and the rows to write go to pg_temp.bundle_apply, straight from the
-- buckets that differ (a row's text is parsed once, when it is written).  The nodes go through a
-- table with statistics, which drives the rest.
create or replace function bundle._checkout_changes(bundle_name text, from_root text, target_root text)
returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    if to_regclass('pg_temp.bundle_changes') is null then
        create temporary table bundle_changes (relation regclass not null, key_columns name[] not null,
                                               path text not null, a_id text, b_id text) on commit drop;
    end if;
    truncate pg_temp.bundle_changes;
    insert into pg_temp.bundle_changes
        select n.relation, n.key_columns, d.path, d.a_id, d.b_id
        from bundle._tree_nodes(bundle_name, from_root, target_root) d
        join bundle._tracked_names(bundle_name) n using (relation_name);
    analyze pg_temp.bundle_changes;
    -- (A bundle without head nodes, a clone's, takes them without "on conflict", which inserts
    -- each speculatively.)
    if (select h.path from bundle.head_node h where h.bundle = bundle_name order by h.relation, h.path limit 1) is null then
        insert into bundle.head_node select bundle_name, c.relation, c.path, c.b_id from pg_temp.bundle_changes c
            where c.b_id is not null;
    else
        insert into bundle.head_node select bundle_name, c.relation, c.path, c.b_id from pg_temp.bundle_changes c
            where c.b_id is not null
            on conflict (bundle, relation, path) do update set id = excluded.id;
    end if;
    -- Driven by the changes (analyzed above), each gone node found by its key.  head_node's
    -- statistics may predate this bundle (a clone after another bundle's), and a join planned from
    -- them scanned all the changes once per head node: 49 s for a clone of 20,000 rows.
    delete from bundle.head_node h
    where h.ctid = any (array(
        select g.ctid from pg_temp.bundle_changes c
        cross join lateral (select n.ctid from bundle.head_node n
                            where n.bundle = bundle_name and n.relation = c.relation and n.path = c.path) g
        where c.b_id is null));
    -- Each row the target has, by its text (a bucket/1's from its blob), and each it lacks, by
    -- the key of the row it replaces.
    insert into pg_temp.bundle_apply
        select c.relation,
               case when r.b_id is null and r.b_row is null
                    then bundle._key(coalesce(r.a_row, bundle._blob_text(bundle_name, r.a_id))::jsonb, c.key_columns) end,
               coalesce(r.b_row, bundle._blob_text(bundle_name, r.b_id))
        from pg_temp.bundle_changes c
        cross join lateral bundle._bucket_changes(bundle_name, c.a_id, c.b_id) r
        where length(c.path) = 4;
    -- A table the target lacks is empty.
    insert into bundle.head_node
        select bundle_name, n.relation, '', bundle._hash('aquapeer-fan/1' || E'\n')
        from bundle._tracked_names(bundle_name) n
        on conflict do nothing;
end
$$;

-- The capture triggers recorded every key a checkout wrote.  Those rows now match the target
-- unless a user trigger changed them on the way in, so only tables with user triggers keep the
-- keys for bundle.status to compare.  Without force, the check for uncommitted changes has
-- compared the rest, so a whole-table comparison pending since bundle.track is done too.  (Most
-- often none are recorded, a clone's never: then the join of a million rows, 0.9 s, is not
-- needed.)
create or replace function bundle._forget_written_keys(bundle_name text, force boolean) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    if exists (select from bundle.changed_key c where c.bundle = bundle_name and c.key <> 'null'::jsonb) then
        analyze pg_temp.bundle_apply;
        delete from bundle.changed_key c using pg_temp.bundle_apply a, bundle.tracked k
        where c.bundle = bundle_name and c.relation = a.relation and k.bundle = bundle_name and k.relation = a.relation
          and c.key = coalesce(a.key, bundle._key(a.row_text::jsonb, k.key_columns))
          and not bundle._has_user_triggers(k.relation);
    end if;
    if not force then
        delete from bundle.changed_key c
        where c.bundle = bundle_name and c.key = 'null'::jsonb and not bundle._has_user_triggers(c.relation);
    end if;
end
$$;

-- After a checkout the head tree must be the target's, table by table (a table it lacks is
-- empty); anything else is a bug, and the checkout is undone.
create or replace function bundle._check_head_tree(bundle_name text, target text, target_root text) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    wrong text;
begin
    -- (Each table's node probed by its key: joined, head_node could be read whole.)
    select n.relation_name into wrong from bundle._tracked_names(bundle_name) n
    cross join lateral (select (select h.id from bundle.head_node h where h.bundle = bundle_name
                                and h.relation = n.relation and h.path = '' limit 1) as id) h
    left join (select e.* from bundle.object o cross join bundle._entries(o.data) e
               where o.bundle = bundle_name and o.id = target_root) e on e.name = n.relation_name
    where h.id is distinct from coalesce(e.id, bundle._hash('aquapeer-fan/1' || E'\n'))
    limit 1;
    if found then
        raise exception 'bundle "%": the rows kept for % do not match commit % after the checkout', bundle_name, wrong, target
            using errcode = 'XX000', hint = 'Nothing was changed. This is a bug in aquapeer; please report it.';
    end if;
end
$$;

-- Make a bundle's tables equal to a commit (default: the head): the rows to write come from a
-- walk of the two trees, and each table's are written in one statement.
create or replace function bundle.checkout(bundle_name text, commit_id text default null, force boolean default false)
returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off set work_mem = '256MB' as $$
declare
    b bundle.bundle;
    target text;
    target_root text;
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
    perform bundle._checkout_changes(bundle_name, bundle._tree(bundle_name, b.checked_out), target_root);
    if force then
        -- The other rows changed since: back to the head rows (the target has them unchanged),
        -- each key once (the rows the target writes get their keys for it).
        update pg_temp.bundle_apply a set key = bundle._key(a.row_text::jsonb, k.key_columns)
            from bundle.tracked k where a.key is null and k.bundle = bundle_name and k.relation = a.relation;
        insert into pg_temp.bundle_apply (relation, key, row_text)
            select c.relation, c.key, h.row_text
            from bundle.changed_key c
            left join lateral bundle._head_row(c.bundle, c.relation,
                                               bundle._hash(c.key::text)) h on true
            where c.bundle = bundle_name
              and not exists (select from pg_temp.bundle_apply a where a.relation = c.relation and a.key = c.key);
    end if;
    if not force then  -- (forced, it also writes back rows whose keys must stay recorded)
        perform set_config('bundle.checking_out', bundle_name, true);
    end if;
    perform bundle._apply(bundle_name, format('check out commit %s', target));
    perform set_config('bundle.checking_out', '', true);
    perform bundle._forget_written_keys(bundle_name, force);
    perform bundle._check_head_tree(bundle_name, target, target_root);
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
