-- Durable messages: the outbox, the inbox, topics and handlers.

-- Comments on this area's tables (sql/incremental creates them); here, so that an upgrade
-- applies a changed comment too.
comment on table peer.message_handler is 'the function run for each message on a topic; peer.on_message sets it';

create or replace function peer._wake_at_commit() returns void
    language c as 'MODULE_PATHNAME', 'aquapeer_wake_at_commit';
comment on function peer._wake_at_commit() is 'wake the worker once this transaction commits (nothing if it aborts)';

-- Messages -------------------------------------------------------------------
create or replace function peer._friend_for_sending(name text) returns peer.friend
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend;
begin
    select * into f from peer.friend where friend.name = _friend_for_sending.name;
    if not found then
        raise exception 'unknown friend "%"', name using errcode = '42704',
            hint = 'See select * from peer.friends; add one with peer.add_friend().';
    end if;
    if f.state <> 'accepted' then
        raise exception 'friend "%" is blocked', name using errcode = '42501';
    end if;
    return f;
end
$$;

create or replace function peer.send(friend text, topic text, payload jsonb) returns uuid
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    f peer.friend := peer._friend_for_sending(friend);
    bytes integer := octet_length(payload::text);
    friend_limit integer := coalesce(f.max_message_bytes, (select max_message_bytes from peer.config));
    message_id uuid;
begin
    if topic is null or topic = '' or length(topic) > 255 then
        raise exception 'invalid topic %', coalesce(quote_literal(topic), 'null') using errcode = '22023',
            hint = 'A topic is 1 to 255 characters.';
    end if;
    if payload is null then
        raise exception 'the payload must not be null' using errcode = '22004',
            hint = 'Send ''null''::jsonb for a JSON null.';
    end if;
    if bytes > friend_limit then
        raise exception 'message of % bytes is larger than "%" accepts (% bytes)', bytes, friend, friend_limit
            using errcode = '54000', hint = 'Split it, or ask the friend to raise peer.config.max_message_bytes.';
    end if;
    insert into peer.outbox_message (peer_id, friend, topic, payload, bytes)
        values (f.peer_id, f.name, topic, payload, bytes)
        returning id into message_id;
    -- Sets a flag: one wake at commit however many messages (cheaper than asking whether it is set).
    perform peer._wake_at_commit();
    return message_id;
end
$$;
comment on function peer.send(text, text, jsonb) is 'queue a message to a friend; it leaves when this transaction commits, and arrives once';

create or replace function peer.allow_topic(topic text, friend text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if friend is not null then
        perform peer._friend_for_sending(friend);
    end if;
    insert into peer.topic_grant values (topic, friend) on conflict do nothing;
end
$$;
comment on function peer.allow_topic(text, text) is 'let a friend (null: every friend) send messages on a topic';

create or replace function peer.disallow_topic(topic text, friend text default null) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.topic_grant g
                  where g.topic = disallow_topic.topic and g.friend is not distinct from disallow_topic.friend
                  returning 1)
    select exists (select from gone)
$$;
comment on function peer.disallow_topic(text, text) is 'take back peer.allow_topic(topic, friend)';

create or replace function peer.on_message(topic text, handler regprocedure) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if handler is null then
        delete from peer.message_handler h where h.topic = on_message.topic;
        return;
    end if;
    if not exists (select from pg_proc p where p.oid = handler and p.pronargs = 1
                   and p.proargtypes[0] = 'peer.inbox'::regtype and p.prokind = 'f') then
        raise exception 'a message handler must be a function taking one peer.inbox argument, not %', handler
            using errcode = '42P13', hint = 'create function my_handler(m peer.inbox) returns void ...';
    end if;
    insert into peer.message_handler values (topic, handler)
        on conflict on constraint message_handler_pkey do update set handler = excluded.handler;
end
$$;
comment on function peer.on_message(text, regprocedure) is 'run handler(peer.inbox) for each message on topic, as the sender''s role (null removes it)';

create or replace function peer._message_handled(id uuid) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    -- Only an executor may say so, in the handler's own transaction.
    perform peer._executor_nonce();
    update peer.inbox set handled_at = now(), handler_error = null,
        handler_attempts = handler_attempts + 1 where inbox.id = _message_handled.id;
end
$$;
comment on function peer._message_handled(uuid) is 'mark an inbox message handled; only the executor running its handler may';

create or replace function peer.retry_message(id uuid) returns boolean
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].retry_message(id)
$$;
comment on function peer.retry_message(uuid) is 'run a message''s handler again (after it raised); raises its error if it raises again';

create or replace view peer.outbox as
    select m.id, m.friend, m.topic, m.payload, m.created_at,
           case when m.final_state is not null then m.final_state
                when m.seq is null or m.epoch is distinct from s.epoch then 'queued'
                when m.seq <= s.acked_upto then 'acked'
                when m.seq <= s.sent_upto then 'sent'
                else 'queued' end as state,
           m.reason, m.seq, m.bytes
    from peer.outbox_message m left join peer.outbox_stream s on s.peer_id = m.peer_id;
comment on view peer.outbox is 'messages sent to friends and their state: queued, sent, acked, rejected or expired';
