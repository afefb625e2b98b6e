"""The signaling server and client: a real server on 127.0.0.1, real WebSocket
clients and real Ed25519 identities.  No PostgreSQL needed."""

import asyncio
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import msgpack
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import testbed as tb
from aquapeer.identity import Identity
from aquapeer.net import signaling
from aquapeer.net.signaling import Limits, NotConnected, PeerOffline, SignalClient, SignalingError

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_clients = []  # every SignalClient a test makes; closed at teardown, also after a failure


@pytest.fixture
def run():
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, 30))
    while _clients:
        loop.run_until_complete(_clients.pop().close())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def client(*args, **kw):
    c = SignalClient(*args, **kw)
    _clients.append(c)
    return c


class Peer:
    """A SignalClient with a fresh identity that records what it receives."""

    def __init__(self, url, **kw):
        self.me = Identity.generate()
        self.got = []          # (from, env)
        self.undeliverable = []
        self.states = []
        self.client = client(url, self.me, self._on_envelope, on_state=self.states.append,
                                   on_undeliverable=lambda to, ref, reason: self.undeliverable.append(
                                       (to, ref, reason)), **kw)

    async def _on_envelope(self, sender, env):  # async on purpose: runs as a task
        self.got.append((sender, env))

    @property
    def id(self):
        return self.me.peer_id

    def envs_from(self, peer):
        return [env for sender, env in self.got if sender == peer.id]


def pack_frame(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame):
    return msgpack.unpackb(frame, raw=False)


async def raw_hello(url, chain, signer, **kw):
    """A bare WebSocket client that answers the challenge with ``chain``, signed by ``signer``."""
    ws = await ws_connect(url, compression=None, max_size=None, **kw)
    challenge = unpack(await ws.recv())
    assert challenge["t"] == "challenge" and challenge["proto"] == signaling.PROTO
    assert isinstance(challenge["nonce"], bytes) and len(challenge["nonce"]) == 32
    sig = signer.sign(signaling.HELLO_CONTEXT + challenge["nonce"])
    await ws.send(pack_frame({"t": "hello", "chain": chain.to_wire(), "sig": sig}))
    return ws, unpack(await ws.recv())


class GarbageChain:
    def to_wire(self):
        return [b"not a key chain"]


async def close_code(ws, timeout=3.0):
    """Read until the server closes the connection; its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


# --- exchange -----------------------------------------------------------------

def test_two_clients_exchange_envelopes_both_ways(run):
    async def go():
        async with await signaling.serve("127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}"
            alice, bob = Peer(url), Peer(url)
            assert await alice.client.start() and await bob.client.start()
            assert alice.client.connected and bob.states[-1] == "connected"
            assert server.stats()["peers"] == 2
            await alice.client.send(bob.id, b"offer from alice")
            await bob.client.send_and_check(alice.id, b"answer from bob")
            await alice.client.send_and_check(bob.id, bytes(range(256)) * 100)  # binary, 25.6 kB
            await tb.until(lambda: len(bob.got) == 2 and len(alice.got) == 1)
            assert bob.envs_from(alice) == [b"offer from alice", bytes(range(256)) * 100]
            assert alice.got == [(bob.id, b"answer from bob")]
            await alice.client.close()
            await bob.client.close()
            assert alice.states[-1] == "closed" and not alice.client.connected
            with pytest.raises(NotConnected):
                await alice.client.send(bob.id, b"after close")
    run(go())


def test_undeliverable_notice_for_an_offline_peer(run):
    async def go():
        async with await signaling.serve("127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}"
            alice, bob = Peer(url), Peer(url)
            await alice.client.start()
            with pytest.raises(PeerOffline) as info:
                await alice.client.send_and_check(bob.id, b"anyone there?", wait=2.0)
            assert info.value.to == bob.id and info.value.reason == "offline"
            ref = await alice.client.send(bob.id, b"fire and forget")
            await tb.until(lambda: alice.undeliverable)
            assert alice.undeliverable == [(bob.id, ref, "offline")]
            # Once bob is there, send_and_check returns on the server's "queued"
            # verdict, well before its wait runs out.
            await bob.client.start()
            started = time.monotonic()
            await alice.client.send_and_check(bob.id, b"now?", wait=5.0)
            assert time.monotonic() - started < 2.5  # half the wait: room for a loaded machine
            await tb.until(lambda: bob.got)
            assert bob.got == [(alice.id, b"now?")]
            await alice.client.close()
            await bob.client.close()
    run(go())


# --- authentication -----------------------------------------------------------

def test_hello_signed_with_a_key_other_than_the_chains_is_refused(run):
    async def go():
        async with await signaling.serve("127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}"
            mallory, bob = Identity.generate(), Identity.generate()
            # Mallory's own chain, signed with some other key.
            ws, reply = await raw_hello(url, mallory.chain, Identity.generate())
            assert reply["t"] == "error" and reply["code"] == "auth"
            assert await close_code(ws) == signaling.CLOSE_AUTH
            # Bob's chain (bob's peer id), signed by mallory.
            ws, reply = await raw_hello(url, bob.chain, mallory)
            assert reply["t"] == "error" and reply["code"] == "auth"
            assert await close_code(ws) == signaling.CLOSE_AUTH
            # Garbage for a chain.
            ws, reply = await raw_hello(url, GarbageChain(), mallory)
            assert reply["t"] == "error" and reply["code"] == "auth"
            assert await close_code(ws) == signaling.CLOSE_AUTH
            assert server.stats()["peers"] == 0 and server.stats()["refused_auth"] == 3
            # Nobody got bob's id: an envelope to him is undeliverable.
            alice = Peer(url)
            await alice.client.start()
            with pytest.raises(PeerOffline):
                await alice.client.send_and_check(bob.peer_id, b"bob?", wait=2.0)
            # The same bare client with a matching signature is welcome.
            ws, reply = await raw_hello(url, bob.chain, bob)
            assert reply == {"t": "welcome", "id": bob.peer_id}
            await alice.client.send_and_check(bob.peer_id, b"bob!", wait=2.0)
            deliver = unpack(await asyncio.wait_for(ws.recv(), 2))
            assert deliver == {"t": "deliver", "from": alice.id, "env": b"bob!"}
            await ws.close()
            await alice.client.close()
    run(go())


def test_a_client_that_never_says_hello_is_dropped(run):
    async def go():
        limits = Limits(hello_timeout=0.5)
        async with await signaling.serve("127.0.0.1", 0, limits=limits) as server:
            url = f"ws://127.0.0.1:{server.port}"
            async with ws_connect(url, compression=None) as ws:
                assert unpack(await ws.recv())["t"] == "challenge"
                started = time.monotonic()
                assert await close_code(ws, timeout=5) == signaling.CLOSE_HELLO_TIMEOUT
                assert 0.4 <= time.monotonic() - started < 3
            await tb.until(lambda: server.stats()["pending"] == 0 and server.stats()["connections"] == 0)
            assert server.stats()["hello_timeout"] == 1
    run(go())


def test_a_second_connection_for_the_same_id_replaces_the_first(run):
    async def go():
        async with await signaling.serve("127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}"
            alice, bob = Peer(url), Peer(url)
            await alice.client.start()
            await bob.client.start()
            bob_again = client(url, bob.me, lambda s, e: got_again.append((s, e)))
            got_again = []
            assert await bob_again.start()
            await tb.until(lambda: bob.client.state == "replaced")
            assert not bob.client.connected
            with pytest.raises(NotConnected, match="same peer id"):
                await bob.client.send(alice.id, b"x")
            await alice.client.send_and_check(bob.id, b"to the newer bob", wait=2)
            await tb.until(lambda: got_again)
            assert got_again == [(alice.id, b"to the newer bob")] and bob.got == []
            assert server.stats()["peers"] == 2
            await asyncio.sleep(1.0)  # the replaced client does not come back and fight
            assert bob.client.state == "replaced" and bob_again.connected
            for c in (alice.client, bob.client, bob_again):
                await c.close()
    run(go())


# --- limits -------------------------------------------------------------------

def test_an_oversized_frame_is_refused_and_the_server_keeps_serving(run):
    async def go():
        async with await signaling.serve("127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}"
            alice, bob, mallory = Peer(url), Peer(url), Identity.generate()
            await alice.client.start()
            await bob.client.start()
            ws, reply = await raw_hello(url, mallory.chain, mallory)
            assert reply["t"] == "welcome"
            big = pack_frame({"t": "send", "to": bob.id, "env": b"\0" * (70 * 1024), "ref": 1})
            await ws.send(big)
            assert await close_code(ws) == 1009  # message too big
            assert bob.got == []
            # The client refuses an oversized envelope itself and stays connected.
            with pytest.raises(SignalingError, match="over the signaling limit"):
                await alice.client.send(bob.id, b"\0" * (signaling.MAX_ENVELOPE + 1))
            assert alice.client.connected
            await alice.client.send_and_check(bob.id, b"\0" * signaling.MAX_ENVELOPE, wait=2)
            await bob.client.send_and_check(alice.id, b"still here", wait=2)
            await tb.until(lambda: bob.got and alice.got)
            assert bob.got == [(alice.id, b"\0" * signaling.MAX_ENVELOPE)]
            assert alice.got == [(bob.id, b"still here")]
            await alice.client.close()
            await bob.client.close()
    run(go())


def test_a_flood_is_rate_limited_and_others_still_get_through(run):
    async def go():
        limits = Limits(rate_per_connection=20, burst_per_connection=50,
                        rate_per_peer=20, burst_per_peer=50, flood_strikes=150)
        async with await signaling.serve("127.0.0.1", 0, limits=limits) as server:
            url = f"ws://127.0.0.1:{server.port}"
            bob, carol, mallory = Peer(url), Peer(url), Identity.generate()
            await bob.client.start()
            await carol.client.start()
            ws, reply = await raw_hello(url, mallory.chain, mallory)
            assert reply["t"] == "welcome"
            replies = []

            async def read():
                try:
                    async for frame in ws:
                        replies.append(unpack(frame))
                except ConnectionClosed:
                    pass

            reader = asyncio.ensure_future(read())
            started = time.monotonic()
            sent = 0
            try:
                for ref in range(1, 401):
                    await ws.send(pack_frame({"t": "send", "to": bob.id, "env": b"spam", "ref": ref}))
                    sent += 1
                    if ref % 50 == 0:  # carol keeps talking to bob during the flood
                        await carol.client.send_and_check(bob.id, b"carol %d" % ref, wait=2)
            except ConnectionClosed:
                pass
            await asyncio.wait_for(reader, 5)
            elapsed = time.monotonic() - started
            await tb.until(lambda: len(bob.envs_from(carol)) >= 1)
            await asyncio.sleep(0.2)
            spam = [env for sender, env in bob.got if sender == mallory.peer_id]
            rate_errors = [r for r in replies if r.get("t") == "error" and r.get("code") == "rate"]
            allowed = 50 + 20 * elapsed + 2
            # The burst got through, nothing much beyond it; the rest was refused
            # one by one, and the connection was closed once it kept flooding.
            assert 50 <= len(spam) <= allowed, (len(spam), elapsed)
            assert len(rate_errors) >= 140, len(rate_errors)
            assert {r["ref"] for r in rate_errors} <= set(range(51, 401))
            assert ws.close_code == signaling.CLOSE_FLOOD
            assert sent < 400
            assert server.stats()["closed_flooding"] == 1
            # Carol was never limited by mallory's flood.
            carols = bob.envs_from(carol)
            assert carols == [b"carol %d" % r for r in range(50, 50 * (len(carols) + 1), 50)]
            assert len(carols) >= 4
            await carol.client.send_and_check(bob.id, b"after the flood", wait=2)
            await tb.until(lambda: bob.envs_from(carol)[-1] == b"after the flood")
            await bob.client.close()
            await carol.client.close()
    run(go())


def test_connections_over_the_limit_are_refused(run):
    async def go():
        limits = Limits(max_connections=2)
        async with await signaling.serve("127.0.0.1", 0, limits=limits) as server:
            url = f"ws://127.0.0.1:{server.port}"
            alice, bob, carol = Peer(url), Peer(url), Peer(url)
            assert await alice.client.start() and await bob.client.start()
            with pytest.raises(InvalidStatus) as info:
                await ws_connect(url, compression=None)
            assert info.value.response.status_code == 503
            assert not await carol.client.start(timeout=0.5)
            await bob.client.close()
            await tb.until(lambda: server.stats()["connections"] == 1)
            assert await carol.client.wait_connected(timeout=5)  # its backoff retries get in
            await alice.client.send_and_check(carol.id, b"hi carol", wait=2)
            await tb.until(lambda: carol.got)
            await alice.client.close()
            await carol.client.close()
    run(go())


# --- reconnecting -------------------------------------------------------------

def test_clients_reconnect_by_themselves_after_a_server_restart(run):
    async def go():
        port = free_port()
        url = f"ws://127.0.0.1:{port}"
        server = await signaling.serve("127.0.0.1", port)
        alice, bob = Peer(url), Peer(url)
        await alice.client.start()
        await bob.client.start()
        await alice.client.send_and_check(bob.id, b"before", wait=2)
        await tb.until(lambda: bob.got)
        await server.aclose()
        await tb.until(lambda: not alice.client.connected and not bob.client.connected)
        with pytest.raises(NotConnected):
            await alice.client.send(bob.id, b"while down")
        await asyncio.sleep(1.0)  # down for a while: the clients back off
        server = await signaling.serve("127.0.0.1", port)
        try:
            started = time.monotonic()
            await tb.until(lambda: alice.client.connected and bob.client.connected, timeout=5)
            assert time.monotonic() - started < 5
            assert "disconnected" in alice.states and alice.states[-1] == "connected"
            await bob.client.send_and_check(alice.id, b"after", wait=2)
            await alice.client.send_and_check(bob.id, b"after too", wait=2)
            await tb.until(lambda: alice.got and len(bob.got) == 2)
            assert alice.got == [(bob.id, b"after")]
            assert bob.envs_from(alice) == [b"before", b"after too"]
        finally:
            await alice.client.close()
            await bob.client.close()
            await server.aclose()
    run(go())


# --- TLS ----------------------------------------------------------------------

def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aquapeer test signaling")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_wss_with_a_self_signed_certificate(run, tmp_path):
    cert, key = self_signed(tmp_path)

    async def go():
        server_ctx = signaling.server_ssl_context(cert, key)
        async with await signaling.serve("127.0.0.1", 0, ssl_context=server_ctx) as server:
            url = f"wss://127.0.0.1:{server.port}"
            assert server.urls == [url]
            trusting = ssl.create_default_context(cafile=cert)
            alice, bob = Peer(url, ssl_context=trusting), Peer(url, ssl_context=trusting)
            assert await alice.client.start() and await bob.client.start()
            await alice.client.send_and_check(bob.id, b"over tls", wait=2)
            await bob.client.send_and_check(alice.id, b"back over tls", wait=2)
            await tb.until(lambda: bob.got and alice.got)
            assert bob.got == [(alice.id, b"over tls")] and alice.got == [(bob.id, b"back over tls")]
            # A client that does not trust the certificate does not get in.
            stranger = Peer(url)
            assert not await stranger.client.start(timeout=1.0)
            assert "CERTIFICATE_VERIFY_FAILED" in (stranger.client.last_error or "")
            # A plain ws:// URL with an SSL context is a mistake caught at once.
            with pytest.raises(SignalingError, match="not a wss"):
                SignalClient(f"ws://127.0.0.1:{server.port}", alice.me, print, ssl_context=trusting)
            for c in (alice.client, bob.client, stranger.client):
                await c.close()
    run(go())


# --- CLI ----------------------------------------------------------------------

def test_the_signal_cli_serves_and_stops_on_sigterm(run):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c",
         'import sys; sys.path.insert(0, "python"); from aquapeer.cli import main; sys.exit(main())',
         "signal", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async def go():
            url = f"ws://127.0.0.1:{port}"
            alice, bob = Peer(url), Peer(url)
            assert await alice.client.start(timeout=15), alice.client.last_error
            assert await bob.client.start(timeout=5)
            await alice.client.send_and_check(bob.id, b"via the cli server", wait=2)
            await tb.until(lambda: bob.got)
            assert bob.got == [(alice.id, b"via the cli server")]
            proc.send_signal(signal.SIGTERM)
            await tb.until(lambda: not alice.client.connected, timeout=5)
            await alice.client.close()
            await bob.client.close()
        run(go())
        out, err = proc.communicate(timeout=10)
        err = err.decode()
        assert proc.returncode == 0, err
        assert f"listening on ws://127.0.0.1:{port}" in err
        assert "registered" in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_client_moves_on_to_the_next_server_when_the_first_is_down(run):
    async def go():
        async with await signaling.serve("127.0.0.1", 0) as server:
            dead = f"ws://127.0.0.1:{free_port()}"
            live = f"ws://127.0.0.1:{server.port}"
            me = Identity.generate()
            client = SignalClient(dead, me, lambda *a: None, fallback_urls=[live])
            assert not await client.start(timeout=0.5)
            assert await client.wait_connected(15)
            assert client.url == live
            assert server.stats()["peers"] == 1
            await client.close()
    run(go())
