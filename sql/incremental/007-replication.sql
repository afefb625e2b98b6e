-- Live replication of tables between friends (docs/replication.md), as of 0.20.0.

-- What this database sends: a table to a friend, its columns (null: all) and a row filter.
create table peer.publication (
    relation regclass not null,
    friend text not null references peer.friend on delete cascade on update cascade,
    key_columns name[] not null,
    columns name[],
    row_filter text,
    created_at timestamptz not null default now(),
    primary key (relation, friend)
);

-- What this database takes from friends, and how far it has come.
create table peer.subscription (
    relation regclass not null,
    friend text not null references peer.friend on delete cascade on update cascade,
    key_columns name[] not null,
    state text not null default 'streaming'
        check (state in ('initializing', 'streaming', 'paused', 'error')),
    last_error text,
    applied_changes bigint not null default 0,
    conflicts_resolved bigint not null default 0,
    last_applied_clock bigint,
    last_applied_at timestamptz,
    -- when the last applied change was captured on its origin
    last_change_at timestamptz,
    created_at timestamptz not null default now(),
    primary key (relation, friend)
);

-- The hybrid logical clock: 48 bits of milliseconds, 16 of counter.  A sequence, so that
-- concurrent writers never wait for each other on it and it survives restarts.
create sequence peer.clock minvalue 0 start 0;

-- Per replicated row: each column's stamp (clock and origin peer) and the row's birth and
-- tombstone stamps.  A stamp is [clock, origin]; stamps compare by clock, then origin.
create table peer.row_clock (
    relation regclass not null,
    key jsonb not null,
    columns jsonb not null default '{}',
    born jsonb,
    deleted jsonb,
    deleted_at timestamptz,
    primary key (relation, key)
);
create index row_clock_tombstones on peer.row_clock (deleted_at) where deleted is not null;

-- A friend's changes waiting in peer.inbox, in order (apply, views, the worker's retries).
create index inbox_changes on peer.inbox (friend, position) where topic = 'aquapeer.changes';

-- Changes that could not be applied, set aside with the reason; later changes to the same key
-- wait behind them.
create table peer.apply_errors (
    id bigint generated always as identity primary key,
    -- as the friend named it (a change for a table not subscribed is kept too)
    relation text not null,
    friend text not null,
    key jsonb not null,
    change jsonb not null,
    sqlstate text,
    reason text not null,
    at timestamptz not null default now()
);
create index apply_errors_key on peer.apply_errors (relation, friend, key);

-- Every resolved conflict, kept for peer.config.conflict_retention.
create table peer.replication_conflicts (
    id bigint generated always as identity primary key,
    relation regclass not null,
    key jsonb not null,
    "column" text not null,
    local_value jsonb,
    local_clock bigint,
    local_origin text,
    remote_value jsonb,
    remote_clock bigint,
    remote_origin text,
    winner text not null check (winner in ('local', 'remote')),
    at timestamptz not null default now()
);
create index replication_conflicts_at on peer.replication_conflicts (at);

alter table peer.config
    add column max_clock_skew interval not null default '5 min' check (max_clock_skew > '0'::interval),
    add column conflict_retention interval not null default '30 days'
        check (conflict_retention >= '0'::interval),
    add column tombstone_retention interval not null default '7 days'
        check (tombstone_retention >= '0'::interval);

select pg_catalog.pg_extension_config_dump('peer.clock', '');
select pg_catalog.pg_extension_config_dump('peer.publication', '');
select pg_catalog.pg_extension_config_dump('peer.subscription', '');
select pg_catalog.pg_extension_config_dump('peer.row_clock', '');
select pg_catalog.pg_extension_config_dump('peer.apply_errors', '');
select pg_catalog.pg_extension_config_dump('peer.replication_conflicts', '');
-- The handlers of aquapeer's own topics are the extension's (sql/idempotent/200-replication.sql
-- inserts them): pg_dump keeps only the users'.
select pg_catalog.pg_extension_config_dump('peer.message_handler', $$where topic not like 'aquapeer.%'$$);
