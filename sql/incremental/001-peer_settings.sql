-- Settings, servers and this database's identity, as of 0.11.0.

-- Servers and ICE settings.
create table peer.signal_server (
    id serial primary key,
    url text not null unique check (url ~ '^wss?://[^/\s]+'),
    priority integer not null default 100
);
create table peer.stun_server (
    id serial primary key,
    url text not null unique check (url ~ '^stuns?:[^\s]+$'),
    priority integer not null default 100
);
create table peer.turn_server (
    id serial primary key,
    url text not null unique check (url ~ '^turns?:[^\s]+$'),
    username text,
    credential text,
    priority integer not null default 100
);
comment on table peer.signal_server is 'rendezvous servers; the one peer.config names, then the others by priority';
comment on table peer.stun_server is 'STUN servers; aiortc uses one at a time, the worker moves on to the next when ICE fails';
comment on table peer.turn_server is 'TURN servers; the credential is readable only by the extension owner';
select pg_catalog.pg_extension_config_dump('peer.signal_server', '');
select pg_catalog.pg_extension_config_dump('peer.stun_server', '');
select pg_catalog.pg_extension_config_dump('peer.turn_server', '');
select pg_catalog.pg_extension_config_dump('peer.signal_server_id_seq', '');
select pg_catalog.pg_extension_config_dump('peer.stun_server_id_seq', '');
select pg_catalog.pg_extension_config_dump('peer.turn_server_id_seq', '');

-- Settings, one row.  Kept by pg_dump; restoring replaces the default row
-- (peer._config_single_row).
create table peer.config (
    singleton boolean primary key default true check (singleton),
    executor_pool_size integer not null default 2
        check (executor_pool_size between 0 and 64),
    executor_idle_timeout interval not null default '60 s'
        check (executor_idle_timeout > '0'::interval),
    signal_server_id integer references peer.signal_server on delete set null,
    stun_server_id integer references peer.stun_server on delete set null,
    turn_server_id integer references peer.turn_server on delete set null,
    ice_host_addresses inet[],
    ice_transport_policy text not null default 'all'
        check (ice_transport_policy in ('all', 'relay')),
    friend_request_limit integer not null default 1000
        check (friend_request_limit between 0 and 1000000),
    max_message_bytes integer not null default 16777216
        check (max_message_bytes between 1024 and 67108864),
    outbox_retention interval not null default '1 day'
        check (outbox_retention >= '0'::interval),
    outbox_max_age interval not null default '30 days'
        check (outbox_max_age > '0'::interval),
    outbox_max_bytes bigint not null default 1073741824
        check (outbox_max_bytes > 0),
    handler_timeout interval not null default '1 min'
        check (handler_timeout > '0'::interval),
    executor_limit integer not null default 4
        check (executor_limit between 1 and 64),
    object_retention interval not null default '7 days'
        check (object_retention >= '0'::interval)
);
comment on table peer.config is 'aquapeer settings (one row); the worker reads them when it starts';
comment on column peer.config.ice_host_addresses is
    'host candidates the worker offers (null: every interface address; loopback only when listed)';
comment on column peer.config.ice_transport_policy is 'relay: never reveal host addresses to friends';
comment on column peer.config.max_message_bytes is 'largest message or call this database accepts; friends learn it when they connect';
comment on column peer.config.outbox_retention is 'acknowledged messages are deleted from the outbox after this long';
comment on column peer.config.outbox_max_age is 'messages a friend has not acknowledged after this long expire';
comment on column peer.config.outbox_max_bytes is 'unacknowledged bytes kept per friend; the oldest messages beyond it expire';
comment on column peer.config.handler_timeout is 'statement timeout of a message handler';
comment on column peer.config.executor_limit is 'executors busy at once at most (each takes a background worker slot); read when the worker starts';
comment on column peer.config.object_retention is
    'objects no commit references (a pull or import that broke off) are deleted after this long';
insert into peer.config default values;
select pg_catalog.pg_extension_config_dump('peer.config', '');

-- This database's identity: its peer id and the secret (current private key
-- and key chain).  pg_dump keeps it, so a restored copy is the same peer
-- (peer.reset_identity() makes a copy a new one).
create table peer.identity (
    singleton boolean primary key default true check (singleton),
    peer_id text not null,
    secret bytea not null,
    created_at timestamptz not null default now(),
    rotated_at timestamptz
);
select pg_catalog.pg_extension_config_dump('peer.identity', '');
