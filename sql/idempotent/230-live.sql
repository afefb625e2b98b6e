-- Live rows: one row shared in real time with one friend (docs/live.md).  Its columns travel by
-- replication (per-column last writer wins), its text columns by Y.Text documents that merge by
-- characters (python/aquapeer/live/).

comment on table peer.live_share is 'rows shared live with a friend, or asked to be (peer.share_live), on both sides under one id';
comment on table peer.live_text is 'per live row and text column: the Y.Text document both sides merge, and its text';
comment on table peer.live_replication is 'the publication and subscription the live rows of a table with a friend set up, removed with the last';

-- Keys and columns -----------------------------------------------------------
-- A key as bundle.status shows it (the key columns' texts in key order) as {column: text}, which
-- jsonb_populate_record casts to the key's types.
create or replace function peer._live_key(relation regclass, key jsonb) returns jsonb
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    key_columns name[] := peer._key_columns(relation);
begin
    if jsonb_typeof(key) is distinct from 'array' or jsonb_array_length(key) <> cardinality(key_columns)
       or exists (select from jsonb_array_elements(key) e where jsonb_typeof(e) <> 'string') then
        raise exception 'key % does not name a row of %', coalesce(key::text, 'null'), relation using errcode = '22023',
            hint = format('Give the key as bundle.status shows it: a JSON array of the texts of (%s), in that order, like ''["42"]''.',
                          array_to_string(key_columns, ', '));
    end if;
    return (select jsonb_object_agg(k.name, key ->> (k.n - 1)::integer)
            from unnest(key_columns) with ordinality k(name, n));
end
$$;
comment on function peer._live_key(regclass, jsonb) is 'a key given as bundle.status shows it, as {column: text}; an error naming the form when it is not one';

-- The columns that merge by characters: text columns outside the key.
create or replace function peer._live_text_columns(relation regclass) returns name[]
language sql stable set search_path = pg_catalog, pg_temp as $$
    select coalesce(array_agg(a.attname order by a.attnum), '{}') from pg_attribute a
    where a.attrelid = relation and a.attnum > 0 and not a.attisdropped and a.atttypid = 'text'::regtype
      and a.attname <> all (peer._key_columns(relation))
$$;
comment on function peer._live_text_columns(regclass) is 'the columns of a table whose live rows merge by characters: text columns outside the key';

-- "t.k = k.k and ..." for a table t and a record k of it.
create or replace function peer._live_key_match(relation regclass) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select string_agg(format('t.%1$I = k.%1$I', c), ' and ') from unnest(peer._key_columns(relation)) c
$$;
comment on function peer._live_key_match(regclass) is 'the join condition of a table''s rows t with a record k on its key';

-- The query of the text cells of live rows whose value differs from their document's text:
-- [{share, column, value}] or null.  source: the rows to look at (alias n), the trigger's
-- transition table or one row; $1: one share or null for all.  Run where source is visible.
create or replace function peer._live_cells_query(relation regclass, source text) returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select format(
        'select jsonb_agg(jsonb_build_object(''share'', s.id, ''column'', c.name, ''value'', coalesce(c.value, '''')) '
        'order by s.id, c.name) '
        'from %s n join peer.live_share s on s.relation = %s and s.state = ''live'' and s.key = jsonb_build_array(%s) '
        'and ($1::uuid is null or s.id = $1::uuid) '
        'join peer.friend f on f.name = s.friend and f.state = ''accepted'' '
        'cross join lateral (values %s) c(name, value) '
        'join peer.live_text d on d.share = s.id and d."column" = c.name '
        'where coalesce(c.value, '''') <> d.value',
        source, relation::oid,
        (select string_agg(format('n.%I::text', k), ', ') from unnest(peer._key_columns(relation)) k),
        (select string_agg(format('(%L::name, n.%I)', t, t), ', ') from unnest(peer._live_text_columns(relation)) t))
$$;
comment on function peer._live_cells_query(regclass, text) is 'the query of the text cells of live rows that differ from their document''s text';

-- Documents ------------------------------------------------------------------
-- Local writes of text cells (the trigger's, or the row's value when a share goes live) as edits
-- of their documents, each queued to the friend on topic aquapeer.live in this transaction.
create or replace function peer._live_edits(cells jsonb) returns void
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].live_edits(cells)
$$;
comment on function peer._live_edits(jsonb) is 'local writes of live text cells as edits of their documents, queued to the friend';

-- A new share's documents, each holding the row's text: the base both sides start from.
create or replace function peer._live_documents(share uuid, "row" jsonb) returns jsonb
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].live_documents(share, row)
$$;
comment on function peer._live_documents(uuid, jsonb) is 'a new live share''s documents of its text columns, from the row; their states in base64';

-- Bring the documents of a share that just went live to the row's current text (edits made while
-- it was not live), queuing the edits.
create or replace function peer._live_sync(share uuid) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    s peer.live_share;
    cells jsonb;
begin
    select * into s from peer.live_share x where x.id = share;
    execute peer._live_cells_query(s.relation,
        format('(select t.* from only %s t join jsonb_populate_record(null::%s, $2) k on %s)',
               s.relation, s.relation, peer._live_key_match(s.relation)))
        into cells using share, peer._live_key(s.relation, s.key);
    if cells is not null then
        perform peer._live_edits(cells);
    end if;
end
$$;
comment on function peer._live_sync(uuid) is 'edits of a live share''s documents that bring them to the row''s current text';

-- The statement trigger of a table with live rows: changed text cells become edits, and any
-- update of a live row (here or applied from the friend) restarts its ttl.
create or replace function peer._live_capture() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    cells jsonb;
begin
    execute peer._live_cells_query(TG_RELID, 'new_rows') into cells using null::uuid;
    if cells is not null then
        perform peer._live_edits(cells);
    end if;
    execute format('update peer.live_share s set last_edit_at = now() from new_rows n '
                   'where s.relation = %s and s.state = ''live'' and s.key = jsonb_build_array(%s)',
                   TG_RELID, (select string_agg(format('n.%I::text', k), ', ') from unnest(peer._key_columns(TG_RELID)) k));
    return null;
end
$$;
comment on function peer._live_capture() is 'trigger of tables with live rows: their changed text cells become edits sent to the friend';

-- Replication of live rows ---------------------------------------------------------
create or replace function peer._live_check_publication(relation regclass, friend text) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    if exists (select from peer.publication p where p.relation = _live_check_publication.relation
                                               and p.friend = _live_check_publication.friend)
       and not exists (select from peer.live_replication r where r.relation = _live_check_publication.relation
                                                       and r.friend = _live_check_publication.friend) then
        raise exception '% is already published to "%", so its rows cannot be live with it', relation, friend
            using errcode = '55000',
                  hint = 'Live rows need the table''s publication to that friend for themselves (their text columns must not '
                         'also travel by last writer wins): peer.unpublish() it first.';
    end if;
end
$$;
comment on function peer._live_check_publication(regclass, text) is 'refuses live rows of a table the user publishes to the friend';

-- Make the live rows of a table with a friend flow, from all its live shares: a publication of
-- their keys (every column but the text columns, which merge by documents), a subscription if
-- there was none, the trigger while any row of the table is live; the last share to end
-- removes exactly what the first set up.
create or replace function peer._live_replicate(relation regclass, friend text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    key_columns name[] := peer._key_columns(relation);
    row_filter text;
    made peer.live_replication;
    trigger_name text := format('aquapeer_live_%s', relation::oid);
begin
    select string_agg('(' || (select string_agg(format('%I::text = %L', k.name, s.key ->> (k.n - 1)::integer), ' and ')
                              from unnest(key_columns) with ordinality k(name, n)) || ')', ' or ' order by s.id)
    into row_filter
    from peer.live_share s where s.relation = _live_replicate.relation and s.friend = _live_replicate.friend and s.state = 'live';
    select * into made from peer.live_replication r where r.relation = _live_replicate.relation and r.friend = _live_replicate.friend;
    if row_filter is null then
        if made is not null then
            perform peer.unpublish(relation, friend);
            if made.made_subscription then
                perform peer.unsubscribe(relation, friend);
            end if;
            delete from peer.live_replication r where r.relation = _live_replicate.relation and r.friend = _live_replicate.friend;
        end if;
    else
        if made is null then
            insert into peer.live_replication values (relation, friend,
                not exists (select from peer.subscription x where x.relation = _live_replicate.relation
                                                             and x.friend = _live_replicate.friend))
            returning * into made;
            if made.made_subscription then
                perform peer.subscribe(relation, friend, initial => false);
            end if;
        end if;
        perform peer.publish(relation, friend,
            columns => array(select a.attname::text from pg_attribute a
                             where a.attrelid = relation and a.attnum > 0 and not a.attisdropped
                               and a.attname <> all (peer._live_text_columns(relation))),
            row_filter => row_filter);
    end if;
    if not exists (select from peer.live_share s where s.relation = _live_replicate.relation and s.state = 'live') then
        execute format('drop trigger if exists %I on %s', trigger_name, relation);
    elsif not exists (select from pg_trigger where tgrelid = relation and tgname = trigger_name) then
        execute format('create trigger %I after update on %s referencing new table as new_rows '
                       'for each statement execute function peer._live_capture()', trigger_name, relation);
    end if;
end
$$;
comment on function peer._live_replicate(regclass, text) is
    'make the live rows of a table flow to and from a friend, from its live shares (set up, rebuilt, or removed with the last)';

-- Whoever ends a share (peer.end_live, the friend, expiry) takes the table's lock first, as
-- its writers do before they touch the share (in the trigger): never the other way round.
create or replace function peer._live_end(share uuid, reason text, tell boolean) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    s peer.live_share;
begin
    select * into s from peer.live_share x where x.id = share;
    if not found or s.state = 'ended' then
        return false;
    end if;
    execute format('lock table %s in share row exclusive mode', s.relation);
    update peer.live_share x set state = 'ended', ended_at = now(), ended_reason = reason
    where x.id = share and x.state <> 'ended';
    if not found then
        return false;
    end if;
    delete from peer.live_text d where d.share = _live_end.share;
    perform peer._live_replicate(s.relation, s.friend);
    if tell and exists (select from peer.friend f where f.name = s.friend and f.state = 'accepted') then
        perform peer.send(s.friend, 'aquapeer.live', jsonb_build_object('op', 'end', 'id', share, 'reason', reason));
    end if;
    return true;
end
$$;
comment on function peer._live_end(uuid, text, boolean) is 'end a live share (or a request) with a reason: its replication goes; tell: the friend is told';

-- The user's side ---------------------------------------------------------------
create or replace function peer.share_live(rel regclass, key jsonb, friend text, ttl interval default '10 min')
returns uuid
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._friend_for_sending(friend);
    key_object jsonb := peer._live_key(rel, key);
    share uuid := gen_random_uuid();
    the_row jsonb;
begin
    if ttl is null or ttl <= '0'::interval then
        raise exception 'ttl must be positive, not %', coalesce(ttl::text, 'null') using errcode = '22023',
            hint = 'It is how long the row stays live without an edit, like ''10 min''.';
    end if;
    execute format('select to_jsonb(t) from only %s t join jsonb_populate_record(null::%s, $1) k on %s',
                   rel, rel, peer._live_key_match(rel))
        into the_row using key_object;
    if the_row is null then
        raise exception 'no row of % has the key %', rel, key using errcode = 'P0002',
            hint = 'Give the key as bundle.status shows it: the key columns'' texts in key order.';
    end if;
    perform peer._live_check_publication(rel, f.name);
    if exists (select from peer.live_share s where s.relation = rel and s.key = share_live.key and s.friend = f.name
                                               and s.state <> 'ended') then
        raise exception 'the row % of % is already live with "%", or asked to be', key, rel, f.name using errcode = '42710',
            hint = 'See select * from peer.live_shares.';
    end if;
    insert into peer.live_share (id, relation, key, friend, asked_here, ttl, requested_row)
    values (share, rel, key, f.name, true, ttl, the_row);
    perform peer.send(f.name, 'aquapeer.live', jsonb_build_object(
        'op', 'request', 'id', share, 'relation', peer._relation_name(rel), 'key', key,
        'ttl_s', extract(epoch from ttl), 'row', the_row, 'texts', peer._live_documents(share, the_row)));
    return share;
end
$$;
comment on function peer.share_live(regclass, jsonb, text, interval) is
    'ask a friend to share one row live (key as bundle.status shows it) until peer.end_live, ttl without an edit, or a long disconnection';

create or replace function peer.accept_live(id uuid) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    s peer.live_share;
    key_columns name[];
    taken text[];
begin
    select * into s from peer.live_share x where x.id = accept_live.id and not x.asked_here;
    if not found or s.state <> 'requested' then
        raise exception 'no live request % from a friend is waiting', id using errcode = '42704',
            hint = 'See select * from peer.live_requests.';
    end if;
    perform peer._friend_for_sending(s.friend);
    execute format('lock table %s in share row exclusive mode', s.relation);
    perform peer._live_check_publication(s.relation, s.friend);
    -- The requester's row: inserted when missing here; else its columns that do not merge by
    -- characters are taken, so that the row starts out the same on both sides.
    key_columns := peer._key_columns(s.relation);
    select array_agg(format('%I', a.attname)) into taken from pg_attribute a
    where a.attrelid = s.relation and a.attnum > 0 and not a.attisdropped and a.attname <> all (key_columns)
      and a.attname <> all (peer._live_text_columns(s.relation)) and s.requested_row ? a.attname;
    execute format('insert into %s as t select * from jsonb_populate_record(null::%s, $1) on conflict (%s) do %s',
                   s.relation, s.relation, array_to_string(array(select format('%I', k) from unnest(key_columns) k), ', '),
                   case when taken is null then 'nothing'
                        else format('update set (%s) = row(%s) where (%s) is distinct from (%s)',
                                    array_to_string(taken, ', '),
                                    array_to_string(array(select 'excluded.' || c from unnest(taken) c), ', '),
                                    array_to_string(array(select 't.' || c from unnest(taken) c), ', '),
                                    array_to_string(array(select 'excluded.' || c from unnest(taken) c), ', ')) end)
        using s.requested_row;
    update peer.live_share x set state = 'live', live_at = now(), last_edit_at = now() where x.id = s.id;
    perform peer._live_replicate(s.relation, s.friend);
    perform peer.send(s.friend, 'aquapeer.live', jsonb_build_object('op', 'accept', 'id', s.id));
    perform peer._live_sync(s.id);
end
$$;
comment on function peer.accept_live(uuid) is 'accept a friend''s request to share a row live (see peer.live_requests)';

create or replace function peer.end_live(id uuid) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    select peer._live_end(id, 'ended here', true)
$$;
comment on function peer.end_live(uuid) is 'stop sharing a row live (or take back or decline a request); the friend is told';

-- The friend's side, in an executor connected as the friend's role -----------------------
-- The friend's messages on topic aquapeer.live not handled yet, up to an inbox position, taken
-- out of the inbox: the handler of the last handles them all, in order.
create or replace function peer._live_take(friend text, upto bigint) returns setof jsonb
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with taken as (
        delete from peer.inbox i
        where i.friend = (peer._applying_friend(_live_take.friend)).name and i.topic = 'aquapeer.live'
          and i.position <= upto
        returning i.position, i.payload
    )
    select payload from taken order by position
$$;
comment on function peer._live_take(text, bigint) is 'the friend''s live messages not handled yet, up to a position, taken out of the inbox';

create or replace function peer._live_requested(friend text, payload jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._applying_friend(friend);
    rel regclass := to_regclass(payload ->> 'relation');
    share uuid := (payload ->> 'id')::uuid;
    refusal text;
begin
    if rel is null then
        refusal := format('there is no table %s here', payload ->> 'relation');
    elsif exists (select from peer.live_share s where s.relation = rel and s.key = payload -> 'key'
                                               and s.friend = f.name and s.state <> 'ended') then
        refusal := 'the row is already live here, or asked to be';
    end if;
    if refusal is not null then
        perform peer.send(f.name, 'aquapeer.live', jsonb_build_object('op', 'end', 'id', share, 'reason', refusal));
        return;
    end if;
    insert into peer.live_share (id, relation, key, friend, asked_here, ttl, requested_row)
    values (share, rel, payload -> 'key', f.name, false, make_interval(secs => (payload ->> 'ttl_s')::float8),
            payload -> 'row');
    insert into peer.live_text (share, "column", value, state)
    select share, t.key, coalesce(payload -> 'row' ->> t.key, ''), decode(t.value #>> '{}', 'base64')
    from jsonb_each(payload -> 'texts') t
    where t.key = any (peer._live_text_columns(rel));
end
$$;
comment on function peer._live_requested(text, jsonb) is 'keep a friend''s request to share a row live (or refuse it, telling why)';

create or replace function peer._live_accepted(friend text, share uuid) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._applying_friend(friend);
    s peer.live_share;
begin
    select * into s from peer.live_share x where x.id = share and x.friend = f.name and x.asked_here;
    if not found or s.state <> 'requested' then
        return;  -- ended here meanwhile: the friend is told so
    end if;
    execute format('lock table %s in share row exclusive mode', s.relation);
    if exists (select from peer.publication p where p.relation = s.relation and p.friend = s.friend)
       and not exists (select from peer.live_replication r where r.relation = s.relation and r.friend = s.friend) then
        perform peer._live_end(share, format('%s was published to "%s" meanwhile', s.relation, s.friend), true);
        return;
    end if;
    update peer.live_share x set state = 'live', live_at = now(), last_edit_at = now() where x.id = share;
    perform peer._live_replicate(s.relation, s.friend);
    perform peer._live_sync(share);
end
$$;
comment on function peer._live_accepted(text, uuid) is 'the friend accepted a request of ours: the row goes live';

create or replace function peer._live_ended(friend text, share uuid, reason text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._applying_friend(friend);
begin
    if exists (select from peer.live_share s where s.id = share and s.friend = f.name) then
        perform peer._live_end(share, format('ended by "%s": %s', f.name, reason), false);
    end if;
end
$$;
comment on function peer._live_ended(text, uuid, text) is 'the friend ended a live share (or declined or took back a request)';

-- Where a friend's edit goes: the live share's table and key ({column: text}); none when it is not live.
create or replace function peer._live_target(friend text, share uuid) returns table (relation text, key jsonb)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select peer._relation_name(s.relation), peer._live_key(s.relation, s.key) from peer.live_share s
    where s.id = share and s.friend = (peer._applying_friend(_live_target.friend)).name and s.state = 'live'
$$;
comment on function peer._live_target(text, uuid) is 'the table and key a friend''s edit of a live row goes to';

-- A friend's edit merged into the document (locked; the row was locked first): its new text.
create or replace function peer._live_merge(friend text, share uuid, "column" name, update text) returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].live_merge(friend, share, column, update)
$$;
comment on function peer._live_merge(text, uuid, name, text) is 'merge a friend''s edit into a live text cell''s document; its new text';

create or replace function peer._live_message(m peer.inbox) returns void
language plpython3u set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].live_message(m["friend"], m["position"])
$$;
comment on function peer._live_message(peer.inbox) is
    'the handler of topic aquapeer.live: requests, accepts, ends and edits of live rows, in order, as the friend''s role';

insert into peer.message_handler values ('aquapeer.live', 'peer._live_message(peer.inbox)'::regprocedure)
    on conflict (topic) do update set handler = excluded.handler;
insert into peer.topic_grant values ('aquapeer.live', null) on conflict do nothing;

-- Expiry, on the worker ---------------------------------------------------------------
-- End the live shares idle longer than their ttl, the requests not accepted within it, and the
-- live shares of friends away longer than peer.config.soft_lock_ttl.  A table a writer holds is
-- passed over (lock_timeout), for the next round: the worker's loop must not wait.
create or replace function peer._expire_live(away text[]) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    s record;
    ended integer := 0;
begin
    perform set_config('lock_timeout', '50ms', true);
    for s in
        select x.id, case when x.state = 'requested' then 'not accepted within its ttl'
                          when x.friend = any (away) then 'the friend was away longer than peer.config.soft_lock_ttl'
                          else 'no edit within its ttl' end as reason
        from peer.live_share x
        where (x.state = 'requested' and x.requested_at + x.ttl < now())
           or (x.state = 'live' and (x.last_edit_at + x.ttl < now() or x.friend = any (away)))
    loop
        begin
            if peer._live_end(s.id, s.reason, true) then
                ended := ended + 1;
            end if;
        exception when lock_not_available then
            null;  -- a writer holds the table: next round
        end;
    end loop;
    return ended;
end
$$;
comment on function peer._expire_live(text[]) is 'end live shares idle past their ttl, requests not accepted within it, and those of friends away too long';

-- Views ----------------------------------------------------------------------
create or replace view peer.live_requests as
    select s.id, s.friend, s.relation, s.key, s.ttl, s.requested_at,
           array(select d."column" from peer.live_text d where d.share = s.id order by d."column") as text_columns
    from peer.live_share s where s.state = 'requested' and not s.asked_here;
comment on view peer.live_requests is 'friends'' requests to share a row live, waiting for peer.accept_live(id) or peer.end_live(id)';

create or replace view peer.live_shares as
    select s.id, s.relation, s.key, s.friend, s.state, s.asked_here, s.ttl, s.requested_at, s.live_at, s.last_edit_at,
           case when s.state = 'live' then s.last_edit_at + s.ttl end as expires_at, s.ended_at, s.ended_reason,
           array(select d."column" from peer.live_text d where d.share = s.id order by d."column") as text_columns
    from peer.live_share s;
comment on view peer.live_shares is 'rows shared live with friends, asked to be, or ended (and why)';
