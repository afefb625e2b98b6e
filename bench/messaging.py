"""Benchmark durable messages and remote calls against PostgreSQL's logical replication.

Run with `make bench` (or `.venv/bin/python bench/messaging.py`).  Two real
clusters on loopback, alice (A, sends) and bob (B, receives), the real
signaling server (`aquapeer signal`, run through the installed CLI), real
aiortc.  Every aquapeer figure stands beside a native reference measured in
the same run between the same two clusters (both made with
wal_level = logical):

- throughput: 1 KB messages, 100 per transaction
  (`select peer.send('bob', 'bench', …) from generate_series(1, 100)`), sent
  by one session for --seconds; messages per second from the first send until
  the last one is acknowledged on A (and until it arrived in B's peer.inbox).
  Reference: the same 1 KB rows, 100 per INSERT, into a table A publishes and
  B subscribes to (CREATE SUBSCRIPTION over A's loopback TCP address): rows
  per second until the last row is visible on B.  Both senders keep at most
  --window messages in flight (sent, not yet on B), so the backlog, and the
  time to drain it at the end, stay bounded.  A sender that was hardly ever
  held back by the window measured itself, not delivery: the output says so
  (typically the native one, so the ratio is an upper bound);
- latency: one 1 KB message at a time, --rate a second; from the sender's
  COMMIT returning to a LISTEN session on B receiving the notification sent
  once the message is committed into peer.inbox (aquapeer_inbox).  Reference:
  one row at a time into the replicated table, to the NOTIFY of an
  `ENABLE ALWAYS` trigger on B (apply workers run with
  session_replication_role = replica);
- concurrent senders: 1, then --senders (8) sessions at once, each sending
  one 1 KB message per transaction (`select peer.send(…)`, COMMIT) as fast
  as it can for --seconds; messages per second from the first send until
  each session's last message is in B's peer.inbox, and the latency of
  each transaction's COMMIT (and of the whole transaction) as the sessions
  saw it.  Reference: the same sessions each INSERTing one row per
  transaction into the replicated table, until each one's last row is
  visible on B.  No window here: a backlog drains at the end, within
  --drain-timeout, and counts in the rate;
- calls: `select peer.call('bob', 'public.bench_echo', …)` from A of a
  trivial SQL function bob exposed to alice.  Reference: the same function
  called over an open libpq TCP connection to B;
- the two workers: RSS from /proc, CPU during the throughput part, and
  loop_lag_max_ms from peer.worker_status() after each aquapeer part.

Native parts run first and their subscription is dropped before the aquapeer
parts, so A does not decode WAL while aquapeer runs; the aquapeer throughput
part runs last, so loop lag and RSS at the end reflect it.  The sending
sessions of both use synchronous_commit = on (--sender-synchronous-commit):
the test bed turns it off cluster-wide, and a logical walsender sends only
flushed WAL, so with it off a native commit would wait for the WAL writer
(wal_writer_delay) before replication even starts.

The figures are printed as rich tables, then (with --json) as one line of
JSON.  The exit status is 1 when a part failed.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
import traceback

import psycopg
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402
from measure import percentiles  # noqa: E402
from procinfo import cpu_seconds, proc_status, worker_pid  # noqa: E402

console = Console(width=140)

THROUGHPUT_TARGET = 5000.0       # messages acknowledged per second, at least
LATENCY_P50_TARGET_MS = 20.0
LATENCY_P99_TARGET_MS = 100.0
CALL_P50_TARGET_MS = 5.0
LOOP_LAG_TARGET_MS = 100.0       # as in bench_worker.py

TOPIC = "bench"
BATCH = 100                      # messages (rows) per transaction in the throughput parts
PAYLOAD_BYTES = 1024             # octet_length(payload::text) of a message (row)
NATIVE_CHANNEL = "bench_native"
PARTS = ("native", "aquapeer")

# The throughput senders: one statement per transaction, BATCH messages (rows) each.
AQUAPEER_SEND_BATCH = ("select peer.send('bob', %s, jsonb_build_object('n', g, 'pad', %s::text)) "
                       "from generate_series(1, %s) g")
NATIVE_INSERT_BATCH = ("insert into public.bench_native (payload) "
                       "select jsonb_build_object('n', g, 'pad', %s::text) from generate_series(1, %s) g "
                       "returning id")
AQUAPEER_SEND_ONE = "select peer.send('bob', %s, jsonb_build_object('n', 0, 'pad', %s::text))"
NATIVE_INSERT_ONE = ("insert into public.bench_native (payload) "
                     "values (jsonb_build_object('n', 0, 'pad', %s::text)) returning id")
AQUAPEER_ARRIVED = "select exists (select from peer.inbox where id = %s)"
NATIVE_ARRIVED = "select exists (select from public.bench_native where id = %s)"


def pad_text():
    """A string making jsonb_build_object('n', <2 digits>, 'pad', it)::text PAYLOAD_BYTES long."""
    # jsonb prints objects like json.dumps does: '{"n": 50, "pad": "…"}'.
    return "x" * (PAYLOAD_BYTES - len(json.dumps({"n": 50, "pad": ""})))


# --- logs ----------------------------------------------------------------------

def log_tail(cluster, lines=30):
    return "\n".join(cluster.log().splitlines()[-lines:])


# --- shared measuring machinery ---------------------------------------------------------

class Listener(threading.Thread):
    """LISTEN on one channel of a cluster in a thread; notes when each payload first arrives."""

    def __init__(self, cluster, channel):
        super().__init__(daemon=True)
        self.conn = cluster.connect()
        self.conn.execute(f"listen {channel}")
        self.received = {}  # payload -> time.perf_counter() when the notification was read
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stopping.is_set():
                for n in self.conn.notifies(timeout=0.2):
                    now = time.perf_counter()
                    self.received.setdefault(n.payload, now)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def stop(self):
        self.stopping.set()
        self.join(5)
        self.conn.close()
        if self.error is not None:
            raise RuntimeError(f"the LISTEN thread failed: {self.error!r}")


def measure_latency(sender, listener, send_one, params, samples, warmup, rate, wait_s):
    """Send one message (row) at a time, `rate` a second; commit-returned → notification received.

    send_one(params) runs in `sender` (not autocommit) and returns the key the
    notification will carry; the clock starts when COMMIT returns.  Returns
    (latencies in s of the measured samples, how many never arrived).
    """
    sent = []  # (key, commit returned at)
    interval = 1.0 / rate
    started = time.perf_counter()
    for i in range(warmup + samples):
        pause = started + i * interval - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        key = str(sender.execute(send_one, params).fetchone()[0])
        sender.commit()
        sent.append((key, time.perf_counter()))
    measured = sent[warmup:]
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline and any(k not in listener.received for k, _ in measured):
        time.sleep(0.02)
    latencies = [listener.received[k] - t for k, t in measured if k in listener.received]
    return latencies, len(measured) - len(latencies)


def pump(sender, receiver, send_batch, params, arrived_sql, seconds, window, drain_timeout):
    """Send BATCH messages (rows) per transaction for `seconds`, at most `window` in flight.

    send_batch returns the ids of the batch, the last one last in the stream;
    arrived_sql (on the receiver) tells whether an id has arrived.  Returns
    the counts and times (perf_counter) of the run; `drained` is when the last
    id was seen on the receiver (None if not within drain_timeout).
    """
    arrived = lambda key: receiver.execute(arrived_sql, (key,)).fetchone()[0]  # noqa: E731
    in_flight = collections.deque()  # (last id of a batch, batch size)
    flying = 0
    count = 0
    blocked_s = 0.0
    last = None
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        while in_flight and flying + BATCH > window:
            if arrived(in_flight[0][0]):
                flying -= in_flight.popleft()[1]
            else:
                wait_from = time.perf_counter()
                time.sleep(0.005)
                blocked_s += time.perf_counter() - wait_from
                if wait_from > deadline:
                    break
        if time.perf_counter() >= deadline:
            break
        ids = [row[0] for row in sender.execute(send_batch, params).fetchall()]
        sender.commit()
        count += len(ids)
        last = ids[-1]
        in_flight.append((last, len(ids)))
        flying += len(ids)
    sent_until = time.perf_counter()
    drained = None
    give_up = sent_until + drain_timeout
    while last is not None and time.perf_counter() < give_up:
        if arrived(last):
            drained = time.perf_counter()
            break
        time.sleep(0.01)
    return {"count": count, "last": last, "started": started, "sent_until": sent_until, "drained": drained,
            "blocked_s": blocked_s}


def concurrent(cluster, receiver, sessions, send_one, params, arrived_sql, seconds, synchronous_commit,
               drain_timeout):
    """`sessions` sessions, each one message (row) per transaction for `seconds`, all at once.

    send_one(params) returns the id of the message (row); arrived_sql (on the
    receiver) tells whether an id has arrived.  A session's transactions each
    begin after its previous one committed, so its last id arriving means all
    of its ids did.  Returns the count, the times (perf_counter) of the run and
    the latencies in s of each COMMIT and each whole transaction.
    """
    conns = [sender_session(cluster, synchronous_commit) for _ in range(sessions)]
    results = [None] * sessions
    barrier = threading.Barrier(sessions + 1)

    def run(i):
        conn, commits, xacts, last = conns[i], [], [], None
        try:
            barrier.wait()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                last = conn.execute(send_one, params).fetchone()[0]
                committing = time.perf_counter()
                conn.commit()
                done = time.perf_counter()
                commits.append(done - committing)
                xacts.append(done - began)
            results[i] = (commits, xacts, last)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(sessions)]
    try:
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join(seconds + 60)
        sent_until = time.perf_counter()
    finally:
        for conn in conns:
            conn.close()
    failed = [r for r in results if not isinstance(r, tuple)]
    if failed:
        raise RuntimeError(f"a sending session failed: {failed[0]!r}")
    lasts = [last for _c, _x, last in results if last is not None]
    drained = None
    give_up = sent_until + drain_timeout
    while lasts and time.perf_counter() < give_up:
        lasts = [key for key in lasts if not receiver.execute(arrived_sql, (key,)).fetchone()[0]]
        if not lasts:
            drained = time.perf_counter()
            break
        time.sleep(0.01)
    return {"sessions": sessions, "count": sum(len(c) for c, _x, _l in results), "started": started,
            "sent_until": sent_until, "drained": drained,
            "commit": [v for c, _x, _l in results for v in c], "xact": [v for _c, x, _l in results for v in x]}


def concurrent_parts(cluster, receiver, args, send_one, params, arrived_sql, figures):
    """The concurrent part with 1 sending session, then with --senders."""
    figures["concurrent"] = {}
    for sessions in sorted({1, args.senders}):
        figures["concurrent"][sessions] = concurrent(cluster, receiver, sessions, send_one, params, arrived_sql,
                                                     args.seconds, args.sender_synchronous_commit,
                                                     args.drain_timeout)


def sender_session(cluster, synchronous_commit):
    conn = cluster.connect(autocommit=False)
    conn.execute("select set_config('synchronous_commit', %s, false)", (synchronous_commit,))
    conn.commit()
    return conn


# --- native logical replication ------------------------------------------------------------

def setup_native(alice, bob):
    alice.sql("create table public.bench_native (id bigint generated always as identity primary key, "
              "payload jsonb not null); "
              "create publication bench_pub for table public.bench_native")
    bob.sql("create table public.bench_native (id bigint primary key, payload jsonb not null)")
    bob.sql(f"create subscription bench_sub connection '{alice.tcp_dsn}' publication bench_pub "
            "with (copy_data = false)")
    tb.wait_for(lambda: bob.scalar("select count(*) from pg_stat_subscription "
                                   "where subname = 'bench_sub' and pid is not null") > 0,
                30, message="the apply worker of bench_sub to start")
    key = alice.scalar("insert into public.bench_native (payload) values ('{}') returning id")
    tb.wait_for(lambda: bob.scalar(NATIVE_ARRIVED, key), 30, message="a first row to replicate to bob")


def teardown_native(bob):
    bob.sql("drop subscription if exists bench_sub")  # drops its slot on alice too


def bench_native(alice, bob, args, pad, figures):
    """Fills `figures` as it goes, so a failure keeps what was measured."""
    setup_native(alice, bob)
    try:
        # Latency, with a trigger on bob that NOTIFYs each replicated row (only for this part).
        bob.sql(f"""
            create function public.bench_native_notify() returns trigger language plpgsql as $$
            begin perform pg_notify('{NATIVE_CHANNEL}', new.id::text); return null; end $$;
            create trigger bench_native_notify after insert on public.bench_native
                for each row execute function public.bench_native_notify();
            alter table public.bench_native enable always trigger bench_native_notify""")
        listener = Listener(bob, NATIVE_CHANNEL)
        listener.start()
        try:
            with sender_session(alice, args.sender_synchronous_commit) as sender:
                latencies, lost = measure_latency(sender, listener, NATIVE_INSERT_ONE, (pad,),
                                                  args.latency_samples, 10, args.rate, 10.0)
        finally:
            listener.stop()
        bob.sql("drop trigger bench_native_notify on public.bench_native")
        figures["latency"] = latencies
        figures["latency_lost"] = lost

        # Concurrent senders, one row per transaction.
        with bob.connect() as receiver:
            concurrent_parts(alice, receiver, args, NATIVE_INSERT_ONE, (pad,), NATIVE_ARRIVED, figures)

        # Throughput.
        base = bob.scalar("select count(*) from public.bench_native")
        with sender_session(alice, args.sender_synchronous_commit) as sender, bob.connect() as receiver:
            run = pump(sender, receiver, NATIVE_INSERT_BATCH, (pad, BATCH), NATIVE_ARRIVED,
                       args.seconds, args.window, args.drain_timeout)
        run["arrived_count"] = bob.scalar("select count(*) from public.bench_native") - base
        figures["throughput"] = run
    finally:
        teardown_native(bob)


# --- aquapeer ---------------------------------------------------------------------------

def setup_aquapeer(alice, bob, signal_url):
    tb.join_signaling(alice, signal_url)
    tb.join_signaling(bob, signal_url)
    tb.befriend(alice, "alice", bob, "bob")
    bob.sql("select peer.allow_topic(%s, 'alice')", TOPIC)
    state = alice.scalar("select peer.connect('bob', '30 s')")
    if state != "connected":
        raise RuntimeError(f"peer.connect('bob') returned {state!r}")
    tb.wait_for(lambda: bob.scalar("select count(*) from peer.connections "
                                   "where friend = 'alice' and state = 'connected'"), 15,
                message="bob to see alice connected")
    # A first message end to end, with a generous timeout: it shows delivery works at all.
    key = alice.scalar("select peer.send('bob', %s, '{\"hello\": 1}')", TOPIC)
    try:
        tb.wait_for(lambda: bob.scalar(AQUAPEER_ARRIVED, key), 30, message="a first message to reach bob's inbox")
        tb.wait_for(lambda: alice.scalar("select state from peer.outbox where id = %s", key) == "acked", 30,
                    message="alice to see the first message acked")
    except TimeoutError as e:
        state = alice.sql("select state, reason from peer.outbox where id = %s", key)
        raise RuntimeError(f"{e}; on alice: {state}") from e


class Workers:
    """The two aquapeer workers, seen from /proc and peer.worker_status()."""

    def __init__(self, clusters):
        self.clusters = clusters  # {"alice": cluster, "bob": cluster}
        self.first = {who: worker_pid(c) for who, c in clusters.items()}

    def snapshot(self):
        out = {}
        for who, cluster in self.clusters.items():
            pid = worker_pid(cluster)
            status = proc_status(pid, ("VmRSS", "VmHWM", "RssAnon", "RssShmem"))
            status.update(pid=pid, cpu_s=cpu_seconds(pid),
                          loop_lag_max_ms=cluster.scalar("select loop_lag_max_ms from peer.worker_status()"))
            out[who] = status
        return out

    def restarted(self):
        return {who: worker_pid(c) != self.first[who] for who, c in self.clusters.items()}


def aquapeer_latency(alice, bob, args, pad, figures):
    listener = Listener(bob, "aquapeer_inbox")
    listener.start()
    try:
        with sender_session(alice, args.sender_synchronous_commit) as sender:
            latencies, lost = measure_latency(sender, listener, AQUAPEER_SEND_ONE, (TOPIC, pad),
                                              args.latency_samples, 10, args.rate, 10.0)
    finally:
        listener.stop()
    figures["latency"] = latencies
    figures["latency_lost"] = lost


def aquapeer_calls(alice, bob, args, figures):
    """peer.call of an exposed echo function, and the same function over libpq for reference."""
    bob.sql("create function public.bench_echo(a jsonb) returns jsonb language sql as 'select a'")
    fn = bob.scalar("select peer.expose('public.bench_echo(jsonb)', 'alice')")
    arg = json.dumps({"x": 1})
    calls, direct = [], []
    with alice.connect() as a:
        for i in range(args.call_warmup + args.call_samples):
            started = time.perf_counter()
            result = a.execute("select peer.call('bob', %s, %s::jsonb)", (fn, arg)).fetchone()[0]
            took = time.perf_counter() - started
            if result != {"x": 1}:
                raise RuntimeError(f"peer.call('bob', {fn!r}, {arg!r}) returned {result!r}")
            if i >= args.call_warmup:
                calls.append(took)
    with psycopg.connect(bob.tcp_dsn, autocommit=True) as b:
        for i in range(args.call_warmup + args.call_samples):
            started = time.perf_counter()
            b.execute("select public.bench_echo(%s::jsonb)", (arg,)).fetchone()
            if i >= args.call_warmup:
                direct.append(time.perf_counter() - started)
    figures["call"] = calls
    figures["call_native"] = direct


def aquapeer_concurrent(alice, bob, args, pad, figures):
    with bob.connect() as receiver:
        concurrent_parts(alice, receiver, args, AQUAPEER_SEND_ONE, (TOPIC, pad), AQUAPEER_ARRIVED, figures)


def aquapeer_throughput(alice, bob, args, pad, figures, workers):
    base = bob.scalar("select coalesce(max(position), 0) from peer.inbox")
    before = workers.snapshot()
    with sender_session(alice, args.sender_synchronous_commit) as sender, bob.connect() as receiver:
        run = pump(sender, receiver, AQUAPEER_SEND_BATCH, (TOPIC, pad, BATCH), AQUAPEER_ARRIVED,
                   args.seconds, args.window, args.drain_timeout)
    acked = None
    if run["last"] is not None:
        give_up = time.perf_counter() + args.drain_timeout
        with alice.connect() as a:
            while time.perf_counter() < give_up:
                state = a.execute("select state from peer.outbox where id = %s", (run["last"],)).fetchone()[0]
                if state == "acked":
                    acked = time.perf_counter()
                    break
                if state in ("rejected", "expired"):
                    reason = alice.sql("select state, reason from peer.outbox where id = %s", run["last"])
                    raise RuntimeError(f"a message of the throughput part was {state}: {reason}")
                time.sleep(0.01)
    run["acked"] = acked
    after = workers.snapshot()
    run["arrived_count"] = bob.scalar("select count(*) from peer.inbox where topic = %s and position > %s",
                                      TOPIC, base)
    run["outbox_states"] = dict(alice.sql("select state, count(*) from peer.outbox where topic = %s group by 1",
                                          TOPIC))
    end = acked or run["drained"] or run["sent_until"]
    run["worker_cpu_pct"] = {
        who: None if after[who]["pid"] != before[who]["pid"] else
        (after[who]["cpu_s"] - before[who]["cpu_s"]) / (end - run["started"]) * 100.0
        for who in after}
    figures["throughput"] = run
    return after


def bench_aquapeer(alice, bob, signal_url, args, pad, figures, errors):
    """Each part on its own: one that fails is reported and the next one still runs.

    Fills `figures` as it goes, so a failure keeps what was measured."""
    setup_aquapeer(alice, bob, signal_url)
    workers = Workers({"alice": alice, "bob": bob})
    figures["workers"] = {}
    parts = (("latency", lambda: aquapeer_latency(alice, bob, args, pad, figures)),
             ("calls", lambda: aquapeer_calls(alice, bob, args, figures)),
             ("concurrent", lambda: aquapeer_concurrent(alice, bob, args, pad, figures)),
             ("throughput", lambda: aquapeer_throughput(alice, bob, args, pad, figures, workers)))
    for name, run in parts:
        try:
            after = run()
        except Exception as e:  # noqa: BLE001 - reported with the other figures
            errors[f"aquapeer {name}"] = f"{e!r}"
            console.print(traceback.format_exc())
            after = None
        try:
            figures["workers"][f"after {name}"] = after or workers.snapshot()
        except Exception as e:  # noqa: BLE001
            errors[f"aquapeer workers after {name}"] = f"{e!r}"
    figures["restarted"] = workers.restarted()


# --- output ------------------------------------------------------------------------

def fmt(v, digits=1):
    return "" if v is None else f"{v:,.{digits}f}"


def verdict(ok):
    return "" if ok is None else ("[green]met[/]" if ok else "[red]missed[/]")


def ratio(ours, theirs):
    return None if ours is None or not theirs else ours / theirs


def rates(run, end_key):
    """Messages (rows) per second from the first send to run[end_key], or None."""
    if run is None or run.get(end_key) is None or not run["count"]:
        return None
    return run["count"] / (run[end_key] - run["started"])


def concurrent_figures(native, ours):
    """One row per number of sessions of the concurrent part: rates and latencies of both."""
    rows = []
    for sessions in sorted(set(native) | set(ours)):
        row = {"sessions": sessions}
        for label, runs in (("aquapeer", ours), ("native", native)):
            run = runs.get(sessions)
            row[f"{label}_sent"] = run and run["count"]
            row[f"{label}_per_s"] = rates(run, "drained")
            row[f"{label}_commit_ms"] = percentiles(run["commit"]) if run and run["commit"] else None
            row[f"{label}_xact_ms"] = percentiles(run["xact"]) if run and run["xact"] else None
        rows.append(row)
    return rows


def report(args, result, errors):
    summary = {"seconds": args.seconds, "window": args.window, "payload_bytes": result.get("payload_bytes"),
               "fsync": args.fsync, "senders": args.senders,
               "batch": BATCH, "rate_per_s": args.rate,
               "sender_synchronous_commit": args.sender_synchronous_commit}
    native = result.get("native", {})
    ours = result.get("aquapeer", {})

    nt, ot = native.get("throughput"), ours.get("throughput")
    native_rate = rates(nt, "drained")
    acked_rate = rates(ot, "acked")
    arrived_rate = rates(ot, "drained")
    nl = percentiles(native["latency"]) if native.get("latency") else (None, None)
    ol = percentiles(ours["latency"]) if ours.get("latency") else (None, None)
    oc = percentiles(ours["call"]) if ours.get("call") else (None, None)
    nc = percentiles(ours["call_native"]) if ours.get("call_native") else (None, None)

    table = Table(title=f"aquapeer messages and calls vs PostgreSQL logical replication, alice → bob on loopback "
                        f"({result.get('payload_bytes', PAYLOAD_BYTES)} B payloads)")
    for column in ("what", "aquapeer", "value", "native reference", "value", "aquapeer/native", "target", ""):
        table.add_column(column)
    incomplete = lambda run, v: "[red]incomplete[/]" if run and v is None else fmt(v, 0)  # noqa: E731
    table.add_row(f"throughput ({BATCH} per xact, {args.seconds:g} s)", "peer.send → acked on alice, msg/s",
                  incomplete(ot, acked_rate), "INSERT → row on bob (subscription), rows/s",
                  incomplete(nt, native_rate),
                  fmt(ratio(acked_rate, native_rate), 2), f"≥ {THROUGHPUT_TARGET:,.0f}/s",
                  verdict(None if acked_rate is None and not ot else (acked_rate or 0) >= THROUGHPUT_TARGET))
    table.add_row("", "peer.send → in bob's peer.inbox, msg/s", incomplete(ot, arrived_rate), "", "",
                  fmt(ratio(arrived_rate, native_rate), 2), "", "")
    n_lat = len(ours.get("latency") or native.get("latency") or [])
    table.add_row(f"latency p50 ({args.rate:g}/s, {n_lat} samples), ms", "COMMIT → NOTIFY aquapeer_inbox on bob",
                  fmt(ol[0], 2), "COMMIT → trigger NOTIFY on bob", fmt(nl[0], 2), fmt(ratio(ol[0], nl[0]), 2),
                  f"< {LATENCY_P50_TARGET_MS:g} ms", verdict(None if ol[0] is None else ol[0] < LATENCY_P50_TARGET_MS))
    table.add_row("latency p99, ms", "", fmt(ol[1], 2), "", fmt(nl[1], 2), fmt(ratio(ol[1], nl[1]), 2),
                  f"< {LATENCY_P99_TARGET_MS:g} ms", verdict(None if ol[1] is None else ol[1] < LATENCY_P99_TARGET_MS))
    table.add_row(f"call p50 ({len(ours.get('call') or [])} calls), ms", "peer.call('bob', echo) on alice",
                  fmt(oc[0], 2), "select echo() on bob over libpq TCP", fmt(nc[0], 3), fmt(ratio(oc[0], nc[0]), 1),
                  f"< {CALL_P50_TARGET_MS:g} ms", verdict(None if oc[0] is None else oc[0] < CALL_P50_TARGET_MS))
    table.add_row("call p99, ms", "", fmt(oc[1], 2), "", fmt(nc[1], 3), fmt(ratio(oc[1], nc[1]), 1), "", "")
    console.print(table)

    concurrent_rows = concurrent_figures(native.get("concurrent") or {}, ours.get("concurrent") or {})
    if concurrent_rows:
        table = Table(title=f"concurrent senders, one {result.get('payload_bytes', PAYLOAD_BYTES)} B message (row) "
                            f"per transaction, {args.seconds:g} s each")
        for column in ("sessions", "aquapeer msg/s in bob's inbox", "native rows/s on bob", "aquapeer/native",
                       "aquapeer COMMIT p50 / p99 ms", "native COMMIT p50 / p99 ms",
                       "aquapeer xact p50 / p99 ms", "native xact p50 / p99 ms"):
            table.add_column(column)
        table.caption = ("xact: peer.send (INSERT) and COMMIT, as the session saw it; the rate counts from the first "
                         "send until every session's last message (row) arrived")
        pair = lambda v: "" if v is None else f"{fmt(v[0], 2)} / {fmt(v[1], 2)}"  # noqa: E731
        for row in concurrent_rows:
            table.add_row(str(row["sessions"]),
                          "[red]incomplete[/]" if row["aquapeer_sent"] and row["aquapeer_per_s"] is None
                          else fmt(row["aquapeer_per_s"], 0),
                          "[red]incomplete[/]" if row["native_sent"] and row["native_per_s"] is None
                          else fmt(row["native_per_s"], 0),
                          fmt(ratio(row["aquapeer_per_s"], row["native_per_s"]), 2),
                          pair(row["aquapeer_commit_ms"]), pair(row["native_commit_ms"]),
                          pair(row["aquapeer_xact_ms"]), pair(row["native_xact_ms"]))
        console.print(table)

    for label, run, end_key in (("aquapeer", ot, "acked"), ("native", nt, "drained")):
        if not run:
            continue
        sent_rate = run["count"] / (run["sent_until"] - run["started"])
        end = run.get(end_key)
        drain = "" if end is None else f", drained {end - run['sent_until']:.2f} s after the last send"
        incomplete = "" if end is not None else f" [red](not all {end_key} within {args.drain_timeout:g} s)[/]"
        console.print(f"{label} throughput: {run['count']:,} sent at {sent_rate:,.0f}/s "
                      f"(sender blocked by the {args.window:,} window for {run['blocked_s']:.1f} s){drain}; "
                      f"{run['arrived_count']:,} arrived{incomplete}")
        if run["blocked_s"] < 0.05 * args.seconds:
            console.print(f"  (the sender was hardly ever blocked: the {label} figure is the one sending session's "
                          "limit rather than delivery's)")
    if ot:
        console.print(f"aquapeer outbox, all messages of topic {TOPIC!r} by state: {ot['outbox_states']}")
    for label, part in (("aquapeer", ours), ("native", native)):
        if part.get("latency_lost"):
            console.print(f"[red]{label} latency: {part['latency_lost']} of {args.latency_samples} "
                          f"notifications never arrived[/]")

    if ours.get("workers"):
        table = Table(title="the two aquapeer workers")
        for column in ("worker", "when", "VmRSS MB", "VmHWM MB", "RssAnon MB", "RssShmem MB", "loop lag ms",
                       "CPU % of a core"):
            table.add_column(column)
        table.caption = ("VmRSS counts the shared buffers the worker touched (RssShmem); RssAnon is its own memory. "
                         "Loop lag: peer.worker_status().loop_lag_max_ms, the worst second of the last minute. "
                         "CPU: during the throughput part, until the last message was acked")
        for who in ("alice", "bob"):
            for when, snap in ours["workers"].items():
                cpu = ot["worker_cpu_pct"][who] if ot and when == "after throughput" else None
                s = snap[who]
                table.add_row(f"{who} (pid {s['pid']})", when, fmt(s["VmRSS"]), fmt(s["VmHWM"]),
                              fmt(s["RssAnon"]), fmt(s["RssShmem"]), fmt(s["loop_lag_max_ms"]), fmt(cpu))
        console.print(table)
        last = list(ours["workers"].values())[-1]
        worst = max(last[who]["loop_lag_max_ms"] or 0.0 for who in last)
        console.print(f"loop lag at the end, worse worker: {worst:.1f} ms (target < {LOOP_LAG_TARGET_MS:g} ms, "
                      f"as in bench_worker.py): {verdict(worst < LOOP_LAG_TARGET_MS)}")
        if any(ours.get("restarted", {}).values()):
            console.print(f"[red]a worker restarted during the run: {ours['restarted']}[/]")

    for part, message in errors.items():
        console.print(f"[bold red]failed: {part}:[/] {message}")

    r = lambda v, d=2: None if v is None else round(v, d)  # noqa: E731
    summary.update({
        "aquapeer_acked_per_s": r(acked_rate, 0), "aquapeer_arrived_per_s": r(arrived_rate, 0),
        "native_rows_per_s": r(native_rate, 0), "throughput_ratio": r(ratio(acked_rate, native_rate), 3),
        "aquapeer_sent": ot and ot["count"], "aquapeer_arrived": ot and ot["arrived_count"],
        "aquapeer_outbox_states": ot and ot["outbox_states"],
        "native_sent": nt and nt["count"], "native_arrived": nt and nt["arrived_count"],
        "aquapeer_latency_p50_ms": r(ol[0]), "aquapeer_latency_p99_ms": r(ol[1]),
        "aquapeer_latency_samples": len(ours.get("latency") or []), "aquapeer_latency_lost": ours.get("latency_lost"),
        "native_latency_p50_ms": r(nl[0]), "native_latency_p99_ms": r(nl[1]),
        "native_latency_samples": len(native.get("latency") or []), "native_latency_lost": native.get("latency_lost"),
        "call_p50_ms": r(oc[0], 3), "call_p99_ms": r(oc[1], 3), "call_samples": len(ours.get("call") or []),
        "libpq_echo_p50_ms": r(nc[0], 3), "libpq_echo_p99_ms": r(nc[1], 3),
        "targets": {"throughput": None if acked_rate is None else acked_rate >= THROUGHPUT_TARGET,
                    "latency_p50": None if ol[0] is None else ol[0] < LATENCY_P50_TARGET_MS,
                    "latency_p99": None if ol[1] is None else ol[1] < LATENCY_P99_TARGET_MS,
                    "call_p50": None if oc[0] is None else oc[0] < CALL_P50_TARGET_MS,
                    "loop_lag": None if not ours.get("workers") else all(
                        (s["loop_lag_max_ms"] or 0.0) < LOOP_LAG_TARGET_MS
                        for s in list(ours["workers"].values())[-1].values())},
        "concurrent": [{k: (r(v) if isinstance(v, float) else [r(x) for x in v] if isinstance(v, tuple) else v)
                        for k, v in row.items()} for row in concurrent_rows] or None,
        "errors": errors or None,
    })
    if ours.get("workers"):
        summary["workers"] = {
            who: {**{when.replace(" ", "_"): {"pid": snap[who]["pid"], "rss_mb": r(snap[who]["VmRSS"], 1),
                                              "hwm_mb": r(snap[who]["VmHWM"], 1),
                                              "anon_mb": r(snap[who]["RssAnon"], 1),
                                              "shmem_mb": r(snap[who]["RssShmem"], 1),
                                              "loop_lag_max_ms": snap[who]["loop_lag_max_ms"]}
                     for when, snap in ours["workers"].items()},
                  "throughput_cpu_pct": r(ot["worker_cpu_pct"][who], 1) if ot else None}
            for who in ("alice", "bob")}
        summary["worker_restarted"] = ours.get("restarted")
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long each throughput part sends (default: 30)")
    parser.add_argument("--latency-samples", type=int, default=300,
                        help="messages (rows) per latency figure, after 10 unmeasured ones (default: 300)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="messages (rows) per second in the latency parts (default: 20)")
    parser.add_argument("--senders", type=int, default=8,
                        help="sending sessions of the concurrent part, after one (default: 8)")
    parser.add_argument("--call-samples", type=int, default=300, help="peer.call round trips (default: 300)")
    parser.add_argument("--call-warmup", type=int, default=30, help="unmeasured calls first (default: 30)")
    parser.add_argument("--window", type=int, default=20000,
                        help="most messages (rows) a throughput sender keeps in flight (default: 20000)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="how long to wait for the backlog after a throughput part (default: 60)")
    parser.add_argument("--sender-synchronous-commit", default="on", choices=("on", "off", "local"),
                        help="synchronous_commit of the sending sessions (default: on; see above)")
    parser.add_argument("--fsync", action="store_true",
                        help="run both clusters with fsync = on (the test bed turns it off), so that a COMMIT "
                             "waits for its WAL flush")
    parser.add_argument("--only", choices=PARTS, default=None, help="run one part only")
    parser.add_argument("--json", action="store_true", help="print the figures as one line of JSON too")
    args = parser.parse_args()
    if args.window < BATCH:
        parser.error(f"--window must be at least {BATCH}")
    if args.senders < 1:
        parser.error("--senders must be at least 1")
    parts = [args.only] if args.only else list(PARTS)
    sys.setswitchinterval(0.0005)  # the LISTEN thread must not wait long for the GIL

    result, errors = {}, {}
    pad = pad_text()
    with tempfile.TemporaryDirectory(prefix="aqp-bench-") as workdir, \
            tb.Testbed(2, names=["alice", "bob"], extra_conf={"wal_level": "logical", "fsync": args.fsync}) as bed:
        alice, bob = bed.alice, bed.bob
        result["payload_bytes"] = alice.scalar(
            "select octet_length(jsonb_build_object('n', 50, 'pad', %s::text)::text)", pad)
        if "native" in parts:
            try:
                bench_native(alice, bob, args, pad, result.setdefault("native", {}))
            except Exception as e:  # noqa: BLE001 - reported with the other figures
                errors["native"] = f"{e!r}"
                console.print(traceback.format_exc())
                for c in (alice, bob):
                    console.print(f"[bold]{c.name}'s server log (tail):[/]\n{log_tail(c)}")
        if "aquapeer" in parts:
            signal_server = tb.SignalServer(log_path=os.path.join(workdir, "signal.log"))
            try:
                signal_server.start()
                bench_aquapeer(alice, bob, signal_server.url, args, pad, result.setdefault("aquapeer", {}), errors)
            except Exception as e:  # noqa: BLE001
                errors["aquapeer"] = f"{e!r}"
                console.print(traceback.format_exc())
                for c in (alice, bob):
                    console.print(f"[bold]{c.name}'s server log (tail):[/]\n{log_tail(c)}")
                with open(signal_server.log_path, errors="replace") if os.path.exists(signal_server.log_path) \
                        else open(os.devnull) as f:
                    console.print(f"[bold]signaling server log (tail):[/]\n{''.join(f.readlines()[-20:])}")
            finally:
                signal_server.stop()

    summary = report(args, result, errors)
    if args.json:
        print(json.dumps(summary, default=str), flush=True)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
