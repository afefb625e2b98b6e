-- Following a friend's bundle (peer.follow_bundle, docs/bundles.md): the worker pulls each new
-- commit the friend makes by itself.

create table peer.bundle_follow (
    friend text not null references peer.friend on delete cascade on update cascade,
    bundle text not null check (bundle ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    since timestamptz not null default now(),
    -- when a pull last ended without an error, and the friend's head it brought
    last_pulled_at timestamptz,
    last_head text,
    state text not null default 'following' check (state in ('following', 'behind', 'conflicts', 'error')),
    last_error text,
    primary key (friend, bundle)
);

select pg_catalog.pg_extension_config_dump('peer.bundle_follow', '');
