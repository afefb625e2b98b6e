"""Slow and lossy links, and a NAT whose public address changes (issue 24), in the network lab
(tests/netlab.py, docs/netlab.md): alice in home1 behind nat1, bob in home2 behind nat2, and
between nat1 and pub a forwarder adding 25 ms each way (50 ms round trip) and dropping 1 % of
the frames each way.

One lab and one pair of clusters for the whole module (the suite's time is counted): the tests
run in file order, the address change and the kill -9 last, since they end the link.
"""

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

import netlab
import testbed as tb

DELAY_MS = 25.0            # each way: a 50 ms round trip
LOSS = 0.01                # each way
MESSAGES = 500
CALLS = 20
CLONE_ROWS = 10_000        # ~5 s at the loss-limited rate; bench/networks.py clones 100,000
LIVE_FOR_S = 20.0  # from the link's start, with the other tests' traffic in it: ~3 × DEAD_AFTER_S
DEAD_WITHIN_S = 10.0
READDRESS_WITHIN_S = 15.0
PACKET_BYTES = 1200        # aiortc's SCTP packets
LOG_TAIL_LINES = 40


def mathis_ceiling(rtt_s=2 * DELAY_MS / 1000, loss=LOSS, mss=PACKET_BYTES):
    """The loss-limited rate of one TCP-like flow, bytes/s: MSS/RTT * sqrt(3/2)/sqrt(p)."""
    return mss / rtt_s * math.sqrt(1.5) / math.sqrt(loss)


TABLES = """
    create table public.widget (id int primary key, name text, price numeric, tags text[], meta jsonb,
                                updated timestamptz);
"""


def connection(cluster, friend):
    rows = cluster.sql("select state, connected_since, last_error, bytes_sent, bytes_received "
                       "from peer.connections where friend = %s", friend)
    return rows[0] if rows else (None, None, None, None, None)


@pytest.fixture(scope="module")
def link():
    """(lab, alice, bob, since): the impaired lab, alice and bob friends and connected through
    it, and each side's connected_since then with the monotonic time of the connect."""
    reason = netlab.unavailable()
    if reason is None and netlab.running_lab():
        reason = "a `make lab` network lab is up, and only one lab runs at a time: `make lab-down` first"
    if reason:
        pytest.skip(reason)
    lab = netlab.Lab(mid=True)
    lab.up()
    bed = None
    try:
        lab.impair(DELAY_MS, LOSS)
        bed = netlab.lab_testbed(lab)
        alice, bob = bed.alice, bed.bob
        with ThreadPoolExecutor(2) as ex:
            for f in [ex.submit(netlab.join_lab, alice, lab, 1), ex.submit(netlab.join_lab, bob, lab, 2)]:
                f.result()
        tb.befriend(alice, "alice", bob, "bob")
        for cluster in (alice, bob):
            cluster.sql(TABLES)
        started = time.monotonic()
        assert alice.scalar("select peer.connect('bob', timeout => '20 s')") == "connected"
        tb.wait_connected(bob, "alice")
        print(f"\nconnected over {DELAY_MS:g} ms each way + {LOSS:.0%} loss each way in "
              f"{time.monotonic() - started:.2f} s, candidates {netlab.pair_types(alice, 'bob')}")
        since = {"alice": connection(alice, "bob")[1], "bob": connection(bob, "alice")[1],
                 "at": time.monotonic()}
        yield lab, alice, bob, since
    except BaseException:
        if bed is not None:
            for c in bed.clusters:
                print(f"----- server log of {c.name} -----")
                print("\n".join(c.log().splitlines()[-LOG_TAIL_LINES:]))
        raise
    finally:
        try:
            if bed is not None:
                bed.close()
        finally:
            lab.down()


@pytest.fixture
def pair(link, request):
    """The module's link; the logs' tails printed when the test failed."""
    yield link
    if getattr(getattr(request.node, "rep_call", None), "failed", False):
        lab, alice, bob, _ = link
        for c in (alice, bob):
            print(f"----- server log of {c.name} -----")
            print("\n".join(c.log().splitlines()[-LOG_TAIL_LINES:]))
        print("----- lab signal.log -----")
        print("\n".join(lab.log("signal.log").splitlines()[-LOG_TAIL_LINES:]))


def test_messages_arrive_exactly_once_and_in_order(pair):
    lab, alice, bob, _ = pair
    bob.sql("select peer.allow_topic('lossy', 'alice')")
    started = time.monotonic()
    for first in range(1, MESSAGES + 1, 50):  # ten transactions of fifty
        alice.sql("select peer.send('bob', 'lossy', jsonb_build_object('n', g)) "
                  "from generate_series(%s::int, %s::int) g", first, first + 49)
    tb.wait_for(lambda: bob.scalar("select count(*) from peer.inbox where topic = 'lossy'") >= MESSAGES, 60,
                interval=0.1, message=f"{MESSAGES} messages in bob's inbox")
    arrived_s = time.monotonic() - started
    tb.wait_for(lambda: alice.sql("select state, count(*) from peer.outbox where topic = 'lossy' group by 1")
                == [("acked", MESSAGES)], 30, interval=0.2, message="alice's outbox all acked")
    time.sleep(1.0)  # anything sent twice would have arrived by now
    ns = [n for (n,) in bob.sql("select (payload->>'n')::int from peer.inbox where topic = 'lossy' "
                                "order by position")]
    distinct = bob.scalar("select count(distinct id) from peer.inbox where topic = 'lossy'")
    print(f"{len(ns)} of {MESSAGES} messages arrived ({distinct} distinct ids) in {arrived_s:.2f} s, in order: "
          f"{ns == list(range(1, MESSAGES + 1))}")
    assert ns == list(range(1, MESSAGES + 1)) and distinct == MESSAGES


def test_a_call_answers(pair):
    lab, alice, bob, _ = pair
    bob.sql("create function public.add(a jsonb) returns jsonb language sql as $$ "
            "select to_jsonb((a->>'x')::int + (a->>'y')::int) $$")
    bob.sql("select peer.expose('public.add(jsonb)', 'alice')")
    took = []
    for i in range(CALLS):
        started = time.monotonic()
        assert alice.scalar("select peer.call('bob', 'public.add', %s::jsonb)", json.dumps({"x": i, "y": 1})) == i + 1
        took.append(time.monotonic() - started)
    took.sort()
    print(f"{CALLS} calls answered: p50 {took[len(took) // 2] * 1000:.0f} ms, max {took[-1] * 1000:.0f} ms "
          f"(round trip {2 * DELAY_MS:g} ms)")
    assert took[len(took) // 2] < 1.0


def test_a_clone_completes_at_about_the_loss_limited_rate(pair):
    lab, alice, bob, _ = pair
    alice.sql("insert into public.widget select n, 'widget ' || n, n * 1.25, array['t' || n %% 7], "
              "jsonb_build_object('n', n), '2026-11-27 10:00:00+00'::timestamptz + n * interval '1 s' "
              "from generate_series(1, %s) n", CLONE_ROWS)
    alice.sql("select bundle.create('shop'); select bundle.track('shop', 'public.widget')")
    alice.sql("select bundle.commit('shop', 'first'); select peer.share_bundle('shop', 'bob')")
    since = connection(bob, "alice")[1]
    wire_out0, wire_in0 = lab.wan_bytes(1)
    sent0 = connection(alice, "bob")[3]
    started = time.monotonic()
    summary = json.loads(bob.scalar("select peer.pull_bundle('alice', 'shop')::text"))
    seconds = time.monotonic() - started
    wire_out, wire_in = (a - b for a, b in zip(lab.wan_bytes(1), (wire_out0, wire_in0), strict=True))
    channel = connection(alice, "bob")[3] - sent0
    assert connection(bob, "alice")[1] == since  # one link throughout: the bytes are this clone's
    assert bob.scalar("select count(*) from public.widget") == CLONE_ROWS
    assert bob.scalar("select md5(string_agg(w::text, ',' order by id)) from public.widget w") == \
        alice.scalar("select md5(string_agg(w::text, ',' order by id)) from public.widget w")
    ceiling = mathis_ceiling()
    rate = wire_out / seconds
    print(f"clone of {CLONE_ROWS} rows in {seconds:.1f} s: pull says {summary['bytes']} B; alice's channel sent "
          f"{channel} B; nat1's WAN {wire_out} B out, {wire_in} B in; {wire_out / CLONE_ROWS:.0f} B/row on the wire, "
          f"{channel / CLONE_ROWS:.0f} B/row in messages; {rate / 1e6:.3f} MB/s on the wire against the Mathis "
          f"ceiling {ceiling / 1e6:.3f} MB/s ({rate / ceiling:.0%})")
    # Not far below what the loss allows (a third: a single SCTP association, one run), and
    # not above it by much either (that would mean the loss was not applied).
    assert ceiling / 3 < rate < ceiling * 2


def test_a_live_friend_is_not_declared_dead(pair):
    lab, alice, bob, since = pair
    samples = 0
    while True:
        a, b = connection(alice, "bob"), connection(bob, "alice")
        assert (a[0], a[1]) == ("connected", since["alice"]), f"alice's link to bob: {a}"
        assert (b[0], b[1]) == ("connected", since["bob"]), f"bob's link to alice: {b}"
        samples += 1
        if time.monotonic() - since["at"] >= LIVE_FOR_S:
            break
        time.sleep(0.5)
    lived = time.monotonic() - since["at"]
    print(f"connected {lived:.1f} s over the impaired link (messages, calls and the clone in it), "
          f"connected_since unchanged on both sides in {samples} samples")


def test_the_link_is_back_soon_after_a_nats_public_address_changes(pair):
    lab, alice, bob, _ = pair
    before = {"alice": connection(alice, "bob")[1], "bob": connection(bob, "alice")[1]}
    assert None not in before.values()
    # The harder case: the side whose address stays wins when both offer at once (the smaller peer
    # id), and its offer goes to the other's registration at the signaling server, made from the
    # old address and dead without either knowing.
    i = 1 if alice.scalar("select peer.whoami()") > bob.scalar("select peer.whoami()") else 2
    old = lab.public_ips[i]
    logs = {c.name: c.log_size() for c in (alice, bob)}
    started = time.monotonic()
    new = lab.readdress(i)
    seen = {}

    def back():
        now = time.monotonic() - started
        for me, cluster, friend in (("alice", alice, "bob"), ("bob", bob, "alice")):
            state, since_, error = connection(cluster, friend)[:3]
            if state != "connected" and me + " lost" not in seen:
                seen[me + " lost"] = (round(now, 1), error)
            if state == "connected" and since_ != before[me]:
                seen.setdefault(me + " back", round(now, 1))
        return "alice back" in seen and "bob back" in seen

    try:
        tb.wait_for(back, 40, interval=0.1, ignore=(psycopg.OperationalError,))
    except TimeoutError:
        pass
    seconds = time.monotonic() - started
    print(f"nat{i} {old} -> {new}: {seen}; link back on both sides after "
          f"{max(seen.get('alice back', 99), seen.get('bob back', 99)):.1f} s (waited {seconds:.1f} s), "
          f"candidates now {netlab.pair_types(alice, 'bob')}")
    for c in (alice, bob):  # what the workers said meanwhile (the signaling client, the links)
        said = [line for line in c.log(logs[c.name]).splitlines() if "aquapeer." in line]
        print(f"{c.name}'s worker: " + (" | ".join(line[24:180] for line in said[-6:]) or "nothing"))
    assert "alice back" in seen and "bob back" in seen, f"not back within 40 s: {seen}"
    assert alice.scalar("select peer.call('bob', 'public.add', '{\"x\": 2, \"y\": 3}')") == 5
    took = max(seen["alice back"], seen["bob back"])
    # Both sides declare the link dead after DEAD_AFTER_S (7 s) and offer again at once.  The
    # winning offer, lost with the dead registration, is sent again when the other side's comes
    # (net/node.py); before, both waited out NEGOTIATION_TIMEOUT_S, and it took 23 s.
    assert took < READDRESS_WITHIN_S, f"back after {took:.1f} s, not within {READDRESS_WITHIN_S:g} s: {seen}"


def test_a_killed_friend_is_declared_dead_soon(pair):
    lab, alice, bob, _ = pair
    tb.wait_connected(alice, "bob")
    bob.kill9()
    started = time.monotonic()
    tb.wait_for(lambda: connection(alice, "bob")[0] != "connected", 30, interval=0.05,
                message="alice to notice bob is gone")
    seconds = time.monotonic() - started
    state, _, error = connection(alice, "bob")[:3]
    print(f"bob killed -9: alice declared him {state} after {seconds:.2f} s ({error})")
    assert seconds < DEAD_WITHIN_S
