-- Re-syncing a subscription by row hashes once changes for it were dropped (docs/replication.md).

-- How long the changes of a table wait for a friend that does not take them; past it they are
-- dropped and the friend re-syncs by comparing row hashes.
alter table peer.config
    add column change_retention interval not null default '7 days' check (change_retention > '0'::interval);

-- What a copy is for: a new subscription's rows, or the rows that differ after changes were dropped.
alter table peer.subscription
    add column copy_kind text not null default 'initial' check (copy_kind in ('initial', 'resync')),
    -- the copy's last request (peer.outbox_message), asked again if no chunk answers it
    add column copy_request uuid;

-- The keys a re-sync still has to copy, asked for in chunks in id order.
create table peer.resync_key (
    id bigint generated always as identity primary key,
    relation regclass not null,
    friend text not null,
    key jsonb not null,
    foreign key (relation, friend) references peer.subscription on delete cascade on update cascade
);
create index resync_key_subscription on peer.resync_key (relation, friend, id);

select pg_catalog.pg_extension_config_dump('peer.resync_key', '');
