-- aquapeer 0.1.0 -> 0.2.0: durable messages (outbox, inbox, handlers, topics) and remote calls.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- Executors connect as the role a friend acts as, and PostgreSQL 15 lets a
-- background worker connect only as a role that can log in.  The role has
-- no password and no privileges of its own.
alter role aquapeer_friend login;

-- Settings -------------------------------------------------------------------

alter table peer.config
    add column max_message_bytes integer not null default 16777216
        check (max_message_bytes between 1024 and 67108864),
    add column outbox_retention interval not null default '1 day'
        check (outbox_retention >= '0'::interval),
    add column outbox_max_age interval not null default '30 days'
        check (outbox_max_age > '0'::interval),
    add column outbox_max_bytes bigint not null default 1073741824
        check (outbox_max_bytes > 0),
    add column handler_timeout interval not null default '1 min'
        check (handler_timeout > '0'::interval),
    add column executor_limit integer not null default 4
        check (executor_limit between 1 and 64);
comment on column peer.config.max_message_bytes is 'largest message or call this database accepts; friends learn it when they connect';
comment on column peer.config.outbox_retention is 'acknowledged messages are deleted from the outbox after this long';
comment on column peer.config.outbox_max_age is 'messages a friend has not acknowledged after this long expire';
comment on column peer.config.outbox_max_bytes is 'unacknowledged bytes kept per friend; the oldest messages beyond it expire';
comment on column peer.config.handler_timeout is 'statement timeout of a message handler';
comment on column peer.config.executor_limit is 'executors busy at once at most (each takes a background worker slot); read when the worker starts';

-- A restored row replaces the default one, whatever the columns, so that
-- upgrades adding settings need not list them all again.
create or replace function peer._config_single_row() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    -- pg_dump restores this table after CREATE EXTENSION made the default row.
    delete from peer.config;
    return new;
end
$$;

-- What a friend told us when it last connected.
alter table peer.friend add column max_message_bytes integer;

create function peer._wake_at_commit() returns void
    language c as 'MODULE_PATHNAME', 'aquapeer_wake_at_commit';
comment on function peer._wake_at_commit() is 'wake the worker once this transaction commits (nothing if it aborts)';

-- Streams --------------------------------------------------------------------

-- This database's outgoing stream epoch.  A new one is drawn when the
-- database is no longer the one that drew it (another system identifier,
-- timeline or database oid: a restore, a promoted copy, a pg_dump reload),
-- so friends never take a restored copy's reused sequence numbers for
-- duplicates.  Not dumped on purpose.
create table peer.stream_epoch (
    singleton boolean primary key default true check (singleton),
    epoch uuid not null,
    system_identifier bigint not null,
    timeline integer not null,
    database_oid oid not null,
    drawn_at timestamptz not null default now()
);
revoke all on peer.stream_epoch from public;

-- Per friend: the sequence numbers handed out, sent and acknowledged in the current epoch.
create table peer.outbox_stream (
    peer_id text primary key,
    epoch uuid not null,
    last_seq bigint not null default 0,
    sent_upto bigint not null default 0,
    acked_upto bigint not null default 0,
    acked_at timestamptz,
    -- acknowledged messages up to prune_upto are deleted once prune_mark_at is a retention old
    prune_upto bigint not null default 0,
    prune_mark_at timestamptz not null default now()
);
revoke all on peer.outbox_stream from public;

create sequence peer.outbox_position;
create table peer.outbox_message (
    id uuid primary key default gen_random_uuid(),
    position bigint not null default nextval('peer.outbox_position'),
    xact xid8 not null default pg_current_xact_id(),
    peer_id text not null,
    friend text not null,
    topic text not null,
    payload jsonb not null,
    bytes integer not null,
    created_at timestamptz not null default clock_timestamp(),
    epoch uuid,
    seq bigint,
    -- null while flowing (queued, sent, acked follow from peer.outbox_stream); else final
    final_state text check (final_state in ('acked', 'rejected', 'expired')),
    reason text,
    finished_at timestamptz
);
alter sequence peer.outbox_position owned by peer.outbox_message.position;
create index outbox_message_unnumbered on peer.outbox_message (position)
    where seq is null and final_state is null;
create index outbox_message_stream on peer.outbox_message (peer_id, seq) where seq is not null;
-- for expiry and pruning, which must not read what is merely acknowledged
create index outbox_message_age on peer.outbox_message (created_at);
create index outbox_message_finished on peer.outbox_message (finished_at) where final_state is not null;
revoke all on peer.outbox_message from public;

-- Commit order.  Each sending transaction records itself here once; a
-- deferred trigger stamps it at commit under a lock held until the
-- transaction has ended, so the next sending transaction's stamp is larger
-- exactly when it commits later.  The worker numbers messages in stamp order.
create sequence peer.commit_order;
create table peer.outbox_commit (
    xact xid8 primary key,
    commit_seq bigint
);
revoke all on peer.outbox_commit from public;

create function peer._stamp_commit() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    perform pg_advisory_xact_lock(hashtext('aquapeer'), hashtext('outbox commit order'));
    update peer.outbox_commit set commit_seq = nextval('peer.commit_order') where xact = new.xact;
    return null;
end
$$;
create constraint trigger stamp_commit after insert on peer.outbox_commit
    deferrable initially deferred for each row execute function peer._stamp_commit();

create view peer.outbox as
    select m.id, m.friend, m.topic, m.payload, m.created_at,
           case when m.final_state is not null then m.final_state
                when m.seq is null or m.epoch is distinct from s.epoch then 'queued'
                when m.seq <= s.acked_upto then 'acked'
                when m.seq <= s.sent_upto then 'sent'
                else 'queued' end as state,
           m.reason, m.seq, m.bytes
    from peer.outbox_message m left join peer.outbox_stream s on s.peer_id = m.peer_id;
comment on view peer.outbox is 'messages sent to friends and their state: queued, sent, acked, rejected or expired';

-- Per friend: the friend's current epoch and the highest sequence number stored.
create table peer.inbox_stream (
    peer_id text primary key,
    epoch uuid not null,
    hwm bigint not null default 0,
    updated_at timestamptz not null default now()
);
revoke all on peer.inbox_stream from public;

create table peer.inbox (
    id uuid primary key,
    friend text not null,
    topic text not null,
    payload jsonb not null,
    sent_at timestamptz not null,
    received_at timestamptz not null default clock_timestamp(),
    position bigint generated always as identity,
    handler regprocedure,
    handled_at timestamptz,
    handler_error text,
    handler_attempts integer not null default 0
);
create index inbox_position on peer.inbox (position);
create index inbox_handler_pending on peer.inbox (position)
    where handler is not null and handled_at is null and handler_error is null;
comment on table peer.inbox is 'messages friends sent, once each, in order per sender and topic; delete what you no longer need';
revoke all on peer.inbox from public;
grant select, delete on peer.inbox to aquapeer_admin;

create table peer.topic_grant (
    topic text not null check (topic <> '' and length(topic) <= 255),
    friend text references peer.friend on delete cascade,
    unique nulls not distinct (topic, friend)
);
comment on table peer.topic_grant is 'topics friends may send to (friend null: every friend)';
revoke all on peer.topic_grant from public;
grant select on peer.topic_grant to aquapeer_admin;

create table peer.message_handler (
    topic text primary key,
    handler regprocedure not null
);
revoke all on peer.message_handler from public;
grant select on peer.message_handler to aquapeer_admin;

create table peer.exposed_function (
    name text not null check (name <> '' and length(name) <= 255),
    function regprocedure not null,
    friend text references peer.friend on delete cascade,
    unique nulls not distinct (name, friend)
);
comment on table peer.exposed_function is 'functions friends may call by name (friend null: every accepted friend)';
revoke all on peer.exposed_function from public;
grant select on peer.exposed_function to aquapeer_admin;

select pg_catalog.pg_extension_config_dump('peer.outbox_message', '');
select pg_catalog.pg_extension_config_dump('peer.outbox_position', '');
select pg_catalog.pg_extension_config_dump('peer.outbox_stream', '');
select pg_catalog.pg_extension_config_dump('peer.inbox', '');
select pg_catalog.pg_extension_config_dump('peer.inbox_stream', '');
select pg_catalog.pg_extension_config_dump('peer.topic_grant', '');
select pg_catalog.pg_extension_config_dump('peer.message_handler', '');
select pg_catalog.pg_extension_config_dump('peer.exposed_function', '');

-- Messages -------------------------------------------------------------------

create function peer._friend_for_sending(name text) returns peer.friend
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

create function peer.send(friend text, topic text, payload jsonb) returns uuid
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
    if not exists (select from peer.outbox_commit where xact = pg_current_xact_id()) then
        insert into peer.outbox_commit (xact) values (pg_current_xact_id());
        perform peer._wake_at_commit();
    end if;
    return message_id;
end
$$;
comment on function peer.send(text, text, jsonb) is 'queue a message to a friend; it leaves when this transaction commits, and arrives once';

create function peer.allow_topic(topic text, friend text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if friend is not null then
        perform peer._friend_for_sending(friend);
    end if;
    insert into peer.topic_grant values (topic, friend) on conflict do nothing;
end
$$;
comment on function peer.allow_topic(text, text) is 'let a friend (null: every friend) send messages on a topic';

create function peer.disallow_topic(topic text, friend text default null) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.topic_grant g
                  where g.topic = disallow_topic.topic and g.friend is not distinct from disallow_topic.friend
                  returning 1)
    select exists (select from gone)
$$;
comment on function peer.disallow_topic(text, text) is 'take back peer.allow_topic(topic, friend)';

create function peer.on_message(topic text, handler regprocedure) returns void
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

create function peer._message_handled(id uuid) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    -- Only an executor may say so, in the handler's own transaction.
    perform peer._executor_nonce();
    update peer.inbox set handled_at = now(), handler_error = null,
        handler_attempts = handler_attempts + 1 where inbox.id = _message_handled.id;
end
$$;

create function peer.retry_message(id uuid) returns boolean
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].retry_message(id)
$$;
comment on function peer.retry_message(uuid) is 'run a message''s handler again (after it raised); raises its error if it raises again';

-- Remote calls ---------------------------------------------------------------

create function peer.expose(fn regprocedure, friend text default null, as_name text default null) returns text
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

create function peer.unexpose(name text, friend text default null) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
    with gone as (delete from peer.exposed_function e
                  where e.name = unexpose.name and e.friend is not distinct from unexpose.friend
                  returning 1)
    select exists (select from gone)
$$;
comment on function peer.unexpose(text, text) is 'take back peer.expose(…, friend, name)';

create function peer.call(friend text, fn text, arg jsonb default '{}', timeout interval default '30 s')
returns jsonb
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
seconds = plpy.execute(plpy.prepare("select extract(epoch from $1)::float8 as s", ["interval"]), [timeout])[0]["s"]
return GD["aquapeer"].call(friend, fn, arg, seconds)
$$;
comment on function peer.call(text, text, jsonb, interval) is 'call a function a friend exposed, and return its result';

-- Friends: removing one expires what waits for it --------------------------------

drop function peer.remove_friend(text);
create function peer.remove_friend(name text, reason text default 'the friend was removed') returns boolean
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

-- Connections show what was refused --------------------------------------------------

drop view peer.connections;
drop function peer._connections();
create function peer._connections(
    out friend text, out state text, out connected_since timestamptz, out rtt_ms double precision,
    out bytes_sent bigint, out bytes_received bigint, out local_candidate text,
    out remote_candidate text, out last_error text, out protocol integer,
    out frames_refused bigint, out last_refusal text)
returns setof record
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].connections()
$$;
create view peer.connections as select * from peer._connections();
comment on view peer.connections is 'live connections to friends, read from the worker';

-- Privileges -------------------------------------------------------------------------

revoke all on function peer.send(text, text, jsonb), peer.allow_topic(text, text),
    peer.disallow_topic(text, text), peer.on_message(text, regprocedure), peer.retry_message(uuid),
    peer.expose(regprocedure, text, text), peer.unexpose(text, text),
    peer.call(text, text, jsonb, interval), peer.remove_friend(text, text), peer._connections(),
    peer._friend_for_sending(text), peer._wake_at_commit() from public;
revoke all on peer.connections, peer.outbox from public;
-- Executors (as any friend's role) mark a handled message in the handler's transaction.
grant execute on function peer._message_handled(uuid) to public;
grant execute on function peer.send(text, text, jsonb), peer.allow_topic(text, text),
    peer.disallow_topic(text, text), peer.on_message(text, regprocedure), peer.retry_message(uuid),
    peer.expose(regprocedure, text, text), peer.unexpose(text, text),
    peer.call(text, text, jsonb, interval), peer.remove_friend(text, text), peer._connections()
    to aquapeer_admin;
grant select on peer.connections, peer.outbox to aquapeer_admin;
