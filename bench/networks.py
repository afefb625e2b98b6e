"""Benchmark aquapeer over real NAT routers, a TURN server, and slow and lossy links (issue 24).

Run as root with `.venv/bin/python bench/networks.py` (the network lab, tests/netlab.py and
docs/netlab.md: alice in home1 behind nat1, bob in home2 behind nat2, coturn and the signaling
server on pub; between nat1 and pub either the kernel bridge or a forwarder adding delay and
loss).  One lab and one pair of databases for the whole run; the path is chosen by nat1's kind:

- direct: both NATs plain (endpoint-independent mapping), STUN only: (host, srflx);
- relay: nat1 symmetric (a new port per destination), STUN and TURN: alice's relay candidate.

Measured:
- connect: `select peer.connect('bob')` on alice until `connected`, each a fresh connection
  (auto_connect off on both sides; `peer.disconnect('bob')` and a wait until neither side
  shows connected between connects), per path, over the unimpaired link;
- for each link (no impairment; DELAY ms each way; DELAY ms each way + LOSS each way) and each
  path: message latency (peer.send committed on alice → bob's NOTIFY aquapeer_inbox for it,
  one at a time), and a clone of a ROWS-row bundle (`peer.pull_bundle` on bob, bob's copy
  removed between clones): its time, the bytes the pull reports, the bytes the data channel
  carried (peer.connections bytes_sent/bytes_received deltas) and the bytes nat1's WAN
  forwarded (IP packets: DTLS, SCTP, TURN and retransmissions included), its MB/s on the wire
  against the Mathis ceiling for the loss (MSS/RTT * sqrt(3/2)/sqrt(p), 1,200-byte packets).

The figures are printed as rich tables, then (--json) as one line of JSON.
"""

import argparse
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import netlab  # noqa: E402
import testbed as tb  # noqa: E402
from measure import percentiles  # noqa: E402

console = Console(width=160)

PACKET_BYTES = 1200  # aiortc's SCTP packets
PATHS = {"direct": "plain", "relay": "symmetric"}  # path -> nat1's kind
PARTS = ("connect", "links")

TABLES = """
    create table public.widget (id int primary key, name text, price numeric, tags text[], meta jsonb,
                                updated timestamptz);
"""


def mathis(rtt_s, loss, mss=PACKET_BYTES):
    """Bytes/s one loss-limited TCP-like flow can carry (None without loss: not loss-limited)."""
    return mss / rtt_s * math.sqrt(1.5) / math.sqrt(loss) if loss else None


def connection(cluster, friend):
    rows = cluster.sql("select state, connected_since, bytes_sent, bytes_received, local_candidate, "
                       "remote_candidate from peer.connections where friend = %s", friend)
    return rows[0] if rows else (None,) * 6


# --- the lab and the databases -------------------------------------------------------------------

def setup(lab, rows):
    bed = netlab.lab_testbed(lab)
    alice, bob = bed.alice, bed.bob
    with ThreadPoolExecutor(2) as ex:
        for f in [ex.submit(netlab.join_lab, alice, lab, 1), ex.submit(netlab.join_lab, bob, lab, 2)]:
            f.result()
    tb.befriend(alice, "alice", bob, "bob")
    for cluster in (alice, bob):
        cluster.sql("update peer.friend set auto_connect = false")
        cluster.sql(TABLES)
    bob.sql("select peer.allow_topic('latency', 'alice')")
    started = time.monotonic()
    alice.sql("insert into public.widget select n, 'widget ' || n, n * 1.25, array['t' || n %% 7], "
              "jsonb_build_object('n', n), '2026-11-27 10:00:00+00'::timestamptz + n * interval '1 s' "
              "from generate_series(1, %s) n", rows)
    alice.sql("select bundle.create('shop'); select bundle.track('shop', 'public.widget')")
    alice.sql("select bundle.commit('shop', 'first'); select peer.share_bundle('shop', 'bob')")
    console.print(f"alice's bundle: {rows} rows, filled and committed in {time.monotonic() - started:.1f} s")
    return bed


def disconnect(alice, bob):
    alice.sql("select peer.disconnect('bob')")
    tb.wait_for(lambda: connection(alice, "bob")[0] != "connected" and connection(bob, "alice")[0] != "connected",
                20, interval=0.02, message="neither side to show connected after peer.disconnect")


def connect(alice):
    started = time.perf_counter()
    state = alice.scalar("select peer.connect('bob', timeout => '30 s')")
    assert state == "connected", state
    return time.perf_counter() - started


def use_path(lab, alice, bob, path):
    """Disconnected, with nat1 of the path's kind, and the TURN server known only for the relay
    path (with it, a lost or late check can leave one side on a relayed pair: not direct)."""
    disconnect(alice, bob)
    if lab.nat_kinds[1] != PATHS[path]:
        lab.set_nat(1, PATHS[path])
    for cluster in (alice, bob):
        has_turn = cluster.scalar("select count(*) from peer.turn_server") > 0
        if has_turn != (path == "relay"):
            if path == "relay":
                cluster.sql("insert into peer.turn_server (url, username, credential) values (%s, %s, %s)",
                            lab.turn_url, lab.turn_user, lab.turn_password)
            else:
                cluster.sql("delete from peer.turn_server")
            cluster.sql("select peer.reload_worker()")


def check_path(alice, bob, path):
    """The candidate types both sides name, checked against the path."""
    def ready():
        a, b = netlab.pair_types(alice, "bob"), netlab.pair_types(bob, "alice")
        return (a, b) if a and b and None not in a + b else None
    a, b = tb.wait_for(ready, 10, interval=0.05, message="both sides to name their candidates")
    relayed = "relay" in a + b
    if relayed != (path == "relay"):
        raise AssertionError(f"{path}: alice {a}, bob {b}")
    return f"{a[0]}→{a[1]}"


# --- measuring ---------------------------------------------------------------------------------

def connect_times(lab, alice, bob, path, count):
    use_path(lab, alice, bob, path)
    samples, types = [], None
    for _ in range(count):
        disconnect(alice, bob)
        samples.append(connect(alice))
        types = types or check_path(alice, bob, path)
    return samples, types


class Listener(threading.Thread):
    """LISTEN aquapeer_inbox on bob in a thread; notes when each message id first arrives."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.conn = cluster.connect()
        self.conn.execute("listen aquapeer_inbox")
        self.received = {}
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            for n in self.conn.notifies(timeout=0.2):
                self.received.setdefault(n.payload, time.perf_counter())

    def stop(self):
        self.stopping.set()
        self.join(5)
        self.conn.close()


def message_latency(alice, listener, samples, rate, wait_s=30.0):
    """peer.send committed on alice → bob's notification; (latencies in s, lost)."""
    sent = []
    with alice.connect() as conn:
        conn.autocommit = True
        started = time.perf_counter()
        for i in range(samples):
            pause = started + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            key = str(conn.execute("select peer.send('bob', 'latency', jsonb_build_object('i', %s::int))",
                                   (i,)).fetchone()[0])
            sent.append((key, time.perf_counter()))
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline and any(k not in listener.received for k, _ in sent):
        time.sleep(0.02)
    latencies = [listener.received[k] - t for k, t in sent if k in listener.received]
    return latencies, len(sent) - len(latencies)


def forget_clone(bob):
    bob.sql("delete from bundle.bundle where name = 'shop'; delete from bundle.changed_key; "
            "delete from peer.transfer; truncate public.widget")


def clone(lab, alice, bob, rows):
    forget_clone(bob)
    since = connection(bob, "alice")[1]
    a0, b0, w0 = connection(alice, "bob"), connection(bob, "alice"), lab.wan_bytes(1)
    started = time.perf_counter()
    summary = json.loads(bob.scalar("select peer.pull_bundle('alice', 'shop')::text"))
    seconds = time.perf_counter() - started
    a1, b1, w1 = connection(alice, "bob"), connection(bob, "alice"), lab.wan_bytes(1)
    if b1[1] != since:
        raise AssertionError("the link was replaced during the clone: its bytes are not the clone's alone")
    got = bob.scalar("select count(*) from public.widget")
    if got != rows:
        raise AssertionError(f"bob's clone has {got} rows, not {rows}")
    return {"seconds": seconds, "pull_bytes": summary["bytes"],
            "channel_bytes": (b1[3] - b0[3]) + (b1[2] - b0[2]),  # bob received + sent
            "alice_sent": a1[2] - a0[2],
            "wire_bytes": (w1[0] - w0[0]) + (w1[1] - w0[1]), "wire_out": w1[0] - w0[0]}


# --- the report ----------------------------------------------------------------------------------

def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def report(args, figures):
    if figures.get("connect"):
        table = Table(title="connect: peer.connect('bob') on alice → connected, a fresh connection each time, "
                            "unimpaired link")
        for col in ("path", "candidates (alice local→remote)", "n", "p50 ms", "p99 ms"):
            table.add_column(col, justify="left" if col.startswith(("path", "cand")) else "right")
        for path, c in figures["connect"].items():
            table.add_row(path + (" (two plain NATs)" if path == "direct" else " (nat1 symmetric, TURN)"),
                          c["types"], str(c["n"]), fmt(c["p50_ms"]), fmt(c["p99_ms"]))
        console.print(table)
    if figures.get("links"):
        table = Table(title=f"over each link: message latency (peer.send → bob's NOTIFY, one at a time) and a "
                            f"{args.rows:,}-row clone (peer.pull_bundle on bob)")
        cols = ("link", "path", "msg p50 ms", "msg p99 ms", "clone s", "rows/s", "pull MB", "channel MB",
                "wire MB out+in", "wire B/row", "out MB/s", "ceiling MB/s", "of ceiling")
        for col in cols:
            table.add_column(col, justify="left" if col in ("link", "path") else "right")
        for r in figures["links"]:
            ceiling = r["ceiling_Bps"]
            rate = r["wire_out"] / r["seconds"]  # alice → bob: the data's direction
            table.add_row(r["link"], r["path"], fmt(r["msg_p50_ms"]), fmt(r["msg_p99_ms"]), fmt(r["seconds"]),
                          fmt(args.rows / r["seconds"], 0), fmt(r["pull_bytes"] / 1e6, 2),
                          fmt(r["channel_bytes"] / 1e6, 2),
                          f"{r['wire_out'] / 1e6:.2f}+{(r['wire_bytes'] - r['wire_out']) / 1e6:.2f}",
                          fmt(r["wire_bytes"] / args.rows, 0), fmt(rate / 1e6, 3),
                          fmt(ceiling / 1e6 if ceiling else None, 3),
                          f"{rate / ceiling:.0%}" if ceiling else "—")
        console.print(table)
        console.print("pull MB: what peer.pull_bundle reports; channel MB: data-channel messages both ways "
                      "(peer.connections deltas); wire MB: IP packets through nat1's WAN, out (alice → bob, the data) "
                      "+ in (bob's requests, SACKs), with DTLS, SCTP and TURN headers and retransmissions; out MB/s: "
                      "the data's direction; ceiling: Mathis, 1,200-byte packets, the link's round "
                      "trip and loss.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the cloned bundle (default: 100,000)")
    parser.add_argument("--connects", type=int, default=15, help="connects per path (default: 15)")
    parser.add_argument("--latency-samples", type=int, default=100,
                        help="messages per link and path for the latency (default: 100)")
    parser.add_argument("--rate", type=float, default=20.0, help="latency messages a second (default: 20)")
    parser.add_argument("--delay-ms", type=float, default=25.0,
                        help="delay each way between nat1 and pub (default: 25, a 50 ms round trip)")
    parser.add_argument("--loss", type=float, default=0.01, help="loss each way on the lossy link (default: 0.01)")
    parser.add_argument("--paths", nargs="+", choices=tuple(PATHS), default=list(PATHS))
    parser.add_argument("--only", choices=PARTS, default=None, help="run one part only")
    parser.add_argument("--json", action="store_true", help="print the figures as one line of JSON too")
    args = parser.parse_args()
    reason = netlab.unavailable()
    if reason is None and netlab.running_lab():
        reason = "a `make lab` network lab is up (one lab at a time): `make lab-down` first"
    if reason:
        console.print(f"networks: {reason}")
        return 2
    links = [("none", 0.0, 0.0), (f"{2 * args.delay_ms:g} ms", args.delay_ms, 0.0),
             (f"{2 * args.delay_ms:g} ms + {args.loss:.0%}", args.delay_ms, args.loss)]
    figures = {"rows": args.rows}
    t0 = time.monotonic()
    with netlab.Lab(mid=True) as lab:
        bed = setup(lab, args.rows)
        listener = None
        try:
            alice, bob = bed.alice, bed.bob
            if args.only in (None, "connect"):
                figures["connect"] = {}
                for path in args.paths:
                    samples, types = connect_times(lab, alice, bob, path, args.connects)
                    p50, p99 = percentiles(samples)
                    figures["connect"][path] = {"types": types, "n": len(samples), "p50_ms": round(p50, 1),
                                                "p99_ms": round(p99, 1)}
                    console.print(f"connect {path}: p50 {p50:.0f} ms, p99 {p99:.0f} ms ({types})")
            if args.only in (None, "links"):
                figures["links"] = []
                listener = Listener(bob)
                listener.start()
                for label, delay, loss in links:
                    lab.impair(delay, loss)
                    for path in args.paths:
                        use_path(lab, alice, bob, path)
                        connect(alice)
                        types = check_path(alice, bob, path)
                        lat, lost = message_latency(alice, listener, args.latency_samples, args.rate)
                        if lost:
                            raise AssertionError(f"{label} {path}: {lost} latency messages did not arrive")
                        p50, p99 = percentiles(lat)
                        run = clone(lab, alice, bob, args.rows)
                        run.update(link=label, path=path, types=types, msg_p50_ms=round(p50, 1),
                                   msg_p99_ms=round(p99, 1), ceiling_Bps=mathis(2 * delay / 1000, loss) if delay
                                   else None)
                        figures["links"].append(run)
                        console.print(f"{label:>12} {path:6} {types}: message p50 {p50:.0f} ms p99 {p99:.0f} ms; "
                                      f"clone {run['seconds']:.1f} s, {run['wire_bytes'] / 1e6:.2f} MB on the wire, "
                                      f"{run['wire_out'] / run['seconds'] / 1e6:.3f} MB/s out")
        finally:
            if listener is not None:
                listener.stop()
            bed.close()
    figures["seconds"] = round(time.monotonic() - t0, 1)
    console.print()
    report(args, figures)
    console.print(f"the whole run: {figures['seconds']} s")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
