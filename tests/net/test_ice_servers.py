"""A bad STUN or TURN row is moved on from at once: coturn on loopback, two databases, relay only.

coturn (Debian's turnserver) runs by pid in a temporary directory with long-term
credentials; ``--allow-loopback-peers`` is needed, since both relayed candidates
are on 127.0.0.1 and coturn refuses loopback peers by default.
"""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

import testbed as tb

pytestmark = pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn (turnserver) is not installed")

USER = "aquapeer"
PASSWORD = "pw-" + os.urandom(8).hex()
WRONG = "wrong-" + os.urandom(8).hex()
CONNECTED_WITHIN_S = 10


class Coturn:
    def __init__(self, directory):
        self.dir = directory
        self.port = tb.free_port()
        self.url = f"turn:127.0.0.1:{self.port}"
        self.log_path = os.path.join(directory, "turnserver.log")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["turnserver", "-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
             "--listening-port", str(self.port), "--no-rfc5780", "--allow-loopback-peers",
             "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", "--realm", "aquapeer-test", "--fingerprint",
             "--no-tls", "--no-dtls", "--no-cli", "--userdb", os.path.join(self.dir, "turndb"),
             "--pidfile", os.path.join(self.dir, "turnserver.pid"), "--log-file", self.log_path,
             "--simple-log", "--no-stdout-log"],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tb.wait_for(self._listening, 10, message="coturn to listen")
        return self

    def _listening(self):
        if self.proc.poll() is not None:
            raise tb.TestbedError(f"turnserver exited with {self.proc.returncode}; see {self.log_path}")
        with socket.socket() as s:  # it listens on TCP and UDP alike
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # SIGTERM takes ~1.2 s, and nothing here needs a clean exit
            self.proc.wait(10)


@pytest.fixture(scope="module")
def coturn(tmp_path_factory):
    server = Coturn(str(tmp_path_factory.mktemp("coturn"))).start()
    yield server
    server.stop()


@pytest.fixture
def signal_server():
    server = tb.SignalServer().start()
    yield server
    server.stop()


def relay_pair(testbed, signal_server, turn_rows):
    """alice and bob, friends, relay only, each with turn_rows in that order."""
    alice, bob = testbed.alice, testbed.bob
    for cluster in (alice, bob):
        tb.join_signaling(cluster, signal_server.url)
        for url, credential in turn_rows:
            cluster.sql("insert into peer.turn_server (url, username, credential) values (%s, %s, %s)",
                        url, USER, credential)
        cluster.sql("update peer.config set ice_transport_policy = 'relay'")
    tb.befriend(alice, "alice", bob, "bob")
    for cluster in (alice, bob):
        cluster.sql("select peer.reload_worker()")
    return alice, bob


def timed_connect(cluster, friend):
    started = time.monotonic()
    assert cluster.scalar("select peer.connect(%s, timeout => '30 s')", friend) == "connected"
    return time.monotonic() - started


def connection(cluster, friend):
    return cluster.sql("select state, local_candidate, remote_candidate, last_error from peer.connections "
                       "where friend = %s", friend)[0]


def test_the_good_row_alone_connects_through_the_relay(testbed, signal_server, coturn):
    alice, _ = relay_pair(testbed, signal_server, [(coturn.url, PASSWORD)])
    elapsed = timed_connect(alice, "bob")
    assert connection(alice, "bob")[:3] == ("connected", "relay", "relay")
    assert elapsed < 5, f"connected in {elapsed:.1f} s"


def test_a_wrong_turn_password_is_moved_on_from_at_once(testbed, signal_server, coturn):
    bad_url = coturn.url + "?transport=udp"  # the same server, named apart from the good row
    alice, bob = relay_pair(testbed, signal_server, [(bad_url, WRONG), (coturn.url, PASSWORD)])
    elapsed = timed_connect(alice, "bob")
    state, local, _, last_error = connection(alice, "bob")
    assert (state, local) == ("connected", "relay")
    assert elapsed < CONNECTED_WITHIN_S, f"connected in {elapsed:.1f} s"
    assert f"TURN server {bad_url} refused: 401" in last_error
    assert "wrong username or credential" in last_error
    alice.wait_for_log(rf"WARNING:.*TURN server {bad_url.replace('?', '[?]')} refused: 401", 5)
    for cluster in (alice, bob):
        log = cluster.log()
        assert PASSWORD not in log and WRONG not in log


def test_an_unreachable_turn_server_is_moved_on_from_within_seconds(testbed, signal_server, coturn):
    nobody = f"turn:127.0.0.1:{tb.free_port()}"  # UDP: no answer at all
    alice, bob = relay_pair(testbed, signal_server, [(nobody, PASSWORD), (coturn.url, PASSWORD)])
    elapsed = timed_connect(alice, "bob")
    state, local, _, last_error = connection(alice, "bob")
    assert (state, local) == ("connected", "relay")
    # One bounded wait (2 s) on each side, not aioice's 5 s or a negotiation timeout.
    assert elapsed < 6, f"connected in {elapsed:.1f} s"
    # The link that hit it, or one made after it that passed it over, says so.
    assert f"TURN server {nobody} did not answer within 2 s" in last_error
    alice.wait_for_log(rf"WARNING:.*TURN server {nobody} did not answer within 2 s", 5)
    assert PASSWORD not in alice.log() + bob.log()


def test_an_unreachable_stun_server_delays_a_direct_connection_by_two_seconds_at_most(testbed, signal_server):
    alice, bob = testbed.alice, testbed.bob
    nobody = f"stun:127.0.0.1:{tb.free_port()}"
    for cluster in (alice, bob):
        tb.join_signaling(cluster, signal_server.url)
        cluster.sql("insert into peer.stun_server (url) values (%s)", nobody)
    tb.befriend(alice, "alice", bob, "bob")
    for cluster in (alice, bob):
        cluster.sql("select peer.reload_worker()")
    elapsed = timed_connect(alice, "bob")
    state, local, _, last_error = connection(alice, "bob")
    assert (state, local) == ("connected", "host")
    # Each side waits for it once (2 s), one after the other at worst; later links leave it out.
    assert elapsed < 5, f"connected in {elapsed:.1f} s"
    assert f"STUN server {nobody} did not answer within 2 s" in last_error
    alice.wait_for_log(rf"WARNING:.*STUN server {nobody} did not answer within 2 s", 5)


def test_a_friend_without_candidates_says_so_at_once():
    """Light peers: bob, relay only without a TURN server, has nothing to answer with; alice
    hears it from bob at once instead of waiting out her timeout."""
    from aquapeer import identity
    from aquapeer.net import signaling, transport
    from aquapeer.net.node import ConnectError, MemoryFriendBook, PeerNode

    transport.configure_ice(["127.0.0.1"])

    async def main():
        port = tb.free_port()
        server = await signaling.serve("127.0.0.1", port)
        alice = PeerNode(identity.Identity.generate(), MemoryFriendBook(), f"ws://127.0.0.1:{port}", name="alice")
        bob = PeerNode(identity.Identity.generate(), MemoryFriendBook(), f"ws://127.0.0.1:{port}",
                       transport.IceServers(relay_only=True), name="bob")
        try:
            for node in (alice, bob):
                await node.start()
            alice.friends.add("bob", bob.me.chain, auto_connect=False)
            bob.friends.add("alice", alice.me.chain, auto_connect=False)
            started = time.monotonic()
            with pytest.raises(ConnectError, match="the friend could not answer: it has no ICE candidates"):
                await alice.connect(bob.me.peer_id, timeout=10)
            return time.monotonic() - started
        finally:
            for node in (alice, bob):
                await node.stop()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) < 2
