-- The initial copy of a subscription, in chunks the subscriber asks for one at a time from its
-- checkpoint (docs/replication.md, "Initial copy").

comment on table peer.change_ahead_of_copy is
    'changes to rows the initial copy has not brought yet, applied right after it brings them';
comment on column peer.config.copy_chunk_rows is 'rows of a published table read and sent together, in one snapshot, when a friend copies it';

-- Subscriber: a new copy from the first row (peer.subscribe).
create or replace function peer._start_copy(relation regclass, friend text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    new_copy_id uuid := gen_random_uuid();
begin
    update peer.subscription s
    set copy_id = new_copy_id, copy_after = null, copy_rows = 0, copy_chunks = 0, copy_rows_estimate = null,
        copy_started_at = now(), copy_finished_at = null
    where s.relation = _start_copy.relation and s.friend = _start_copy.friend;
    perform peer.send(friend, 'aquapeer.copy',
                      jsonb_build_object('r', peer._relation_name(relation), 'copy_id', new_copy_id, 'after', null));
end
$$;
comment on function peer._start_copy(regclass, text) is 'ask the friend for the first chunk of a subscribed table''s rows';

-- Publisher: the published rows after key "after" (null: from the first), chunk_rows of them in
-- key order, queued to the friend as inserts stamped with their column stamps (or 0, so that any
-- change wins over them), 1,000 a message; the last message carries the chunk's marker (the
-- last key, whether it is the last chunk, the publisher's estimate of all the rows), returned
-- too.  Keyset pagination: each chunk is one index range scan, whatever the table's size.
create or replace function peer._queue_copy_chunk(p peer.publication, f peer.friend, copy_id uuid, after jsonb)
returns jsonb
language plpgsql set search_path = pg_catalog, pg_temp set extra_float_digits = 1 set jit = off as $$
declare
    key_list text := (select string_agg(format('r.%I', k), ', ' order by n)
                      from unnest(p.key_columns) with ordinality k(k, n));
    plan jsonb;
    marker jsonb;
begin
    execute format('explain (format json) select from only %s r where (%s)', p.relation, coalesce(p.row_filter, 'true'))
        into plan;
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
            select jsonb_build_object('copy_id', $7, 'after', $2, 'upto', (select s.key from sent s order by s.n desc limit 1),
                                      'rows', (select count(*) from sent), 'done', (select count(*) from chunk) <= $1,
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
        case when after is null then 'true'
             else format('(%s) > (select %s from jsonb_populate_record(null::%s, $2) a)', key_list,
                         (select string_agg(format('a.%I', k), ', ' order by n)
                          from unnest(p.key_columns) with ordinality k(k, n)), p.relation) end,
        p.relation::oid)
    into marker
    using (select copy_chunk_rows from peer.config), after, (plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint,
          f.peer_id, f.name, peer._relation_name(p.relation), copy_id, (select peer_id from peer.identity);
    return marker;
end
$$;
comment on function peer._queue_copy_chunk(peer.publication, peer.friend, uuid, jsonb) is
    'queue the next chunk of a published table''s rows, after a key, to the friend copying it';

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
        perform peer._queue_copy_chunk(p, f, (m.payload->>'copy_id')::uuid, nullif(m.payload->'after', 'null'));
    else
        -- a friend of 0.20.0 asks for every row at once, and asks no more
        while not (marker->>'done')::boolean loop
            marker := peer._queue_copy_chunk(p, f, null, nullif(marker->'upto', 'null'));
        end loop;
    end if;
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
    select * into s from peer.subscription x
    where x.friend = f.name and peer._relation_name(x.relation) = relation_name and x.copy_finished_at is null
      and (not chunk ? 'after'
           or (x.copy_id = (chunk->>'copy_id')::uuid and x.copy_after is not distinct from nullif(chunk->'after', 'null')))
    for update;
    if not found then
        return false;
    end if;
    update peer.subscription x
    set copy_after = nullif(chunk->'upto', 'null'), copy_rows = x.copy_rows + (chunk->>'rows')::bigint,
        copy_chunks = x.copy_chunks + 1, copy_rows_estimate = coalesce((chunk->>'estimate')::bigint, x.copy_rows_estimate),
        copy_finished_at = case when done then now() end,
        state = case when done and x.state = 'initializing' then 'streaming' else x.state end
    where x.relation = s.relation and x.friend = s.friend;
    if done then
        -- what still waits for a row the copy did not bring updates nothing
        delete from peer.change_ahead_of_copy c where c.relation = s.relation and c.friend = s.friend;
    else
        perform peer.send(f.name, 'aquapeer.copy',
                          jsonb_build_object('r', relation_name, 'copy_id', s.copy_id, 'after', chunk->'upto'));
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
