-- Three-way merges of bundles, conflicts and their resolution.

-- Comments on this area's tables (sql/incremental creates them); here, so that an upgrade
-- applies a changed comment too.
comment on table bundle.merge is 'the merge in progress of each bundle: the commits merged and their base';
comment on table bundle.conflicts is 'the fields both sides of a merge changed differently; bundle.resolve settles each';

-- The commits a commit descends from, itself included.
create or replace function bundle._ancestors(bundle_name text, commit_id text) returns setof text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    with recursive walk(id) as (
        select commit_id where commit_id is not null
        union
        select p.id from walk w join bundle.commit c on c.bundle = bundle_name and c.id = w.id
        cross join unnest(c.parents) p(id)
    )
    select id from walk
$$;

-- The newest common ancestor of two commits (null: none, the empty tree is the base).
create or replace function bundle._merge_base(bundle_name text, a text, b text) returns text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select c.id from bundle._ancestors(bundle_name, a) x(id)
    join bundle._ancestors(bundle_name, b) y(id) on y.id = x.id
    join bundle.commit c on c.bundle = bundle_name and c.id = x.id
    order by c.committed_at desc, c.id limit 1
$$;

-- Start a merge: the rows only theirs changed since the base go to pg_temp.bundle_apply (which
-- it begins); the rows both sides changed differently are returned, with their fields at the
-- base, ours and theirs (null: no row), for the field merge.
create or replace function bundle._merge_rows(bundle_name text, base_commit text, our_commit text, their_commit text)
returns table (relation regclass, key jsonb, base_fields jsonb, our_fields jsonb, their_fields jsonb)
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
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
               t.a_row as base_row, o.b_row as our_row, t.b_row as their_row
        from theirs t join bundle._tracked_names(bundle_name) n on n.relation_name = t.relation_name
        left join ours o on o.relation_name = t.relation_name and o.key_hash = t.key_hash
        where o.relation_name is null or o.b_blob is distinct from t.b_blob
    ), loaded as (
        select p.relation, p.key_columns, p.both_changed, p.base_row::jsonb as b_fields, p.our_row::jsonb as o_fields,
               p.their_row::jsonb as t_fields
        from plan p
    ), only_theirs as (
        insert into pg_temp.bundle_apply (relation, key, row_text)
        select l.relation, bundle._key(coalesce(l.t_fields, l.b_fields), l.key_columns), l.t_fields::text
        from loaded l where not l.both_changed
    )
    select l.relation, bundle._key(coalesce(l.t_fields, l.o_fields, l.b_fields), l.key_columns),
           l.b_fields, l.o_fields, l.t_fields
    from loaded l where l.both_changed;
end
$$;

-- Bring a commit kept from elsewhere (all its objects in bundle.object) into the bundle:
-- fast-forward, up to date, or (with checkout) a three-way merge.  See docs/bundles.md.
create or replace function bundle._integrate(bundle_name text, theirs text, checkout boolean) returns jsonb
language plpython3u set search_path = pg_catalog, pg_temp set jit = off as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].bundle_integrate(bundle_name, theirs, checkout)
$$;

create or replace function bundle.resolve(bundle_name text, relation regclass, key jsonb, column_name text, choice text,
                               value text default null)
returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C' set jit = off
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
        insert into pg_temp.bundle_apply (relation, key, row_text) values (c.relation, c.key, chosen::jsonb::text);
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

create or replace function bundle.merge_abort(bundle_name text) returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off as $$
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
