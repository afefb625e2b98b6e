-- Privileges, all in one place, applied on every install and upgrade.
--
-- Everything that changes state or reveals private data is for the extension
-- owner and aquapeer_admin.  PUBLIC keeps what any session and a friend's
-- executor (connected as the friend's role) must reach: the worker's helpers
-- and bootstrap, peer.version(), peer.whoami(), the serving entry points of
-- bundles (each checks that it runs in an executor for a friend the bundle is
-- shared with), the row hashing a tracked table's capture trigger runs, and
-- marking a handled message.  docs/sql-reference.md lists them.

grant usage on schema peer to public;
grant usage on schema bundle to aquapeer_admin;

-- Tables, views and sequences: nothing for PUBLIC.
revoke all on peer.migration, peer.config, peer.identity, peer.identity_restored, peer.signal_server, peer.stun_server,
    peer.turn_server, peer.signal_server_id_seq, peer.stun_server_id_seq, peer.turn_server_id_seq,
    peer.friend, peer.friends, peer.friend_request, peer.friend_requests, peer.connections,
    peer.stream_epoch, peer.outbox_stream, peer.outbox_position, peer.outbox_message,
    peer.outbox, peer.inbox_stream, peer.inbox, peer.topic_grant, peer.message_handler,
    peer.exposed_function, peer.bundle_share, peer.transfer, peer.transfers from public;
revoke all on bundle.bundle, bundle.tracked, bundle.changed_key, bundle.object,
    bundle.pending, bundle.commit, bundle.head_node, bundle.merge, bundle.conflicts from public;

grant select, update on peer.config to aquapeer_admin;
grant select, insert, update, delete on peer.signal_server, peer.stun_server to aquapeer_admin;
-- The TURN credential is readable only by the extension owner.
grant select (id, url, username, priority), insert, update, delete on peer.turn_server to aquapeer_admin;
grant usage on sequence peer.signal_server_id_seq, peer.stun_server_id_seq, peer.turn_server_id_seq
    to aquapeer_admin;
grant select on peer.friend, peer.friends, peer.friend_requests, peer.connections to aquapeer_admin;
grant update (auto_connect, signal_server_id, stun_server_id) on peer.friend to aquapeer_admin;
grant select on peer.outbox, peer.topic_grant, peer.message_handler, peer.exposed_function
    to aquapeer_admin;
grant select, delete on peer.inbox to aquapeer_admin;
grant select on peer.bundle_share, peer.transfers, bundle.bundle, bundle.tracked, bundle.merge,
    bundle.conflicts to aquapeer_admin;

-- Functions and procedures, by area.
-- worker
revoke all on function peer._config_single_row(), peer._library_version(), peer._payload_dir(),
    peer._should_stop(), peer._check_interrupts(), peer._executor_nonce(),
    peer._arm_statement_timeout(integer), peer._register_worker(), peer._launcher_hold(boolean),
    peer._launcher_check(), peer._start_executor(oid, text), peer._bootstrap(), peer.version(),
    peer._worker_pid(), peer._worker_answers(), peer._await_worker(boolean, interval),
    peer.start_worker(), peer.stop_worker(), peer.ping_worker(), peer.nudge_worker(),
    peer.worker_status(), peer._run_in_executor(oid, oid, jsonb, double precision),
    peer.run_in_executor(regrole, regprocedure, jsonb, interval) from public;
grant execute on function peer._config_single_row(), peer._library_version(), peer._payload_dir(),
    peer._should_stop(), peer._check_interrupts(), peer._executor_nonce(),
    peer._arm_statement_timeout(integer), peer._bootstrap(), peer.version(), peer._worker_pid(),
    peer._await_worker(boolean, interval) to public;
grant execute on function peer.start_worker(), peer.stop_worker(), peer.ping_worker(),
    peer.nudge_worker(), peer.worker_status() to aquapeer_admin;
revoke all on procedure peer.worker_main(), peer.executor_main() from public;
grant execute on procedure peer.executor_main() to public;

-- identity
revoke all on function peer._identity_single_row(), peer._new_identity(), peer.whoami(), peer.invite(),
    peer.rotate_identity(), peer.reset_identity(), peer.keep_identity() from public;
grant execute on function peer._identity_single_row(), peer.whoami() to public;
grant execute on function peer.invite(), peer.rotate_identity() to aquapeer_admin;

-- friends and introductions (the handler checks that it runs in an executor for the introducer)
revoke all on function peer.add_friend(text, text), peer.accept_friend(text, text), peer.block(text),
    peer.set_friend_role(text, regrole), peer.remove_friend(text, text), peer.set_introducer(text, boolean),
    peer.introduce(text, text, text), peer._introduction_message(peer.inbox) from public;
grant execute on function peer.add_friend(text, text), peer.accept_friend(text, text), peer.block(text),
    peer.set_friend_role(text, regrole), peer.remove_friend(text, text), peer.set_introducer(text, boolean),
    peer.introduce(text, text, text) to aquapeer_admin;
grant execute on function peer._introduction_message(peer.inbox) to public;

-- connections
revoke all on function peer.connect(text, interval), peer.reload_worker(), peer.disconnect(text),
    peer._connections() from public;
grant execute on function peer.connect(text, interval), peer.reload_worker(), peer.disconnect(text),
    peer._connections() to aquapeer_admin;

-- messages
revoke all on function peer._wake_at_commit(), peer._friend_for_sending(text),
    peer.send(text, text, jsonb), peer.allow_topic(text, text), peer.disallow_topic(text, text),
    peer.on_message(text, regprocedure), peer._message_handled(uuid),
    peer.retry_message(uuid) from public;
grant execute on function peer._message_handled(uuid) to public;
grant execute on function peer.send(text, text, jsonb), peer.allow_topic(text, text),
    peer.disallow_topic(text, text), peer.on_message(text, regprocedure),
    peer.retry_message(uuid) to aquapeer_admin;

-- calls
revoke all on function peer.expose(regprocedure, text, text), peer.unexpose(text, text),
    peer.call(text, text, jsonb, interval) from public;
grant execute on function peer.expose(regprocedure, text, text), peer.unexpose(text, text),
    peer.call(text, text, jsonb, interval) to aquapeer_admin;

-- bundle_tracking
revoke all on function bundle._rows_query(regclass, text, name[], text), bundle._whole(text, regclass),
    bundle._hash(text), bundle._row_hashes_query(regclass, text, name[], text),
    bundle._row_hashes(regclass, text, name[], text), bundle._capture(), bundle."create"(text),
    bundle._bundle(text), bundle.track(text, regclass, text),
    bundle._changes_query(text, bundle.tracked, boolean), bundle.status(text),
    bundle._has_user_triggers(regclass), bundle._tracked_names(text), bundle._key(jsonb, name[]),
    bundle._key_values(regclass, name[], text), bundle.rescan(text), bundle._forget(),
    bundle._keep_name(), bundle._key_of_columns(jsonb, name[]), bundle._untracked(),
    bundle.drop(text) from public;
grant execute on function bundle._rows_query(regclass, text, name[], text), bundle._hash(text),
    bundle._row_hashes_query(regclass, text, name[], text),
    bundle._row_hashes(regclass, text, name[], text), bundle._capture(), bundle._bundle(text) to public;
grant execute on function bundle."create"(text), bundle.track(text, regclass, text), bundle.status(text),
    bundle.rescan(text), bundle.drop(text) to aquapeer_admin;

-- bundle_commit
revoke all on function bundle._stage(text), bundle._rebuild_buckets(text, regclass),
    bundle._rebuild_fans(text, regclass, text[]), bundle.commit(text, text), bundle.log(text),
    bundle._children(bytea), bundle._kind(bytea), bundle._entries(bytea), bundle._bucket(text),
    bundle._bucket_rows(text, bytea), bundle._head_row(text, regclass, text), bundle._head_rows(text, regclass),
    bundle._bucket_lines(bytea), bundle._bucket_misfit(bytea, text), bundle._blob_text(text, text),
    bundle._lines(bytea) from public;
grant execute on function bundle.commit(text, text), bundle.log(text) to aquapeer_admin;

-- bundle_store
revoke all on function bundle._keep(text, text[], bytea[]), bundle._promote(text, text[]),
    bundle._keep_commits(text, jsonb), bundle._describe(text), bundle._adopt(text, jsonb),
    bundle._reachable(text), bundle.export(text), bundle.import(jsonb), bundle._collect_garbage(),
    bundle._tree(text, text), bundle._check_root(text, text), bundle._node_at(text, text),
    bundle._misplaced(text, text, text), bundle._new_children(text, text, bytea, text),
    bundle._new_rows(text, text[], text[]), bundle._unlike_lines(text, bytea, text),
    bundle._pending_walk(text, text[], text[]), bundle._lacking(text, text[], text[]),
    bundle._keep(text, text[], bytea[], text[]), bundle.import_batch(jsonb[]) from public;
grant execute on function bundle.export(text), bundle.import(jsonb),
    bundle.import_batch(jsonb[]) to aquapeer_admin;

-- bundle_checkout
revoke all on function bundle._node_diff(text, text, text), bundle._tree_diff(text, text, text),
    bundle.diff(text, text, text), bundle._refuse_uncommitted(text, text), bundle._apply_begin(),
    bundle._fk_order(regclass[]), bundle._apply(text, text), bundle.checkout(text, text, boolean),
    bundle._tree_changes(text, text, text), bundle._tree_nodes(text, text, text),
    bundle._bucket_changes(text, text, text), bundle._write_statement(regclass, name[], boolean),
    bundle._checkout_changes(text, text, text),
    bundle._forget_written_keys(text, boolean), bundle._check_head_tree(text, text, text),
    bundle._advance_sequences(regclass[]) from public;
grant execute on function bundle.diff(text, text, text),
    bundle.checkout(text, text, boolean) to aquapeer_admin;

-- bundle_merge
revoke all on function bundle._ancestors(text, text), bundle._merge_base(text, text, text),
    bundle._merge_rows(text, text, text, text), bundle._integrate(text, text, boolean),
    bundle.resolve(text, regclass, jsonb, text, text, text), bundle.merge_abort(text) from public;
grant execute on function bundle.resolve(text, regclass, jsonb, text, text, text),
    bundle.merge_abort(text) to aquapeer_admin;

-- bundle_sharing
revoke all on function peer.share_bundle(text, text, boolean), peer.unshare_bundle(text, text),
    peer._check_bundle_served(text, text, boolean, boolean),
    peer._serve_bundle_head(text, text, boolean),
    peer._serve_bundle_objects(text, text, boolean, text[]), peer.pull_bundle(text, text, boolean),
    peer.push_bundle(text, text),
    peer._serve_bundle_commits(text, text, boolean, text[], text[]) from public;
grant execute on function peer._check_bundle_served(text, text, boolean, boolean),
    peer._serve_bundle_head(text, text, boolean),
    peer._serve_bundle_objects(text, text, boolean, text[]),
    peer._serve_bundle_commits(text, text, boolean, text[], text[]) to public;
grant execute on function peer.share_bundle(text, text, boolean), peer.unshare_bundle(text, text),
    peer.pull_bundle(text, text, boolean), peer.push_bundle(text, text) to aquapeer_admin;

-- replication
revoke all on peer.publication, peer.subscription, peer.clock, peer.row_clock, peer.apply_errors,
    peer.apply_errors_id_seq, peer.replication_conflicts, peer.replication_conflicts_id_seq,
    peer.publications, peer.subscriptions, peer.change_ahead_of_copy, peer.change_ahead_of_copy_id_seq,
    peer.resync_key, peer.resync_key_id_seq from public;
grant select on peer.publications, peer.subscriptions, peer.publication, peer.subscription, peer.row_clock,
    peer.apply_errors, peer.replication_conflicts, peer.change_ahead_of_copy, peer.resync_key to aquapeer_admin;
grant delete on peer.replication_conflicts to aquapeer_admin;
revoke all on function peer._clock_tick(bigint), peer._key_columns(regclass), peer._relation_name(regclass),
    peer._key_of(jsonb, text[]), peer._capture_changes(), peer._stamp_changes(oid, jsonb, bigint),
    peer._filtered_changes(oid, jsonb, text), peer._forwarded_changes(oid, jsonb, text),
    peer._recipients_changed(), peer._refuse_truncate(), peer.publish(regclass, text, text[], text),
    peer.unpublish(regclass, text), peer.subscribe(regclass, text, boolean), peer.unsubscribe(regclass, text),
    peer._copy_rows(peer.inbox), peer._applying_friend(text), peer._pending_changes(text, bigint),
    peer._change_messages(text, uuid[]), peer._subscribed(text, text), peer._row_states(text, regclass, jsonb),
    peer._record_apply(text, regclass, jsonb, jsonb, jsonb, bigint),
    peer._set_aside(text, text, jsonb, text, text), peer._applied(text, uuid[], jsonb),
    peer._pause_subscription(text, text, text), peer._apply_changes(peer.inbox), peer.retry_apply(bigint),
    peer.discard_apply(bigint), peer._row_hashes(regclass, name[], name[], text),
    peer._published_row_hashes(jsonb), peer.verify_subscription(regclass, text), peer._start_copy(regclass, text),
    peer._queue_copy_chunk(peer.publication, peer.friend, jsonb), peer._copy_chunk_applied(text, text, jsonb),
    peer._copy_in_progress(text, text), peer._hold_changes(text, regclass, jsonb),
    peer._take_held_changes(text, regclass, jsonb), peer._ask_copy_chunk(peer.subscription),
    peer._expire_changes(), peer._start_resync(text, text), peer._ask_stalled_copies() from public;
-- What an executor applying a friend's changes (connected as the friend's role) calls; each
-- checks that it runs in an executor for that friend.
grant execute on function peer._copy_rows(peer.inbox), peer._applying_friend(text),
    peer._pending_changes(text, bigint), peer._change_messages(text, uuid[]), peer._subscribed(text, text),
    peer._row_states(text, regclass, jsonb), peer._record_apply(text, regclass, jsonb, jsonb, jsonb, bigint),
    peer._set_aside(text, text, jsonb, text, text), peer._applied(text, uuid[], jsonb),
    peer._pause_subscription(text, text, text), peer._apply_changes(peer.inbox),
    peer._published_row_hashes(jsonb), peer._copy_chunk_applied(text, text, jsonb), peer._copy_in_progress(text, text),
    peer._hold_changes(text, regclass, jsonb), peer._take_held_changes(text, regclass, jsonb),
    peer._start_resync(text, text) to public;
grant execute on function peer.publish(regclass, text, text[], text), peer.unpublish(regclass, text),
    peer.subscribe(regclass, text, boolean), peer.unsubscribe(regclass, text), peer.retry_apply(bigint),
    peer.discard_apply(bigint), peer.verify_subscription(regclass, text) to aquapeer_admin;

-- bundle_follow
revoke all on peer.bundle_follow, peer.followed_bundles from public;
grant select on peer.bundle_follow, peer.followed_bundles to aquapeer_admin;
revoke all on function peer.follow_bundle(text, text), peer.unfollow_bundle(text, text),
    peer._follow_pull(jsonb) from public;
grant execute on function peer.follow_bundle(text, text), peer.unfollow_bundle(text, text) to aquapeer_admin;

-- presence
revoke all on peer.soft_lock, peer.lock_watch, peer.friend_presence, peer.soft_locks, peer.presence from public;
grant select on peer.lock_watch, peer.friend_presence, peer.soft_locks, peer.presence to aquapeer_admin;
revoke all on function peer._lock_key(regclass, jsonb), peer._take_locks(oid, jsonb, text, double precision, boolean),
    peer.soft_lock(regclass, jsonb, text, interval, boolean), peer.release_lock(uuid),
    peer._lock_audience(regclass), peer.watch(regclass, text), peer.unwatch(regclass, text),
    peer._take_auto_locks(oid, jsonb), peer._auto_soft_lock(), peer.auto_soft_lock(regclass),
    peer.no_auto_soft_lock(regclass), peer.set_status(text), peer._online_links(),
    peer._lock_overlaps(regclass, jsonb),
    peer._notify_soft_locks(peer.soft_lock[], text) from public;
grant execute on function peer._lock_key(regclass, jsonb), peer._take_locks(oid, jsonb, text, double precision, boolean),
    peer.soft_lock(regclass, jsonb, text, interval, boolean), peer.release_lock(uuid), peer.watch(regclass, text),
    peer.unwatch(regclass, text), peer.auto_soft_lock(regclass), peer.no_auto_soft_lock(regclass),
    peer.set_status(text), peer._online_links() to aquapeer_admin;

-- live rows
revoke all on peer.live_share, peer.live_text, peer.live_replication, peer.live_requests, peer.live_shares
    from public;
grant select on peer.live_share, peer.live_text, peer.live_replication, peer.live_requests, peer.live_shares
    to aquapeer_admin;
revoke all on function peer._live_key(regclass, jsonb), peer._live_text_columns(regclass),
    peer._live_key_match(regclass), peer._live_cells_query(regclass, text), peer._live_edits(jsonb),
    peer._live_documents(uuid, jsonb), peer._live_sync(uuid), peer._live_capture(),
    peer._live_check_publication(regclass, text), peer._live_replicate(regclass, text),
    peer._live_end(uuid, text, boolean), peer.share_live(regclass, jsonb, text, interval),
    peer.accept_live(uuid), peer.end_live(uuid), peer._live_take(text, bigint),
    peer._live_requested(text, jsonb), peer._live_accepted(text, uuid), peer._live_ended(text, uuid, text),
    peer._live_target(text, uuid), peer._live_merge(text, uuid, name, text), peer._live_message(peer.inbox),
    peer._expire_live(text[]) from public;
-- What an executor handling a friend's live messages (connected as the friend's role) calls; each
-- checks that it runs in an executor for that friend.
grant execute on function peer._live_take(text, bigint), peer._live_requested(text, jsonb),
    peer._live_accepted(text, uuid), peer._live_ended(text, uuid, text), peer._live_target(text, uuid),
    peer._live_merge(text, uuid, name, text), peer._live_message(peer.inbox) to public;
grant execute on function peer.share_live(regclass, jsonb, text, interval), peer.accept_live(uuid),
    peer.end_live(uuid) to aquapeer_admin;
