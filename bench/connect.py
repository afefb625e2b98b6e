"""Benchmark connections between databases against PostgreSQL's own paths.

Run with `make bench` (or `.venv/bin/python bench/connect.py`).  Real
clusters on loopback, the real signaling server (`aquapeer signal`, run
through the installed CLI), real aiortc.  Every aquapeer figure stands beside
a native reference measured in the same run:

- connect: time from `select peer.connect('bob')` on alice to `connected`,
  each one a fresh connection (auto_connect off on both sides, and between
  connects `peer.disconnect('bob')` and a wait until neither side shows
  connected), against opening a new libpq connection to bob over TCP
  127.0.0.1 and running `select 1`;
- friends: one database's worker holding N connected friends (light peers
  run by `aquapeer lightpeers` in a subprocess), its RSS and idle CPU over a
  window, against the same worker with 0 friends and an idle ordinary
  backend of the same database.  The light peers hold back their own offers
  at first, so the database connects to them all itself;
- storm: the usual order of things instead, on another database: N friends
  offer before the database has accepted them (refused, recorded as friend
  requests), then it adds them all; how many are connected after a while.

The figures are printed as rich tables, then as one line of JSON.
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psycopg
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402
from measure import percentiles, tail  # noqa: E402
from procinfo import cpu_seconds, proc_status, worker_pid  # noqa: E402

console = Console(width=120)

CONNECT_P50_TARGET_MS = 1000.0
RSS_TARGET_MB = 300.0
PARTS = ("connect", "friends", "storm")
CPU_TARGET_PCT = 2.0


# --- processes ----------------------------------------------------------------

def start_process(argv, log_path):
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def stop_process(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --- /proc ----------------------------------------------------------------------

def measure_idle(pids, seconds):
    """{pid: (cpu % of one core over the window, status at the end)} for processes idling together."""
    before = {pid: cpu_seconds(pid) for pid in pids}
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    return {pid: ((cpu_seconds(pid) - before[pid]) / wall * 100.0,
                  proc_status(pid, ("VmRSS", "RssAnon", "RssFile", "RssShmem")))
            for pid in pids}


# --- databases ------------------------------------------------------------------

def connected(conn, friend):
    return conn.execute("select count(*) from peer.connections where friend = %s and state = 'connected'",
                        (friend,)).fetchone()[0] > 0


# --- a: connect -------------------------------------------------------------------

def bench_connect(alice, bob, n):
    tb.befriend(alice, "alice", bob, "bob")
    # Each connect must be a fresh one made by peer.connect, not an automatic reconnection.
    alice.sql("update peer.friend set auto_connect = false")
    bob.sql("update peer.friend set auto_connect = false")
    connects, settles = [], []
    with alice.connect() as a, bob.connect() as b:
        for i in range(n + 1):  # the first one warms up both backends and workers
            started = time.perf_counter()
            state = a.execute("select peer.connect('bob')").fetchone()[0]
            took = time.perf_counter() - started
            if state != "connected":
                raise RuntimeError(f"peer.connect('bob') returned {state!r}")
            tb.wait_for(lambda: connected(b, "alice"), 10, message="bob to see alice connected")
            a.execute("select peer.disconnect('bob')")
            closing = time.perf_counter()
            tb.wait_for(lambda: not connected(a, "bob") and not connected(b, "alice"), 15,
                        message="neither side to show connected after peer.disconnect")
            if i:
                connects.append(took)
                settles.append(time.perf_counter() - closing)
    native = []
    for _ in range(n + 1):
        started = time.perf_counter()
        with psycopg.connect(bob.tcp_dsn, autocommit=True) as conn:
            conn.execute("select 1").fetchone()
        native.append(time.perf_counter() - started)
    return connects, settles, native[1:]


# --- b: many friends ----------------------------------------------------------------

def connected_count(cluster):
    return cluster.scalar("select count(*) from peer.connections where state = 'connected'")


class LightPeers:
    """`aquapeer lightpeers` befriending one database, as a subprocess."""

    def __init__(self, cluster, signal_url, count, workdir, tag, offer_after):
        self.cluster, self.count = cluster, count
        self.invites_path = os.path.join(workdir, f"{tag}-invites.json")
        self.log_path = os.path.join(workdir, f"{tag}-lightpeers.log")
        self.proc = start_process([tb.AQUAPEER_CLI, "lightpeers", "--count", str(count), "--signal", signal_url,
                                   "--friend-invite", cluster.scalar("select peer.invite()"),
                                   "--invites-out", self.invites_path, "--offer-after", str(offer_after)],
                                  self.log_path)

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"aquapeer lightpeers exited with {self.proc.returncode}:\n{tail(self.log_path)}")
        return os.path.exists(self.invites_path)

    def invites(self):
        tb.wait_for(self._ready, 60, message="the light peers to start")
        with open(self.invites_path) as f:
            return json.load(f)

    def add_as_friends(self, invites):
        """peer.add_friend() for each light peer, as light0, light1, ..., over one connection."""
        with self.cluster.connect() as conn:
            for i, invite in enumerate(invites):
                conn.execute("select peer.add_friend(%s, %s)", (f"light{i}", invite))

    def diagnose(self):
        """Where the connections stand, on both sides, for an error message or a report."""
        me = self.cluster.scalar("select peer.whoami()")
        rows = self.cluster.sql("select c.state, coalesce(c.last_error, ''), count(*), "
                                "count(*) filter (where f.peer_id < %s collate \"C\") from peer.connections c "
                                "join peer.friends f on f.name = c.friend group by 1, 2 order by 3 desc", me)
        self.proc.send_signal(signal.SIGUSR1)  # the light peers' side, as JSON lines in their log
        time.sleep(0.5)
        theirs = collections.Counter()
        with open(self.log_path, errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    row = json.loads(line)
                    theirs[(row["link"], row.get("offerer"), row.get("signaling"))] += 1
        return {"database": [{"state": r[0], "last_error": r[1], "links": r[2],
                              "friend_peer_id_smaller_than_database": r[3]} for r in rows],
                "light_peers": [{"link": k[0], "offerer": k[1], "signaling_state": k[2], "peers": v}
                                for k, v in theirs.items()]}

    def stop(self):
        stop_process(self.proc)


def bench_friends(hub, signal_url, count, idle_seconds, settle_seconds, workdir):
    """The hub's worker idle with 0 friends, then holding `count` connected friends."""
    tb.join_signaling(hub, signal_url)
    figures = {}
    with hub.connect() as idle_backend:
        backend_pid = idle_backend.execute("select pg_backend_pid()").fetchone()[0]
        idle_backend.execute("select 1").fetchone()

        # The worker with 0 friends, registered at the signaling server, beside an idle backend.
        pid = worker_pid(hub)
        time.sleep(settle_seconds)
        idle = measure_idle([pid, backend_pid], idle_seconds)
        figures["worker_0"] = idle[pid]
        figures["backend"] = idle[backend_pid]
        figures["worker_0_lag_ms"] = hub.scalar("select loop_lag_max_ms from peer.worker_status()")

        # The light peers hold back their own offers for a while: the database, adding them
        # at once, connects to all of them itself, and no stranger's offer reaches it (see
        # bench_storm for what those do).
        peers = LightPeers(hub, signal_url, count, workdir, "hub", offer_after=10)
        try:
            invites = peers.invites()
            added = time.perf_counter()
            peers.add_as_friends(invites)
            try:
                tb.wait_for(lambda: connected_count(hub) == count, 60, interval=0.2,
                            message=f"{count} connected friends")
            except TimeoutError as e:
                raise RuntimeError(f"{e}: {json.dumps(peers.diagnose())}") from None
            figures["all_connected_s"] = time.perf_counter() - added
            if worker_pid(hub) != pid:
                raise RuntimeError("the worker restarted while its friends connected")
            time.sleep(settle_seconds)
            idle = measure_idle([pid, peers.proc.pid], idle_seconds)
            figures["worker_n"] = idle[pid]
            figures["lightpeers"] = idle[peers.proc.pid]
            figures["worker_n_lag_ms"] = hub.scalar("select loop_lag_max_ms from peer.worker_status()")
            figures["still_connected"] = connected_count(hub)
        finally:
            peers.stop()
    return figures


def bench_storm(db, signal_url, count, timeout, workdir):
    """The usual order of things: friends offer before the database has accepted them.

    The light peers offer at once; the database refuses them and records
    friend requests; once all are recorded (or 15 s passed), the database adds
    them all as friends.  How many are connected `timeout` seconds later?
    """
    tb.join_signaling(db, signal_url)
    peers = LightPeers(db, signal_url, count, workdir, "storm", offer_after=0)
    try:
        invites = peers.invites()
        requests = lambda: db.scalar("select count(*) from peer.friend_requests")  # noqa: E731
        try:
            tb.wait_for(lambda: requests() >= count, 15, interval=0.2)
        except TimeoutError:
            pass  # some strangers are stuck waiting for an answer that never comes: add them all anyway
        figures = {"friend_requests": requests()}
        added = time.perf_counter()
        peers.add_as_friends(invites)
        all_connected = None
        deadline = added + timeout
        while time.perf_counter() < deadline:
            if connected_count(db) == count:
                all_connected = time.perf_counter() - added
                break
            time.sleep(0.2)
        figures.update(connected=connected_count(db), all_connected_s=all_connected,
                       rate_limited_logged=db.log().count("over its rate limit"))
        if all_connected is None:
            figures["diagnosis"] = peers.diagnose()
        return figures
    finally:
        peers.stop()


# --- output -----------------------------------------------------------------------

def fmt(v, digits=1):
    return "" if v is None else f"{v:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--connects", type=int, default=30,
                        help="connects (and native connections) per latency figure (default: 30)")
    parser.add_argument("--friends", type=int, default=50, help="light peers befriending one database (default: 50)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="CPU measuring window (default: 30)")
    parser.add_argument("--settle-seconds", type=float, default=5.0,
                        help="wait before each measuring window (default: 5)")
    parser.add_argument("--storm-timeout", type=float, default=45.0,
                        help="how long the storm part waits for all friends to connect (default: 45)")
    parser.add_argument("--only", choices=PARTS, default=None, help="run one part only")
    args = parser.parse_args()
    parts = [args.only] if args.only else list(PARTS)

    result = {}
    with tempfile.TemporaryDirectory(prefix="aqp-bench-") as workdir, \
            tb.Testbed(4, names=["alice", "bob", "hub", "storm"]) as bed:
        signal_server = tb.SignalServer(log_path=os.path.join(workdir, "signal.log"))
        try:
            signal_server.start()
            if "connect" in parts:
                tb.join_signaling(bed.alice, signal_server.url)
                tb.join_signaling(bed.bob, signal_server.url)
                result["connect"] = bench_connect(bed.alice, bed.bob, args.connects)
            if "friends" in parts:
                result["friends"] = bench_friends(bed.hub, signal_server.url, args.friends, args.idle_seconds,
                                                  args.settle_seconds, workdir)
            if "storm" in parts:
                result["storm"] = bench_storm(bed.storm, signal_server.url, args.friends, args.storm_timeout,
                                              workdir)
        except BaseException:
            console.print(f"[bold red]signaling server log (tail):[/]\n{tail(signal_server.log_path)}")
            raise
        finally:
            signal_server.stop()

    summary = {}
    if "connect" in result:
        connects, settles, native = result["connect"]
        c50, c99 = percentiles(connects)
        s50, s99 = percentiles(settles)
        n50, n99 = percentiles(native)
        table = Table(title=f"connect between two databases on loopback (ms; {len(connects)} each)")
        for column in ("what", "aquapeer", "p50", "p99", "native reference", "p50", "p99"):
            table.add_column(column)
        table.add_row("connect", "peer.connect('bob') → connected", fmt(c50), fmt(c99),
                      "libpq connect (TCP) + select 1", fmt(n50, 2), fmt(n99, 2))
        table.add_row("hang up", "peer.disconnect → both sides closed", fmt(s50), fmt(s99), "", "", "")
        console.print(table)
        verdict = "[green]met[/]" if c50 < CONNECT_P50_TARGET_MS else "[red]missed[/]"
        console.print(f"target: peer.connect p50 under {CONNECT_P50_TARGET_MS:.0f} ms: {verdict}")
        summary.update(connects=len(connects), connect_p50_ms=round(c50, 1), connect_p99_ms=round(c99, 1),
                       libpq_connect_p50_ms=round(n50, 2), libpq_connect_p99_ms=round(n99, 2),
                       disconnect_settle_p50_ms=round(s50, 1), disconnect_settle_p99_ms=round(s99, 1))
    if "friends" in result:
        f = result["friends"]
        n = args.friends
        table = Table(title=f"one worker holding {n} connected friends, idle for {args.idle_seconds:.0f} s")
        for column in ("process", "VmRSS MB", "RssAnon MB", "RssShmem MB", "CPU % of a core", "loop lag ms"):
            table.add_column(column)
        table.caption = "loop lag: peer.worker_status().loop_lag_max_ms, the worst second of the last minute"
        for label, key, lag in ((f"aquapeer worker, {n} friends", "worker_n", f["worker_n_lag_ms"]),
                                ("aquapeer worker, 0 friends", "worker_0", f["worker_0_lag_ms"]),
                                ("idle client backend", "backend", None),
                                (f"aquapeer lightpeers ({n} friends)", "lightpeers", None)):
            cpu, status = f[key]
            table.add_row(label, fmt(status["VmRSS"]), fmt(status["RssAnon"]), fmt(status.get("RssShmem")),
                          fmt(cpu, 2), fmt(lag))
        console.print(table)
        cpu_n, status_n = f["worker_n"]
        console.print(f"all {n} connected {f['all_connected_s']:.1f} s after peer.add_friend; "
                      f"{f['still_connected']} still connected after the window")
        for what, ok in ((f"RSS under {RSS_TARGET_MB:.0f} MB", status_n["VmRSS"] < RSS_TARGET_MB),
                         (f"CPU under {CPU_TARGET_PCT:.0f} % of a core", cpu_n < CPU_TARGET_PCT)):
            console.print(f"target: {what}: " + ("[green]met[/]" if ok else "[red]missed[/]"))
        summary.update({
            "friends": n, "all_connected_s": round(f["all_connected_s"], 2),
            "still_connected": f["still_connected"], "idle_window_s": args.idle_seconds,
            "worker_n_rss_mb": round(status_n["VmRSS"], 1), "worker_n_anon_mb": round(status_n["RssAnon"], 1),
            "worker_n_cpu_pct": round(cpu_n, 2), "worker_n_loop_lag_ms": f["worker_n_lag_ms"],
            "worker_0_rss_mb": round(f["worker_0"][1]["VmRSS"], 1),
            "worker_0_anon_mb": round(f["worker_0"][1]["RssAnon"], 1),
            "worker_0_cpu_pct": round(f["worker_0"][0], 2), "worker_0_loop_lag_ms": f["worker_0_lag_ms"],
            "backend_rss_mb": round(f["backend"][1]["VmRSS"], 1), "backend_cpu_pct": round(f["backend"][0], 2),
            "lightpeers_rss_mb": round(f["lightpeers"][1]["VmRSS"], 1),
            "lightpeers_cpu_pct": round(f["lightpeers"][0], 2),
        })
    if "storm" in result:
        f = result["storm"]
        n = args.friends
        took = f"after {f['all_connected_s']:.1f} s" if f["all_connected_s"] is not None else \
            f"[red]only {f['connected']} after {args.storm_timeout:.0f} s[/]"
        console.print(f"storm: {n} friends whose offers came before they were accepted (refused, then "
                      f"peer.add_friend): all connected {took}; "
                      f"{f['rate_limited_logged']} 'over its rate limit' warnings in the server log")
        if "diagnosis" in f:
            console.print("storm diagnosis:", json.dumps(f["diagnosis"]))
        summary.update(storm_friend_requests=f["friend_requests"], storm_connected=f["connected"],
                       storm_all_connected_s=(
            None if f["all_connected_s"] is None else round(f["all_connected_s"], 2)),
            storm_timeout_s=args.storm_timeout, storm_rate_limited_logged=f["rate_limited_logged"])
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
