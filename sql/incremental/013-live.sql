-- Live rows: one row shared in real time with one friend (docs/live.md), as of 0.22.0.

-- A row shared live with a friend, or asked to be.  Both databases keep one with the same id.
create table peer.live_share (
    id uuid primary key,
    relation regclass not null,
    -- the key as bundle.status shows it: the key columns' texts in key order
    key jsonb not null,
    friend text not null references peer.friend on delete cascade on update cascade,
    state text not null default 'requested' check (state in ('requested', 'live', 'ended')),
    asked_here boolean not null,
    ttl interval not null check (ttl > '0'::interval),
    -- the requester's row, which the accepting side takes for its columns that do not merge by characters
    requested_row jsonb,
    requested_at timestamptz not null default now(),
    live_at timestamptz,
    last_edit_at timestamptz not null default now(),
    ended_at timestamptz,
    ended_reason text
);
-- one request or live share per row and friend at a time
create unique index live_share_row on peer.live_share (relation, key, friend) where state <> 'ended';
create index live_share_open on peer.live_share (relation, state) where state <> 'ended';

-- A text column of a live row as a Y.Text document (python/aquapeer/live/text.py): its state and
-- its text, which the column has after each write (a local write that differs is an edit).
create table peer.live_text (
    share uuid not null references peer.live_share on delete cascade,
    "column" name not null,
    value text not null,
    state bytea not null,
    primary key (share, "column")
);

-- What the live shares of a table with a friend set up, so that the last one to end removes
-- exactly that: the publication (always theirs) and the subscription (unless the user had one).
create table peer.live_replication (
    relation regclass not null,
    friend text not null references peer.friend on delete cascade on update cascade,
    made_subscription boolean not null,
    primary key (relation, friend)
);

select pg_catalog.pg_extension_config_dump('peer.live_share', '');
select pg_catalog.pg_extension_config_dump('peer.live_text', '');
select pg_catalog.pg_extension_config_dump('peer.live_replication', '');
-- Friends send live requests on topic aquapeer.live, which every friend may use
-- (sql/idempotent/230-live.sql grants it): pg_dump keeps only the users' grants.
select pg_catalog.pg_extension_config_dump('peer.topic_grant', $$where not (topic = 'aquapeer.live' and friend is null)$$);
