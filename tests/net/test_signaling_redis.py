"""Several signaling instances sharing registrations through Redis: a real
redis-server and real `aquapeer signal --redis` processes on loopback (so
kill -9 is real), real WebSocket clients and, for peer.connect, real clusters
and aiortc."""

import asyncio
import json
import signal
import subprocess
import time

import msgpack
import pytest

import testbed as tb
from aquapeer.identity import Identity
from aquapeer.net import signal_cluster, signaling
from aquapeer.net.signaling import PeerOffline, SignalClient

pytestmark = pytest.mark.skipif(tb.RedisServer.missing() is not None,
                                reason=f"no Redis for these tests: {tb.RedisServer.missing()}")


@pytest.fixture(scope="module")
def redis_server():
    server = tb.RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def instances(redis_server, tmp_path):
    """start(n) -> n `aquapeer signal --redis` instances; each logs to its own file."""
    started = []

    def start(n):
        new = [tb.SignalServer(redis_url=redis_server.url, log_path=str(tmp_path / f"signal{len(started) + i}.log"))
               for i in range(n)]
        for server in new:
            server.start()
        started.extend(new)
        return new

    yield start
    for server in started:
        server.stop()


def log_of(server):
    with open(server.log_path, errors="replace") as f:
        return f.read()


@pytest.fixture
def run():
    loop = asyncio.new_event_loop()
    clients = []
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro(clients), 45))
    for client in clients:
        loop.run_until_complete(client.close())
    loop.close()


class Peer:
    """A SignalClient with its own identity, recording what it receives."""

    def __init__(self, clients, url, me=None, fallback_urls=()):
        self.me = me or Identity.generate()
        self.got = []  # (from, env)
        self.client = SignalClient(url, self.me, lambda sender, env: self.got.append((sender, env)),
                                   fallback_urls=fallback_urls)
        clients.append(self.client)

    @property
    def id(self):
        return self.me.peer_id

    def envs_from(self, peer):
        return [env for sender, env in self.got if sender == peer.id]


def test_peers_on_two_instances_exchange_envelopes_with_the_verdicts_of_one(instances, run):
    one, two = instances(2)

    async def go(clients):
        alice, bob, carol = Peer(clients, one.url), Peer(clients, two.url), Peer(clients, one.url)
        assert await alice.client.start(timeout=10) and await bob.client.start(timeout=10)
        assert await carol.client.start(timeout=10)
        started = time.monotonic()
        await alice.client.send_and_check(bob.id, b"offer across", wait=2)  # returns on "queued"
        assert time.monotonic() - started < 1
        await bob.client.send_and_check(alice.id, b"answer across", wait=2)
        await carol.client.send_and_check(alice.id, b"next door", wait=2)
        await tb.until(lambda: bob.got and len(alice.got) == 2)
        assert bob.got == [(alice.id, b"offer across")]
        assert sorted(alice.got) == sorted([(bob.id, b"answer across"), (carol.id, b"next door")])
        with pytest.raises(PeerOffline):  # registered nowhere
            await alice.client.send_and_check(Identity.generate().peer_id, b"anyone?", wait=2)
        # bob registers again at the other instance: the newest registration wins
        # there too, and the older connection is closed as replaced.
        bob_again = Peer(clients, one.url, me=bob.me)
        assert await bob_again.client.start(timeout=10)
        await tb.until(lambda: bob.client.state == "replaced")
        await alice.client.send_and_check(bob.id, b"to the newer bob", wait=2)
        await tb.until(lambda: bob_again.got)
        assert bob_again.got == [(alice.id, b"to the newer bob")] and len(bob.got) == 1
        # The replaced connection's end at its instance did not unregister the newer one.
        await asyncio.sleep(0.3)
        await carol.client.send_and_check(bob.id, b"still there", wait=2)
        await tb.until(lambda: len(bob_again.got) == 2)

    run(go)


def forwarded(origin, seq, sender, to, env):
    """An envelope as one instance passes it on to another (signal_cluster.Cluster.route)."""
    return msgpack.packb({"k": "env", "origin": origin, "seq": seq, "from": sender, "conn": 1, "to": to,
                          "env": env, "ref": seq, "ack": False}, use_bin_type=True)


def test_an_envelope_published_twice_is_delivered_once(instances, redis_server, run):
    one, = instances(1)

    async def go(clients):
        bob = Peer(clients, one.url)
        assert await bob.client.start(timeout=10)
        instance = redis_server.cli("get", signal_cluster.peer_key(bob.id)).strip().decode()
        channel = signal_cluster.instance_channel(instance)
        sender = Identity.generate().peer_id
        # What a retried PUBLISH does: the same envelope (same origin and sequence) twice.
        for _ in range(2):
            assert redis_server.cli("publish", channel, stdin=forwarded("elsewhere", 7, sender, bob.id, b"once")) \
                .strip() == b"1"
        assert redis_server.cli("publish", channel, stdin=forwarded("elsewhere", 8, sender, bob.id, b"next")) \
            .strip() == b"1"
        await tb.until(lambda: len(bob.got) >= 2)
        await asyncio.sleep(0.3)
        assert bob.got == [(sender, b"once"), (sender, b"next")]

    run(go)


def test_kill_9_an_instance_its_peers_move_on_and_nothing_arrives_twice(instances, run):
    one, two = instances(2)

    async def go(clients):
        alice = Peer(clients, one.url, fallback_urls=[two.url])
        bob = Peer(clients, two.url)
        carol = Peer(clients, one.url)  # no other server to go to
        for peer in (alice, bob, carol):
            assert await peer.client.start(timeout=10)
        queued = []  # the numbers the server said it queued for bob

        async def stream():  # alice numbers her envelopes to bob, 50 a second
            n = 0
            while True:
                n += 1
                try:
                    await alice.client.send_and_check(bob.id, b"%d" % n, wait=1)
                    queued.append(n)
                except signaling.SignalingError:
                    pass  # not registered for a moment
                await asyncio.sleep(0.02)

        streaming = asyncio.ensure_future(stream())
        await tb.until(lambda: len(queued) >= 20)
        one.kill9()
        killed = time.monotonic()
        # Its registrations are gone with it: offline at once, not queued into the void.
        with pytest.raises(PeerOffline):
            await bob.client.send_and_check(carol.id, b"carol?", wait=2)
        assert time.monotonic() - killed < 1
        await tb.until(lambda: not alice.client.connected, timeout=5)
        await tb.until(lambda: alice.client.connected, timeout=10)
        moved = time.monotonic() - killed
        assert alice.client.url == two.url
        first_after = len(queued)
        await tb.until(lambda: len(queued) >= first_after + 20, timeout=5)
        streaming.cancel()
        await asyncio.sleep(0.5)
        numbers = [int(env) for env in bob.envs_from(alice)]
        assert len(numbers) == len(set(numbers)), "an envelope arrived twice"
        assert numbers == sorted(numbers)
        assert set(queued[first_after:]) <= set(numbers)  # what the next instance queued arrived
        assert moved < 5, f"alice took {moved:.1f} s to register at the next instance"

    run(go)


def test_an_instance_cut_off_from_redis_counts_as_gone_within_5_s(instances, run):
    one, two = instances(2)

    async def go(clients):
        bob, carol = Peer(clients, one.url), Peer(clients, two.url)
        assert await bob.client.start(timeout=10) and await carol.client.start(timeout=10)
        await carol.client.send_and_check(bob.id, b"before", wait=2)
        # Stopped, not dead: its connection to Redis stays open, so a PUBLISH still
        # reaches its subscription, but its heartbeat stops.
        one.proc.send_signal(signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            while True:
                try:
                    await carol.client.send_and_check(bob.id, b"anyone?", wait=0.3)
                except PeerOffline:
                    break
                assert time.monotonic() - stopped < signal_cluster.INSTANCE_TTL_MS / 1000 + 2
                await asyncio.sleep(0.2)
            assert time.monotonic() - stopped > 2  # its liveness key outlived the heartbeats it missed
        finally:
            one.proc.send_signal(signal.SIGCONT)
        # Back: its next heartbeat makes its peers reachable again; nobody reconnected.
        resumed = time.monotonic()
        while True:
            try:
                await carol.client.send_and_check(bob.id, b"after", wait=2)
                break
            except PeerOffline:
                assert time.monotonic() - resumed < 5
                await asyncio.sleep(0.2)
        await tb.until(lambda: bob.got[-1:] == [(carol.id, b"after")])
        assert bob.envs_from(carol).count(b"after") == 1
        assert bob.client.reconnects == 0

    run(go)


async def raw_peer(url, me):
    """A bare WebSocket client registered as me."""
    ws, reply = await _raw_hello(url, me)
    assert reply == {"t": "welcome", "id": me.peer_id}
    return ws


async def _raw_hello(url, me):
    from websockets.asyncio.client import connect as ws_connect

    ws = await ws_connect(url, compression=None)
    challenge = msgpack.unpackb(await ws.recv(), raw=False)
    await ws.send(msgpack.packb({"t": "hello", "chain": me.chain.to_wire(),
                                 "sig": me.sign(signaling.HELLO_CONTEXT + challenge["nonce"])}, use_bin_type=True))
    return ws, msgpack.unpackb(await ws.recv(), raw=False)


async def burst(ws, to, count):
    """Send count envelopes as fast as possible; (queued, refused over the rate)."""
    for ref in range(1, count + 1):
        await ws.send(msgpack.packb({"t": "send", "to": to, "env": b"x", "ref": ref, "ack": True},
                                    use_bin_type=True))
    replies = []
    while len(replies) < count:
        replies.append(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5), raw=False))
    queued = sum(1 for r in replies if r["t"] == "queued")
    refused = sum(1 for r in replies if r["t"] == "error" and r["code"] == "rate")
    assert queued + refused == count, replies
    return queued, refused


def test_the_per_peer_rate_is_one_across_instances(instances, run):
    one, two = instances(2)
    limits = signaling.Limits()  # what the CLI runs with: 20 a second, a burst of 50

    async def go(clients):
        bob = Peer(clients, one.url)
        assert await bob.client.start(timeout=10)
        mallory = Identity.generate()
        started = time.monotonic()
        ws = await raw_peer(one.url, mallory)
        queued_one, _ = await burst(ws, bob.id, 60)
        # The same peer id at the other instance, at once: its own buckets there are
        # full, but the peer id's allowance is shared and spent.
        ws_two = await raw_peer(two.url, mallory)
        queued_two, refused_two = await burst(ws_two, bob.id, 60)
        elapsed = time.monotonic() - started
        assert limits.burst_per_peer <= queued_one <= limits.burst_per_peer + 2
        allowed = limits.rate_per_peer * elapsed + 1
        assert queued_two <= allowed, (queued_two, elapsed)
        assert refused_two >= 60 - allowed
        await ws.close()
        await ws_two.close()

    run(go)


def test_echo_light_peers_register_round_robin_and_send_envelopes_back(instances, run, tmp_path):
    one, two = instances(2)
    ready = tmp_path / "echo.json"
    proc = subprocess.Popen([tb.AQUAPEER_CLI, "lightpeers", "--echo", "--count", "4", "--signal", one.url,
                             "--signal", two.url, "--invites-out", str(ready)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        tb.wait_for(lambda: ready.exists() or proc.poll() is not None, 20, message="the echo peers")
        assert proc.poll() is None, proc.stderr.read().decode()
        echo_ids = json.loads(ready.read_text())["peer_ids"]

        async def go(clients):
            alice = Peer(clients, one.url)
            assert await alice.client.start(timeout=10)
            for i, echo_id in enumerate(echo_ids):
                await alice.client.send_and_check(echo_id, b"ping %d" % i, wait=2)
            await tb.until(lambda: len(alice.got) == len(echo_ids))
            assert sorted(alice.got) == sorted((echo_id, b"ping %d" % i) for i, echo_id in enumerate(echo_ids))

        run(go)
        # Round robin: echo peers 0 and 2 (and alice) at the first instance, 1 and 3 at the second.
        assert log_of(one).count(") registered") == 3 and log_of(two).count(") registered") == 2
    finally:
        proc.terminate()
        proc.wait(15)


def test_redis_unreachable_at_start_is_a_clear_error():
    nowhere = f"redis://127.0.0.1:{tb.free_port()}/0"
    for url, expected in [(nowhere, f"cannot reach Redis at {nowhere}"),
                          ("http://127.0.0.1:1/0", "invalid Redis URL")]:
        proc = subprocess.run([tb.AQUAPEER_CLI, "signal", "--port", str(tb.free_port()), "--redis", url],
                              capture_output=True, text=True, timeout=30, env=tb.outside_env(COLUMNS="300"))
        assert proc.returncode == 1, proc.stderr
        assert expected in proc.stderr
        assert "hint: " in proc.stderr and "redis://host:port/db" in proc.stderr


def test_an_instance_serves_its_own_peers_without_redis_and_recovers(instances, redis_server, run):
    one, two = instances(2)

    async def go(clients):
        alice, carol, bob = Peer(clients, one.url), Peer(clients, one.url), Peer(clients, two.url)
        for peer in (alice, carol, bob):
            assert await peer.client.start(timeout=10)
        await alice.client.send_and_check(bob.id, b"before", wait=2)
        redis_server.kill9()
        await tb.until(lambda: "lost Redis at" in log_of(one), timeout=5)
        await alice.client.send_and_check(carol.id, b"next door, without redis", wait=2)
        with pytest.raises(PeerOffline):  # the other instance cannot be reached
            await alice.client.send_and_check(bob.id, b"across, without redis", wait=2)
        redis_server.start()  # empty: the instances register their peers again
        await tb.until(lambda: "answers again" in log_of(one) and "answers again" in log_of(two), timeout=10)
        await alice.client.send_and_check(bob.id, b"after", wait=2)
        await bob.client.send_and_check(carol.id, b"after too", wait=2)
        await tb.until(lambda: len(bob.got) == 2 and len(carol.got) == 2)
        assert bob.envs_from(alice) == [b"before", b"after"]
        assert carol.got == [(alice.id, b"next door, without redis"), (bob.id, b"after too")]
        assert alice.client.connected and bob.client.connected  # nobody was dropped

    run(go)


@pytest.mark.testbed(n=2)
def test_databases_on_two_instances_connect_and_reconnect_after_a_kill_9(testbed, instances):
    one, two = instances(2)
    alice, bob = testbed.alice, testbed.bob
    # Each lists both instances, its own first (as behind no load balancer).
    for cluster, urls in ((alice, (one.url, two.url)), (bob, (two.url, one.url))):
        tb.join_signaling(cluster, urls[0])
        cluster.sql("insert into peer.signal_server (url, priority) values (%s, 200)", urls[1])
        cluster.sql("select peer.reload_worker()")
    tb.befriend(alice, "alice", bob, "bob")
    assert alice.scalar("select peer.connect('bob')") == "connected"
    tb.wait_connected(bob, "alice", timeout=10)
    one.kill9()
    killed = time.monotonic()
    alice.sql("select peer.disconnect('bob')")
    assert alice.scalar("select peer.connect('bob', timeout => '15 s')") == "connected"
    reconnected = time.monotonic() - killed
    assert reconnected < 10, f"alice and bob took {reconnected:.1f} s to connect again"
    tb.wait_connected(bob, "alice", timeout=10)
