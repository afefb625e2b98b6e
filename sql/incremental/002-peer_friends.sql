-- Friends and the requests of strangers, as of 0.11.0.

create table peer.friend (
    name text primary key check (name ~ '^[a-z0-9_-]{1,63}$'),
    peer_id text not null unique,
    chain bytea not null,
    signal_urls text[] not null default '{}',
    state text not null default 'accepted' check (state in ('accepted', 'blocked')),
    role name not null default 'aquapeer_friend',
    auto_connect boolean not null default true,
    signal_server_id integer references peer.signal_server on delete set null,
    stun_server_id integer references peer.stun_server on delete set null,
    added_at timestamptz not null default now(),
    last_seen timestamptz,
    -- what the friend told us when it last connected
    max_message_bytes integer
);
comment on table peer.friend is 'friends: their identities (key chains), the role they act as, and overrides';
select pg_catalog.pg_extension_config_dump('peer.friend', '');

-- Connection attempts from strangers, bounded (oldest dropped first).
create table peer.friend_request (
    peer_id text primary key,
    claimed_name text not null default '',
    chain bytea not null,
    first_seen timestamptz not null default now(),
    last_seen timestamptz not null default now(),
    attempts integer not null default 1
);
