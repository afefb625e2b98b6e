-- Moving a peer with pg_dump and pg_restore (docs/moving.md), as of 0.23.0.

-- The sequences behind dumped tables: a restored copy must not hand their
-- numbers out again (new inbox messages would sort before the restored ones,
-- a new apply error or conflict would reuse a restored one's id).
select pg_catalog.pg_extension_config_dump('peer.inbox_position_seq', '');
select pg_catalog.pg_extension_config_dump('peer.apply_errors_id_seq', '');
select pg_catalog.pg_extension_config_dump('peer.change_ahead_of_copy_id_seq', '');
select pg_catalog.pg_extension_config_dump('peer.replication_conflicts_id_seq', '');
select pg_catalog.pg_extension_config_dump('peer.resync_key_id_seq', '');

-- Requests and introductions waiting for peer.accept_friend move with the friends.
select pg_catalog.pg_extension_config_dump('peer.friend_request', '');

-- Set when pg_restore replaces this database's identity (peer._identity_single_row):
-- the copy and the original now share one peer id, and two live copies would take
-- each other's registration at the signaling server.  While it is set the worker
-- stays offline, until peer.keep_identity() or peer.reset_identity().  Not dumped,
-- so a fresh CREATE EXTENSION and an upgrade start without it.
create table peer.identity_restored (
    singleton boolean primary key default true check (singleton),
    peer_id text not null,
    restored_at timestamptz not null default now()
);
comment on table peer.identity_restored is
    'set when a restore replaced the identity: the peer the dump came from; the worker stays offline until '
    'peer.keep_identity() or peer.reset_identity()';

-- peer.worker_status() gains the column problem (a new return type).
drop function if exists peer.worker_status();
