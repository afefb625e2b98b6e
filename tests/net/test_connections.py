"""Databases befriending and connecting through a real signaling server, with real aiortc on loopback."""

import os
import signal
import subprocess
import time

import psycopg
import pytest

import testbed as tb


@pytest.fixture
def signal_server():
    server = tb.SignalServer()
    server.start()
    yield server
    server.stop()


setup_peer = tb.join_signaling
befriend = tb.befriend


def connection(cluster, friend):
    rows = cluster.sql("select state, local_candidate, rtt_ms, last_error from peer.connections "
                       "where friend = %s", friend)
    return rows[0] if rows else None


@pytest.fixture
def pair(testbed, signal_server):
    alice, bob = testbed.alice, testbed.bob
    setup_peer(alice, signal_server.url)
    setup_peer(bob, signal_server.url)
    return alice, bob


def test_two_databases_connect(pair):
    alice, bob = pair
    befriend(alice, "alice", bob, "bob")
    assert alice.scalar("select peer.connect('bob')") == "connected"
    assert connection(alice, "bob")[:2] == ("connected", "host")
    tb.wait_for(lambda: (connection(bob, "alice") or ("",))[0] == "connected", 10)
    assert bob.sql("select name, state, role from peer.friends") == [("alice", "accepted", "aquapeer_friend")]


def test_connect_errors_name_the_cause(pair, signal_server):
    alice, bob = pair
    with pytest.raises(psycopg.errors.UndefinedObject, match='unknown friend "nobody"'):
        alice.sql("select peer.connect('nobody')")
    # bob added alice, but alice never added bob: bob is refused and shows as a request.
    bob.sql("select peer.add_friend('alice', %s)", alice.scalar("select peer.invite()"))
    with pytest.raises(psycopg.Error, match="refused: this peer has not accepted you as a friend"):
        bob.sql("select peer.connect('alice', timeout => '10 s')")
    bob_id = bob.scalar("select peer.whoami()")
    assert alice.sql("select peer_id, name, attempts >= 1 from peer.friend_requests") == [(bob_id, "postgres", True)]
    alice.sql("select peer.accept_friend(%s, 'bob')", bob_id)
    assert alice.sql("select count(*) from peer.friend_requests") == [(0,)]
    assert bob.scalar("select peer.connect('alice')") == "connected"


def test_offline_friend_is_named(pair):
    alice, bob = pair
    befriend(alice, "alice", bob, "bob")
    bob.sql("select peer.stop_worker()")
    started = time.monotonic()
    with pytest.raises(psycopg.Error, match="not reachable at the signaling server"):
        alice.sql("select peer.connect('bob', timeout => '5 s')")
    assert time.monotonic() - started < 9  # within the 5 s asked for, with room for a loaded machine


def test_bad_invites_change_nothing(pair):
    alice, bob = pair
    invite = bob.scalar("select peer.invite()")
    for bad, pattern in [(invite[:-5], "truncated or damaged|tampered"),
                         ("hello", "not an aquapeer invite"),
                         (alice.scalar("select peer.invite()"), "own")]:
        with pytest.raises(psycopg.Error, match=pattern):
            alice.sql("select peer.add_friend('bob', %s)", bad)
    with pytest.raises(psycopg.Error, match="invalid friend name"):
        alice.sql("select peer.add_friend('Bob!', %s)", invite)
    assert alice.sql("select count(*) from peer.friend") == [(0,)]
    alice.sql("select peer.add_friend('bob', %s)", invite)
    with pytest.raises(psycopg.errors.UniqueViolation, match="already in use"):
        alice.sql("select peer.add_friend('bob', %s)", invite)


def test_private_key_and_turn_credential_are_the_owners_only(pair):
    alice, _ = pair
    alice.sql("insert into peer.turn_server (url, username, credential) values ('turn:127.0.0.1:3478', 'u', 's3cret')")
    alice.sql("create role aq_admin login in role aquapeer_admin; create role aq_plain login")
    try:
        for user in ("aq_admin", "aq_plain"):
            with alice.connect(user=user) as conn:
                for query in ("select secret from peer.identity", "select credential from peer.turn_server"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(query)
                assert conn.execute("select peer.whoami()").fetchone()[0] == alice.scalar("select peer.whoami()")
        with alice.connect(user="aq_admin") as conn:
            assert conn.execute("select username from peer.turn_server").fetchone()[0] == "u"
    finally:
        alice.sql("drop role aq_admin; drop role aq_plain")


def test_whoami_is_checksummed_and_stable(pair):
    alice, _ = pair
    peer_id = alice.scalar("select peer.whoami()")
    assert len(peer_id) == 63 and peer_id.count("-") == 7
    assert alice.scalar("select peer.rotate_identity()") == peer_id
    assert alice.scalar("select peer.whoami()") == peer_id
    assert alice.scalar("select peer.reset_identity()") != peer_id


def test_rotate_identity_keeps_the_friendship(pair):
    alice, bob = pair
    befriend(alice, "alice", bob, "bob")
    assert alice.scalar("select peer.connect('bob')") == "connected"
    old_chain = bob.scalar("select chain from peer.friend where name = 'alice'")
    alice.sql("select peer.rotate_identity()")
    time.sleep(1.5)  # the worker takes up the new key within a second
    alice.sql("select peer.disconnect('bob')")
    # Both sides reconnect by themselves (auto_connect); bob learns alice's new key from its chain.
    tb.wait_for(lambda: bob.scalar("select chain from peer.friend where name = 'alice'") != old_chain, 20,
                message="bob to store alice's rotated key")
    assert alice.scalar("select peer.connect('bob')") == "connected"
    assert bob.scalar("select peer_id from peer.friends where name = 'alice'") == alice.scalar("select peer.whoami()")


def test_set_friend_role_refuses_powerful_roles(pair):
    alice, bob = pair
    alice.sql("select peer.add_friend('bob', %s)", bob.scalar("select peer.invite()"))
    alice.sql("create role aq_limited login; create role aq_bypass login bypassrls; "
              "create role aq_climber login in role aq_bypass; create role aq_nologin nologin")
    try:
        alice.sql("select peer.set_friend_role('bob', 'aq_limited')")
        assert alice.scalar("select role from peer.friends where name = 'bob'") == "aq_limited"
        # Executors connect as the role itself, which PostgreSQL 15 allows only for roles that can log in.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot log in"):
            alice.sql("select peer.set_friend_role('bob', 'aq_nologin')")
        for role in ("postgres", "aq_bypass", "aq_climber"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                alice.sql("select peer.set_friend_role('bob', %s)", role)
        assert alice.scalar("select role from peer.friends where name = 'bob'") == "aq_limited"
    finally:
        alice.sql("update peer.friend set role = 'aquapeer_friend'")
        alice.sql("drop role aq_limited; drop role aq_climber; drop role aq_bypass; drop role aq_nologin")


@pytest.mark.testbed(n=3)
def test_three_databases_all_connect(testbed, signal_server):
    peers = {name: testbed[name] for name in ("alice", "bob", "carol")}
    for cluster in peers.values():
        setup_peer(cluster, signal_server.url)
    names = list(peers)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            befriend(peers[a], a, peers[b], b)
    for a in names:
        for b in names:
            if a != b:
                assert peers[a].scalar("select peer.connect(%s)", b) == "connected"
    for cluster in peers.values():
        tb.wait_for(lambda cluster=cluster: cluster.scalar(
            "select count(*) from peer.connections where state = 'connected'") == 2, 10)


def test_signaling_server_restart_then_a_new_connect_works(pair, signal_server):
    alice, bob = pair
    befriend(alice, "alice", bob, "bob")
    alice.sql("update peer.friend set auto_connect = false")
    bob.sql("update peer.friend set auto_connect = false")
    signal_server.stop()
    signal_server.start()
    # Both workers re-register by themselves (backoff is capped at 10 s).
    assert alice.scalar("select peer.connect('bob', timeout => '30 s')") == "connected"


def test_an_offer_lost_with_the_signaling_server_is_made_again(pair, signal_server):
    alice, bob = pair
    befriend(alice, "alice", bob, "bob")
    alice.sql("update peer.friend set auto_connect = false")
    bob.sql("update peer.friend set auto_connect = false")
    [bob_worker] = bob.backend_pids("aquapeer worker")
    os.kill(bob_worker, signal.SIGSTOP)  # the offer waits at the server, unanswered
    try:
        with pytest.raises(psycopg.Error, match="within 1 s"):
            alice.sql("select peer.connect('bob', timeout => '1 s')")
        signal_server.stop()  # and is lost with it
        signal_server.start()
    finally:
        os.kill(bob_worker, signal.SIGCONT)
    started = time.monotonic()
    assert alice.scalar("select peer.connect('bob', timeout => '30 s')") == "connected"
    # Not by waiting out the lost offer's 15 s: a new one is made once alice is registered again.
    assert time.monotonic() - started < 12


# The bed turns synchronous_commit off for speed; a crash test needs commits to survive kill -9.
@pytest.mark.testbed(extra_conf={"synchronous_commit": "on"})
def test_a_crashed_friend_is_noticed_and_reconnected_when_back(pair):
    alice, bob = pair
    befriend(alice, "alice", bob, "bob")
    assert alice.scalar("select peer.connect('bob')") == "connected"
    bob.kill9()  # every process of bob's server, as in a machine crash
    crashed = time.monotonic()
    tb.wait_for(lambda: (connection(alice, "bob") or ("",))[0] != "connected", 20,
                message="alice to notice bob is gone")
    # 7 s of silence, checked every 2 s, and room for a loaded machine; aiortc alone takes ~30 s.
    assert time.monotonic() - crashed < 15
    assert connection(alice, "bob")[3]  # last_error says why
    bob.start()
    # auto_connect: nobody calls peer.connect; the friends find each other again.
    tb.wait_for(lambda: (connection(alice, "bob") or ("",))[0] == "connected", 40,
                message="alice and bob to reconnect by themselves", ignore=(psycopg.Error,))


def test_a_friend_reached_through_another_signaling_server(testbed):
    alice, bob = testbed.alice, testbed.bob
    here, there = tb.SignalServer().start(), tb.SignalServer().start()
    try:
        setup_peer(alice, here.url)
        setup_peer(bob, there.url)
        befriend(alice, "alice", bob, "bob")
        alice.sql("insert into peer.signal_server (url, priority) values (%s, 200)", there.url)
        alice.sql("update peer.friend set signal_server_id = "
                  "(select id from peer.signal_server where url = %s) where name = 'bob'", there.url)
        assert alice.scalar("select peer.connect('bob')") == "connected"
    finally:
        here.stop()
        there.stop()


def test_block_and_remove_friend(pair):
    alice, bob = pair
    befriend(alice, "alice", bob, "bob")
    assert alice.scalar("select peer.connect('bob')") == "connected"
    assert alice.scalar("select peer.block('bob')") is True
    assert alice.sql("select state from peer.friends where name = 'bob'") == [("blocked",)]
    tb.wait_for(lambda: (connection(alice, "bob") or ("",))[0] != "connected", 10)
    with pytest.raises(psycopg.Error, match="not accepted you|could not connect"):
        bob.sql("select peer.disconnect('alice'); select peer.connect('alice', timeout => '5 s')")
    assert alice.sql("select count(*) from peer.friend_requests") == [(0,)]  # blocked, not a stranger
    assert alice.scalar("select peer.remove_friend('bob')") is True
    assert alice.sql("select count(*) from peer.friends") == [(0,)]
    with pytest.raises(psycopg.errors.UndefinedObject, match='unknown friend "bob"'):
        alice.sql("select peer.remove_friend('bob')")


def test_friend_requests_are_bounded_oldest_dropped_first(pair, signal_server, tmp_path):
    alice, _ = pair
    alice.sql("update peer.config set friend_request_limit = 2")
    strangers = subprocess.Popen(
        [tb.AQUAPEER_CLI, "lightpeers", "--count", "3", "--signal", signal_server.url,
         "--friend-invite", alice.scalar("select peer.invite()"), "--invites-out", str(tmp_path / "invites.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Three strangers offer; alice refuses them all and keeps the two latest requests.
        tb.wait_for(lambda: alice.scalar("select count(*) from peer.friend_requests") == 2, 20)
        time.sleep(1.5)
        assert alice.scalar("select count(*) from peer.friend_requests") == 2
        assert alice.sql("select count(*) from peer.friends") == [(0,)]
        assert alice.sql("select state from peer.connections") == []
    finally:
        strangers.terminate()
        strangers.wait(10)
