-- Sharing bundles with friends, serving them, pull and push.

-- Comments on this area's tables (sql/incremental creates them); here, so that an upgrade
-- applies a changed comment too.
comment on table peer.bundle_share is 'which friends may pull, and push to, which bundles; peer.share_bundle sets it';

create or replace function peer.share_bundle(bundle_name text, friend text, can_push boolean default false) returns void
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

create or replace function peer.unshare_bundle(bundle_name text, friend text) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.bundle_share s where s.bundle = bundle_name and s.friend = unshare_bundle.friend
                  returning 1)
    select exists (select from gone)
$$;
comment on function peer.unshare_bundle(text, text) is 'take back what peer.share_bundle gave; true if it was shared';

-- What a friend may read, checked in the serving executor: shared with it, or (granted) it is
-- pulling what we asked it to take in a push.  The same error whether the bundle exists or not.
create or replace function peer._check_bundle_served(bundle_name text, friend text, granted boolean, push boolean default false)
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
comment on function peer._check_bundle_served(text, text, boolean, boolean) is 'refuse unless an executor serves a friend the bundle is shared with';

create or replace function peer._serve_bundle_head(bundle_name text, friend text, granted boolean) returns jsonb
language plpgsql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    -- format: the newest object format of its commits, which the friend must be able to read.
    return (select jsonb_build_object('head', b.head, 'tables', bundle._describe(b.name),
                                      'format', case when exists (
                                          select from bundle.commit c where c.bundle = b.name
                                          and c.document->'commit'->>'format' = 'aquapeer-bundle/2')
                                          then 'aquapeer-bundle/2' else 'aquapeer-bundle/1' end)
            from bundle.bundle b where b.name = bundle_name);
end
$$;
comment on function peer._serve_bundle_head(text, text, boolean) is 'a shared bundle''s head and tables, for a friend''s pull (executors only)';

create or replace function peer.pull_bundle(friend text, bundle_name text, checkout boolean default true) returns jsonb
language plpython3u security definer set search_path = pg_catalog, pg_temp set jit = off as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].pull_bundle(friend, bundle_name, checkout)
$$;
comment on function peer.pull_bundle(text, text, boolean) is
    'fetch what a friend committed to a bundle that this database lacks, then fast-forward or merge, and check out';

create or replace function peer.push_bundle(friend text, bundle_name text) returns jsonb
language plpython3u security definer set search_path = pg_catalog, pg_temp set jit = off as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].push_bundle(friend, bundle_name)
$$;
comment on function peer.push_bundle(text, text) is
    'send a friend (who granted can_push) the commits of a bundle it lacks, fast-forwarding its head';

-- The objects a friend asked for, looked up in the order of their ids (the asker's are in the
-- order of its walk): the index is then read in order.
create or replace function peer._serve_bundle_objects(bundle_name text, friend text, granted boolean, ids text[])
returns table (id text, data bytea)
language plpgsql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    return query select o.id, o.data from (select distinct i from unnest(ids) i order by i) a
        cross join lateral (select o.id, o.data from bundle.object o where o.bundle = bundle_name and o.id = a.i limit 1) o;
end
$$;
comment on function peer._serve_bundle_objects(text, text, boolean, text[]) is 'the objects of a shared bundle a friend asked for (executors only)';

create or replace function peer._serve_bundle_commits(bundle_name text, friend text, granted boolean, have text[],
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
comment on function peer._serve_bundle_commits(text, text, boolean, text[], text[]) is 'the commits of a shared bundle a friend lacks (executors only)';

-- Also the copies of subscriptions, initial or re-syncs (peer.subscription keeps their progress):
-- rows_total is the friend's estimate (for a re-sync, the rows that differ) until the copy ends.
create or replace view peer.transfers as
    select id, friend, bundle, direction, state, bytes_done, rows_done, rows_total, objects_done, commits,
           started_at, finished_at, error, null::regclass as relation
    from peer.transfer where state = 'running' or finished_at > now() - interval '1 day'
    union all
    select copy_id, friend, null, case copy_kind when 'resync' then 'resync' else 'copy' end, case when copy_finished_at is null then 'running' else 'done' end, null,
           copy_rows, case when copy_finished_at is not null then copy_rows
                           when copy_rows_estimate is not null then greatest(copy_rows_estimate, copy_rows) end,
           null, null, copy_started_at, copy_finished_at, last_error, relation
    from peer.subscription where copy_finished_at is null and copy_started_at is not null
                              or copy_finished_at > now() - interval '1 day'
    order by started_at desc;
comment on view peer.transfers is
    'bundle transfers and initial copies of subscriptions running now or ended in the last day, with their progress';
