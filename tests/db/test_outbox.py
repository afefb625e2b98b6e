"""The outbox on one real cluster, for a friend that never connects: what peer.send
refuses, how messages are numbered, that sending transactions do not wait for each
other, when messages expire or are pruned, and what a new stream epoch does.
(Delivery between clusters: tests/net/test_messaging.py.)"""

import threading
import time

import psycopg
import pytest

import testbed as tb
from aquapeer import identity


@pytest.fixture(scope="module")
def outbox(worker_cluster):
    """worker_cluster with a friend "ghost" that exists only as an invite."""
    ghost = identity.Identity.generate()
    worker_cluster.sql("select peer.add_friend('ghost', %s)", identity.make_invite(ghost, [], "ghost"))
    return worker_cluster


@pytest.fixture(autouse=True)
def empty_outbox(outbox):
    outbox.sql("delete from peer.outbox_message")
    outbox.sql("update peer.config set max_message_bytes = default, outbox_max_age = default, "
               "outbox_max_bytes = default, outbox_retention = default")


def restart_worker(cluster):
    """Housekeeping and the epoch check run when the worker starts."""
    cluster.sql("select peer.stop_worker()")
    cluster.sql("select peer.start_worker()")


def states(cluster):
    return cluster.sql("select payload, state, reason, seq from peer.outbox order by created_at")


def test_sent_messages_are_numbered_in_commit_order(outbox):
    first, second = outbox.connect(), outbox.connect()
    first.autocommit = second.autocommit = False
    try:
        first.execute("select peer.send('ghost', 't', '1')")           # begins first,
        second.execute("select peer.send('ghost', 't', '2'), peer.send('ghost', 't', '3')")
        second.commit()
        tb.wait_for(lambda: outbox.scalar("select count(*) from peer.outbox where seq is not null") == 2, 5)
        first.execute("select peer.send('ghost', 't', '4')")
        first.commit()                                                  # commits last
    finally:
        first.close()
        second.close()
    tb.wait_for(lambda: outbox.scalar("select count(*) from peer.outbox where seq is not null") == 4, 5)
    numbered = outbox.sql("select payload from peer.outbox order by seq")
    assert [p for (p,) in numbered] == [2, 3, 1, 4]
    assert {s for _p, s, _r, _q in states(outbox)} == {"queued"}  # ghost never connects


def numbered(cluster):
    return cluster.scalar("select count(*) from peer.outbox where seq is not null")


def test_sending_transactions_commit_side_by_side(outbox):
    """A sender that is still committing (held here by a deferred trigger of its own, after
    peer.send) does not hold up another sender's COMMIT, nor the numbering of its messages."""
    outbox.sql("create table if not exists public.gate (x int); "
               "create or replace function public.wait_at_gate() returns trigger language plpgsql as "
               "$$ begin perform pg_advisory_xact_lock(4242); return null; end $$; "
               "drop trigger if exists wait_at_gate on public.gate; "
               "create constraint trigger wait_at_gate after insert on public.gate "
               "deferrable initially deferred for each row execute function public.wait_at_gate()")
    # A lock timeout, so that a sender waiting for another fails instead of hanging the test
    # (statement_timeout does not cover the deferred triggers COMMIT runs).
    with outbox.connect() as gatekeeper, outbox.connect(autocommit=False) as first, \
            outbox.connect(autocommit=False, options="-c lock_timeout=5s") as second:
        gatekeeper.execute("select pg_advisory_lock(4242)")
        first_pid = first.info.backend_pid
        first.execute("select peer.send('ghost', 't', '1')")
        first.execute("insert into public.gate values (1)")
        # Open after peer.send: the second sender does not wait for it.
        second.execute("select peer.send('ghost', 't', '2')")
        started = time.monotonic()
        second.commit()
        assert time.monotonic() - started < 2
        # Inside its COMMIT (the deferred triggers run there): nor then.
        committing = threading.Thread(target=first.commit)
        committing.start()
        try:
            tb.wait_for(lambda: outbox.scalar("select count(*) from pg_locks where pid = %s and not granted "
                                              "and locktype = 'advisory'", first_pid) == 1, 5,
                        message="the first sender to wait at its gate, inside COMMIT")
            second.execute("select peer.send('ghost', 't', '3')")
            started = time.monotonic()
            second.commit()
            assert time.monotonic() - started < 2
            tb.wait_for(lambda: numbered(outbox) == 2, 5, message="the second sender's messages numbered")
            assert outbox.scalar("select seq from peer.outbox where payload = '1'") is None
        finally:
            gatekeeper.execute("select pg_advisory_unlock(4242)")
            committing.join(10)
    tb.wait_for(lambda: numbered(outbox) == 3, 5)
    # The first began before the second committed: it may follow it.
    assert [p for (p,) in outbox.sql("select payload from peer.outbox order by seq")] == [2, 3, 1]


def test_a_prepared_sender_blocks_no_one_and_is_delivered_after_commit_prepared(make_testbed):
    bed = make_testbed(1, names=["prepared"], extra_conf={"max_prepared_transactions": 2})
    cluster = bed[0]
    if cluster.scalar("select current_setting('max_prepared_transactions')::int") < 1:
        pytest.skip("the test cluster did not take max_prepared_transactions > 0")
    cluster.sql("create extension aquapeer cascade")
    tb.wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null"), 20,
                message="the worker to answer", ignore=(Exception,))
    ghost = identity.Identity.generate()
    cluster.sql("select peer.add_friend('ghost', %s)", identity.make_invite(ghost, [], "ghost"))
    options = "-c lock_timeout=5s"  # a sender waiting for the prepared one fails, not hangs
    with cluster.connect(autocommit=False, options=options) as preparer:
        preparer.execute("select peer.send('ghost', 't', '\"prepared\"')")
        preparer.execute("prepare transaction 'sent'")
        preparer.commit()  # psycopg's own transaction state; the prepared one stays
    try:
        with cluster.connect(autocommit=False, options=options) as other:
            other.execute("select peer.send('ghost', 't', '\"other\"')")
            started = time.monotonic()
            other.commit()
            assert time.monotonic() - started < 2
        tb.wait_for(lambda: numbered(cluster) == 1, 5, message="the other sender's message numbered")
        assert cluster.sql("select payload from peer.outbox where seq is not null") == [("other",)]
        assert cluster.scalar("select count(*) from peer.outbox") == 1  # the prepared one is not visible
    finally:
        cluster.sql("commit prepared 'sent'")
    # No wake comes with COMMIT PREPARED: the worker's poll (messaging.POLL_S, 5 s) finds it.
    tb.wait_for(lambda: numbered(cluster) == 2, 15, message="the prepared message numbered after COMMIT PREPARED")
    assert [p for (p,) in cluster.sql("select payload from peer.outbox order by seq")] == ["other", "prepared"]


def test_a_rolled_back_send_never_exists(outbox):
    with outbox.connect() as conn:
        conn.autocommit = False
        conn.execute("select peer.send('ghost', 't', '\"never\"')")
        conn.rollback()
    time.sleep(0.3)
    assert outbox.scalar("select count(*) from peer.outbox") == 0


def test_bad_sends_name_the_problem_and_change_nothing(outbox):
    outbox.sql("update peer.config set max_message_bytes = 2048")
    cases = [("select peer.send('nobody', 't', '1')", psycopg.errors.UndefinedObject, 'unknown friend "nobody"'),
             ("select peer.send('ghost', '', '1')", psycopg.errors.InvalidParameterValue, "invalid topic"),
             ("select peer.send('ghost', 't', null)", psycopg.errors.NullValueNotAllowed, "must not be null"),
             ("select peer.send('ghost', 't', to_jsonb(repeat('x', 3000)))", psycopg.errors.ProgramLimitExceeded,
              'larger than "ghost" accepts \\(2048 bytes\\)')]
    for query, error, message in cases:
        with pytest.raises(error, match=message):
            outbox.sql(query)
    assert outbox.scalar("select count(*) from peer.outbox") == 0


def test_old_and_excess_messages_expire_with_a_warning(outbox):
    outbox.sql("select peer.send('ghost', 'old', to_jsonb(g)) from generate_series(1, 2) g")
    outbox.sql("update peer.outbox_message set created_at = created_at - interval '31 days'")
    outbox.sql("select peer.send('ghost', 'big', to_jsonb(repeat('x', 1000))) from generate_series(1, 5)")
    outbox.sql("update peer.config set outbox_max_bytes = 3500")
    offset = outbox.log_size()
    restart_worker(outbox)
    outbox.wait_for_log(r"WARNING: .*expired 2 messages to ghost: not acknowledged within 30 days", 10, since=offset)
    outbox.wait_for_log(r"WARNING: .*expired 2 messages to ghost: more than 3500 bytes were waiting", 10,
                        since=offset)
    rows = outbox.sql("select topic, state from peer.outbox order by created_at")
    assert rows == [("old", "expired")] * 2 + [("big", "expired")] * 2 + [("big", "queued")] * 3


def test_acknowledged_messages_are_pruned_after_the_retention(outbox):
    outbox.sql("select peer.send('ghost', 't', to_jsonb(g)) from generate_series(1, 3) g")
    tb.wait_for(lambda: outbox.scalar("select count(*) from peer.outbox where seq is not null") == 3, 5)
    # As if ghost had acknowledged the first two.
    outbox.sql("update peer.outbox_stream set acked_upto = (select min(seq) + 1 from peer.outbox_message)")
    assert [s for _p, s, _r, _q in states(outbox)] == ["acked", "acked", "queued"]
    outbox.sql("update peer.config set outbox_retention = '0'")
    restart_worker(outbox)   # marks what is acknowledged now
    time.sleep(0.5)
    assert outbox.scalar("select count(*) from peer.outbox") == 3
    restart_worker(outbox)   # a retention later: deletes it
    tb.wait_for(lambda: outbox.scalar("select count(*) from peer.outbox") == 1, 5)
    assert [p for p, _s, _r, _q in states(outbox)] == [3]


def test_removing_a_friend_expires_what_waits_for_it(outbox):
    peer_id = outbox.scalar("select peer_id from peer.friends where name = 'ghost'")
    chain = outbox.scalar("select chain from peer.friend where name = 'ghost'")
    outbox.sql("select peer.send('ghost', 't', '1')")
    try:
        outbox.sql("select peer.remove_friend('ghost', reason => 'moved away')")
        assert [(p, s, r) for p, s, r, _q in states(outbox)] == [(1, "expired", "moved away")]
    finally:
        outbox.sql("insert into peer.friend (name, peer_id, chain) values ('ghost', %s, %s)", peer_id, chain)


def test_a_copy_of_the_database_numbers_in_a_new_epoch(outbox):
    outbox.sql("select peer.send('ghost', 't', to_jsonb(g)) from generate_series(1, 3) g")
    tb.wait_for(lambda: outbox.scalar("select count(*) from peer.outbox where seq is not null") == 3, 5)
    outbox.sql("update peer.outbox_stream set acked_upto = (select min(seq) from peer.outbox_message)")
    before = outbox.scalar("select epoch from peer.stream_epoch")
    first_seq = outbox.scalar("select min(seq) from peer.outbox_message")
    # What a restore with recovery or a promotion changes: the timeline.
    outbox.sql("update peer.stream_epoch set timeline = timeline + 1")
    restart_worker(outbox)
    tb.wait_for(lambda: outbox.scalar("select count(*) from peer.outbox where state = 'queued' and seq is not null")
                == 2, 10)
    assert outbox.scalar("select epoch from peer.stream_epoch") != before
    rows = outbox.sql("select payload, state, seq from peer.outbox order by created_at, payload")
    assert rows == [(1, "acked", first_seq), (2, "queued", 1), (3, "queued", 2)]
