"""Live replication: peer.publish on one database, peer.subscribe on a friend.

Real clusters, a real signaling server and real aiortc on loopback.  The
module shares three clusters, friends of each other: alice, bob and carol.
Each test uses tables of its own.
"""

import time

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 3, "names": ["alice", "bob", "carol"]}
FRIEND_ROLE = "aq_replica"


@pytest.fixture(scope="module")
def trio(module_testbed, module_signal_server):
    alice, bob, carol = module_testbed.alice, module_testbed.bob, module_testbed.carol
    for cluster in (alice, bob, carol):
        tb.join_signaling(cluster, module_signal_server.url)
        cluster.sql(f"create role {FRIEND_ROLE} login")
    for (a, a_name), (b, b_name) in (((alice, "alice"), (bob, "bob")), ((bob, "bob"), (carol, "carol")),
                                     ((carol, "carol"), (alice, "alice"))):
        tb.befriend(a, a_name, b, b_name)
    for cluster, friends in ((alice, ("bob", "carol")), (bob, ("alice", "carol")), (carol, ("alice", "bob"))):
        for friend in friends:
            cluster.sql("select peer.set_friend_role(%s, %s)", friend, FRIEND_ROLE)
    for cluster, friend in ((alice, "bob"), (bob, "carol"), (carol, "alice")):
        assert cluster.scalar("select peer.connect(%s)", friend) == "connected"
    return alice, bob, carol


@pytest.fixture
def peers(trio):
    alice, bob, carol = trio
    for cluster, friend in ((alice, "bob"), (bob, "carol"), (carol, "alice")):
        tb.wait_connected(cluster, friend)
    return trio


def make_table(clusters, ddl, name):
    for cluster in clusters:
        cluster.sql(ddl)
        cluster.sql(f"grant select, insert, update, delete on {name} to {FRIEND_ROLE}")


def rows(cluster, table, order="id"):
    return cluster.sql(f"select * from {table} order by {order}")


def wait_same(clusters, table, timeout=30, expected=None):
    def same():
        tables = [rows(c, table) for c in clusters]
        if expected is not None and tables[0] != expected:
            return False
        return all(t == tables[0] for t in tables[1:])
    tb.wait_for(same, timeout, interval=0.1, message=f"{table} to be the same everywhere",
                ignore=(psycopg.Error,))
    return rows(clusters[0], table)


def applied(cluster, table, friend):
    return cluster.scalar("select applied_changes from peer.subscriptions where relation = %s::regclass "
                          "and friend = %s", table, friend)


# --------------------------------------------------------------------------

def test_publishing_needs_a_primary_key_and_real_columns(peers):
    alice, _, _ = peers
    alice.sql("create table public.nokey (v text)")
    with pytest.raises(psycopg.errors.InvalidTableDefinition, match="has no primary key"):
        alice.sql("select peer.publish('public.nokey', 'bob')")
    alice.sql("create table public.withkey (id int primary key, v text)")
    with pytest.raises(psycopg.errors.UndefinedColumn, match="has no column nope"):
        alice.sql("select peer.publish('public.withkey', 'bob', columns => '{v,nope}')")
    with pytest.raises(psycopg.errors.DatatypeMismatch, match="row filter"):
        alice.sql("select peer.publish('public.withkey', 'bob', row_filter => 'no_such_column > 1')")
    with pytest.raises(psycopg.errors.UndefinedObject, match='unknown friend "nobody"'):
        alice.sql("select peer.publish('public.withkey', 'nobody')")
    alice.sql("select peer.publish('public.withkey', 'bob')")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="TRUNCATE of public.withkey is not replicated"):
        alice.sql("truncate public.withkey")
    assert alice.scalar("select peer.unpublish('public.withkey', 'bob')") is True
    alice.sql("truncate public.withkey")  # unpublished: the triggers are gone


def test_changes_flow_both_ways_and_concurrent_edits_converge(peers):
    alice, bob, _ = peers
    make_table((alice, bob), "create table public.item (id int primary key, a text, b text, n int)", "public.item")
    for here, there in ((alice, "bob"), (bob, "alice")):
        here.sql("select peer.publish('public.item', %s::text)", there)
        here.sql("select peer.subscribe('public.item', %s::text, initial => false)", there)
    alice.sql("insert into public.item select g, 'a' || g, 'b' || g, g from generate_series(1, 100) g")
    wait_same((alice, bob), "public.item")
    assert len(rows(bob, "public.item")) == 100
    # different columns of the same row, at once: both edits survive
    alice.sql("update public.item set a = 'alice' where id <= 10")
    bob.sql("update public.item set b = 'bob' where id <= 10")
    result = wait_same((alice, bob), "public.item")
    assert all(r[1] == "alice" and r[2] == "bob" for r in result[:10])
    # the same column at once (bob's edit is stamped first, commits last): the later stamp wins
    # everywhere, and alice keeps bob's losing value as a conflict
    with bob.connect(autocommit=False) as conn:
        conn.execute("update public.item set n = -2 where id = 20")
        alice.sql("update public.item set n = -1 where id = 20")
        conn.commit()
    result = wait_same((alice, bob), "public.item")
    assert result[19][3] == -1
    tb.wait_for(lambda: alice.sql("select local_value, remote_value, winner from peer.replication_conflicts "
                                  "where \"column\" = 'n'") == [(-1, -2, "local")], 30,
                message="the conflict to be kept")
    # a delete on one side against an update on the other: the row is gone on both
    alice.sql("delete from public.item where id = 30")
    bob.sql("update public.item set a = 'late' where id = 30")
    result = wait_same((alice, bob), "public.item")
    assert 30 not in [r[0] for r in result]
    # insert against insert of the same key: one row, the same on both
    with bob.connect(autocommit=False) as conn:
        conn.execute("insert into public.item values (500, 'from bob', 'b', 2)")
        alice.sql("insert into public.item values (500, 'from alice', null, 1)")
        conn.commit()
    result = wait_same((alice, bob), "public.item")
    assert [r for r in result if r[0] == 500] == [(500, "from alice", None, 1)]  # alice's stamp is later
    status = bob.sql("select state, last_error, apply_errors from peer.subscriptions "
                     "where relation = 'public.item'::regclass")
    assert status == [("streaming", None, 0)]


def test_a_refused_row_is_set_aside_while_the_others_flow_then_retried(peers):
    alice, bob, _ = peers
    make_table((alice, bob), "create table public.uniq (id int primary key, u text unique, v int)", "public.uniq")
    alice.sql("select peer.publish('public.uniq', 'bob')")
    bob.sql("select peer.subscribe('public.uniq', 'alice', initial => false)")
    bob.sql("insert into public.uniq values (100, 'taken', 0)")
    alice.sql("begin; insert into public.uniq values (1, 'taken', 1), (2, 'free', 2); commit")
    alice.sql("update public.uniq set v = 10 where id = 1")   # waits behind the refused insert
    alice.sql("insert into public.uniq values (3, 'three', 3)")
    tb.wait_for(lambda: bob.scalar("select count(*) from public.uniq where id in (2, 3)") == 2, 30,
                message="the other rows to flow")
    errors = bob.sql("select id, sqlstate, reason from peer.apply_errors where relation = 'public.uniq' order by id")
    assert [e[1] for e in errors] == ["23505", None]
    assert "waiting behind apply error" in errors[1][2]
    bob.sql("delete from public.uniq where id = 100")
    assert bob.scalar("select peer.retry_apply(%s)", errors[0][0]) is True
    tb.wait_for(lambda: bob.sql("select v from public.uniq where id = 1") == [(10,)], 30,
                message="the retried row and the change behind it")
    assert bob.scalar("select count(*) from peer.apply_errors where relation = 'public.uniq'") == 0


def test_a_ring_of_three_converges_without_echo(peers):
    alice, bob, carol = peers
    make_table((alice, bob, carol), "create table public.ring (id int primary key, v text)", "public.ring")
    for here, there in ((alice, "bob"), (bob, "carol"), (carol, "alice")):
        here.sql("select peer.publish('public.ring', %s::text)", there)
    for here, there in ((bob, "alice"), (carol, "bob"), (alice, "carol")):
        here.sql("select peer.subscribe('public.ring', %s::text, initial => false)", there)
    alice.sql("insert into public.ring select g, 'alice' from generate_series(1, 50) g")
    carol.sql("insert into public.ring select g, 'carol' from generate_series(51, 100) g")
    assert len(wait_same((alice, bob, carol), "public.ring")) == 100
    bob.sql("update public.ring set v = 'bob' where id % 10 = 0")
    result = wait_same((alice, bob, carol), "public.ring")
    assert {r[1] for r in result if r[0] % 10 == 0} == {"bob"}
    # Each change applied once on each other database, never back at its origin: bob has alice's
    # and carol's 100 rows, carol alice's 50 and bob's 10 updates, alice carol's 50 and bob's 10.
    tb.wait_for(lambda: (applied(bob, "public.ring", "alice"), applied(carol, "public.ring", "bob"),
                         applied(alice, "public.ring", "carol")) == (100, 60, 60), 20,
                message="each change to be applied once everywhere")
    time.sleep(1)  # and nothing more comes
    assert (applied(bob, "public.ring", "alice"), applied(carol, "public.ring", "bob"),
            applied(alice, "public.ring", "carol")) == (100, 60, 60)


def test_schema_and_privilege_problems_pause_and_resume_after_the_fix(peers):
    alice, bob, _ = peers
    alice.sql("create table public.shape (id int primary key, v text, extra int)")
    bob.sql("create table public.shape (id int primary key, v text)")
    bob.sql(f"grant select, insert on public.shape to {FRIEND_ROLE}")
    alice.sql("select peer.publish('public.shape', 'bob')")
    bob.sql("select peer.subscribe('public.shape', 'alice', initial => false)")
    alice.sql("insert into public.shape values (1, 'one', 1)")
    tb.wait_for(lambda: bob.scalar("select state from peer.subscriptions where relation = 'public.shape'::regclass")
                == "paused", 30, message="the subscription to pause")
    assert "column extra of public.shape does not exist here" in bob.scalar(
        "select last_error from peer.subscriptions where relation = 'public.shape'::regclass")
    bob.sql("alter table public.shape add column extra int")
    tb.wait_for(lambda: bob.sql("select * from public.shape") == [(1, "one", 1)], 30,
                message="the change to be applied after the fix")
    alice.sql("update public.shape set v = 'uno' where id = 1")
    tb.wait_for(lambda: bob.scalar("select last_error from peer.subscriptions "
                                   "where relation = 'public.shape'::regclass") or "", 30,
                message="the missing privilege to pause it")
    assert "lacks the UPDATE privilege on public.shape" in bob.scalar(
        "select last_error from peer.subscriptions where relation = 'public.shape'::regclass")
    bob.sql(f"grant update on public.shape to {FRIEND_ROLE}")
    tb.wait_for(lambda: bob.sql("select v from public.shape") == [("uno",)], 30, message="the update after the grant")
    assert bob.scalar("select state from peer.subscriptions where relation = 'public.shape'::regclass") == "streaming"


def test_an_initial_copy_then_changes_and_a_subscriber_that_was_away(peers, module_testbed):
    alice, bob, _ = peers
    make_table((alice, bob), "create table public.copied (id int primary key, v int, note text)", "public.copied")
    alice.sql("insert into public.copied select g, g, 'before' from generate_series(1, 5000) g")
    alice.sql("select peer.publish('public.copied', 'bob', columns => '{v}', row_filter => 'id <= 4000')")
    bob.sql("select peer.subscribe('public.copied', 'alice')")
    expected = [(i, i, None) for i in range(1, 4001)]
    tb.wait_for(lambda: rows(bob, "public.copied") == expected, 60, message="the initial copy")
    tb.wait_for(lambda: bob.scalar("select state from peer.subscriptions where relation = 'public.copied'::regclass")
                == "streaming", 10, message="the subscription to stream")
    # bob away while 10,000 changes are made
    bob.stop()
    alice.sql("do $$ begin for i in 1..10 loop update public.copied set v = v + 1 where id <= 1000; "
              "commit; end loop; end $$")
    bob.start()
    tb.wait_connected(alice, "bob", timeout=60)
    expected = [(i, i + 10 if i <= 1000 else i, None) for i in range(1, 4001)]
    tb.wait_for(lambda: rows(bob, "public.copied") == expected, 90, message="bob to catch up",
                ignore=(psycopg.Error,))
    # verified by row hashes over the published columns and rows: the same, then one differs
    assert bob.sql("select * from peer.verify_subscription('public.copied', 'alice')") == []
    bob.sql("update public.copied set v = -1 where id = 7")
    bob.sql("insert into public.copied values (4001, 1, null)")
    assert sorted(bob.sql("select key->>'id', difference from peer.verify_subscription('public.copied', 'alice')")) == \
        [("4001", "not at the friend"), ("7", "differs")]


def test_killed_servers_lose_nothing_and_apply_nothing_twice(peers):
    alice, bob, _ = peers
    make_table((alice, bob), "create table public.counted (id int primary key, n int)", "public.counted")
    alice.sql("insert into public.counted select g, 0 from generate_series(1, 100) g")
    alice.sql("select peer.publish('public.counted', 'bob')")
    bob.sql("select peer.subscribe('public.counted', 'alice')")
    tb.wait_for(lambda: bob.scalar("select count(*) from public.counted") == 100, 30, message="the copy")
    # increments are not idempotent: a change applied twice or lost shows in the sum
    def increment_all():
        with alice.connect() as conn:
            conn.autocommit = True
            conn.execute("set synchronous_commit = on")  # what alice acknowledged survives its kill
            for i in range(1, 101):
                conn.execute("update public.counted set n = n + 1 where id = %s", (i,))
    for victim in (bob, alice):
        increment_all()
        victim.kill9()  # while the changes stream
        victim.start()
        tb.wait_connected(alice, "bob", timeout=60)
        increment_all()
    expected = [(i, 4) for i in range(1, 101)]
    tb.wait_for(lambda: rows(bob, "public.counted") == expected, 90, message="bob to have every change once",
                ignore=(psycopg.Error,))
