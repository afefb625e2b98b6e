-- Presence and soft locks (docs/presence.md), as of 0.22.0.

-- Soft locks: this database's (holder null) and those friends told us of.  Written only by the
-- worker, in its own transactions: a lock is seen by friends at once, whatever the taker's
-- transaction does.  Unlogged: a lock outlives neither its session nor a crash.
create unlogged table peer.soft_lock (
    id uuid primary key,
    holder text references peer.friend on delete cascade on update cascade,
    relation regclass not null,
    -- the key as bundle.status shows it (the key columns' texts in key order); null: every row
    key jsonb,
    note text,
    since timestamptz not null default now(),
    ttl interval not null,
    -- null: as long as its session lives (ours) or its holder stays connected (a friend's)
    expires_at timestamptz,
    -- a session lock of ours: the backend that holds it
    pid integer,
    backend_start timestamptz
);
create index soft_lock_row on peer.soft_lock (relation, key);
-- Ours, which each friend's lock is checked against (peer._lock_overlaps).
create index soft_lock_own on peer.soft_lock (relation, key) where holder is null;
create index soft_lock_holder on peer.soft_lock (holder);
create index soft_lock_expiry on peer.soft_lock (expires_at) where expires_at is not null;

-- Friends told of soft locks on a table besides those it is shared with (peer.watch).
create table peer.lock_watch (
    relation regclass not null,
    friend text not null references peer.friend on delete cascade on update cascade,
    primary key (relation, friend)
);

-- What friends told us of themselves, and what we refused of them.
create table peer.friend_presence (
    friend text primary key references peer.friend on delete cascade on update cascade,
    status text,
    status_at timestamptz,
    last_connected timestamptz,
    last_disconnected timestamptz,
    locks_refused bigint not null default 0
);

alter table peer.config
    add column status text check (length(status) <= 200),
    add column soft_lock_ttl interval not null default '30 s' check (soft_lock_ttl > '0'::interval),
    add column max_soft_locks integer not null default 10000 check (max_soft_locks >= 0),
    add column soft_lock_rate integer not null default 1000 check (soft_lock_rate > 0),
    add column max_auto_locks_per_statement integer not null default 100
        check (max_auto_locks_per_statement >= 0);

select pg_catalog.pg_extension_config_dump('peer.lock_watch', '');
select pg_catalog.pg_extension_config_dump('peer.friend_presence', '');
