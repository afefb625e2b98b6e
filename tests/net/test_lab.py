"""Connection paths through real NAT routers, coturn and the signaling server (tests/netlab.py,
docs/netlab.md): alice in home1 and bob in home2, each behind its own NAT; what peer.connections
names, and what leaves the homes."""

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

import netlab
import testbed as tb

LOG_TAIL_LINES = 40


@pytest.fixture(scope="module")
def lab_available():
    reason = netlab.unavailable()
    if reason is None and netlab.running_lab():
        reason = "a `make lab` network lab is up, and only one lab runs at a time: `make lab-down` first"
    if reason:
        pytest.skip(reason)


def root_links() -> set[str]:
    """The network devices of the machine's own (root) namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture
def lab_pair(lab_available, request):
    """make(nat1, nat2, block_direct, stun, turn, policy1) -> (lab, alice, bob): a lab, alice in
    home1 and bob in home2 joined to it and friends.  Torn down in order (databases, then the
    lab), also on failure, with the logs printed then."""
    made = []

    def make(nat1="plain", nat2="plain", *, block_direct=False, stun=True, turn=True, policy1="all",
             delay_ms=None):
        lab = netlab.Lab(nat1, nat2, block_direct=block_direct, mid=delay_ms is not None)
        made.append(lab)
        lab.up()
        if delay_ms is not None:
            lab.splice_delay(delay_ms)
        bed = netlab.lab_testbed(lab)
        made.append(bed)
        alice, bob = bed.alice, bed.bob
        with ThreadPoolExecutor(2) as ex:
            futures = [ex.submit(netlab.join_lab, alice, lab, 1, stun=stun, turn=turn, policy=policy1),
                       ex.submit(netlab.join_lab, bob, lab, 2, stun=stun, turn=turn)]
            for f in futures:
                f.result()
        tb.befriend(alice, "alice", bob, "bob")
        return lab, alice, bob

    yield make
    if getattr(getattr(request.node, "rep_call", None), "failed", False):
        for obj in made:
            if isinstance(obj, tb.Testbed):
                for c in obj.clusters:
                    print(f"----- server log of {c.name} -----")
                    print("\n".join(c.log().splitlines()[-LOG_TAIL_LINES:]))
            else:
                for name in ("turnserver.log", "signal.log"):
                    print(f"----- lab {name} -----")
                    print("\n".join(obj.log(name).splitlines()[-LOG_TAIL_LINES:]))
    errors = []
    for obj in reversed(made):
        try:
            obj.close() if isinstance(obj, tb.Testbed) else obj.down()
        except Exception as exc:
            errors.append(exc)
    for obj in made:
        if isinstance(obj, netlab.Lab):
            print(f"lab up {obj.up_seconds}s, down {obj.down_seconds}s")
    if errors:
        raise errors[0]


def connect(cluster, friend, timeout="15 s") -> float:
    """peer.connect, asserted connected; returns the seconds it took."""
    started = time.monotonic()
    assert cluster.scalar("select peer.connect(%s, timeout => %s::interval)", friend, timeout) == "connected"
    return time.monotonic() - started


def both_types(alice, bob):
    """The (local, remote) candidate types each side's peer.connections names, once both show them."""
    def ready():
        a, b = netlab.pair_types(alice, "bob"), netlab.pair_types(bob, "alice")
        return (a, b) if a and b and None not in a + b else None
    return tb.wait_for(ready, 10, interval=0.1, message="both sides to name their candidates")


def nothing_left_the_lab(lab):
    return lab.outside_packets(1) == lab.outside_packets(2) == 0


def test_direct_behind_two_nats_with_stun_only(lab_pair):
    links = root_links()
    lab, alice, bob = lab_pair(stun=True, turn=False)
    assert root_links() == links  # nothing of the lab in the machine's own namespace
    seconds = connect(alice, "bob")
    a, b = both_types(alice, bob)
    print(f"direct: connect {seconds:.2f} s, alice {a}, bob {b}")
    # Each side sends from its host socket; the far side is known by its NAT's mapping.
    assert a[0] == "host" and a[1] in ("srflx", "prflx")
    assert b[0] == "host" and b[1] in ("srflx", "prflx")
    assert nothing_left_the_lab(lab)


def test_relay_behind_a_symmetric_nat(lab_pair):
    lab, alice, bob = lab_pair("symmetric", "plain", stun=True, turn=True)
    seconds = connect(alice, "bob")
    a, b = both_types(alice, bob)
    print(f"symmetric nat1: connect {seconds:.2f} s, alice {a}, bob {b}")
    assert "relay" in a and "relay" in b
    assert nothing_left_the_lab(lab)


def test_relay_only_with_ice_transport_policy_relay(lab_pair):
    lab, alice, bob = lab_pair(stun=True, turn=True, policy1="relay")
    seconds = connect(alice, "bob")
    a, b = both_types(alice, bob)
    print(f"policy relay: connect {seconds:.2f} s, alice {a}, bob {b}")
    # Direct would work here; with the policy alice offers and uses only her relay address.
    assert a[0] == "relay" and b[1] == "relay"
    assert nothing_left_the_lab(lab)


def test_relay_when_direct_udp_between_the_nats_is_blocked(lab_pair):
    lab, alice, bob = lab_pair(block_direct=True, stun=True, turn=True)
    seconds = connect(alice, "bob")
    a, b = both_types(alice, bob)
    dropped = lab.direct_dropped()
    print(f"direct blocked: connect {seconds:.2f} s, alice {a}, bob {b}, {dropped} direct packets dropped")
    assert "relay" in a and "relay" in b
    assert nothing_left_the_lab(lab)
    assert dropped > 0  # the direct checks were tried, and stopped between the NATs


def test_no_public_server_without_stun_or_turn_rows(lab_pair):
    lab, alice, bob = lab_pair(stun=False, turn=False)
    started = time.monotonic()
    with pytest.raises(psycopg.Error) as failure:
        alice.sql("select peer.connect('bob', timeout => '4 s')")
    seconds = time.monotonic() - started
    rows = alice.sql("select state, local_candidate, remote_candidate, last_error from peer.connections")
    private = lab.to_private_homes(1)
    print(f"no servers: failed after {seconds:.2f} s: {failure.value}; peer.connections {rows}; "
          f"{private} packets from home1 to bob's private address")
    assert seconds < 8 and "could not connect to bob" in str(failure.value)  # within the time asked for
    assert "answered, but no network path" in str(failure.value)
    # Host candidates only: alice's checks go to bob's private address, and die in pub.
    assert private > 0
    # And nothing went anywhere else: no public STUN server, no DNS for one.
    assert nothing_left_the_lab(lab)
    # The counter does count what leaves for the world (192.0.2.1: TEST-NET-1).
    lab.run("home1", ["python3", "-c", "import socket; "
                      "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.1', 3478))"])
    assert lab.outside_packets(1) == 1


def test_a_delay_spliced_between_nat1_and_pub(lab_pair):
    # The hook for slow and lossy links: a user-space forwarder in aqlab-mid1, 40 ms each way.
    lab, alice, bob = lab_pair(stun=True, turn=False, delay_ms=40)
    seconds = connect(alice, "bob")
    a, b = both_types(alice, bob)
    rtt = tb.wait_for(lambda: alice.scalar("select rtt_ms from peer.connections where friend = 'bob'"), 10,
                      interval=0.2, message="a measured round trip")
    print(f"40 ms each way: connect {seconds:.2f} s, alice {a}, bob {b}, rtt {rtt:.1f} ms")
    assert a[0] == "host" and a[1] in ("srflx", "prflx")
    assert 80 <= rtt < 400
    assert nothing_left_the_lab(lab)
