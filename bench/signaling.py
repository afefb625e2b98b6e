"""Benchmark signaling: one server alone, and 1, 2 and 4 instances sharing Redis.

Run with `make bench` (or `.venv/bin/python bench/signaling.py`; `--instances 1,2` for some
configurations only).  The real `aquapeer signal` (the installed CLI), a real redis-server
(tests/testbed.py's RedisServer: loopback, no persistence) and --peers light peers on
loopback, in two processes: half are echo peers (`aquapeer lightpeers --echo`, a
subprocess), half are senders in this process, each sender talking to one echo peer
registered at another instance (with several instances).  For each configuration:

- registrations a second: the echo peers, then the senders, register (100 at a time per
  process); all of them over the time both took.  The instances run with --accept-rate and
  --total-rate raised out of the way, so what is measured is what they can do, not their
  default limits (500 new connections and 5,000 envelopes a second per instance);
- memory per registered peer: the instances' VmRSS summed, and Redis's used_memory, before
  and after;
- envelope round trips: every sender sends a 1 KB envelope to its echo peer and waits for it
  to come back, for --seconds, twice: at a steady --steady-rate round trips a second in all
  (latency where nothing queues), and at saturation, each sender starting at most --pace a
  second (under the per-peer limit of 20 envelopes a second), far more than the machine
  does; round trips completed a second and their latency, the CPU of the instances, of Redis
  (utime + stime from /proc/<pid>/stat) and of both load processes, and how busy the whole
  machine was;

and, as the native reference in the same run, Redis's own pub/sub: redis-benchmark's PUBLISH
rate (the C client, 50 connections, the same 1 KB payload) and a raw PUBLISH/SUBSCRIBE round
trip through redis.asyncio (one process publishes to a channel another connection subscribes
to and publishes back, 200 at a time), the pattern the instances use for each forwarded
envelope.  Everything shares this machine's cores (say how many when quoting the figures).

The figures are printed as rich tables, then as one line of JSON.
"""

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import testbed as tb  # noqa: E402
from aquapeer.identity import Identity  # noqa: E402
from aquapeer.net import lightpeer  # noqa: E402
from aquapeer.net.signaling import SignalingError  # noqa: E402
from measure import percentiles, tail  # noqa: E402
from procinfo import cpu_seconds, machine_busy_seconds, proc_status  # noqa: E402

console = Console(width=160)

PAYLOAD = os.urandom(1024)
ROUND_TRIP_TIMEOUT_S = 5.0
NATIVE_CONCURRENCY = 200
UNLIMITED = 1000000  # --accept-rate and --total-rate: measure what the instances can do, not their limits


class CpuWindow:
    """CPU seconds of some processes and of the whole machine over a window."""

    def __init__(self, pids):
        self.pids = dict(pids)  # label -> pid, or a list of pids summed
        self.started = time.monotonic()
        self.before = {label: self._cpu(pid) for label, pid in self.pids.items()}
        self.busy_before = machine_busy_seconds()

    @staticmethod
    def _cpu(pid):
        return sum(cpu_seconds(p) for p in pid) if isinstance(pid, list) else cpu_seconds(pid)

    def percent(self):
        """{label: % of one core}, "machine": % of all cores (of os.cpu_count())."""
        wall = time.monotonic() - self.started
        out = {label: (self._cpu(pid) - self.before[label]) / wall * 100.0 for label, pid in self.pids.items()}
        out["machine"] = (machine_busy_seconds() - self.busy_before) / wall / os.cpu_count() * 100.0
        return out


def rss_mb(pids):
    return sum(proc_status(pid, ("VmRSS",))["VmRSS"] for pid in pids)


def redis_used_bytes(redis_server):
    info = redis_server.cli("info", "memory").decode()
    return int(re.search(r"^used_memory:(\d+)", info, re.M).group(1))


# --- aquapeer: one configuration ------------------------------------------------------------------

class EchoPeers:
    """`aquapeer lightpeers --echo` as a subprocess."""

    def __init__(self, count, urls, workdir, tag):
        self.ready_path = os.path.join(workdir, f"{tag}-echo.json")
        self.log_path = os.path.join(workdir, f"{tag}-echo.log")
        argv = [tb.AQUAPEER_CLI, "lightpeers", "--echo", "--count", str(count), "--invites-out", self.ready_path,
                "--log-level", "warning"]
        for url in urls:
            argv += ["--signal", url]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"aquapeer lightpeers --echo exited with {self.proc.returncode}:\n"
                               f"{tail(self.log_path)}")
        return os.path.exists(self.ready_path)

    def wait_ready(self, timeout):
        tb.wait_for(self._ready, timeout, interval=0.2, message="the echo peers to register")
        with open(self.ready_path) as f:
            return json.load(f)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Echoes:
    """What each sender waits for: its envelope back from its echo peer."""

    def __init__(self, count):
        self.waiting = [None] * count

    def handler(self, i):
        def on_envelope(sender, env):
            fut = self.waiting[i]
            if fut is not None and not fut.done():
                fut.set_result(None)
        return on_envelope


async def round_trips(senders, echo_ids, echoes, seconds, pace):
    """Each sender pings its echo peer, at most `pace` a second, for `seconds`;
    (round trip times in s, lost)."""
    loop = asyncio.get_running_loop()
    waiting = echoes.waiting
    rtts, lost = [], 0
    stop_at = loop.time() + seconds

    async def pinger(i):
        nonlocal lost
        client, target = senders[i], echo_ids[i]
        await asyncio.sleep(i / len(senders) / pace)  # spread the first sends over one period
        while loop.time() < stop_at:
            started = loop.time()
            waiting[i] = loop.create_future()
            try:
                await client.send(target, PAYLOAD)
                await asyncio.wait_for(waiting[i], ROUND_TRIP_TIMEOUT_S)
                rtts.append(loop.time() - started)
            except (TimeoutError, SignalingError):
                lost += 1
            await asyncio.sleep(max(0.0, 1.0 / pace - (loop.time() - started)))

    await asyncio.gather(*(pinger(i) for i in range(len(senders))))
    return rtts, lost


def bench_configuration(label, n_instances, redis_server, peers, seconds, loads, workdir):
    """loads: {name: round trips a second each sender starts at most}."""
    redis_url = redis_server.url if redis_server else None
    if redis_server:
        redis_server.cli("flushall")
    servers = [tb.SignalServer(log_path=os.path.join(workdir, f"{label}-signal{i}.log"), redis_url=redis_url,
                               extra_args=["--accept-rate", str(UNLIMITED), "--total-rate", str(UNLIMITED),
                                           "--max-connections", str(peers + 100), "--log-level", "warning"])
               for i in range(n_instances)]
    echo = None
    try:
        for server in servers:
            server.start()
        pids = [s.proc.pid for s in servers]
        urls = [s.url for s in servers]
        time.sleep(1.0)
        rss_before = rss_mb(pids)
        redis_before = redis_used_bytes(redis_server) if redis_server else None
        half = peers // 2
        started = time.monotonic()
        echo = EchoPeers(half, urls, workdir, label)
        ready = echo.wait_ready(180)
        sender_ids = [Identity.generate() for _ in range(half)]
        figures = {"instances": n_instances, "redis": bool(redis_server), "peers": 2 * half}

        async def run():
            loop_started = time.monotonic()
            # Sender i registers at the instance after its echo peer's.
            echoes = Echoes(half)
            senders = await lightpeer.register_signal_clients(sender_ids, urls[1:] + urls[:1], echoes.handler)
            figures["register_s"] = ready["register_s"] + (time.monotonic() - loop_started)
            figures["registrations_per_s"] = figures["peers"] / figures["register_s"]
            await asyncio.sleep(2.0)  # let the instances settle after the registrations
            figures["rss_before_mb"], figures["rss_after_mb"] = rss_before, rss_mb(pids)
            figures["kb_per_peer"] = (figures["rss_after_mb"] - rss_before) * 1024 / figures["peers"]
            if redis_server:
                figures["redis_bytes_per_peer"] = (redis_used_bytes(redis_server) - redis_before) / figures["peers"]
            cpu_pids = {"instances": pids, "echo peers": echo.proc.pid, "senders": os.getpid()}
            if redis_server:
                cpu_pids["redis"] = redis_server.pid
            for load, pace in loads.items():
                await round_trips(senders, ready["peer_ids"], echoes, 2.0, pace)  # warm up
                window = CpuWindow(cpu_pids)
                rtts, lost = await round_trips(senders, ready["peer_ids"], echoes, seconds, pace)
                p50, p99 = percentiles(rtts)
                figures[load] = {"round_trips_per_s": len(rtts) / seconds, "rtt_p50_ms": p50, "rtt_p99_ms": p99,
                                 "lost": lost, "cpu_pct": window.percent()}
            await asyncio.gather(*(c.close() for c in senders), return_exceptions=True)

        asyncio.run(run())
        figures["setup_s"] = time.monotonic() - started
        return figures
    except BaseException:
        for server in servers:
            console.print(f"[bold red]{server.log_path} (tail):[/]\n{tail(server.log_path)}")
        raise
    finally:
        if echo is not None:
            echo.stop()
        for server in servers:
            server.stop()


# --- the native reference: Redis's own pub/sub ----------------------------------------------------

def redis_benchmark_publish(redis_server, requests=200000):
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(redis_server.port), "-c", "50",
                          "-n", str(requests), "-q", "PUBLISH", "aquapeer:bench", PAYLOAD.hex()[:1024]],
                         capture_output=True, text=True, timeout=120).stdout
    match = re.search(r"([\d.]+) requests per second", out)
    if not match:
        raise RuntimeError(f"could not read redis-benchmark's output: {out!r}")
    return float(match.group(1))


async def raw_pubsub_round_trips(redis_url, seconds, concurrency=NATIVE_CONCURRENCY):
    """Round trips through two channels: publish a ping, a subscriber publishes it back."""
    pingers = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=64))
    echoer = aioredis.from_url(redis_url)
    loop = asyncio.get_running_loop()
    waiting = {}
    rtts = []
    async with echoer.pubsub(ignore_subscribe_messages=True) as pings, \
            pingers.pubsub(ignore_subscribe_messages=True) as pongs:
        await pings.subscribe("bench:ping")
        await pongs.subscribe("bench:pong")

        async def echo():
            async for message in pings.listen():
                await echoer.publish("bench:pong", message["data"])

        async def collect():
            async for message in pongs.listen():
                fut = waiting.pop(message["data"][:8], None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

        async def pinger(i):
            n = 0
            while loop.time() < stop_at:
                n += 1
                key = i.to_bytes(4, "big") + n.to_bytes(4, "big")
                waiting[key] = fut = loop.create_future()
                started = loop.time()
                await pingers.publish("bench:ping", key + PAYLOAD)
                await asyncio.wait_for(fut, ROUND_TRIP_TIMEOUT_S)
                rtts.append(loop.time() - started)

        helpers = [asyncio.ensure_future(echo()), asyncio.ensure_future(collect())]
        stop_at = loop.time() + seconds
        started = loop.time()
        await asyncio.gather(*(pinger(i) for i in range(concurrency)))
        elapsed = loop.time() - started
        for task in helpers:
            task.cancel()
    await pingers.aclose()
    await echoer.aclose()
    return len(rtts) / elapsed, percentiles(rtts)


def bench_native(redis_server, seconds):
    redis_server.cli("flushall")
    window = CpuWindow({"redis": redis_server.pid})
    publish_rate = redis_benchmark_publish(redis_server)
    rate, (p50, p99) = asyncio.run(raw_pubsub_round_trips(redis_server.url, seconds))
    return {"redis_benchmark_publish_per_s": publish_rate, "pubsub_round_trips_per_s": rate,
            "pubsub_rtt_p50_ms": p50, "pubsub_rtt_p99_ms": p99, "cpu_pct": window.percent()}


# --- output ---------------------------------------------------------------------------------------

def fmt(v, digits=0):
    return "" if v is None else f"{v:,.{digits}f}"


def rounded(value):
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=10000, help="light peers in all (default: 10000)")
    parser.add_argument("--instances", default="1,2,4",
                        help="instance counts sharing Redis, comma-separated (default: 1,2,4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each round-trip window (default: 10)")
    parser.add_argument("--steady-rate", type=float, default=500.0,
                        help="round trips a second in all for the latency figures (default: 500)")
    parser.add_argument("--pace", type=float, default=10.0,
                        help="at saturation, round trips a second each sender starts at most (default: 10)")
    args = parser.parse_args()
    counts = [int(n) for n in args.instances.split(",")]
    logging.getLogger("aquapeer").setLevel(logging.ERROR)  # a lost round trip is counted, not logged
    missing = tb.RedisServer.missing()
    if missing:
        sys.exit(f"bench/signaling.py: {missing}")
    loads = {"steady": args.steady_rate / (args.peers // 2), "saturated": args.pace}

    configurations, native = [], None
    with tempfile.TemporaryDirectory(prefix="aqp-bench-") as workdir:
        redis_server = tb.RedisServer().start()
        try:
            native = bench_native(redis_server, args.seconds)
            for label, n, redis in [("alone", 1, None)] + [(f"redis-{n}", n, redis_server) for n in counts]:
                configurations.append((label, bench_configuration(label, n, redis, args.peers, args.seconds,
                                                                  loads, workdir)))
        finally:
            redis_server.close()

    cores = os.cpu_count()
    names = {label: "one server alone (no --redis)" if label == "alone" else f"{f['instances']} instance(s) + Redis"
             for label, f in configurations}
    table = Table(title=f"registrations and memory, {args.peers:,} light peers on one machine ({cores} cores, "
                        "shared by instances, Redis and both load processes)")
    for column in ("configuration", "registrations/s", "instances' RSS MB before → after", "KB per peer",
                   "Redis bytes per peer"):
        table.add_column(column)
    for label, f in configurations:
        table.add_row(names[label], fmt(f["registrations_per_s"]),
                      f"{fmt(f['rss_before_mb'])} → {fmt(f['rss_after_mb'])}", fmt(f["kb_per_peer"], 1),
                      fmt(f.get("redis_bytes_per_peer")))
    console.print(table)
    saturation = f"at saturation (each of {args.peers // 2:,} senders at most {args.pace:g} a second)"
    for load, what in (("steady", f"at {args.steady_rate:,.0f} a second in all"), ("saturated", saturation)):
        table = Table(title=f"envelope round trips {what}, {args.seconds:g} s")
        for column in ("configuration", "round trips/s", "rtt p50 ms", "rtt p99 ms", "lost", "instances CPU %",
                       "Redis CPU %", "load CPU %", "machine busy %"):
            table.add_column(column)
        table.caption = "CPU: % of one core; load: senders + echo peers; machine: % of all cores"
        for label, f in configurations:
            m = f[load]
            cpu = m["cpu_pct"]
            table.add_row(names[label], fmt(m["round_trips_per_s"]), fmt(m["rtt_p50_ms"], 1), fmt(m["rtt_p99_ms"], 1),
                          str(m["lost"]), fmt(cpu["instances"]), fmt(cpu.get("redis")),
                          fmt(cpu["senders"] + cpu["echo peers"]), fmt(cpu["machine"]))
        console.print(table)
    ref = Table(title="native reference: Redis's own pub/sub, same machine, same run")
    for column in ("what", "per second", "p50 ms", "p99 ms", "Redis CPU %"):
        ref.add_column(column)
    ref.add_row("redis-benchmark PUBLISH, 1 KB (C client, 50 connections)",
                fmt(native["redis_benchmark_publish_per_s"]), "", "", "")
    ref.add_row(f"PUBLISH/SUBSCRIBE round trip via redis.asyncio, {NATIVE_CONCURRENCY} at a time",
                fmt(native["pubsub_round_trips_per_s"]), fmt(native["pubsub_rtt_p50_ms"], 1),
                fmt(native["pubsub_rtt_p99_ms"], 1), fmt(native["cpu_pct"]["redis"]))
    ref.caption = "Redis CPU: over both measurements"
    console.print(ref)
    summary = {"cores": cores, "peers": args.peers, "seconds": args.seconds, "steady_rate": args.steady_rate,
               "pace": args.pace, **{label: rounded(f) for label, f in configurations}, "native": rounded(native)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
