-- Copies of a subscribed table, in chunks the subscriber asks for one at a time from its
-- checkpoint: the initial copy, and the re-sync of the rows that differ once changes were
-- dropped (docs/replication.md, "Initial copy" and "Re-sync").

comment on table peer.change_ahead_of_copy is
    'changes to rows a copy has not brought yet, applied right after it brings them';
comment on column peer.config.copy_chunk_rows is 'rows of a published table read and sent together, in one snapshot, when a friend copies it';
comment on column peer.config.change_retention is
    'changes wait this long for a friend that does not take them; then they are dropped and the friend re-syncs by row hashes';
comment on table peer.resync_key is 'the keys a re-sync of a subscription still has to copy from the friend';

-- Subscriber: ask for the next chunk of a copy from its checkpoint (copy_after): the rows after
-- that key, or for a re-sync the next keys to copy after that peer.resync_key id.  False when a
-- re-sync has no keys left.
create or replace function peer._ask_copy_chunk(s peer.subscription) returns boolean
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    request jsonb := jsonb_build_object('r', peer._relation_name(s.relation), 'copy_id', s.copy_id, 'after', s.copy_after);
    keys jsonb;
    upto bigint;
begin
    if s.copy_kind = 'resync' then
        select jsonb_agg(k.key order by k.id), max(k.id) into keys, upto
        from (select r.id, r.key from peer.resync_key r
              where r.relation = s.relation and r.friend = s.friend and r.id > coalesce((s.copy_after)::bigint, 0)
              order by r.id limit (select copy_chunk_rows from peer.config)) k;
        if keys is null then
            return false;
        end if;
        request := request || jsonb_build_object('keys', keys, 'upto', upto);
    end if;
    update peer.subscription x set copy_request = peer.send(s.friend, 'aquapeer.copy', request)
    where x.relation = s.relation and x.friend = s.friend;
    return true;
end
$$;
comment on function peer._ask_copy_chunk(peer.subscription) is 'ask the friend for the next chunk of a copy, from its checkpoint';

-- Subscriber, run by the worker every few seconds (replication/resume.py): a copy whose last
-- request the friend stored more than twice the handler timeout ago, with no chunk of it here,
-- asks again from its checkpoint (the friend's handler failed on the request, say, as its
-- server stopped).  Should both chunks come, the second moves no checkpoint.
create or replace function peer._ask_stalled_copies() returns integer
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    s peer.subscription;
    asked integer := 0;
begin
    for s in
        select x.* from peer.subscription x
        join peer.outbox_message m on m.id = x.copy_request
        left join peer.outbox_stream st on st.peer_id = m.peer_id
        where x.copy_started_at is not null and x.copy_finished_at is null
          and (m.final_state = 'acked' or (m.final_state is null and m.epoch = st.epoch and m.seq <= st.acked_upto))
          and m.created_at < now() - 2 * (select handler_timeout from peer.config)
          and not exists (select from peer.inbox i
                          where i.friend = x.friend and i.topic = 'aquapeer.changes'
                            and i.payload ->> 'copy_id' = x.copy_id::text)
        for update of x skip locked
    loop
        perform peer._ask_copy_chunk(s);
        asked := asked + 1;
    end loop;
    return asked;
end
$$;
comment on function peer._ask_stalled_copies() is 'ask again for the chunk a copy waits for when the friend has not answered its request';

-- Subscriber: a new copy from the first row (peer.subscribe).
create or replace function peer._start_copy(relation regclass, friend text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    s peer.subscription;
begin
    update peer.subscription x
    set copy_kind = 'initial', copy_id = gen_random_uuid(), copy_after = null, copy_rows = 0, copy_chunks = 0,
        copy_rows_estimate = null, copy_started_at = now(), copy_finished_at = null
    where x.relation = _start_copy.relation and x.friend = _start_copy.friend
    returning * into s;
    perform peer._ask_copy_chunk(s);
end
$$;
comment on function peer._start_copy(regclass, text) is 'ask the friend for the first chunk of a subscribed table''s rows';

-- Publisher: the chunk a friend asks for (request: copy_id, after, and for a re-sync the keys and
-- upto), queued to it as inserts stamped with their column stamps (or 0, so that any change wins
-- over them), 1,000 a message.  The last message carries the chunk's marker, returned too: the
-- request's after, the last key (for a re-sync its upto), whether it is the last chunk, and the
-- planner's estimate of all the rows.  An initial copy reads copy_chunk_rows rows after key
-- "after" (null: from the first) in key order: keyset pagination, one index range scan
-- whatever the table's size.
create or replace function peer._queue_copy_chunk(p peer.publication, f peer.friend, request jsonb)
returns jsonb
language plpgsql set search_path = pg_catalog, pg_temp set extra_float_digits = 1 set jit = off as $$
declare
    after jsonb := nullif(request->'after', 'null');
    keys jsonb := request->'keys';
    key_list text := (select string_agg(format('r.%I', k), ', ' order by n)
                      from unnest(p.key_columns) with ordinality k(k, n));
    after_list text := (select string_agg(format('a.%I', k), ', ' order by n)
                        from unnest(p.key_columns) with ordinality k(k, n));
    plan jsonb;
    marker jsonb;
begin
    if keys is null then
        execute format('explain (format json) select from only %s r where (%s)', p.relation,
                       coalesce(p.row_filter, 'true'))
            into plan;
    end if;
    execute format($q$
        with chunk as materialized (
            select jsonb_build_object(%1$s) as key, to_jsonb(r.*) - %2$L::text[] as v,
                   row_number() over (order by %3$s) as n
            from (select * from only %4$s r where (%5$s) and %6$s order by %3$s limit $1 + 1) r
        ), sent as (
            select c.n, c.key, jsonb_build_object('op', 'I', 'k', c.key, 'v', c.v, 'stamps', k.columns) as change
            from chunk c left join peer.row_clock k on k.relation = %7$s and k.key = c.key
            where c.n <= $1
        ), marker as (
            select jsonb_build_object('copy_id', $7, 'after', $2,
                                      'upto', coalesce($10, (select s.key from sent s order by s.n desc limit 1)),
                                      'rows', (select count(*) from sent),
                                      'done', $9 is null and (select count(*) from chunk) <= $1,
                                      'estimate', $3) as chunk
        ), parts as (
            select (s.n - 1) / 1000 as part, jsonb_agg(s.change order by s.n) as rows from sent s group by 1
            union all
            -- an empty table (or the end of one) still says so
            select 0, '[]' where not exists (select from sent)
        ), queued as (
            insert into peer.outbox_message (peer_id, friend, topic, payload, bytes)
            select $4, $5, 'aquapeer.changes', payload, octet_length(payload::text)
            from (select x.part,
                         jsonb_build_object('r', $6, 'copy', true, 'copy_id', $7, 'c', 0, 'o', $8, 'rows', x.rows)
                         || case when x.part = max(x.part) over () then jsonb_build_object('chunk', m.chunk)
                                 else '{}' end as payload
                  from parts x cross join marker m) y
            order by part
        )
        select chunk from marker$q$,
        (select string_agg(format('%L, r.%I', k, k), ', ') from unnest(p.key_columns) k),
        coalesce((select array_agg(a.attname::text) from pg_attribute a
                  where a.attrelid = p.relation and a.attnum > 0 and not a.attisdropped
                    and a.attname <> all (p.columns)), '{}'),
        key_list, p.relation, coalesce(p.row_filter, 'true'),
        case when keys is not null
             then format('(%s) in (select %s from jsonb_populate_recordset(null::%s, $9) a)', key_list, after_list, p.relation)
             when after is null then 'true'
             else format('(%s) > (select %s from jsonb_populate_record(null::%s, $2) a)', key_list, after_list, p.relation) end,
        p.relation::oid)
    into marker
    using coalesce(jsonb_array_length(keys), (select copy_chunk_rows from peer.config)), after,
          (plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint, f.peer_id, f.name, peer._relation_name(p.relation),
          (request->>'copy_id')::uuid, (select peer_id from peer.identity), keys, request->'upto';
    return marker;
end
$$;
comment on function peer._queue_copy_chunk(peer.publication, peer.friend, jsonb) is
    'queue the chunk of a published table''s rows a friend copying it asked for';

-- The handler of topic aquapeer.copy, on the publisher: one chunk per request, each in this
-- transaction's snapshot of its own.
create or replace function peer._copy_rows(m peer.inbox) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    p peer.publication;
    f peer.friend;
    marker jsonb := '{"done": false}';
begin
    perform peer._executor_nonce();
    select * into f from peer.friend where name = m.friend;
    select * into p from peer.publication where friend = m.friend and peer._relation_name(relation) = m.payload->>'r';
    if not found then
        raise exception '% is not published to "%"', m.payload->>'r', m.friend using errcode = '42501';
    end if;
    if m.payload ? 'after' then
        perform peer._queue_copy_chunk(p, f, m.payload);
    else
        -- a friend of 0.20.0 asks for every row at once, and asks no more
        while not (marker->>'done')::boolean loop
            marker := peer._queue_copy_chunk(p, f, jsonb_build_object('after', marker->'upto'));
        end loop;
    end if;
    delete from peer.inbox i where i.id = m.id;  -- served: one request a chunk would pile up
    perform peer._wake_at_commit();
end
$$;
comment on function peer._copy_rows(peer.inbox) is
    'the handler of topic aquapeer.copy: queue the next chunk of a published table''s rows to the friend copying it';

insert into peer.message_handler values ('aquapeer.copy', 'peer._copy_rows(peer.inbox)'::regprocedure)
    on conflict (topic) do update set handler = excluded.handler;

-- Subscriber, in the executor applying the friend's changes, in the transaction that applied
-- the chunk: the checkpoint moves on, and the next chunk is asked for or the copy is done.  A
-- chunk of another copy, or asked for twice, moves nothing: its rows were applied like any copy's.
-- A friend of 0.20.0 sends its whole copy at once, without a marker (chunk {"rows": n}).
create or replace function peer._copy_chunk_applied(friend text, relation_name text, chunk jsonb) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._applying_friend(friend);
    s peer.subscription;
    done boolean := coalesce((chunk->>'done')::boolean, true);
begin
    update peer.subscription x
    set copy_after = nullif(chunk->'upto', 'null'), copy_rows = x.copy_rows + (chunk->>'rows')::bigint,
        copy_chunks = x.copy_chunks + 1, copy_rows_estimate = coalesce((chunk->>'estimate')::bigint, x.copy_rows_estimate)
    where x.friend = f.name and peer._relation_name(x.relation) = relation_name and x.copy_finished_at is null
      and (not chunk ? 'after'
           or (x.copy_id = (chunk->>'copy_id')::uuid and x.copy_after is not distinct from nullif(chunk->'after', 'null')))
    returning * into s;
    if not found then
        return false;
    end if;
    if s.copy_kind = 'resync' then
        delete from peer.resync_key r where r.relation = s.relation and r.friend = s.friend and r.id <= (s.copy_after)::bigint;
        done := not peer._ask_copy_chunk(s);
    elsif not done then
        perform peer._ask_copy_chunk(s);
    end if;
    if done then
        update peer.subscription x
        set copy_finished_at = now(), state = case when x.state = 'initializing' then 'streaming' else x.state end
        where x.relation = s.relation and x.friend = s.friend;
        -- what still waits for a row the copy did not bring updates nothing
        delete from peer.change_ahead_of_copy c where c.relation = s.relation and c.friend = s.friend;
    end if;
    return done;
end
$$;
comment on function peer._copy_chunk_applied(text, text, jsonb) is
    'a chunk of a copy is applied: move its checkpoint and ask for the next chunk, or end the copy';

create or replace function peer._copy_in_progress(friend text, relation_name text) returns boolean
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select exists (select from peer.subscription s
                   where s.friend = (peer._applying_friend(_copy_in_progress.friend)).name
                     and peer._relation_name(s.relation) = relation_name
                     and s.copy_started_at is not null and s.copy_finished_at is null)
$$;
comment on function peer._copy_in_progress(text, text) is 'whether a copy of a table subscribed from the friend an executor applies changes of is running';

create or replace function peer._hold_changes(friend text, relation regclass, changes jsonb) returns void
language sql security definer set search_path = pg_catalog, pg_temp as $$
    insert into peer.change_ahead_of_copy (relation, friend, key, change)
    select relation, (peer._applying_friend(_hold_changes.friend)).name, c.change -> 'k', c.change
    from jsonb_array_elements(changes) with ordinality c(change, n)
    order by c.n
$$;
comment on function peer._hold_changes(text, regclass, jsonb) is 'keep changes to rows the copy has not brought yet, until it brings them';

create or replace function peer._take_held_changes(friend text, relation regclass, keys jsonb) returns setof jsonb
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with taken as (
        delete from peer.change_ahead_of_copy h
        where h.relation = _take_held_changes.relation and h.friend = (peer._applying_friend(_take_held_changes.friend)).name
          and h.key in (select jsonb_array_elements(keys))
        returning h.id, h.change
    )
    select change from taken order by id
$$;
comment on function peer._take_held_changes(text, regclass, jsonb) is
    'the changes kept for rows the copy has just brought, in the order they came; they are kept no more';

-- Re-sync -------------------------------------------------------------------------------------
-- Publisher, run by the outbox's retention: changes of a table that waited for a friend longer
-- than peer.config.change_retention are dropped.  Every friend whose changes of a table were
-- dropped in this transaction (here, or by the outbox's own bounds just before) is told to
-- re-sync it, on the change stream: after what was dropped, before what comes next.
create or replace function peer._expire_changes() returns table (friend text, n bigint, reason text)
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    return query
        with expired as (
            update peer.outbox_message m
            set final_state = 'expired', finished_at = clock_timestamp(),
                reason = format('not acknowledged within %s (peer.config.change_retention): the friend re-syncs by row hashes',
                                c.change_retention)
            from peer.config c
            where m.topic = 'aquapeer.changes' and m.final_state is null and m.created_at < now() - c.change_retention
              and not exists (select from peer.outbox_stream s
                              where s.peer_id = m.peer_id and s.epoch = m.epoch and m.seq <= s.acked_upto)
            returning m.friend, m.reason
        )
        select e.friend, count(*), min(e.reason) from expired e group by e.friend;
    insert into peer.outbox_message (peer_id, friend, topic, payload, bytes)
    select d.peer_id, d.friend, 'aquapeer.changes', x.payload, octet_length(x.payload::text)
    from (select distinct m.peer_id, m.friend, m.payload ->> 'r' as relation_name
          from peer.outbox_message m
          where m.topic = 'aquapeer.changes' and m.final_state = 'expired' and m.finished_at >= now()
            and exists (select from peer.publication p
                        where p.friend = m.friend and peer._relation_name(p.relation) = m.payload ->> 'r')) d
    cross join lateral (select jsonb_build_object('r', d.relation_name, 'resync', true, 'c', 0,
                                                  'o', (select peer_id from peer.identity), 'rows', '[]'::jsonb) as payload) x;
    perform peer._wake_at_commit();
end
$$;
comment on function peer._expire_changes() is
    'drop the changes that waited for a friend longer than peer.config.change_retention, and tell the friend to re-sync';

-- Subscriber, in the executor applying the friend's changes, when the friend says changes were
-- dropped: compare the table with the friend's by row hashes (aquapeer.row_hashes) and copy only
-- the rows that differ.  The stamps those rows had from friends are forgotten, so that the
-- friend's rows win over them as an initial copy's would (changes that come later win over the
-- copy by their stamps); stamps of this database's own writes stay.  Returns, as deletes stamped
-- 0, the rows the friend no longer has.
create or replace function peer._start_resync(friend text, relation_name text) returns setof jsonb
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._applying_friend(friend);
    s peer.subscription;
    here text := (select peer_id from peer.identity);
    theirs jsonb;
begin
    select * into s from peer.subscription x
    where x.friend = f.name and peer._relation_name(x.relation) = relation_name for update;
    if not found then
        return;
    end if;
    theirs := peer.call(f.name, 'aquapeer.row_hashes', jsonb_build_object('relation', relation_name));
    create temporary table if not exists aquapeer_resync_differs (key jsonb, not_at_friend boolean)
        on commit delete rows;
    delete from pg_temp.aquapeer_resync_differs;
    insert into pg_temp.aquapeer_resync_differs
    with mine as (
        select h.key::text as k, h.key, h.hash
        from peer._row_hashes(s.relation, s.key_columns,
                              array(select jsonb_array_elements_text(theirs -> 'columns'))::name[], null) h
    ), remote as (
        select t.key as k, t.value #>> '{}' as hash from jsonb_each(theirs -> 'hashes') t
    )
    select coalesce(m.key, r.k::jsonb), r.k is null
    from mine m full join remote r on r.k = m.k
    where m.hash is distinct from r.hash;
    update peer.row_clock k
    set columns = (select coalesce(jsonb_object_agg(c.key, c.value), '{}') from jsonb_each(k.columns) c
                   where c.value ->> 1 = here),
        born = case when k.born ->> 1 = here then k.born end,
        deleted = case when k.deleted ->> 1 = here then k.deleted end,
        deleted_at = case when k.deleted ->> 1 = here then k.deleted_at end
    from pg_temp.aquapeer_resync_differs d
    where k.relation = s.relation and k.key = d.key;
    delete from peer.resync_key r where r.relation = s.relation and r.friend = s.friend;
    delete from peer.change_ahead_of_copy c where c.relation = s.relation and c.friend = s.friend;
    insert into peer.resync_key (relation, friend, key)
    select s.relation, s.friend, d.key from pg_temp.aquapeer_resync_differs d where not d.not_at_friend order by d.key;
    update peer.subscription x
    set copy_kind = 'resync', copy_id = gen_random_uuid(), copy_after = null, copy_rows = 0, copy_chunks = 0,
        copy_rows_estimate = (select count(*) from pg_temp.aquapeer_resync_differs d where not d.not_at_friend),
        copy_started_at = now(), copy_finished_at = null
    where x.relation = s.relation and x.friend = s.friend
    returning * into s;
    if not peer._ask_copy_chunk(s) then
        update peer.subscription x set copy_finished_at = now() where x.relation = s.relation and x.friend = s.friend;
    end if;
    return query select jsonb_build_object('op', 'D', 'k', d.key, 'c', 0, 'o', f.peer_id)
                 from pg_temp.aquapeer_resync_differs d where d.not_at_friend;
end
$$;
comment on function peer._start_resync(text, text) is
    'start re-syncing a table subscribed from the friend an executor applies changes of: copy the rows that differ';
