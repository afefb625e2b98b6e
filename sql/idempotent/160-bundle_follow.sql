-- Following a friend's bundle: the worker (bundles/follow.py) pulls each new commit by itself.

comment on table peer.bundle_follow is 'the friends'' bundles this database follows, and how far each got; peer.follow_bundle sets it';

create or replace function peer.follow_bundle(friend text, bundle_name text) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._friend_for_sending(friend);
begin
    if bundle_name is null or bundle_name !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' then
        raise exception 'invalid bundle name %', coalesce(quote_literal(bundle_name), 'null') using errcode = '22023',
            hint = 'Use 1 to 63 lower-case letters, digits, ''_'', ''.'' or ''-'', starting with a letter or digit.';
    end if;
    insert into peer.bundle_follow as b (friend, bundle) values (f.name, bundle_name)
        on conflict on constraint bundle_follow_pkey do update set state = 'following', last_error = null
        where b.state = 'error';
    return found;
end
$$;
comment on function peer.follow_bundle(text, text) is
    'pull each new commit a friend makes to a bundle it shares, by itself, while connected; true if newly followed (or retried after an error)';

create or replace function peer.unfollow_bundle(friend text, bundle_name text) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.bundle_follow f where f.friend = unfollow_bundle.friend and f.bundle = bundle_name
                  returning 1)
    select exists (select from gone)
$$;
comment on function peer.unfollow_bundle(text, text) is 'stop following a friend''s bundle; true if it was followed';

-- One pull of a followed bundle, in an executor connected as the worker's role: peer.pull_bundle
-- itself, with checkout unless the tables have uncommitted changes; a merge without conflicts is
-- committed, one with conflicts stops following until it is resolved.  arg: friend, bundle, and
-- theirs (the friend's head the worker saw).  Errors are recorded, not raised.
create or replace function peer._follow_pull(arg jsonb) returns jsonb
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    friend_name text := arg->>'friend';
    bundle_name text := arg->>'bundle';
    theirs text := arg->>'theirs';
    follow peer.bundle_follow;
    b bundle.bundle;
    dirty boolean := false;
    summary jsonb;
    new_state text;
    message text;
begin
    perform peer._executor_nonce();
    select * into follow from peer.bundle_follow f where f.friend = friend_name and f.bundle = bundle_name;
    if not found then
        return jsonb_build_object('state', null);  -- unfollowed meanwhile
    end if;
    begin
        select * into b from bundle.bundle where name = bundle_name;
        if found then
            if exists (select from bundle.merge m where m.bundle = bundle_name) then
                update peer.bundle_follow f set state = 'conflicts',
                    last_error = 'a merge is in progress: resolve its conflicts (bundle.resolve) and commit, '
                                 'or give it up (bundle.merge_abort)'
                where f.friend = friend_name and f.bundle = bundle_name;
                return jsonb_build_object('state', 'conflicts');
            end if;
            dirty := exists (select from bundle.tracked t where t.bundle = bundle_name)
                     and exists (select from bundle.status(bundle_name));
            -- Commits kept without checkout while there were changes: check them out now, and
            -- pull next time (pulling asks the worker for steps that wait for this transaction).
            if not dirty and follow.state = 'behind' and b.head is distinct from b.checked_out then
                perform bundle.checkout(bundle_name);
                update peer.bundle_follow f set state = 'following', last_error = null
                where f.friend = friend_name and f.bundle = bundle_name;
                return jsonb_build_object('state', 'following', 'checked_out', b.head);
            end if;
        end if;
        summary := peer.pull_bundle(friend_name, bundle_name, not dirty);
        if (summary->>'merging')::boolean and (summary->>'conflicts')::bigint = 0 then
            summary := summary || jsonb_build_object(
                'merging', false, 'merged', true,
                'head', bundle.commit(bundle_name, format('merge %s''s commit %s', friend_name, theirs)));
        end if;
        select * into b from bundle.bundle where name = bundle_name;
        new_state := case when (summary->>'merging')::boolean then 'conflicts'
                          when dirty and (b.head is distinct from b.checked_out
                                          or not coalesce((summary->>'up_to_date')::boolean, false)) then 'behind'
                          else 'following' end;
        update peer.bundle_follow f set state = new_state, last_pulled_at = now(),
            last_head = coalesce(theirs, f.last_head),
            last_error = case new_state
                when 'conflicts' then format('the merge of %s''s commit %s has %s conflict(s): resolve them '
                                             '(bundle.resolve) and commit, or give it up (bundle.merge_abort)',
                                             friend_name, theirs, summary->>'conflicts')
                when 'behind' then 'uncommitted changes in the bundle''s tables: its commits are kept, not checked out'
            end
        where f.friend = friend_name and f.bundle = bundle_name;
        return summary || jsonb_build_object('state', new_state);
    exception when others then
        get stacked diagnostics message = message_text;
        update peer.bundle_follow f set state = 'error', last_error = message
        where f.friend = friend_name and f.bundle = bundle_name;
        return jsonb_build_object('state', 'error', 'error', message);
    end;
end
$$;
comment on function peer._follow_pull(jsonb) is 'one pull of a followed bundle, recording how it went (executors only)';

create or replace view peer.followed_bundles as
    select f.friend, f.bundle, f.state, f.last_error, f.since, f.last_pulled_at, f.last_head,
           b.head, b.checked_out,
           coalesce(behind.commits, 0) as commits_behind_checkout,
           coalesce(unmerged.commits, 0) as commits_not_merged,
           (select count(*) from bundle.conflicts c where c.bundle = f.bundle) as conflicts
    from peer.bundle_follow f
    left join bundle.bundle b on b.name = f.bundle
    -- the commits of the head that the tables do not have checked out
    left join lateral (
        with recursive h(id) as (
            select b.head where b.head is distinct from b.checked_out
            union
            select p from h join bundle.commit c on c.bundle = f.bundle and c.id = h.id cross join unnest(c.parents) p
        ), o(id) as (
            select b.checked_out where b.head is distinct from b.checked_out
            union
            select p from o join bundle.commit c on c.bundle = f.bundle and c.id = o.id cross join unnest(c.parents) p
        )
        select count(*) as commits from (select id from h except select id from o) x where x.id is not null
    ) behind on true
    -- the commits of the friend's head, kept here, that the head lacks (waiting to be merged)
    left join lateral (
        with recursive t(id) as (
            select c.id from bundle.commit c where c.bundle = f.bundle and c.id = f.last_head
            union
            select p from t join bundle.commit c on c.bundle = f.bundle and c.id = t.id cross join unnest(c.parents) p
        ), h(id) as (
            select b.head where exists (select from t)
            union
            select p from h join bundle.commit c on c.bundle = f.bundle and c.id = h.id cross join unnest(c.parents) p
        )
        select count(*) as commits from (select id from t except select id from h) x where x.id is not null
    ) unmerged on true;
comment on view peer.followed_bundles is
    'the friends'' bundles followed: state, last error and pull, and how far the checkout is behind the head and the head behind the friend''s';
