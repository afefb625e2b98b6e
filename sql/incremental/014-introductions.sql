-- Introductions and display names (docs/introductions.md), as of 0.23.0.

-- The name this database gives itself in friend requests, invites and introductions; shown to
-- others beside its peer id, never trusted as an identity.  Null: the database's name.
alter table peer.config add column display_name text
    check (display_name is null or (length(display_name) between 1 and 63 and display_name !~ '[[:cntrl:]]'));
comment on column peer.config.display_name is
    'the name this database gives itself to others (null: the database name); shown beside its peer id, never trusted';

-- introducer: this friend's introductions are accepted by themselves (peer.set_introducer).
-- introduced_by: the peer id of the friend whose introduction made this friendship, if one did.
alter table peer.friend
    add column introducer boolean not null default false,
    add column introduced_by text;

-- An introduction waiting for peer.accept_friend: who made it, its name for the peer, its note,
-- and the peer's signaling servers (as an invite carries them).
alter table peer.friend_request
    add column introduced_by text,
    add column introduced_as text,
    add column note text,
    add column signal_urls text[] not null default '{}';

-- Introductions arrive on topic aquapeer.introduce, which every friend may use (granted by
-- sql/idempotent/030-friends.sql): pg_dump keeps only the users' grants.
select pg_catalog.pg_extension_config_dump('peer.topic_grant', $$where not (topic like 'aquapeer.%' and friend is null)$$);
