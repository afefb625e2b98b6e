-- Live replication of tables between friends: publish, subscribe, capture, apply (docs/replication.md).

comment on table peer.publication is 'tables this database sends to friends as they change (peer.publish)';
comment on table peer.subscription is 'tables this database takes from friends as they change (peer.subscribe)';
comment on table peer.row_clock is 'per replicated row: the stamp (clock, origin) of each column, of its birth and of its deletion';
comment on table peer.apply_errors is 'changes from friends that could not be applied, with the reason; peer.retry_apply or peer.discard_apply settles them';
comment on table peer.replication_conflicts is 'each conflict resolved by the clock: both values and stamps, and which won';
comment on column peer.config.max_clock_skew is 'a friend''s change stamped further ahead of this server''s time is refused';
comment on column peer.config.conflict_retention is 'resolved conflicts are kept this long';
comment on column peer.config.tombstone_retention is 'deleted rows'' stamps are kept at least this long, and until every friend acknowledged the delete';

-- The clock ------------------------------------------------------------------
-- The next stamp of this database's hybrid logical clock: past every stamp it gave and saw
-- (at_least), and at least the current time in milliseconds, shifted past the 16-bit counter
-- (src/clock.c).
create or replace function peer._clock_tick(at_least bigint default 0) returns bigint
language c strict as 'MODULE_PATHNAME', 'aquapeer_clock_tick';
comment on function peer._clock_tick(bigint) is 'the next stamp of this database''s hybrid logical clock, past at_least';

-- Shared checks ----------------------------------------------------------------
create or replace function peer._key_columns(relation regclass) returns name[]
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    key_columns name[];
begin
    select array_agg(a.attname order by k.n) into key_columns
    from pg_index i cross join unnest(i.indkey) with ordinality k(attnum, n)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
    where i.indrelid = relation and i.indisprimary;
    if key_columns is null then
        raise exception 'table % has no primary key, so its rows cannot be replicated', relation
            using errcode = '42P16', hint = format('ALTER TABLE %s ADD PRIMARY KEY (...) first.', relation);
    end if;
    return key_columns;
end
$$;
comment on function peer._key_columns(regclass) is 'a table''s primary key columns; an error naming the fix when it has none';

create or replace function peer._relation_name(relation regclass) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format('%I.%I', n.nspname, c.relname) from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.oid = relation
$$;
comment on function peer._relation_name(regclass) is 'a table''s schema-qualified, quoted name, as changes name it between friends';

-- Capture --------------------------------------------------------------------
-- A row's key, {column: value}, from the row as jsonb.  Without a SET clause, so that it is
-- inlined.
create or replace function peer._key_of(fields jsonb, key_columns text[]) returns jsonb
language sql immutable parallel safe as $$
    select jsonb_object_agg(k, fields -> k) from unnest(key_columns) k
$$;
comment on function peer._key_of(jsonb, text[]) is 'a row''s key, {column: value}, from the row as jsonb';

-- The statement-level trigger of a published table (TG_ARGV: its key columns).  In the user's
-- transaction it hands each 1,000 changed rows (op, key, the values that changed, the row) to
-- peer._queue_changes, reading the transition tables once, in C (src/capture.c): per row,
-- SQL expressions cost a 200,000-row UPDATE 7 s here and a million-row one 400 MB of memory.
create or replace function peer._capture_changes() returns trigger
language c security definer set search_path = pg_catalog, pg_temp set extra_float_digits = 1 set jit = off
as 'MODULE_PATHNAME', 'aquapeer_capture_changes';
comment on function peer._capture_changes() is 'capture trigger of published tables: queues each row change to the friends it is published to';

-- What the capture trigger asks of SQL, for changes ([{op, k, v, r}]) of a published table:
-- A local write's stamps, for a table friends also send changes to.
create or replace function peer._stamp_changes(relation oid, changes jsonb, stamp bigint) returns void
language sql set search_path = pg_catalog, pg_temp as $$
    insert into peer.row_clock as k (relation, key, columns, born, deleted, deleted_at)
    select _stamp_changes.relation, c -> 'k',
           case when c ->> 'op' = 'D' then '{}'
                else (select jsonb_object_agg(n, jsonb_build_array(stamp, i.peer_id)) from jsonb_object_keys(c -> 'v') n) end,
           case when c ->> 'op' = 'I' then jsonb_build_array(stamp, i.peer_id) end,
           case when c ->> 'op' = 'D' then jsonb_build_array(stamp, i.peer_id) end,
           case when c ->> 'op' = 'D' then now() end
    from jsonb_array_elements(changes) c cross join peer.identity i
    on conflict on constraint row_clock_pkey do update set
        columns = case when excluded.deleted is not null then k.columns
                       when excluded.born is not null then excluded.columns
                       else k.columns || excluded.columns end,
        born = coalesce(excluded.born, k.born),
        deleted = case when excluded.born is not null then null else coalesce(excluded.deleted, k.deleted) end,
        deleted_at = case when excluded.born is not null then null else coalesce(excluded.deleted_at, k.deleted_at) end
$$;
comment on function peer._stamp_changes(oid, jsonb, bigint) is 'stamp a local write''s changes of a table friends also send changes to';

-- The changes whose rows a publication's row filter selects (null: none).
create or replace function peer._filtered_changes(relation oid, changes jsonb, row_filter text) returns jsonb
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    selected jsonb;
begin
    execute format('select jsonb_agg(c) from jsonb_array_elements($1) c '
                   'where (select %s from jsonb_populate_record(null::%s, c -> ''r'') r)',
                   row_filter, relation::regclass)
        into selected using changes;
    return selected;
end
$$;
comment on function peer._filtered_changes(oid, jsonb, text) is 'the changes of the rows a publication''s row filter selects';

-- Changes applied from a friend go on to the other friends (never back to the one they came
-- from, nor to their origin), each with its origin's stamp (pg_temp.aquapeer_applying, written
-- by peer._record_apply).  Null: none.
create or replace function peer._forwarded_changes(relation oid, changes jsonb, friend_peer_id text) returns jsonb
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    return (select jsonb_agg(c || jsonb_build_object('c', a.clock, 'o', a.origin))
            from jsonb_array_elements(changes) c
            join pg_temp.aquapeer_applying a on a.relation = _forwarded_changes.relation and a.key = c -> 'k'
            where friend_peer_id <> a.origin and friend_peer_id <> a.from_peer);
end
$$;
comment on function peer._forwarded_changes(oid, jsonb, text) is 'the changes applied from a friend that go on to another, with their origin''s stamps';

-- The capture trigger keeps each published table's recipients per backend until one of these
-- tables changes (src/capture.c).
create or replace function peer._recipients_changed() returns trigger
language c as 'MODULE_PATHNAME', 'aquapeer_recipients_changed';
comment on function peer._recipients_changed() is 'tells every backend''s capture trigger that whom published tables go to changed';
create or replace trigger recipients_changed after insert or update or delete or truncate on peer.publication
    for each statement execute function peer._recipients_changed();
create or replace trigger recipients_changed after insert or update of relation or delete or truncate on peer.subscription
    for each statement execute function peer._recipients_changed();
create or replace trigger recipients_changed after insert or update of name, peer_id, state or delete or truncate
    on peer.friend for each statement execute function peer._recipients_changed();
create or replace trigger recipients_changed after insert or update or delete or truncate on peer.identity
    for each statement execute function peer._recipients_changed();

create or replace function peer._refuse_truncate() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    raise exception 'TRUNCATE of % is not replicated, and the table is published to friends', TG_RELID::regclass
        using errcode = '0A000',
              hint = 'DELETE the rows instead (friends then delete them too), or peer.unpublish() the table first.';
end
$$;
comment on function peer._refuse_truncate() is 'refuses TRUNCATE of a published table: friends would not see it';

-- Publishing -----------------------------------------------------------------
create or replace function peer.publish(relation regclass, friend text, columns text[] default null,
                                        row_filter text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._friend_for_sending(friend);
    key_columns name[] := peer._key_columns(relation);
    missing text;
    trigger_name text := format('aquapeer_replicate_%s', relation::oid);
begin
    select string_agg(quote_ident(c), ', ') into missing from unnest(columns) c
    where not exists (select from pg_attribute a where a.attrelid = relation and a.attname = c
                      and a.attnum > 0 and not a.attisdropped);
    if missing is not null then
        raise exception 'table % has no column %', relation, missing using errcode = '42703',
            hint = 'columns names columns of the table (the primary key is always sent).';
    end if;
    if row_filter is not null then
        begin
            execute format('select from %s r where (%s) limit 0', relation, row_filter);
        exception when others then
            raise exception 'row filter % is not a condition on %: %', quote_literal(row_filter), relation, sqlerrm
                using errcode = '42804', hint = 'Write a boolean SQL expression over the table''s columns, as in a WHERE clause.';
        end;
    end if;
    insert into peer.publication (relation, friend, key_columns, columns, row_filter)
    values (relation, f.name, key_columns,
            case when columns is null then null else array(select distinct c from unnest(columns || key_columns::text[]) c) end,
            row_filter)
    on conflict on constraint publication_pkey do update
        set columns = excluded.columns, row_filter = excluded.row_filter, key_columns = excluded.key_columns;
    -- The friend asks for the rows it lacks on this topic (peer.subscribe(initial => true)).
    insert into peer.topic_grant values ('aquapeer.copy', f.name) on conflict do nothing;
    -- peer.verify_subscription at the friend asks for the rows' hashes.
    insert into peer.exposed_function (name, function, friend)
        values ('aquapeer.row_hashes', 'peer._published_row_hashes(jsonb)'::regprocedure, f.name)
        on conflict on constraint exposed_function_name_friend_key do nothing;
    if not exists (select from pg_trigger where tgrelid = relation and tgname = trigger_name || '_ins') then
        execute format('create trigger %I after insert on %s referencing new table as new_rows '
                       'for each statement execute function peer._capture_changes(%s)',
                       trigger_name || '_ins', relation, array_to_string(array(select quote_literal(c) from unnest(key_columns) c), ', '));
        execute format('create trigger %I after update on %s referencing old table as old_rows new table as new_rows '
                       'for each statement execute function peer._capture_changes(%s)',
                       trigger_name || '_upd', relation, array_to_string(array(select quote_literal(c) from unnest(key_columns) c), ', '));
        execute format('create trigger %I after delete on %s referencing old table as old_rows '
                       'for each statement execute function peer._capture_changes(%s)',
                       trigger_name || '_del', relation, array_to_string(array(select quote_literal(c) from unnest(key_columns) c), ', '));
        execute format('create trigger %I before truncate on %s for each statement execute function peer._refuse_truncate()',
                       trigger_name || '_trunc', relation);
    end if;
end
$$;
comment on function peer.publish(regclass, text, text[], text) is
    'send every committed change of a table (with a primary key) to a friend: all columns or some, all rows or those row_filter selects';

create or replace function peer.unpublish(relation regclass, friend text) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    trigger_name text := format('aquapeer_replicate_%s', relation::oid);
    suffix text;
begin
    delete from peer.publication p where p.relation = unpublish.relation and p.friend = unpublish.friend;
    if not found then
        return false;
    end if;
    if not exists (select from peer.publication p where p.friend = unpublish.friend) then
        delete from peer.topic_grant g where g.topic = 'aquapeer.copy' and g.friend = unpublish.friend;
        delete from peer.exposed_function e where e.name = 'aquapeer.row_hashes' and e.friend = unpublish.friend;
    end if;
    if not exists (select from peer.publication p where p.relation = unpublish.relation) then
        foreach suffix in array array['_ins', '_upd', '_del', '_trunc'] loop
            execute format('drop trigger if exists %I on %s', trigger_name || suffix, relation);
        end loop;
    end if;
    return true;
end
$$;
comment on function peer.unpublish(regclass, text) is 'stop sending a table''s changes to a friend (what is queued still goes)';

-- Subscribing ----------------------------------------------------------------
create or replace function peer.subscribe(relation regclass, friend text, initial boolean default true) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._friend_for_sending(friend);
begin
    insert into peer.subscription (relation, friend, key_columns, state)
    values (relation, f.name, peer._key_columns(relation), case when initial then 'initializing' else 'streaming' end)
    on conflict on constraint subscription_pkey do nothing;
    if not found then
        raise exception '% is already subscribed from "%"', relation, friend using errcode = '42710',
            hint = 'peer.unsubscribe() it first to subscribe anew.';
    end if;
    insert into peer.topic_grant values ('aquapeer.changes', f.name) on conflict do nothing;
    if initial then
        perform peer._start_copy(relation, f.name);  -- sql/idempotent/210-replication_copy.sql
    end if;
end
$$;
comment on function peer.subscribe(regclass, text, boolean) is
    'apply a friend''s changes to a local table of the same name; initial: copy the friend''s rows first';

create or replace function peer.unsubscribe(relation regclass, friend text) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    delete from peer.subscription s where s.relation = unsubscribe.relation and s.friend = unsubscribe.friend;
    if not found then
        return false;
    end if;
    if not exists (select from peer.subscription s where s.friend = unsubscribe.friend) then
        delete from peer.topic_grant g where g.topic = 'aquapeer.changes' and g.friend = unsubscribe.friend;
    end if;
    return true;
end
$$;
comment on function peer.unsubscribe(regclass, text) is 'stop applying a friend''s changes to a table';

-- Applying -------------------------------------------------------------------
-- The executor applying a friend's changes runs as the friend's role (so GRANT and row-level
-- security decide what it may change); these definer functions keep the books it may not
-- write itself, and only for the friend it runs as.
create or replace function peer._applying_friend(friend text) returns peer.friend
language plpgsql stable security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend;
begin
    perform peer._executor_nonce();
    select * into f from peer.friend p where p.name = _applying_friend.friend and p.role = session_user;
    if not found then
        raise exception 'this session does not apply changes of "%"', friend using errcode = '42501';
    end if;
    return f;
end
$$;
comment on function peer._applying_friend(text) is 'the friend an executor applies changes of; refused in any other session';

-- The messages of changes a friend sent that are not applied yet, up to an inbox position, marked
-- handled: the handler of the last one applies them all (messaging runs only that one).
create or replace function peer._pending_changes(friend text, upto bigint)
returns table (id uuid, "position" bigint, rows integer, ends boolean)
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with seen as (
        update peer.inbox i set handled_at = coalesce(i.handled_at, now())
        where i.friend = (peer._applying_friend(_pending_changes.friend)).name and i.topic = 'aquapeer.changes'
          and i.position <= upto
        returning i.id, i.position, jsonb_array_length(i.payload -> 'rows') as rows,
                  coalesce((i.payload ->> 'end')::boolean, true) as ends
    )
    select * from seen order by position
$$;
comment on function peer._pending_changes(text, bigint) is 'the messages of changes a friend sent that are not applied yet';

create or replace function peer._change_messages(friend text, ids uuid[]) returns setof jsonb
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select i.payload from peer.inbox i
    where i.id = any (ids) and i.friend = (peer._applying_friend(_change_messages.friend)).name
    order by i.position
$$;
comment on function peer._change_messages(text, uuid[]) is 'the payloads of messages of changes a friend sent, in order';

create or replace function peer._subscribed(friend text, relation_name text)
returns table (relation regclass, key_columns name[], state text)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select s.relation, s.key_columns, s.state from peer.subscription s
    where s.friend = (peer._applying_friend(_subscribed.friend)).name and peer._relation_name(s.relation) = relation_name
$$;
comment on function peer._subscribed(text, text) is 'the local table subscribed from the friend an executor applies changes of, by the name the friend sent';

create or replace function peer._row_states(friend text, relation regclass, keys jsonb)
returns table (key jsonb, columns jsonb, born jsonb, deleted jsonb, waiting bigint)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with waiting as (
        select e.key, min(e.id) as id from peer.apply_errors e
        where e.relation = peer._relation_name(_row_states.relation)
          and e.friend = (peer._applying_friend(_row_states.friend)).name
        group by e.key
    )
    select k.key, c.columns, c.born, c.deleted, w.id
    from peer._applying_friend(_row_states.friend) f
    cross join jsonb_array_elements(keys) k(key)
    left join peer.row_clock c on c.relation = _row_states.relation and c.key = k.key
    left join waiting w on w.key = k.key
$$;
comment on function peer._row_states(text, regclass, jsonb) is 'the stamps and waiting apply errors of the keys a friend''s changes touch';

-- Before the rows are written: the new stamps, the conflicts resolved, and what the capture
-- trigger forwards to other friends (pg_temp.aquapeer_applying).
create or replace function peer._record_apply(friend text, relation regclass, states jsonb, conflicts jsonb,
                                              forward jsonb, newest bigint) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._applying_friend(friend);
    skew interval := (select max_clock_skew from peer.config);
begin
    if newest is not null and to_timestamp((newest >> 16) / 1000.0) > clock_timestamp() + skew then
        raise exception 'a change from "%" is stamped %, further ahead of this server''s time than % (peer.config.max_clock_skew)',
            f.name, to_timestamp((newest >> 16) / 1000.0), skew
            using errcode = '22008', hint = 'Fix the clock of the friend''s server (or of this one).';
    end if;
    if newest is not null then
        perform peer._clock_tick(newest);
    end if;
    insert into peer.row_clock as k (relation, key, columns, born, deleted, deleted_at)
    select _record_apply.relation, s.key, coalesce(s.columns, '{}'), s.born, s.deleted,
           case when s.deleted is not null then now() end
    from jsonb_to_recordset(states) as s(key jsonb, columns jsonb, born jsonb, deleted jsonb)
    on conflict on constraint row_clock_pkey do update
        set columns = excluded.columns, born = excluded.born, deleted = excluded.deleted,
            deleted_at = case when excluded.deleted is null then null
                              when excluded.deleted = k.deleted then k.deleted_at else now() end;
    insert into peer.replication_conflicts (relation, key, "column", local_value, local_clock, local_origin,
                                            remote_value, remote_clock, remote_origin, winner)
    select _record_apply.relation, c.key, c."column", c.local_value, c.local_clock, c.local_origin,
           c.remote_value, c.remote_clock, c.remote_origin, c.winner
    from jsonb_to_recordset(conflicts) as c(key jsonb, "column" text, local_value jsonb, local_clock bigint,
                                            local_origin text, remote_value jsonb, remote_clock bigint,
                                            remote_origin text, winner text);
    -- only a table published to friends has a capture trigger to forward them
    if exists (select from peer.publication p where p.relation = _record_apply.relation) then
        create temporary table if not exists aquapeer_applying (
            relation oid, key jsonb, clock bigint, origin text, from_peer text) on commit delete rows;
        delete from pg_temp.aquapeer_applying;
        insert into pg_temp.aquapeer_applying
        select _record_apply.relation, a.key, a.clock, a.origin, f.peer_id
        from jsonb_to_recordset(forward) as a(key jsonb, clock bigint, origin text);
    end if;
    perform set_config('peer.applying_from', f.peer_id, true);
end
$$;
comment on function peer._record_apply(text, regclass, jsonb, jsonb, jsonb, bigint) is
    'record the stamps and conflicts of changes a friend sent, before they are written';

create or replace function peer._set_aside(friend text, relation_name text, changes jsonb, sqlstate text, reason text)
returns void
language sql security definer set search_path = pg_catalog, pg_temp as $$
    insert into peer.apply_errors (relation, friend, key, change, sqlstate, reason)
    select relation_name, (peer._applying_friend(_set_aside.friend)).name, c -> 'k', c, sqlstate, reason
    from jsonb_array_elements(changes) c
$$;
comment on function peer._set_aside(text, text, jsonb, text, text) is 'keep changes that could not be applied, with the reason';

create or replace function peer._applied(friend text, ids uuid[], tally jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._applying_friend(friend);
begin
    delete from peer.inbox i where i.id = any (ids) and i.friend = f.name;
    update peer.subscription s
    set applied_changes = s.applied_changes + t.applied, conflicts_resolved = s.conflicts_resolved + t.conflicts,
        last_applied_clock = greatest(s.last_applied_clock, t.clock), last_applied_at = now(),
        last_change_at = coalesce(t.sent_at, s.last_change_at),
        state = case when s.state = 'initializing' and not t.copied then s.state else 'streaming' end,
        last_error = null
    from jsonb_to_recordset(tally) as t(relation text, applied bigint, conflicts bigint, clock bigint,
                                         sent_at timestamptz, copied boolean)
    where s.friend = f.name and peer._relation_name(s.relation) = t.relation;
end
$$;
comment on function peer._applied(text, uuid[], jsonb) is 'a friend''s transaction is applied: its messages go, the subscriptions move on';

create or replace function peer._pause_subscription(friend text, relation_name text, reason text) returns void
language sql security definer set search_path = pg_catalog, pg_temp as $$
    update peer.subscription s set state = 'paused', last_error = reason
    where s.friend = (peer._applying_friend(_pause_subscription.friend)).name and peer._relation_name(s.relation) = relation_name
$$;
comment on function peer._pause_subscription(text, text, text) is 'stop applying a friend''s changes to a table until what stops them is fixed';

create or replace function peer._apply_changes(m peer.inbox) returns void
language plpython3u set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].apply_changes(m["friend"], m["position"])
$$;
comment on function peer._apply_changes(peer.inbox) is
    'the handler of topic aquapeer.changes: applies the friend''s complete transactions received so far, as the friend''s role';

insert into peer.message_handler values ('aquapeer.changes', 'peer._apply_changes(peer.inbox)'::regprocedure)
    on conflict (topic) do update set handler = excluded.handler;

-- Settling apply errors ------------------------------------------------------
-- Retrying queues the change (and every later one set aside for its key) as a message from the
-- friend again, applied in order behind what is pending.
create or replace function peer.retry_apply(id bigint) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    e peer.apply_errors;
begin
    select * into e from peer.apply_errors a where a.id = retry_apply.id;
    if not found then
        return false;
    end if;
    with gone as (
        delete from peer.apply_errors a
        where a.relation = e.relation and a.friend = e.friend and a.key = e.key
        returning a.id, a.change
    )
    insert into peer.inbox (id, friend, topic, payload, sent_at, handler)
    select gen_random_uuid(), e.friend, 'aquapeer.changes',
           jsonb_build_object('r', e.relation, 'rows', jsonb_agg(g.change order by g.id), 'end', true, 'c', 0, 'o', ''),
           now(), 'peer._apply_changes(peer.inbox)'::regprocedure
    from gone g;
    perform peer._wake_at_commit();
    return true;
end
$$;
comment on function peer.retry_apply(bigint) is 'apply a change set aside in peer.apply_errors again (with the later ones for its key)';

create or replace function peer.discard_apply(id bigint) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.apply_errors a where a.id = discard_apply.id returning 1)
    select exists (select from gone)
$$;
comment on function peer.discard_apply(bigint) is 'drop a change set aside in peer.apply_errors: the local row stays as it is';

-- Views ----------------------------------------------------------------------
create or replace view peer.publications as
    select p.relation, p.friend, p.columns, p.row_filter,
           coalesce(q.changes, 0) as changes_queued, q.oldest as oldest_unacknowledged
    from peer.publication p
    left join lateral (
        select sum(jsonb_array_length(m.payload -> 'rows')) as changes, min(m.created_at) as oldest
        from peer.outbox_message m left join peer.outbox_stream s on s.peer_id = m.peer_id
        where m.friend = p.friend and m.topic = 'aquapeer.changes' and m.final_state is null
          and m.payload ->> 'r' = peer._relation_name(p.relation)
          and (m.seq is null or m.epoch is distinct from s.epoch or m.seq > s.acked_upto)) q on true;
comment on view peer.publications is 'tables sent to friends, with the changes the friend has not acknowledged yet';

create or replace view peer.subscriptions as
    select s.relation, s.friend,
           -- initializing (or resyncing) until the copy's last chunk is applied, also if it paused meanwhile
           case when s.copy_started_at is null or s.copy_finished_at is not null or s.state <> 'streaming' then s.state
                when s.copy_kind = 'resync' then 'resyncing' else 'initializing' end as state,
           s.last_error,
           coalesce(q.changes, 0) as lag_changes,
           case when q.oldest is null then 0
                else (extract(epoch from clock_timestamp() - q.oldest) * 1000)::bigint end as lag_ms,
           s.last_applied_clock, s.last_applied_at, s.applied_changes, s.conflicts_resolved,
           (select count(*) from peer.apply_errors e
            where e.friend = s.friend and e.relation = peer._relation_name(s.relation)) as apply_errors
    from peer.subscription s
    left join lateral (
        select sum(jsonb_array_length(i.payload -> 'rows')) as changes, min(i.sent_at) as oldest
        from peer.inbox i
        where i.friend = s.friend and i.topic = 'aquapeer.changes'
          and i.payload ->> 'r' = peer._relation_name(s.relation)) q on true;
comment on view peer.subscriptions is 'tables taken from friends: state, lag, what was applied, conflicts and errors';

-- Verifying ------------------------------------------------------------------
-- A table's published rows as {key text: row hash}, under the settings that make a column's
-- text the same on any server (bundle._row_hashes's): what peer.verify_subscription compares.
create or replace function peer._row_hashes(relation regclass, key_columns name[], columns name[], row_filter text)
returns table (key jsonb, hash text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set lc_monetary = 'C' set jit = off
as $$
begin
    return query execute format(
        'select jsonb_build_object(%s), bundle._hash(%s::text) from only %s r where (%s)',
        (select string_agg(format('%L, r.%I', k, k), ', ') from unnest(key_columns) k),
        format('(select jsonb_object_agg(e.key, e.value) from jsonb_each(to_jsonb(r.*)) e where e.key = any (%L))',
               columns),
        relation, coalesce(row_filter, 'true'));
end
$$;
comment on function peer._row_hashes(regclass, name[], name[], text) is 'the key and hash of each row a publication sends';

-- Exposed to each friend a table is published to (as aquapeer.row_hashes): the hashes of the
-- rows it is sent.  Only in an executor running a friend's call (peer.caller).
create or replace function peer._published_row_hashes(arg jsonb) returns jsonb
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    p peer.publication;
    columns name[];
begin
    perform peer._executor_nonce();
    select * into p from peer.publication
    where friend = current_setting('peer.caller', true) and peer._relation_name(relation) = arg ->> 'relation';
    if not found then
        raise exception '% is not published to you', arg ->> 'relation' using errcode = '42501';
    end if;
    columns := coalesce(p.columns, (select array_agg(a.attname) from pg_attribute a
                                    where a.attrelid = p.relation and a.attnum > 0 and not a.attisdropped));
    return jsonb_build_object(
        'columns', columns,
        'hashes', (select coalesce(jsonb_object_agg(h.key::text, h.hash), '{}')
                   from peer._row_hashes(p.relation, p.key_columns, columns, p.row_filter) h));
end
$$;
comment on function peer._published_row_hashes(jsonb) is 'the row hashes of a table published to the calling friend';

create or replace function peer.verify_subscription(relation regclass, friend text)
returns table (key jsonb, difference text)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    s peer.subscription;
    theirs jsonb;
begin
    select * into s from peer.subscription x where x.relation = verify_subscription.relation and x.friend = verify_subscription.friend;
    if not found then
        raise exception '% is not subscribed from "%"', relation, friend using errcode = '42704',
            hint = 'See select * from peer.subscriptions.';
    end if;
    theirs := peer.call(friend, 'aquapeer.row_hashes', jsonb_build_object('relation', peer._relation_name(relation)));
    -- hashed over the columns the friend sends, here as there
    return query
        with mine as (
            select h.key::text as k, h.key, h.hash
            from peer._row_hashes(relation, s.key_columns, array(select jsonb_array_elements_text(theirs -> 'columns'))::name[],
                                  null) h
        ), remote as (
            select t.key as k, t.value #>> '{}' as hash from jsonb_each(theirs -> 'hashes') t
        )
        select coalesce(m.key, r.k::jsonb),
               case when m.k is null then 'missing here' when r.k is null then 'not at the friend' else 'differs' end
        from mine m full join remote r on r.k = m.k
        where m.hash is distinct from r.hash;
end
$$;
comment on function peer.verify_subscription(regclass, text) is
    'compare a subscribed table with the friend''s by row hashes: the keys that differ, and how';
