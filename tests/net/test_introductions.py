"""Introductions: a hub introduces two of its friends to each other (peer.introduce).

Real clusters, a real signaling server and real aiortc on loopback.  bob takes introductions as
friend requests; carol trusts the hub as an introducer (peer.set_introducer), so the hub's
introduction makes bob her friend by itself.
"""

import base64
import json

import pytest

import testbed as tb

MODULE_TESTBED = {"n": 3, "names": ["hub", "bob", "carol"]}


@pytest.fixture(scope="module")
def hub_and_friends(module_testbed, module_signal_server):
    hub, bob, carol = module_testbed.hub, module_testbed.bob, module_testbed.carol
    for cluster in (hub, bob, carol):
        tb.join_signaling(cluster, module_signal_server.url)
    carol.sql("update peer.config set display_name = 'Carol''s shop'")
    for friend in (bob, carol):
        tb.befriend(hub, "hub", friend, friend.name)
        assert hub.scalar("select peer.connect(%s)", friend.name) == "connected"
    return hub, bob, carol


def test_introduction_is_a_request_or_a_friendship_as_the_recipient_chose(hub_and_friends):
    hub, bob, carol = hub_and_friends
    carol.sql("select peer.set_introducer('hub', true)")
    carol_id, bob_id = carol.scalar("select peer.whoami()"), bob.scalar("select peer.whoami()")
    hub.sql("select peer.introduce('bob', 'carol', 'you both replicate widgets')")

    # carol trusts the hub: bob is her friend, with the default role, not one the hub names
    tb.wait_for(lambda: carol.scalar("select count(*) from peer.friends where peer_id = %s", bob_id) == 1, 30,
                message="carol to accept bob by the hub's introduction")
    assert carol.sql("select name, role, introduced_by, introducer from peer.friends where peer_id = %s",
                     bob_id) == [("bob", "aquapeer_friend", "hub", False)]

    # bob does not: carol waits in his requests, introduced by the hub, with the hub's name and note;
    # carol's own attempts to connect add the name she gives herself
    tb.wait_for(lambda: bob.scalar("select name from peer.friend_requests where peer_id = %s", carol_id)
                == "Carol's shop", 30, message="bob to see carol's request with her display name")
    assert bob.sql("select introduced_by, introduced_as, note from peer.friend_requests where peer_id = %s",
                   carol_id) == [("hub", "carol", "you both replicate widgets")]
    assert bob.scalar("select count(*) from peer.friends where peer_id = %s", carol_id) == 0

    bob.sql("select peer.accept_friend(%s, 'carol')", carol_id)
    assert bob.scalar("select peer.connect('carol')") == "connected"
    assert bob.sql("select introduced_by from peer.friends where name = 'carol'") == [("hub",)]


def test_an_introduction_altered_or_meant_for_another_never_makes_a_friendship(hub_and_friends):
    hub, bob, _carol = hub_and_friends
    bob.sql("select peer.set_introducer('hub', true)")
    friends_before = bob.sql("select peer_id from peer.friends order by 1")
    hub.sql("select peer.introduce('bob', 'carol', 'second')")
    to_carol = json.loads(hub.scalar("select payload::text from peer.outbox_message where friend = 'carol' "
                                     "and topic = 'aquapeer.introduce' order by position desc limit 1"))
    body = bytearray(base64.b64decode(to_carol["introduction"]))
    body[len(body) // 2] ^= 1  # inside the key chain: still well-formed, no longer signed
    altered = dict(to_carol, introduction=base64.b64encode(bytes(body)).decode())
    # one meant for carol passed on to bob, and one altered on the way
    for payload in (to_carol, altered):
        hub.sql("select peer.send('bob', 'aquapeer.introduce', %s::jsonb)", json.dumps(payload))
    tb.wait_for(lambda: bob.scalar("select count(*) from peer.inbox where topic = 'aquapeer.introduce' "
                                   "and handler_error is not null") == 2, 30,
                message="bob to refuse both introductions")
    errors = [r[0] for r in bob.sql("select handler_error from peer.inbox where topic = 'aquapeer.introduce' "
                                    "and handler_error is not null order by position")]
    assert "meant for another peer" in errors[0], errors
    assert "signature does not verify" in errors[1], errors
    assert bob.sql("select peer_id from peer.friends order by 1") == friends_before
    assert bob.scalar("select count(*) from peer.friend_requests") == 0
