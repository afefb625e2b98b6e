"""Benchmark the worker, the control channel and executors against PostgreSQL's own paths.

Run with `make bench` (or `.venv/bin/python bench/bench_worker.py`).  One
throwaway cluster; every aquapeer figure stands beside the native reference
measured in the same run:

- control round trip: `select peer.ping_worker()` against `select 1`;
- executor round trip: `peer.run_in_executor` of a trivial function against
  calling the function directly;
- loop lag of the worker while two sessions hammer it;
- `pg_ctl stop -m fast` with the worker running against the same server
  without the extension;
- whether the idle worker holds a snapshot or a transaction id.
"""

import argparse
import os
import sys
import threading
import time

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402
from measure import percentiles  # noqa: E402

console = Console(width=120)


def timed(conn, query, n):
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        conn.execute(query).fetchall()
        samples.append(time.perf_counter() - started)
    return samples


def hammer(cluster, query, seconds):
    """Run query in a loop on its own connection for `seconds`; return the count."""
    count = 0
    with cluster.connect() as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.execute(query).fetchall()
            count += 1
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="round trips per latency figure")
    parser.add_argument("--load-seconds", type=float, default=10.0)
    args = parser.parse_args()

    rows = []
    with tb.Testbed(1, names=["bench"]) as bed:
        cluster = bed[0]
        cluster.sql("create extension aquapeer cascade")
        tb.wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null"), 20, ignore=(Exception,))
        cluster.sql("create role bench_exec login")
        cluster.sql("create function public.bench_echo(a jsonb) returns jsonb language sql as 'select a'")

        with cluster.connect() as conn:
            native = timed(conn, "select 1", args.n)
            ping = timed(conn, "select peer.ping_worker()", args.n)
            direct = timed(conn, "select public.bench_echo('{}')", args.n)
            conn.execute("select peer.run_in_executor('bench_exec', 'public.bench_echo(jsonb)', '{}')")
            executor = timed(conn, "select peer.run_in_executor('bench_exec', 'public.bench_echo(jsonb)', '{}')",
                             args.n)
            inner = [float(conn.execute("select extract(epoch from peer.ping_worker())").fetchone()[0])
                     for _ in range(args.n)]
        rows += [
            ("control round trip (client view)", "select peer.ping_worker()", *percentiles(ping),
             "select 1", *percentiles(native)),
            ("control round trip (socket only)", "peer.ping_worker() result", *percentiles(inner),
             "", None, None),
            ("executor round trip", "peer.run_in_executor(echo)", *percentiles(executor),
             "select echo() directly", *percentiles(direct)),
        ]

        # Loop lag under load: a fresh minute window, then two sessions hammer the worker.
        cluster.sql("select peer.stop_worker()")
        cluster.sql("select peer.start_worker()")
        counts = []
        threads = [threading.Thread(target=lambda q=q: counts.append(hammer(cluster, q, args.load_seconds)))
                   for q in ("select peer.ping_worker()",
                             "select peer.run_in_executor('bench_exec', 'public.bench_echo(jsonb)', '{}')")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lag = cluster.scalar("select loop_lag_max_ms from peer.worker_status()")

        # The idle worker: snapshot and transaction id, sampled.
        samples = [cluster.sql("select backend_xmin is null and backend_xid is null from pg_stat_activity "
                               "where backend_type = 'aquapeer worker'")[0][0] for _ in range(50)]

        stop_with = []
        for _ in range(3):
            cluster.start()
            tb.wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null"), 20, ignore=(Exception,))
            stop_with.append(cluster.stop())
        cluster.configure(shared_preload_libraries=None)
        stop_without = []
        for _ in range(3):
            cluster.start()
            stop_without.append(cluster.stop())

    table = Table(title="aquapeer worker and control channel (ms; p50 / p99)")
    for column in ("what", "aquapeer", "p50", "p99", "native reference", "p50", "p99"):
        table.add_column(column)
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for what, ours, p50, p99, ref, r50, r99 in rows:
        table.add_row(what, ours, fmt(p50), fmt(p99), ref, fmt(r50), fmt(r99))
    console.print(table)
    console.print(f"loop lag, worst second while 2 sessions hammered it for {args.load_seconds:.0f} s "
                  f"({sum(counts)} requests): {lag:.1f} ms (target < 100 ms)")
    console.print(f"idle worker without snapshot or xid: {sum(samples)}/{len(samples)} samples")
    console.print(f"pg_ctl stop -m fast: with worker {max(stop_with):.3f} s (worst of 3), "
                  f"without aquapeer {max(stop_without):.3f} s (target < 2 s)")


if __name__ == "__main__":
    main()
