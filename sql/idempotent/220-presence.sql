-- Presence and soft locks (docs/presence.md).  The worker keeps the books (python/aquapeer/presence.py);
-- these functions check what a caller asks and hand it over.

comment on table peer.soft_lock is 'soft locks: this database''s (holder null) and its friends''; written by the worker only';
comment on table peer.lock_watch is 'friends told of soft locks on a table besides those it is shared with (peer.watch)';
comment on table peer.friend_presence is 'what each friend told of itself (status), when it came and went, and the soft locks of it refused';
comment on column peer.config.status is 'this database''s status for its friends (peer.set_status)';
comment on column peer.config.soft_lock_ttl is 'a soft lock''s default time to live: how long a friend''s locks outlast its going away';
comment on column peer.config.max_soft_locks is 'soft locks held per friend at most; more are refused and counted';
comment on column peer.config.soft_lock_rate is 'soft locks a friend may take per second (bursting to max_soft_locks); more are refused and counted';
comment on column peer.config.max_auto_locks_per_statement is 'an auto-locked table''s statement that updates more rows takes one lock on the whole table';

-- A soft lock's key checked against the table: null (every row) or the key columns' texts.
create or replace function peer._lock_key(rel regclass, key jsonb) returns jsonb
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    key_columns name[] := peer._key_columns(rel);
begin
    if key is null or jsonb_typeof(key) = 'null' then
        return null;
    end if;
    if jsonb_typeof(key) <> 'array' or jsonb_array_length(key) <> cardinality(key_columns)
       or exists (select from jsonb_array_elements(key) e where jsonb_typeof(e) <> 'string') then
        raise exception 'key % does not name a row of %', key, rel using errcode = '22023',
            detail = format('A key is a JSON array of the texts of the key columns (%s), in that order.',
                            array_to_string(key_columns, ', ')),
            hint = format('For example ''["42"]''::jsonb, as bundle.status shows keys; or null for the whole table.');
    end if;
    return key;
end
$$;
comment on function peer._lock_key(regclass, jsonb) is 'a soft lock''s key checked against the table''s primary key';

create or replace function peer._take_locks(relation oid, keys jsonb, note text, ttl_s double precision,
                                            session boolean) returns uuid[]
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].take_locks(relation, keys, note, ttl_s, session)
$$;
comment on function peer._take_locks(oid, jsonb, text, double precision, boolean) is
    'the worker takes soft locks on rows of a table (keys: a JSON array of keys) and tells friends';

create or replace function peer.soft_lock(rel regclass, key jsonb, note text default null,
                                          ttl interval default null, session boolean default true) returns uuid
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    lock_key jsonb := peer._lock_key(rel, key);
    lifetime interval := coalesce(ttl, (select c.soft_lock_ttl from peer.config c));
begin
    if lifetime <= '0'::interval then
        raise exception 'a soft lock''s ttl must be positive, not %', ttl using errcode = '22023';
    end if;
    if length(note) > 1000 then
        raise exception 'a soft lock''s note may have 1,000 characters at most, not %', length(note)
            using errcode = '22001';
    end if;
    return (peer._take_locks(rel, jsonb_build_array(lock_key), note,
                             extract(epoch from lifetime)::float8, session))[1];
end
$$;
comment on function peer.soft_lock(regclass, jsonb, text, interval, boolean) is
    'announce to the friends who have the table that this row (key null: the table) is being edited; '
    'never blocks a write. session: until this session ends, else until peer.release_lock or the ttl';

create or replace function peer.release_lock(id uuid) returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].release_lock(id)
$$;
comment on function peer.release_lock(uuid) is 'release one of this database''s soft locks and tell friends; false when there is none';

-- Who is told of soft locks on a table: friends it is shared with through a bundle (shared with
-- them, followed from them or pulled from them), a publication or a subscription, and watchers.
create or replace function peer._lock_audience(relation regclass) returns setof text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select p.friend from peer.publication p where p.relation = _lock_audience.relation
    union select s.friend from peer.subscription s where s.relation = _lock_audience.relation
    union select w.friend from peer.lock_watch w where w.relation = _lock_audience.relation
    union select s.friend from peer.bundle_share s join bundle.tracked t using (bundle)
          where t.relation = _lock_audience.relation
    union select f.friend from peer.bundle_follow f join bundle.tracked t using (bundle)
          where t.relation = _lock_audience.relation
    union select x.friend from peer.transfer x join bundle.tracked t using (bundle)
          where t.relation = _lock_audience.relation and x.direction = 'pull' and x.state = 'done'
$$;
comment on function peer._lock_audience(regclass) is 'the friends told of soft locks on a table';

create or replace function peer.watch(rel regclass, friend text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._friend_for_sending(friend);
begin
    insert into peer.lock_watch values (rel, f.name) on conflict do nothing;
end
$$;
comment on function peer.watch(regclass, text) is 'tell a friend of this database''s soft locks on a table, besides those it is shared with';

create or replace function peer.unwatch(rel regclass, friend text) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.lock_watch w where w.relation = rel and w.friend = unwatch.friend returning 1)
    select exists (select from gone)
$$;
comment on function peer.unwatch(regclass, text) is 'stop peer.watch''s telling a friend of soft locks on a table';

-- Auto locks: a statement trigger locks the rows a session updates, once per row and session.
create or replace function peer._take_auto_locks(relation oid, keys jsonb) returns void
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].take_auto_locks(relation, keys)
$$;
comment on function peer._take_auto_locks(oid, jsonb) is
    'soft locks on the rows a statement updated that this session does not hold yet; never fails the statement';

create or replace function peer._auto_soft_lock() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    most integer := (select c.max_auto_locks_per_statement from peer.config c);
    keys jsonb;
begin
    -- TG_ARGV: the key columns.  One more row than allowed is enough to know it is too many.
    execute format('select jsonb_agg(jsonb_build_array(%s)) from (select * from new_rows limit %s) t',
                   (select string_agg(format('t.%I::text', k), ', ' order by n)
                    from unnest(TG_ARGV) with ordinality u(k, n)), most + 1)
        into keys;
    if keys is not null then
        perform peer._take_auto_locks(TG_RELID,
                                      case when jsonb_array_length(keys) > most then '[null]' else keys end);
    end if;
    return null;
end
$$;
comment on function peer._auto_soft_lock() is 'statement trigger of peer.auto_soft_lock: soft locks on the rows a session updates';

create or replace function peer.auto_soft_lock(rel regclass) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    execute format('create or replace trigger %I after update on %s referencing new table as new_rows '
                   'for each statement execute function peer._auto_soft_lock(%s)',
                   format('aquapeer_soft_lock_%s', rel::oid), rel,
                   array_to_string(array(select quote_literal(c) from unnest(peer._key_columns(rel)) c), ', '));
end
$$;
comment on function peer.auto_soft_lock(regclass) is
    'take a soft lock on each row a session updates in this table (once per row and session; '
    'a statement over peer.config.max_auto_locks_per_statement rows locks the whole table)';

create or replace function peer.no_auto_soft_lock(rel regclass) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if not exists (select from pg_trigger where tgrelid = rel and tgname = format('aquapeer_soft_lock_%s', rel::oid)) then
        return false;
    end if;
    execute format('drop trigger %I on %s', format('aquapeer_soft_lock_%s', rel::oid), rel);
    return true;
end
$$;
comment on function peer.no_auto_soft_lock(regclass) is 'stop peer.auto_soft_lock on a table; false when it was not on';

create or replace view peer.soft_locks as
    select l.id, l.relation, l.key, coalesce(l.holder, 'self') as holder, l.note, l.since, l.expires_at
    from peer.soft_lock l;
comment on view peer.soft_locks is
    'soft locks held here and by friends (holder ''self'' or the friend''s name); expires_at null: while the session or the link lasts';

-- Presence -------------------------------------------------------------------
create or replace function peer.set_status(status text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if length(status) > 200 then
        raise exception 'a status may have 200 characters at most, not %', length(status) using errcode = '22001';
    end if;
    update peer.config set status = nullif(set_status.status, '');
end
$$;
comment on function peer.set_status(text) is 'a short status friends see in peer.presence (null: none); sent within a second of the commit';

create or replace function peer._online_links(out friend text, out rtt_ms double precision)
returns setof record
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].online_links()
$$;
comment on function peer._online_links() is 'friends connected now, with the round trip; none when the worker does not answer';

create or replace view peer.presence as
    select f.name as friend, o.friend is not null as online,
           case when o.friend is not null then now() else greatest(p.last_disconnected, f.last_seen) end as last_seen,
           o.rtt_ms, (select count(*) from peer.soft_lock l where l.holder = f.name) as locks_held,
           p.status, p.status_at, coalesce(p.locks_refused, 0) as locks_refused
    from peer.friend f
    left join peer._online_links() o on o.friend = f.name
    left join peer.friend_presence p on p.friend = f.name
    where f.state = 'accepted';
comment on view peer.presence is 'each friend: online now, last seen, round trip, soft locks held, its status, soft locks refused';

-- Overlaps ----------------------------------------------------------------------
-- A friend's lock on a row of relation (key null: on every row) overlaps when this database holds a
-- lock covering that row or changed it since the last commit of a bundle tracking the table
-- (bundle.changed_key; its JSON null key: every row).  A flood of a friend's locks asks it for each,
-- so each test is one index probe, and those for a whole-table lock run only for one.
create or replace function peer._lock_overlaps(relation regclass, key jsonb) returns boolean
language sql stable set search_path = pg_catalog, pg_temp as $$
    select exists (select from peer.soft_lock o where o.holder is null and o.relation = $1 and o.key = $2)
        or exists (select from peer.soft_lock o where o.holder is null and o.relation = $1 and o.key is null)
        or ($2 is null and exists (select from peer.soft_lock o where o.holder is null and o.relation = $1))
        or exists (select from bundle.tracked t join bundle.changed_key c using (bundle, relation)
                   where t.relation = $1 and c.key in ($2, 'null'::jsonb))
        or ($2 is null and exists (select from bundle.tracked t join bundle.changed_key c using (bundle, relation)
                                   where t.relation = $1))
$$;
comment on function peer._lock_overlaps(regclass, jsonb) is
    'whether a friend''s soft lock on a row covers one this database holds a lock on or changed since its bundle''s last commit';

create or replace function peer._notify_soft_locks(locks peer.soft_lock[], kind text) returns void
language sql set search_path = pg_catalog, pg_temp as $$
    select pg_notify('aquapeer_soft_lock', json_build_object('id', l.id, 'kind', kind, 'holder', l.holder,
                                                             'relation', l.relation::text, 'key', l.key)::text)
    from unnest(locks) l
$$;
comment on function peer._notify_soft_locks(peer.soft_lock[], text) is
    'NOTIFY aquapeer_soft_lock of friends'' soft locks: {id, kind (overlap or released), holder, relation, key}';
