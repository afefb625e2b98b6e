-- Durable messages and remote calls: streams, the outbox, the inbox, topics,
-- handlers and exposed functions, as of 0.11.0.

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

-- Commit order.  Each sending transaction records itself here once; a
-- deferred trigger (peer._stamp_commit) stamps it at commit under a lock held
-- until the transaction has ended, so the next sending transaction's stamp is
-- larger exactly when it commits later.  The worker numbers messages in stamp
-- order.
create sequence peer.commit_order;
create table peer.outbox_commit (
    xact xid8 primary key,
    commit_seq bigint
);

-- Per friend: the friend's current epoch and the highest sequence number stored.
create table peer.inbox_stream (
    peer_id text primary key,
    epoch uuid not null,
    hwm bigint not null default 0,
    updated_at timestamptz not null default now()
);

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

create table peer.topic_grant (
    topic text not null check (topic <> '' and length(topic) <= 255),
    friend text references peer.friend on delete cascade,
    unique nulls not distinct (topic, friend)
);
comment on table peer.topic_grant is 'topics friends may send to (friend null: every friend)';

create table peer.message_handler (
    topic text primary key,
    handler regprocedure not null
);

create table peer.exposed_function (
    name text not null check (name <> '' and length(name) <= 255),
    function regprocedure not null,
    friend text references peer.friend on delete cascade,
    unique nulls not distinct (name, friend)
);
comment on table peer.exposed_function is 'functions friends may call by name (friend null: every accepted friend)';

select pg_catalog.pg_extension_config_dump('peer.outbox_message', '');
select pg_catalog.pg_extension_config_dump('peer.outbox_position', '');
select pg_catalog.pg_extension_config_dump('peer.outbox_stream', '');
select pg_catalog.pg_extension_config_dump('peer.inbox', '');
select pg_catalog.pg_extension_config_dump('peer.inbox_stream', '');
select pg_catalog.pg_extension_config_dump('peer.topic_grant', '');
select pg_catalog.pg_extension_config_dump('peer.message_handler', '');
select pg_catalog.pg_extension_config_dump('peer.exposed_function', '');
