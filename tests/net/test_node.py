"""Light peers (outside PostgreSQL) connecting through a real signaling server with real aiortc."""

import asyncio
import os
import socket

import pytest

from aquapeer import identity
from aquapeer.net import signaling, transport
from aquapeer.net.node import ConnectError, MemoryFriendBook, PeerNode

transport.configure_ice(["127.0.0.1"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run():
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, 60))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


class Net:
    """A signaling server and light peers, all on loopback."""

    def __init__(self):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.server = None
        self.nodes = []
        self.frames = {}

    async def start_server(self):
        self.server = await signaling.serve("127.0.0.1", self.port)

    async def stop_server(self):
        self.server.close()
        await self.server.wait_closed()

    async def peer(self, name, **kw):
        me = identity.Identity.generate()
        node = PeerNode(me, MemoryFriendBook(), self.url, name=name,
                        on_frame=lambda link, frame, name=name: self.frames.setdefault(name, []).append(frame), **kw)
        await node.start()
        self.nodes.append(node)
        return node

    async def close(self):
        for node in self.nodes:
            await node.stop()
        if self.server is not None:
            await self.stop_server()


def befriend(a, b, auto_connect=False):
    a.friends.add(b.name, b.me.chain, auto_connect=auto_connect)
    b.friends.add(a.name, a.me.chain, auto_connect=auto_connect)


async def until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(predicate)
        await asyncio.sleep(0.05)


@pytest.fixture
def net(run):
    net = Net()
    run(net.start_server())
    yield net
    run(net.close())


def test_two_friends_connect_and_exchange_frames(net, run):
    async def go():
        alice, bob = await net.peer("alice"), await net.peer("bob")
        befriend(alice, bob)
        link = await alice.connect(bob.me.peer_id, timeout=10)
        assert link.state == "connected"
        await until(lambda: bob.links.get(alice.me.peer_id) and bob.links[alice.me.peer_id].state == "connected")
        call = {"t": "call", "id": b"a" * 16, "fn": "hello", "arg": '"bob"', "timeout_ms": 1000}
        cancel = {"t": "cancel", "id": b"b" * 16}
        link.send(call)
        bob.links[alice.me.peer_id].send(cancel)
        await until(lambda: net.frames.get("bob") and net.frames.get("alice"))
        assert net.frames["bob"] == [call]
        assert net.frames["alice"] == [cancel]
        # What the wire does not define is refused and counted, never handed on.
        link.send({"t": "note", "text": "hello bob"})
        back = bob.links[alice.me.peer_id]
        await until(lambda: back.frames_refused == 1)
        assert back.last_refusal == "unknown frame type 'note'" and net.frames["bob"] == [call]
        assert link.stats()["local_candidate"] == "host"
        await until(lambda: link.rtt_ms is not None, timeout=5)
    run(go())


def test_three_peers_all_connect(net, run):
    async def go():
        peers = [await net.peer(n) for n in ("alice", "bob", "carol")]
        for i, a in enumerate(peers):
            for b in peers[i + 1:]:
                befriend(a, b)
        await asyncio.gather(*(a.connect(b.me.peer_id) for i, a in enumerate(peers) for b in peers[i + 1:]))
        for a in peers:
            await until(lambda a=a: sum(link.state == "connected" for link in a.links.values()) == 2)
    run(go())


def test_simultaneous_connects_end_in_one_connection(net, run):
    async def go():
        alice, bob = await net.peer("alice"), await net.peer("bob")
        befriend(alice, bob)
        a_link, b_link = await asyncio.gather(alice.connect(bob.me.peer_id), bob.connect(alice.me.peer_id))
        assert a_link.session == b_link.session
        assert alice.links[bob.me.peer_id] is a_link and bob.links[alice.me.peer_id] is b_link
    run(go())


def test_a_stranger_is_refused_and_recorded(net, run):
    async def go():
        alice, mallory = await net.peer("alice"), await net.peer("mallory")
        mallory.friends.add("alice", alice.me.chain, auto_connect=False)  # alice never added mallory
        with pytest.raises(ConnectError, match="refused: this peer has not accepted you as a friend"):
            await mallory.connect(alice.me.peer_id, timeout=10)
        assert alice.friends.requests[mallory.me.peer_id]["name"] == "mallory"
        assert not alice.links
    run(go())


def test_unknown_friend_and_offline_friend_are_named(net, run):
    async def go():
        alice = await net.peer("alice")
        with pytest.raises(ConnectError, match="unknown friend"):
            await alice.connect(identity.Identity.generate().peer_id)
        ghost = identity.Identity.generate()
        alice.friends.add("ghost", ghost.chain, auto_connect=False)
        with pytest.raises(ConnectError, match="not reachable at the signaling server"):
            await alice.connect(ghost.peer_id, timeout=5)
    run(go())


def test_an_impostor_with_a_stolen_peer_id_cannot_connect(net, run):
    async def go():
        alice, bob = await net.peer("alice"), await net.peer("bob")
        befriend(alice, bob)
        # Eve knows bob's chain (it is public) but not his key: alice must refuse her link.
        eve = identity.Identity.generate()
        link = transport.Link(eve, alice.me.chain, os.urandom(16), True, transport.IceServers())
        sdp = await link.make_offer()
        forged = identity.seal(eve, "offer", alice.me.peer_id, link.session, 1, {"sdp": sdp}, include_chain=True)
        await alice._on_envelope(bob.me.peer_id, forged)  # as if the server forwarded it from bob's id
        assert bob.me.peer_id not in alice.links
        link.close()
    run(go())


def test_dead_peer_noticed_and_friend_reconnects_when_back(net, run):
    async def go():
        alice, bob = await net.peer("alice"), await net.peer("bob")
        befriend(alice, bob, auto_connect=True)
        await until(lambda: alice.links.get(bob.me.peer_id) and alice.links[bob.me.peer_id].state == "connected")
        link = alice.links[bob.me.peer_id]
        # Bob vanishes without a word, as in kill -9: his UDP sockets just close.
        bob._supervisor.cancel()
        await bob.signal.close()
        net.nodes.remove(bob)
        for bobs_link in list(bob.links.values()):
            for task in bobs_link._tasks:
                task.cancel()
            for protocol in transport._ice_connection(bobs_link.pc)._protocols:
                protocol.transport.close()
        started = asyncio.get_running_loop().time()
        await until(lambda: link.state == "failed", timeout=20)
        # 7 s of silence, checked every 2 s, and room for a loaded machine; aiortc alone takes ~30 s.
        assert asyncio.get_running_loop().time() - started < 15
        # A new bob with the same identity comes back and alice reconnects by herself.
        bob2 = PeerNode(bob.me, MemoryFriendBook(), net.url, name="bob")
        bob2.friends.add("alice", alice.me.chain, auto_connect=True)
        await bob2.start()
        net.nodes.append(bob2)
        await until(lambda: alice.links.get(bob.me.peer_id) and alice.links[bob.me.peer_id].state == "connected",
                    timeout=30)
    run(go())


def test_signaling_restart_then_a_new_connect_works(net, run):
    async def go():
        alice, bob = await net.peer("alice"), await net.peer("bob")
        befriend(alice, bob)
        await net.stop_server()
        await net.start_server()
        await until(lambda: alice.signal.connected and bob.signal.connected, timeout=15)
        link = await alice.connect(bob.me.peer_id, timeout=10)
        assert link.state == "connected"
    run(go())


def test_rotated_identity_keeps_the_friendship(net, run):
    async def go():
        alice, bob = await net.peer("alice"), await net.peer("bob")
        befriend(alice, bob)
        await bob.stop()
        net.nodes.remove(bob)
        rotated = bob.me.rotate()
        bob2 = PeerNode(rotated, MemoryFriendBook(), net.url, name="bob")
        bob2.friends.add("alice", alice.me.chain, auto_connect=False)
        await bob2.start()
        net.nodes.append(bob2)
        link = await bob2.connect(alice.me.peer_id, timeout=10)
        assert link.state == "connected"
        assert alice.friends.lookup(bob.me.peer_id).chain.current_key == rotated.chain.current_key
    run(go())
