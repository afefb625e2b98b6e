-- Friends: adding, accepting, blocking and removing them, and their roles.

create or replace function peer.add_friend(name text, invite text) returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].add_friend(name, invite)
$$;
comment on function peer.add_friend(text, text) is 'add a friend under a local name from its invite; returns its peer id';

create or replace function peer.accept_friend(peer_id text, name text) returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].accept_friend(peer_id, name)
$$;
comment on function peer.accept_friend(text, text) is 'turn a friend request into a friend';

create or replace function peer.block(name text) returns boolean
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].block(name)
$$;
comment on function peer.block(text) is 'refuse a friend from now on (keeps the record; remove_friend forgets it)';

create or replace function peer.remove_friend(name text, reason text default 'the friend was removed') returns boolean
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].remove_friend(name, reason)
$$;
comment on function peer.remove_friend(text, text) is 'forget a friend; messages still waiting for it expire with reason';

create or replace function peer.set_friend_role(name text, role regrole) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if exists (select from pg_roles r
               where (r.rolsuper or r.rolbypassrls) and pg_has_role(role, r.oid, 'MEMBER')) then
        raise exception 'role "%" is or can become a superuser or a role that bypasses row-level security', role
            using errcode = '42501',
                  hint = 'Friends act as this role; give them a role with only the privileges they need.';
    end if;
    if not (select rolcanlogin from pg_roles where oid = role) then
        raise exception 'role "%" cannot log in, so no executor can connect as it', role
            using errcode = '42501',
                  hint = format('Executors connect as the role itself: ALTER ROLE %s LOGIN '
                                '(without a password it still cannot log in from outside).', role);
    end if;
    update peer.friend f set role = set_friend_role.role::name where f.name = set_friend_role.name;
    if not found then
        raise exception 'unknown friend "%"', name using errcode = '42704',
            hint = 'See select * from peer.friends.';
    end if;
end
$$;
comment on function peer.set_friend_role(text, regrole) is 'the role a friend acts as in executors';

create or replace function peer.set_introducer(friend text, introducer boolean) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if introducer is null then
        raise exception 'introducer must be true or false' using errcode = '22004';
    end if;
    update peer.friend f set introducer = set_introducer.introducer where f.name = set_introducer.friend;
    if not found then
        raise exception 'unknown friend "%"', friend using errcode = '42704',
            hint = 'See select * from peer.friends.';
    end if;
end
$$;
comment on function peer.set_introducer(text, boolean) is
    'whether a friend''s introductions make friendships by themselves (true) or wait in peer.friend_requests (false)';

-- Introductions --------------------------------------------------------------------------------
create or replace function peer.introduce(friend_a text, friend_b text, note text default null) returns void
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].introduce(friend_a, friend_b, note)
$$;
comment on function peer.introduce(text, text, text) is
    'send each of two friends a signed introduction of the other, as durable messages queued in this transaction';

-- Runs in an executor as the introducer's role; peer._applying_friend refuses any other session,
-- and the payload is read again from the inbox rather than taken from the argument.
create or replace function peer._introduction_message(m peer.inbox) returns void
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].introduction_message(m["friend"], m["id"])
$$;
comment on function peer._introduction_message(peer.inbox) is
    'the handler of topic aquapeer.introduce: a checked introduction becomes a friend (from an introducer) or a friend request';

insert into peer.message_handler values ('aquapeer.introduce', 'peer._introduction_message(peer.inbox)'::regprocedure)
    on conflict (topic) do update set handler = excluded.handler;
insert into peer.topic_grant values ('aquapeer.introduce', null) on conflict do nothing;

-- Views ----------------------------------------------------------------------------------------
create or replace view peer.friends as
    select f.name, f.peer_id, f.state, f.role, f.added_at, f.last_seen, f.introducer,
           coalesce(i.name, f.introduced_by) as introduced_by
    from peer.friend f left join peer.friend i on i.peer_id = f.introduced_by;
comment on view peer.friends is
    'friends: local name, peer id, state, role they act as, when last seen, whether they introduce, who introduced them';

create or replace view peer.friend_requests as
    select r.peer_id, r.claimed_name as name, r.first_seen, r.attempts,
           coalesce(i.name, r.introduced_by) as introduced_by, r.introduced_as, r.note
    from peer.friend_request r left join peer.friend i on i.peer_id = r.introduced_by;
comment on view peer.friend_requests is
    'peers that tried to connect without being friends, or that a friend introduced (name: what the peer calls itself, '
    'never an identity); peer.accept_friend makes one a friend';
