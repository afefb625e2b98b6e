"""A friend on an earlier protocol version is told clearly that it cannot read a bundle of object
format aquapeer-bundle/2 (wire protocol 7); a friend on the current version clones it, its answers
in zstd (protocol 6 and later).

The friends are light peers (PeerNodes in this process, net/lightpeer's kind): the elder one
offers protocol versions up to 6 in its hello, as aquapeer did before 0.17.0, and both ask
alice's real worker for a bundle as a clone does.
"""

import asyncio
import hashlib
import os
import threading

import pytest

import testbed as tb
from aquapeer import identity
from aquapeer.bundles import store as bundle_store
from aquapeer.net import transport, wire
from aquapeer.net.node import MemoryFriendBook, PeerNode

MODULE_TESTBED = {"n": 1, "names": ["alice"]}


class Friend:
    """A light peer on its own loop in a thread, asking alice for a bundle."""

    def __init__(self, signal_url, name):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"friend-{name}", daemon=True)
        self.thread.start()
        self.name = name
        self.me = identity.Identity.generate()
        self.book = MemoryFriendBook()
        self.invite = identity.make_invite(self.me, [signal_url], name_hint=name)
        self.answers = {}
        self.node = self.run(self._start(signal_url))

    async def _start(self, signal_url):
        node = PeerNode(self.me, self.book, signal_url, transport.IceServers(), name=self.name,
                        on_frame=self._on_frame)
        await node.start()
        return node

    def _on_frame(self, link, frame):
        future = self.answers.pop(frame.get("id"), None)
        if frame["t"] == "bundle_data" and future is not None:
            future.set_result(frame)

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect(self, peer_id):
        return self.run(self.node.connect(peer_id, timeout=30))

    def answer(self, link, **request):
        """alice's answer frame."""
        async def ask():
            request_id = os.urandom(16)
            future = self.answers[request_id] = asyncio.get_running_loop().create_future()
            link.send({"t": "bundle_get", "id": request_id, "bundle": "shop", **request}, transport.CONTROL)
            return await asyncio.wait_for(future, 30)
        return self.run(ask())

    def ask(self, link, **request):
        """The body of alice's answer, as it came (compressed)."""
        answer = self.answer(link, **request)
        assert answer["ok"], answer["error"]
        return answer["data"]

    def close(self):
        try:
            self.run(self.node.stop(), timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def alice(module_testbed, module_signal_server):
    alice = module_testbed.alice
    tb.join_signaling(alice, module_signal_server.url)
    alice.sql("create table public.widget (id int primary key, name text, price numeric)")
    alice.sql("insert into public.widget select n, 'widget ' || n, n * 1.25 from generate_series(1, 300) n")
    alice.sql("select bundle.create('shop'); select bundle.track('shop', 'public.widget')")
    alice.sql("select bundle.commit('shop', 'first')")
    return alice


@pytest.fixture
def elder_protocol(monkeypatch):
    """Light peers made while this is in force speak versions up to 6, as before object format 2:
    in their hello, and when they pick the link's version."""
    elder = wire.FORMAT2_PROTOCOL - 1
    monkeypatch.setattr(wire, "PROTOCOL_MAX", elder)
    monkeypatch.setattr(wire.negotiate, "__defaults__", ((wire.PROTOCOL_MIN, elder),))


def clone(friend, link):
    """What a clone asks for, down to the rows: the head, the commits, then the tree, buckets
    with their rows.  Every answer's body as it came, and the key hashes of the rows received."""
    bodies = [friend.ask(link, want="head", ids=[])]
    head = wire.unpack_body(bodies[-1], wire.BODY_LIMIT)["head"]
    bodies.append(friend.ask(link, want="commits", ids=[]))
    (commit,) = wire.unpack_body(bodies[-1], wire.BODY_LIMIT)
    assert commit["id"] == head
    objects, rows, wanted = {}, set(), [commit["commit"]["tree"]]
    while wanted:
        bodies.append(friend.ask(link, want="objects", ids=[bytes.fromhex(i) for i in wanted], blobs=True))
        answered, blobs = wire.unpack_body(bodies[-1], wire.BODY_LIMIT)
        assert len(answered) == len(wanted)
        objects.update({hashlib.sha256(o).hexdigest(): o for o in answered})
        assert blobs == [None] * len(answered)  # a bucket/2 has its rows in it
        rows.update(line.split()[0] for o in answered if o.startswith(bundle_store.BUCKET2_HEADER)
                    for line in o.split(b"\n")[1:] if line)
        wanted = sorted({line.split()[-1].decode() for o in answered if not o.startswith(bundle_store.BUCKET2_HEADER)
                         for line in o.split(b"\n")[1:] if line} - objects.keys())
    return bodies, rows


@pytest.mark.parametrize("protocol", ["elder", "current"])
def test_a_friend_on_an_earlier_protocol_is_told_it_cannot_read_format_2(alice, module_signal_server, request,
                                                                         protocol):
    if protocol == "elder":
        request.getfixturevalue("elder_protocol")
    friend = Friend(module_signal_server.url, protocol)
    try:
        alices = identity.parse_invite(alice.scalar("select peer.invite()")).chain
        friend.book.add("alice", alices, auto_connect=False)
        alice.sql("select peer.add_friend(%s, %s)", protocol, friend.invite)
        alice.sql("select peer.share_bundle('shop', %s)", protocol)
        link = friend.connect(alices.peer_id)
        expected = 6 if protocol == "elder" else wire.PROTOCOL_MAX
        assert link.protocol == expected
        assert alice.scalar("select protocol from peer.connections where friend = %s", protocol) == expected

        if protocol == "elder":
            answer = friend.answer(link, want="head", ids=[])
            assert not answer["ok"] and answer["error"]["sqlstate"] == "0A000"
            assert answer["error"]["message"] == (
                'bundle "shop" has commits of object format aquapeer-bundle/2, which the aquapeer of elder '
                '(protocol 6) cannot read: update it to 0.17.0 or later')
            return
        bodies, rows = clone(friend, link)
        assert all(body.startswith(wire.ZSTD_MAGIC) for body in bodies)
        assert len(rows) == 300
    finally:
        friend.close()
        alice.sql("select peer.remove_friend(%s)", protocol)
