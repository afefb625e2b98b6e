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

create or replace view peer.friends as
    select name, peer_id, state, role, added_at, last_seen from peer.friend;
comment on view peer.friends is 'friends: local name, peer id, state, the role they act as, when last seen';

create or replace view peer.friend_requests as
    select peer_id, claimed_name as name, first_seen, attempts from peer.friend_request;
comment on view peer.friend_requests is 'peers that tried to connect without being friends; peer.accept_friend makes one a friend';
