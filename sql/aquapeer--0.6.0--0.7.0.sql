-- aquapeer 0.6.0 -> 0.7.0: a friend's commits served newest first from given starting points (pages); blobs committed without on conflict.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- The signed commits of a bundle that a friend lacks: those reachable from starts (by default
-- the head) without passing through one of those it has, newest first.  From protocol 4 an
-- answer holds as many as fit in one message, and the friend asks again from the parents it
-- still lacks.  (The commits it has are looked up by hashing: a pull far behind a long history
-- walks tens of thousands of commits against thousands it has.)
drop function peer._serve_bundle_commits(text, text, boolean, text[]);
create function peer._serve_bundle_commits(bundle_name text, friend text, granted boolean, have text[],
                                           starts text[] default null)
returns setof jsonb
language plpgsql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    return query
        with recursive history(id) as (
            select s from unnest(coalesce(starts, array[(select b.head from bundle.bundle b where b.name = bundle_name)])) s
            where s not in (select unnest(have))
            union
            select p from history h join bundle.commit c on c.bundle = bundle_name and c.id = h.id
            cross join unnest(c.parents) p where p not in (select unnest(have))
        )
        select c.document from history h join bundle.commit c on c.bundle = bundle_name and c.id = h.id
        order by c.committed_at desc, c.id;
end
$$;
revoke all on function peer._serve_bundle_commits(text, text, boolean, text[], text[]) from public;
-- Serving runs in executors connected as the friend's role; _executor_nonce refuses anybody else.
grant execute on function peer._serve_bundle_commits(text, text, boolean, text[], text[]) to public;

-- A commit's changed rows, blobs and head rows (see 0.3.0), the blobs the store lacks inserted
-- without "on conflict".
create or replace function bundle._stage(bundle_name text, out root text, out rows_changed bigint)
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
        -- than splitting pages all over indexes larger than shared_buffers.  Blobs the store
        -- lacks are inserted without "on conflict", which inserts each row speculatively (a
        -- first commit of a million rows: 2.3 s of 17-19 s); no other transaction inserts
        -- objects of the bundle meanwhile, since bundles.commit locks its row for update.
        execute format(
            'with c as materialized (%s), '
            'blobs as (insert into bundle.object select distinct on (c.blob_id collate "C") %L, c.blob_id, ''blob'', '
            '          convert_to(c.blob, ''UTF8'') from c where c.blob is not null and not exists '
            '          (select from bundle.object o where o.bundle = %L and o.id = c.blob_id) order by c.blob_id collate "C"), '
            'added as (insert into bundle.head_row select %L, %s, c.key_hash, c.key, c.blob_id from c '
            '          where c.head_blob is null order by c.key_hash collate "C"), '
            'modified as (update bundle.head_row h set blob = c.blob_id from c where c.blob is not null '
            '             and c.head_blob is not null and h.bundle = %L and h.relation = %s and h.key_hash = c.key_hash), '
            'deleted as (delete from bundle.head_row h using c where c.blob is null '
            '            and h.bundle = %L and h.relation = %s and h.key_hash = c.key_hash), '
            'done as (delete from bundle.changed_key k where k.bundle = %L and k.relation = %s) '
            'select (select count(*) from c), (select array_agg(distinct left(f.key_hash, 4)) '
            '                                  from (select c.key_hash from c limit 10001) f having count(*) <= 10000)',
            bundle._changes_query(bundle_name, t), bundle_name, bundle_name, bundle_name, t.relation::oid,
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
