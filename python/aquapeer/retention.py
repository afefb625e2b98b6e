"""What the outbox and the bundles' object stores keep, and for how long: expiry, pruning and
garbage collection.

Run by an executor connected as the worker's role every 5 minutes (the
worker asks; messaging.run_retention), never on the network worker's loop:
the scans grow with what waits in the outbox.  Pure SQL behind the db
adapter; the worker logs what expired as a WARNING.
"""

EXPIRE_OLD = """
with expired as (
    update peer.outbox_message m
    set final_state = 'expired', reason = 'not acknowledged within ' || c.outbox_max_age::text,
        finished_at = pg_catalog.clock_timestamp()
    from peer.config c
    where m.final_state is null and m.created_at < pg_catalog.now() - c.outbox_max_age
      and not exists (select from peer.outbox_stream s
                      where s.peer_id = m.peer_id and s.epoch = m.epoch and m.seq <= s.acked_upto)
    returning m.friend, m.reason
)
select friend, count(*) as n, min(reason) as reason from expired group by friend
"""

EXPIRE_LARGE = """
with unacked as (
    -- through the indexes: what each stream has not had acknowledged, and what is not numbered yet
    select m.id, m.peer_id, m.position, m.bytes from peer.outbox_stream s
    cross join lateral (select * from peer.outbox_message m
                        where m.peer_id = s.peer_id and m.epoch = s.epoch and m.seq > s.acked_upto
                          and m.final_state is null) m
    union all
    select id, peer_id, position, bytes from peer.outbox_message where seq is null and final_state is null
), totals as (
    select id, sum(bytes) over (partition by peer_id order by position desc) as newer_bytes from unacked
), expired as (
    update peer.outbox_message m
    set final_state = 'expired', reason = 'more than ' || c.outbox_max_bytes || ' bytes were waiting',
        finished_at = pg_catalog.clock_timestamp()
    from totals u, peer.config c
    where m.id = u.id and u.newer_bytes > c.outbox_max_bytes
    returning m.friend, m.reason
)
select friend, count(*) as n, min(reason) as reason from expired group by friend
"""

PRUNE = [
    # Acknowledged at least a retention ago: up to the mark set a retention ago.
    """delete from peer.outbox_message m using peer.outbox_stream s, peer.config c
       where s.peer_id = m.peer_id and m.epoch = s.epoch and m.seq <= s.prune_upto and m.final_state is null
         and s.prune_mark_at <= pg_catalog.now() - c.outbox_retention""",
    """update peer.outbox_stream s set prune_upto = s.acked_upto, prune_mark_at = pg_catalog.now()
       from peer.config c where s.prune_mark_at <= pg_catalog.now() - c.outbox_retention""",
    # Final states: acknowledged in an earlier epoch, rejected, expired.
    """delete from peer.outbox_message m using peer.config c
       where (m.final_state = 'acked' and m.finished_at < pg_catalog.now() - c.outbox_retention)
          or (m.final_state in ('rejected', 'expired') and m.finished_at < pg_catalog.now() - c.outbox_max_age)""",
    # Replication's resolved conflicts, after peer.config.conflict_retention.
    """delete from peer.replication_conflicts r using peer.config c
       where r.at < pg_catalog.now() - c.conflict_retention""",
    # Tombstones past peer.config.tombstone_retention that every friend the table goes to has
    # acknowledged (no change older than the delete still waits for it).
    """delete from peer.row_clock k using peer.config c
       where k.deleted is not null and k.deleted_at < pg_catalog.now() - c.tombstone_retention
         and not exists (
             select from peer.publication p
             join peer.outbox_message m on m.friend = p.friend
             left join peer.outbox_stream s on s.peer_id = m.peer_id
             where p.relation = k.relation and m.topic = 'aquapeer.changes' and m.final_state is null
               and m.created_at <= k.deleted_at
               and (m.seq is null or m.epoch is distinct from s.epoch or m.seq > s.acked_upto))""",
    # Transfers show in peer.transfers for a day after they end; keep them a week for questions.
    """delete from peer.transfer where finished_at < pg_catalog.now() - interval '7 days'""",
]

# Replication's changes past peer.config.change_retention, and re-syncs for the friends whose
# changes were dropped (last: also after what EXPIRE_OLD and EXPIRE_LARGE dropped).
EXPIRE_CHANGES = "select * from peer._expire_changes()"

# Objects a pull or an import kept that no commit came to reference, once they are older than
# peer.config.object_retention (a walk over the bundle's trees, in SQL).
COLLECT = "select * from bundle._collect_garbage()"


def run(db):
    """Expire what waited too long or is too much, prune what was acknowledged long ago, collect
    unreferenced bundle objects; return [{friend, n, reason}] for what expired."""
    expired = [dict(r) for query in (EXPIRE_OLD, EXPIRE_LARGE, EXPIRE_CHANGES) for r in db.query(query)]
    for statement in PRUNE:
        db.query(statement)
    db.query(COLLECT)
    db.commit()
    return expired
