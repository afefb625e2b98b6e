"""The outbox on one real cluster, for a friend that never connects: what peer.send
refuses, how messages are numbered, when they expire or are pruned, and what a new
stream epoch does.  (Delivery between clusters: tests/net/test_messaging.py.)"""

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
