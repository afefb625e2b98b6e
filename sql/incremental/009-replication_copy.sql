-- The initial copy of a subscription in chunks, checkpointed (docs/replication.md).

-- The copy the subscriber drives: it asks for the rows after its checkpoint, the publisher
-- queues one chunk, and applying it moves the checkpoint in the same transaction.
alter table peer.subscription
    -- a new one per copy: chunks of an earlier copy still on their way are told apart
    add column copy_id uuid,
    -- the key of the last row copied (null: from the first)
    add column copy_after jsonb,
    add column copy_rows bigint not null default 0,
    add column copy_chunks integer not null default 0,
    -- the publisher's estimate of the rows it sends in all
    add column copy_rows_estimate bigint,
    add column copy_started_at timestamptz,
    add column copy_finished_at timestamptz;

-- Changes to rows the copy has not brought yet (an update is sent as the columns it changed,
-- which make no row): applied right after the copy brings their row.
create table peer.change_ahead_of_copy (
    id bigint generated always as identity primary key,
    relation regclass not null,
    friend text not null,
    key jsonb not null,
    change jsonb not null,
    foreign key (relation, friend) references peer.subscription on delete cascade on update cascade
);
create index change_ahead_of_copy_key on peer.change_ahead_of_copy (relation, friend, key);

alter table peer.config
    add column copy_chunk_rows integer not null default 10000 check (copy_chunk_rows between 1 and 1000000);

select pg_catalog.pg_extension_config_dump('peer.change_ahead_of_copy', '');
