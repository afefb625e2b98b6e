-- Remote calls of functions a friend exposed.

-- Remote calls ---------------------------------------------------------------
create or replace function peer.expose(fn regprocedure, friend text default null, as_name text default null) returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    published text;
begin
    if not exists (select from pg_proc p where p.oid = fn and p.pronargs = 1 and p.prokind = 'f'
                   and p.proargtypes[0] = 'jsonb'::regtype and p.prorettype = 'jsonb'::regtype
                   and not p.proretset) then
        raise exception 'an exposed function must take one jsonb argument and return jsonb, not %', fn
            using errcode = '42P13';
    end if;
    if friend is not null then
        perform peer._friend_for_sending(friend);
    end if;
    published := coalesce(as_name, (select format('%s.%s', n.nspname, p.proname)
                                    from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                                    where p.oid = fn));
    insert into peer.exposed_function (name, function, friend) values (published, fn, friend)
        on conflict on constraint exposed_function_name_friend_key do update set function = excluded.function;
    return published;
end
$$;
comment on function peer.expose(regprocedure, text, text) is 'let a friend (null: every friend) call fn(jsonb) by name; returns that name';

create or replace function peer.unexpose(name text, friend text default null) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.exposed_function e
                  where e.name = unexpose.name and e.friend is not distinct from unexpose.friend
                  returning 1)
    select exists (select from gone)
$$;
comment on function peer.unexpose(text, text) is 'take back peer.expose(…, friend, name)';

create or replace function peer.call(friend text, fn text, arg jsonb default '{}', timeout interval default '30 s')
returns jsonb
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
seconds = plpy.execute(plpy.prepare("select extract(epoch from $1)::float8 as s", ["interval"]), [timeout])[0]["s"]
return GD["aquapeer"].call(friend, fn, arg, seconds)
$$;
comment on function peer.call(text, text, jsonb, interval) is 'call a function a friend exposed, and return its result';
