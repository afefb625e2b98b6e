"""A real network on one machine: two homes behind NAT routers, a public side with coturn
and the signaling server, all in network namespaces (root only).  See docs/netlab.md.

```
home1 10.0.1.2 -- 10.0.1.1 nat1 172.31.0.11 --[mid1, optional]--+
                                                    br0 172.31.0.1 pub: coturn :3478 (STUN, TURN),
home2 10.0.2.2 -- 10.0.2.1 nat2 172.31.0.12 --------------------+       `aquapeer signal` :8765;
                                                                        default route into a sink
```

Every veth is created inside the lab's namespaces, so no lab packet can reach the root
namespace or the machine's own addresses.  Each NAT router is nft masquerade (``plain``:
endpoint-independent mapping, ``symmetric``: ``fully-random``, a new port per destination)
plus the drop of new packets arriving on its WAN, as home routers do (without it, a far
side's check that arrives first confirms a conntrack entry and srflx-to-srflx never
connects).  pub's default route goes into a veth whose far end drops everything: coturn
drops a whole allocation when it cannot send to a peer address, and a blackhole route
makes sendto fail.  A counter in each NAT counts packets leaving its WAN towards anything
outside the lab's networks.

One lab at a time (fixed names ``aqlab-*``): :class:`Lab` takes ``LOCK_PATH`` for its life.
Whatever a lab made is gone after it (processes killed by pid, namespaces deleted, temp dir
removed), also on failure; a lab killed before it could clean up is reaped by the next one.

As a script (``make lab`` / ``make lab-down``): ``up`` brings a lab up with two databases,
alice in home1 and bob in home2, friends, with STUN and TURN rows, kept by a background
process until ``down``.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testbed as tb  # noqa: E402

PREFIX = "aqlab-"
LOCK_PATH = "/tmp/aquapeer-netlab.lock"
STATE_PATH = "/tmp/aquapeer-netlab.json"     # the lab `make lab` keeps: pid and how to reach it
SERVE_LOG = "/tmp/aquapeer-netlab.log"
TMP_PREFIX = "aqlab-"

PUB_IP = "172.31.0.1"
WAN_NET = "172.31.0.0/24"
SINK_GW = "172.31.255.2"                     # pub's default gateway: a MAC nobody has
SINK_MAC = "02:00:00:00:00:01"
SIGNAL_PORT = 8765
TURN_PORT = 3478
TURN_USER, TURN_PASSWORD, TURN_REALM = "aquapeer", "lab-secret", "lab"
NAT_KINDS = ("plain", "symmetric")
TOOLS = ("ip", "nsenter", "nft", "turnserver")


def home_net(i: int) -> str:
    return f"10.0.{i}.0/24"


def home_ip(i: int) -> str:
    return f"10.0.{i}.2"


def nat_lan_ip(i: int) -> str:
    return f"10.0.{i}.1"


def nat_wan_ip(i: int) -> str:
    return f"172.31.0.{10 + i}"


LAB_NETS = (home_net(1), home_net(2), WAN_NET)


class LabError(RuntimeError):
    """The lab could not be brought up or down."""


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _run(argv: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
                       + (f"\ninput:\n{input}" if input else ""))
    return proc


def in_ns(ns: str, argv: list[str]) -> list[str]:
    """argv run in the named network namespace (nsenter: no mount namespace, unlike ip netns exec)."""
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _del_namespaces(names: list[str]) -> None:
    _run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in names), check=False)


def _proc_listens(pid: int, proto: str, ip: str, port: int) -> bool:
    """Whether a socket of pid's network namespace listens on ip:port (read from /proc/PID/net,
    which shows the namespace of that process: no command run in the namespace)."""
    want = f"{struct.unpack('<I', socket.inet_aton(ip))[0]:08X}:{port:04X}"
    try:
        with open(f"/proc/{pid}/net/{proto}") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if fields[1] == want and (proto == "udp" or fields[3] == "0A"):
            return True
    return False


def _kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL one process and wait until it is gone (reaped if it is our child)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not tb._alive(pid):
                return
        time.sleep(0.005)
    raise LabError(f"process {pid} survived SIGKILL")


def unavailable() -> str | None:
    """Why a lab cannot be made here (None when it can): not root, a tool missing, or
    `ip netns add` refused."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, nft, coturn)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"the network lab needs {', '.join(missing)} (scripts/setup-debian installs them)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def reap_stale() -> list[str]:
    """Remove what a lab killed before its teardown left: kill every process in an ``aqlab-*``
    namespace, delete the namespaces and ``/tmp/aqlab-*`` directories.  Call with the lock
    held (then no other lab is alive).  Returns the namespaces removed."""
    stale = [ns for ns in _netns_list() if ns.startswith(PREFIX)]
    for ns in stale:
        for pid in _netns_pids(ns):
            _kill_pid(pid)
    if stale:
        _del_namespaces(stale)
    for entry in Path(tempfile.gettempdir()).glob(TMP_PREFIX + "*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    return stale


# --------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------

_live_labs: set[Lab] = set()


def _down_live_labs() -> None:
    for lab in list(_live_labs):
        try:
            lab.down()
        except Exception:
            pass


atexit.register(_down_live_labs)


class Lab:
    """The namespaces, the NAT rules, coturn and the signaling server; a context manager.

    nat1, nat2: "plain" or "symmetric".  block_direct: pub's bridge drops UDP between the two
    NATs' WAN addresses (only the relay is left).  mid: nat1's WAN goes through a namespace
    ``aqlab-mid1`` (a kernel bridge there until :meth:`splice` puts a forwarder in its place).
    """

    def __init__(self, nat1: str = "plain", nat2: str = "plain", *, block_direct: bool = False,
                 mid: bool = False, coturn: bool = True, signaling: bool = True, lock_timeout: float = 120):
        for kind in (nat1, nat2):
            if kind not in NAT_KINDS:
                raise ValueError(f"NAT kind {kind!r}: one of {NAT_KINDS}")
        self.nat_kinds = {1: nat1, 2: nat2}
        self.block_direct = block_direct
        self.mid = mid
        self.want_coturn = coturn
        self.want_signaling = signaling
        self.lock_timeout = lock_timeout
        self.namespaces = [self.ns(n) for n in ("home1", "nat1", "home2", "nat2", "pub")]
        if mid:
            self.namespaces.append(self.ns("mid1"))
        self.signal_url = f"ws://{PUB_IP}:{SIGNAL_PORT}"
        self.stun_url = f"stun:{PUB_IP}:{TURN_PORT}"
        self.turn_url = f"turn:{PUB_IP}:{TURN_PORT}?transport=udp"
        self.turn_user, self.turn_password = TURN_USER, TURN_PASSWORD
        self.dir: str | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.public_ips = {1: nat_wan_ip(1), 2: nat_wan_ip(2)}  # changed by readdress()
        self.impairment = (0.0, 0.0)  # (delay_ms each way, loss each way) between nat1 and pub
        self.up_seconds = self.down_seconds = None
        self._lock_fd: int | None = None
        self._forwarders = 0  # forwarders started (each logs one "forwarding" line)
        self._made: list[str] = []
        self._state = "new"

    @staticmethod
    def ns(name: str) -> str:
        """The full namespace name: ns("home1") -> "aqlab-home1"."""
        return PREFIX + name

    def home_ip(self, i: int) -> str:
        return home_ip(i)

    def nat_wan_ip(self, i: int) -> str:
        return nat_wan_ip(i)

    # ---- commands in the namespaces ----

    def run(self, ns: str, argv: list[str], input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
        """Run argv in namespace ns ("home1" or "aqlab-home1")."""
        return _run(in_ns(self._full(ns), argv), input=input, check=check)

    def _full(self, ns: str) -> str:
        return ns if ns.startswith(PREFIX) else self.ns(ns)

    def _ip_batch(self, ns: str | None, lines: list[str]) -> None:
        argv = ["ip"] + (["-n", self._full(ns)] if ns else []) + ["-batch", "-"]
        _run(argv, input="\n".join(lines) + "\n")

    def popen(self, key: str, ns: str, argv: list[str], log_name: str) -> subprocess.Popen:
        """Start a process in a namespace, tracked by pid under key (killed by down())."""
        log = open(os.path.join(self.dir, log_name), "ab")
        try:
            proc = subprocess.Popen(in_ns(self._full(ns), argv), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=self.dir)
        finally:
            log.close()
        self.procs[key] = proc
        return proc

    def kill(self, key: str) -> None:
        proc = self.procs.pop(key, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                raise LabError(f"{key} (pid {proc.pid}) survived SIGKILL") from None

    def log(self, name: str) -> str:
        try:
            return Path(self.dir, name).read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # ---- up ----

    def _lock(self) -> None:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LabError(f"another network lab holds {LOCK_PATH} (a `make lab`? `make lab-down` "
                                   f"ends it)") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def up(self) -> Lab:
        if self._state != "new":
            raise LabError("a Lab is brought up once")
        t0 = time.monotonic()
        self._lock()
        self._state = "up"
        _live_labs.add(self)
        try:
            reap_stale()
            self.dir = tempfile.mkdtemp(prefix=TMP_PREFIX)
            self._topology()
            self._rules()
            if self.want_coturn:
                self._start_coturn()
            if self.want_signaling:
                self._start_signaling()
            self._wait_carrier()
            self._wait_listening()
        except BaseException:
            self.down()
            raise
        self.up_seconds = time.monotonic() - t0
        return self

    def _topology(self) -> None:
        # Every veth end gets its own ifindex: the kernel reports a veth's carrier at once only
        # when its ifindex differs from its peer's (in another namespace they could be equal, and
        # the carrier would come up to a second later).
        _run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in self.namespaces))
        self._made = list(self.namespaces)
        # Before any link exists: no IPv6 anywhere (no router solicitations, no DAD noise), and
        # the NAT routers forward.
        sysctls = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        with ThreadPoolExecutor(len(self.namespaces)) as ex:
            list(ex.map(lambda ns: self.run(ns, ["sysctl", "-eqw", *sysctls] + (
                ["net.ipv4.ip_forward=1"] if "-nat" in ns else [])), self.namespaces))
        pub, mid = self.ns("pub"), self.ns("mid1")
        for i in (1, 2):
            self._ip_batch(f"home{i}", [
                "link set lo up",
                f"link add eth0 index {i}1 type veth peer name lan index {i}2 netns {self.ns(f'nat{i}')}",
                f"addr add {home_ip(i)}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {nat_lan_ip(i)}",
            ])
            wan_peer = f"link add wan index {i}3 type veth peer name " + (
                f"tonat index {i}5 netns {mid}" if (self.mid and i == 1) else f"nat{i} index {i}4 netns {pub}")
            self._ip_batch(f"nat{i}", [
                "link set lo up",
                f"addr add {nat_lan_ip(i)}/24 dev lan",
                "link set lan up",
                wan_peer,
                f"addr add {nat_wan_ip(i)}/24 dev wan",
                "link set wan up",
                f"route add default via {PUB_IP}",
            ])
        if self.mid:
            # A transparent kernel bridge until splice() puts a forwarder between tonat and topub.
            self._ip_batch("mid1", [
                "link set lo up",
                f"link add topub index 16 type veth peer name nat1 index 14 netns {pub}",
                "link add mb type bridge forward_delay 0",
                "link set tonat master mb", "link set topub master mb",
                "link set tonat up", "link set topub up", "link set mb up",
            ])
        self._ip_batch("pub", [
            "link set lo up",
            "link add br0 type bridge forward_delay 0",
            "link set nat1 master br0", "link set nat1 up",
            "link set nat2 master br0", "link set nat2 up",
            f"addr add {PUB_IP}/24 dev br0",
            "link set br0 up",
            # The default route: into a veth whose far end drops every frame (nothing there has
            # the gateway's MAC, and pub does not forward).
            "link add sink index 31 type veth peer name void index 32",
            "link set void up",
            "addr add 172.31.255.1/30 dev sink",
            "link set sink up",
            f"neigh add {SINK_GW} lladdr {SINK_MAC} dev sink nud permanent",
            f"route add default via {SINK_GW} dev sink",
        ])

    def _nat_rules(self, i: int) -> str:
        lab, homes = ", ".join(LAB_NETS), ", ".join((home_net(1), home_net(2)))
        return self._nat_table(i) + f"""
table inet aqcount {{
    counter outside {{ }}
    counter homes {{ }}
    counter wan_out {{ }}
    counter wan_in {{ }}
    chain forward {{
        type filter hook forward priority -10;
        oifname "wan" counter name wan_out
        iifname "wan" counter name wan_in
        oifname "wan" meta nfproto ipv6 counter name outside
        oifname "wan" ip daddr != {{ {lab} }} counter name outside
        oifname "wan" ip daddr {{ {homes} }} counter name homes
    }}
    chain output {{
        type filter hook output priority -10;
        oifname "wan" meta nfproto ipv6 counter name outside
        oifname "wan" ip daddr != {{ {lab} }} counter name outside
    }}
}}
"""

    def _nat_table(self, i: int) -> str:
        """nat i's NAT table alone: masquerade (plain or symmetric) and the drop of new WAN packets."""
        random_ports = " fully-random" if self.nat_kinds[i] == "symmetric" else ""
        return f"""
table ip aqlab {{
    chain post {{ type nat hook postrouting priority srcnat; oifname "wan" masquerade{random_ports}; }}
    chain input {{ type filter hook input priority filter; iifname "wan" ct state new drop; }}
    chain forward {{ type filter hook forward priority filter; iifname "wan" ct state new drop; }}
}}
"""

    def _rules(self) -> None:
        jobs = [("nat1", self._nat_rules(1)), ("nat2", self._nat_rules(2))]
        if self.block_direct:
            a, b = nat_wan_ip(1), nat_wan_ip(2)
            jobs.append(("pub", f"""
table bridge aqlab {{
    counter direct {{ }}
    chain forward {{
        type filter hook forward priority filter;
        ip saddr {a} ip daddr {b} meta l4proto udp counter name direct drop
        ip saddr {b} ip daddr {a} meta l4proto udp counter name direct drop
    }}
}}
"""))
        with ThreadPoolExecutor(len(jobs)) as ex:
            list(ex.map(lambda job: self.run(job[0], ["nft", "-f", "-"], input=job[1]), jobs))

    def _start_coturn(self) -> None:
        self.popen("coturn", "pub", [
            "turnserver", "-n", "--listening-ip", PUB_IP, "--relay-ip", PUB_IP,
            "--listening-port", str(TURN_PORT), "--lt-cred-mech",
            "--user", f"{TURN_USER}:{TURN_PASSWORD}", "--realm", TURN_REALM, "--fingerprint",
            "--no-tls", "--no-dtls", "--no-cli", "--userdb", os.path.join(self.dir, "turndb"),
            "--pidfile", os.path.join(self.dir, "turnserver.pid"),
            "--log-file", os.path.join(self.dir, "turnserver.log"), "--simple-log", "--no-stdout-log",
        ], "turnserver.out")

    def _start_signaling(self) -> None:
        cli = tb.AQUAPEER_CLI
        if os.access(cli, os.X_OK):
            argv = [cli]
        else:  # not installed: the package from the tree, with the venv's python
            argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tb.REPO_ROOT / 'python')!r}); "
                                          "from aquapeer.cli import main; sys.exit(main())"]
        self.popen("signal", "pub", [*argv, "signal", "--host", PUB_IP, "--port", str(SIGNAL_PORT)], "signal.log")

    def _wait_carrier(self, timeout: float = 5) -> None:
        """Until every link has its carrier: the kernel notices a veth's far end came up up to
        a second later, and a bridge port forwards only then (a first packet would be lost)."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [f"{ns}: {line.split(':')[1].strip()}" for ns in self.namespaces
                       for line in _run(["ip", "-n", ns, "-o", "link", "show"]).stdout.splitlines()
                       if "NO-CARRIER" in line]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise LabError(f"links without carrier after {timeout} s: {waiting}")
            time.sleep(0.01)

    def _wait_listening(self, timeout: float = 15) -> None:
        checks = []
        if self.want_coturn:
            checks.append(("coturn", "udp", TURN_PORT, "turnserver.log"))
        if self.want_signaling:
            checks.append(("signal", "tcp", SIGNAL_PORT, "signal.log"))
        deadline = time.monotonic() + timeout
        for key, proto, port, log in checks:
            proc = self.procs[key]
            while not _proc_listens(proc.pid, proto, PUB_IP, port):
                if proc.poll() is not None:
                    raise LabError(f"{key} exited with {proc.returncode}:\n{self.log(log)[-2000:]}")
                if time.monotonic() > deadline:
                    raise LabError(f"{key} does not listen on {PUB_IP}:{port} after {timeout} s")
                time.sleep(0.005)

    # ---- the delay/loss hook ----

    def splice(self, argv: list[str]) -> subprocess.Popen:
        """Put a user-space forwarder between nat1's WAN and pub's bridge (needs mid=True):
        the kernel bridge in aqlab-mid1 is taken away, offloads are turned off on the veths
        that feed the forwarder (or STUN checksums fail), and argv (which gets the device
        names "tonat" and "topub" appended) runs in aqlab-mid1, tracked by pid.
        ICE addresses stay the same."""
        if not self.mid:
            raise LabError("splice() needs Lab(mid=True)")
        self._ip_batch("mid1", ["link set tonat nomaster", "link set topub nomaster", "link del mb"])
        offloads = ["tx", "off", "tso", "off", "gso", "off", "gro", "off"]
        for ns, dev in (("mid1", "tonat"), ("mid1", "topub"), ("nat1", "wan"), ("pub", "nat1")):
            self.run(ns, ["ethtool", "-K", dev, *offloads])
        proc = self.popen("forwarder", "mid1", [*argv, "tonat", "topub"], "forwarder.log")
        deadline = time.monotonic() + 10
        while "forwarding" not in self.log("forwarder.log"):  # its first line, once both sockets are bound
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the forwarder did not start:\n{self.log('forwarder.log')[-2000:]}")
            time.sleep(0.01)
        self._forwarders += 1
        return proc

    def splice_delay(self, delay_ms: float, loss: float = 0.0) -> subprocess.Popen:
        """splice() this file's own forwarder: delay_ms each way, loss (0..1) dropped each way."""
        return self.splice([sys.executable, os.path.abspath(__file__), "forward",
                            "--delay-ms", str(delay_ms), "--loss", str(loss)])

    def impair(self, delay_ms: float = 0.0, loss: float = 0.0) -> None:
        """Set the link between nat1 and pub (needs mid=True): delay_ms each way and a `loss`
        share (0..1) dropped each way, through this file's forwarder; (0, 0) puts the kernel
        bridge back (no user-space hop at all).  May be called any number of times; frames in
        flight in a forwarder that is replaced are lost, as on a wire being re-plugged."""
        if not self.mid:
            raise LabError("impair() needs Lab(mid=True)")
        spliced = "forwarder" in self.procs
        if spliced:
            self.kill("forwarder")
        if delay_ms or loss:
            if not spliced:
                self.splice_delay(delay_ms, loss)
                self.impairment = (float(delay_ms), float(loss))
                return
            proc = self.popen("forwarder", "mid1", [sys.executable, os.path.abspath(__file__), "forward",
                                                    "--delay-ms", str(delay_ms), "--loss", str(loss),
                                                    "tonat", "topub"], "forwarder.log")
            deadline = time.monotonic() + 10
            while self.log("forwarder.log").count("forwarding") < self._forwarders + 1:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"the forwarder did not start:\n{self.log('forwarder.log')[-2000:]}")
                time.sleep(0.01)
            self._forwarders += 1
        elif spliced:
            self._ip_batch("mid1", ["link add mb type bridge forward_delay 0",
                                    "link set tonat master mb", "link set topub master mb", "link set mb up"])
            self._wait_carrier()
        self.impairment = (float(delay_ms), float(loss))

    def set_nat(self, i: int, kind: str) -> None:
        """Make nat i plain or symmetric from now on (its mappings are forgotten: conntrack flushed)."""
        if kind not in NAT_KINDS:
            raise ValueError(f"NAT kind {kind!r}: one of {NAT_KINDS}")
        self.nat_kinds[i] = kind
        self.run(f"nat{i}", ["nft", "-f", "-"], input="delete table ip aqlab\n" + self._nat_table(i))
        self.run(f"nat{i}", ["conntrack", "-F"], check=False)

    def readdress(self, i: int, new_ip: str | None = None) -> str:
        """Give nat i a new public address, as an ISP does: the WAN gets new_ip (default: the next
        free 172.31.0.x), the old address goes, the masquerade uses the new one and every mapping
        the NAT kept is forgotten (conntrack flushed): packets to the old address die at pub's
        bridge, flows from the home leave from the new address.  Returns the new address."""
        old = self.public_ips[i]
        if new_ip is None:
            new_ip = f"172.31.0.{int(old.rsplit('.', 1)[1]) + 10}"
        ns = f"nat{i}"
        self.run(ns, ["sysctl", "-qw", "net.ipv4.conf.wan.promote_secondaries=1"])
        self._ip_batch(ns, [f"addr add {new_ip}/24 dev wan", f"addr del {old}/24 dev wan",
                            f"route replace default via {PUB_IP} dev wan src {new_ip}"])
        self.run(ns, ["conntrack", "-F"], check=False)
        self.public_ips[i] = new_ip
        return new_ip

    # ---- what went where ----

    def wan_bytes(self, i: int) -> tuple[int, int]:
        """(bytes out, bytes in) nat i forwarded through its WAN (IP packets, headers included)."""
        out = self.run(f"nat{i}", ["nft", "-j", "list", "counters", "table", "inet", "aqcount"]).stdout
        got = {}
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                got[item["counter"]["name"]] = int(item["counter"]["bytes"])
        return got["wan_out"], got["wan_in"]

    def counter(self, ns: str, family_table: str, name: str) -> int:
        """Packets an nft counter counted, e.g. counter("nat1", "inet aqcount", "outside")."""
        out = self.run(ns, ["nft", "-j", "list", "counter", *family_table.split(), name]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError(f"no counter {name} in {ns}")

    def outside_packets(self, i: int) -> int:
        """Packets that left nat i's WAN towards an address outside the lab's networks."""
        return self.counter(f"nat{i}", "inet aqcount", "outside")

    def to_private_homes(self, i: int) -> int:
        """Packets that left nat i's WAN for a home's private address (host candidates; they never arrive)."""
        return self.counter(f"nat{i}", "inet aqcount", "homes")

    def direct_dropped(self) -> int:
        """UDP packets pub's bridge dropped between the two NATs (block_direct)."""
        return self.counter("pub", "bridge aqlab", "direct")

    # ---- down ----

    def down(self) -> None:
        """Kill every process the lab started and every process left in its namespaces, delete
        the namespaces and the temp dir, release the lock.  Idempotent."""
        if self._state != "up":
            return
        t0 = time.monotonic()
        errors: list[BaseException] = []
        try:
            for key in list(self.procs):
                try:
                    self.kill(key)
                except Exception as exc:
                    errors.append(exc)
            for ns in self._made:
                for pid in _netns_pids(ns):  # anything else still in there (a forgotten server)
                    try:
                        _kill_pid(pid)
                    except Exception as exc:
                        errors.append(exc)
            if self._made:
                _del_namespaces(self._made)
                left = [ns for ns in _netns_list() if ns in self._made]
                if left:
                    errors.append(LabError(f"namespaces left: {left}"))
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self._state = "down"
            _live_labs.discard(self)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            self.down_seconds = time.monotonic() - t0
        if errors:
            raise errors[0]

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, exc_type, exc, tb_) -> bool:
        try:
            self.down()
        except Exception:
            if exc_type is None:
                raise
        return False


# --------------------------------------------------------------------------
# databases in the homes
# --------------------------------------------------------------------------

def lab_testbed(lab: Lab, names=("alice", "bob"), **kw) -> tb.Testbed:
    """A started Testbed whose i-th cluster runs in home i (the caller closes it before lab.down())."""
    bed = tb.Testbed(len(names), names=list(names), start=False, **kw)
    try:
        bed.setup()
        for i, cluster in enumerate(bed.clusters, start=1):
            cluster.netns = lab.ns(f"home{i}")
        bed.start_all()
    except BaseException:
        bed.close()
        raise
    return bed


def join_lab(cluster, lab: Lab, home: int, *, stun: bool = True, turn: bool = True, policy: str = "all") -> None:
    """CREATE EXTENSION; the lab's signaling server; host candidates: the home's address only;
    the lab's STUN and TURN server rows as asked; the worker up with them."""
    import psycopg

    cluster.sql("create extension if not exists aquapeer cascade")
    cluster.sql("insert into peer.signal_server (url) values (%s)", lab.signal_url)
    cluster.sql("update peer.config set ice_host_addresses = array[%s::inet], ice_transport_policy = %s",
                lab.home_ip(home), policy)
    if stun:
        cluster.sql("insert into peer.stun_server (url) values (%s)", lab.stun_url)
    if turn:
        cluster.sql("insert into peer.turn_server (url, username, credential) values (%s, %s, %s)",
                    lab.turn_url, lab.turn_user, lab.turn_password)
    tb.wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null"), 20,
                message=f"{cluster.name}'s worker", ignore=(psycopg.Error,))
    cluster.sql("select peer.reload_worker()")


def pair_types(cluster, friend: str) -> tuple[str | None, str | None] | None:
    """(local, remote) candidate types peer.connections shows for a friend, None without a row."""
    rows = cluster.sql("select local_candidate, remote_candidate from peer.connections where friend = %s",
                       friend)
    return tuple(rows[0]) if rows else None


# --------------------------------------------------------------------------
# the forwarder (runs in aqlab-mid1, see Lab.splice)
# --------------------------------------------------------------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def forward(dev_a: str, dev_b: str, delay_ms: float, loss: float, seed: int | None = None) -> None:
    """Copy every frame between two devices, each after delay_ms, dropping a random `loss` share."""
    import asyncio

    rng = random.Random(seed)
    delay = delay_ms / 1000

    async def main():
        loop = asyncio.get_running_loop()
        socks = {}
        for dev in (dev_a, dev_b):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            s.bind((dev, 0))
            s.setblocking(False)
            socks[dev] = s

        def send(out, frame):
            try:
                out.send(frame)
            except OSError:  # a full queue: a lost frame, as on a wire
                pass

        def pump(src, out):
            while True:
                try:
                    frame, addr = src.recvfrom(65536)
                except BlockingIOError:
                    return
                if addr[2] == PACKET_OUTGOING or (loss and rng.random() < loss):
                    continue
                if delay:
                    loop.call_later(delay, send, out, frame)
                else:
                    send(out, frame)

        loop.add_reader(socks[dev_a].fileno(), pump, socks[dev_a], socks[dev_b])
        loop.add_reader(socks[dev_b].fileno(), pump, socks[dev_b], socks[dev_a])
        print(f"forwarding {dev_a} <-> {dev_b}, {delay_ms} ms each way, loss {loss}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# --------------------------------------------------------------------------
# make lab / make lab-down
# --------------------------------------------------------------------------

def _serve() -> int:
    """Bring the lab up with alice and bob, write STATE_PATH, and keep them until SIGTERM/SIGINT."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    t0 = time.monotonic()
    with Lab() as lab:
        bed = lab_testbed(lab)
        try:
            alice, bob = bed.alice, bed.bob
            threads = [threading.Thread(target=join_lab, args=(c, lab, i)) for i, c in ((1, alice), (2, bob))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            tb.befriend(alice, "alice", bob, "bob")
            connected = alice.scalar("select peer.connect('bob', timeout => '20 s')")
            state = {
                "pid": os.getpid(), "lab_up_s": round(lab.up_seconds, 3), "all_up_s": round(time.monotonic() - t0, 1),
                "connect": connected, "types": pair_types(alice, "bob"),
                "signal_url": lab.signal_url, "stun_url": lab.stun_url, "turn_url": lab.turn_url,
                "turn_user": lab.turn_user, "turn_password": lab.turn_password,
                "databases": [{"name": c.name, "home": f"home{i}", "ns": c.netns, "ip": home_ip(i),
                               "nat_wan": nat_wan_ip(i), "sock_dir": c.sock_dir, "port": c.port,
                               "log": c.log_path} for i, c in ((1, alice), (2, bob))],
                "lab_dir": lab.dir,
            }
            tmp = STATE_PATH + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp, STATE_PATH)
            signum = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            print(f"netlab: signal {signum}, going down", flush=True)
        finally:
            try:
                os.unlink(STATE_PATH)
            except FileNotFoundError:
                pass
            bed.close()
    return 0


def running_lab() -> dict | None:
    """What `make lab` printed, while the lab it keeps is up (None otherwise)."""
    return _read_state()


def _read_state() -> dict | None:
    try:
        with open(STATE_PATH) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if tb._alive(state.get("pid")) else None


def _describe(state: dict) -> str:
    lines = [f"aquapeer network lab is up (namespaces, NAT, coturn, signaling in {state['lab_up_s']} s; "
             f"with both databases {state['all_up_s']} s). alice connect('bob'): {state['connect']}, "
             f"candidates {state['types']}.", ""]
    for db in state["databases"]:
        lines.append(f"  {db['name']:5}  {db['home']} {db['ip']} behind NAT {db['nat_wan']}:  "
                     f"psql -h {db['sock_dir']} -p {db['port']} -U postgres")
    lines += ["",
              f"  signaling {state['signal_url']}; STUN {state['stun_url']}; TURN {state['turn_url']} "
              f"(user {state['turn_user']}, password {state['turn_password']})",
              "  try:   select * from peer.connections;   select peer.disconnect('bob'), peer.connect('bob');",
              "  a shell in a namespace: ip netns exec aqlab-home1 bash  (also aqlab-nat1, aqlab-pub, ...)",
              f"  logs: {state['databases'][0]['log']}, {state['lab_dir']}/turnserver.log, signal.log",
              "  down:  make lab-down"]
    return "\n".join(lines)


def _up(timeout: float = 180) -> int:
    state = _read_state()
    if state is None:
        reason = unavailable()
        if reason:
            print(f"netlab: {reason}", file=sys.stderr)
            return 1
        with open(SERVE_LOG, "ab") as log:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve"], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while (state := _read_state()) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.terminate()
                print(f"netlab: the lab did not come up; see {SERVE_LOG}:", file=sys.stderr)
                print(Path(SERVE_LOG).read_text(errors="replace")[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.1)
    print(_describe(state))
    return 0


def _down(timeout: float = 60) -> int:
    try:
        with open(STATE_PATH) as f:
            pid = json.load(f).get("pid")
    except (OSError, ValueError):
        pid = None
    if pid and tb._alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while tb._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if tb._alive(pid):
            os.kill(pid, signal.SIGKILL)
    # Whatever is left (a killed keeper): the stale lab and its clusters.
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        left = reap_stale()
        tb.reap_stale()
    finally:
        os.close(fd)
    try:
        os.unlink(STATE_PATH)
    except FileNotFoundError:
        pass
    print("netlab: down" + (f" (reaped {', '.join(left)})" if left else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="bring the lab up with alice (home1) and bob (home2), in the background")
    sub.add_parser("down", help="take it down again")
    sub.add_parser("serve", help="(internal) keep the lab up until SIGTERM")
    fw = sub.add_parser("forward", help="(internal) the delay/loss forwarder: copy frames between two devices")
    fw.add_argument("--delay-ms", type=float, default=0.0)
    fw.add_argument("--loss", type=float, default=0.0)
    fw.add_argument("--seed", type=int, default=None)
    fw.add_argument("dev_a")
    fw.add_argument("dev_b")
    args = parser.parse_args(argv)
    if args.cmd == "forward":
        forward(args.dev_a, args.dev_b, args.delay_ms, args.loss, args.seed)
        return 0
    return {"up": _up, "down": _down, "serve": _serve}[args.cmd]()


if __name__ == "__main__":
    sys.exit(main())
