"""Throwaway PostgreSQL 15 clusters for aquapeer's tests and demo.

This module is a plain library: it does not import pytest, so
``scripts/demo.py`` can use it as well as ``tests/conftest.py``.

Local backend (the default)
    Each :class:`Cluster` is a real cluster made with ``initdb`` under a private
    base directory (``/tmp/aqp-XXXXXXXX``).  When the Python process runs as
    root, every server command (initdb, pg_ctl) runs as the OS user
    ``postgres`` through ``runuser -u postgres --``; otherwise the server runs
    as the current user.  A cluster listens on ``127.0.0.1:<free port>`` and on
    a unix socket in its own ``sock`` directory; clients connect through the
    socket as database user ``postgres`` (trust auth).

Docker backend
    :class:`DockerCluster` has the same client-side API but runs the server in
    a container built from the repository's ``Dockerfile`` (via testcontainers,
    imported lazily).  :func:`docker_engine_error` tells whether an engine is
    reachable.

Queries: :meth:`Cluster.sql` uses psycopg 3's own placeholder style, ``%s``
(or ``%(name)s`` with a single dict argument), with server-side binding.
Without parameters the text is sent as is, so a literal ``%`` needs no
escaping and several ``;``-separated statements are allowed; with parameters
a literal ``%`` must be written ``%%``.

Safety net: every cluster and base directory this process creates is
registered; an ``atexit`` hook (and a SIGTERM/SIGHUP handler, installed only
where the default handler was in place) kills their processes and removes
their directories.  :func:`reap_stale` removes what a killed earlier run left.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = [
    "TestbedError",
    "ExtensionNotInstalled",
    "Cluster",
    "DockerCluster",
    "Testbed",
    "wait_for",
    "free_port",
    "make_base_dir",
    "reap_stale",
    "docker_engine_error",
    "pg_bindir",
    "pkglibdir",
    "extension_installed",
    "server_user",
    "REPO_ROOT",
    "CLUSTER_NAMES",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Names given to the clusters of a Testbed, in order.
CLUSTER_NAMES = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    "ivan", "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil",
]

BASE_DIR_PREFIX = "aqp-"
OWNER_FILE = "owner"
SERVER_OS_USER = "postgres"
START_TIMEOUT = 60          # seconds, passed to pg_ctl -t
PORT_RETRIES = 5

# Environment variables that must not leak from the test process into the
# server (libpq defaults, the venv's Python, locale overrides).
_ENV_DROP_PREFIXES = ("PG", "LC_")
_ENV_DROP = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "LANG",
             "LANGUAGE", "PYTHONDONTWRITEBYTECODE"}
_SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class TestbedError(RuntimeError):
    """A cluster could not be made, started, stopped or cleaned up."""

    __test__ = False  # not a pytest test class


class ExtensionNotInstalled(TestbedError):
    """shared_preload_libraries='aquapeer' was asked for but aquapeer.so is missing."""


# --------------------------------------------------------------------------
# PostgreSQL installation
# --------------------------------------------------------------------------

_pg_config_cache: dict[str, str] = {}


def _pg_config(flag: str) -> str:
    if flag not in _pg_config_cache:
        env = os.environ.get("PG_CONFIG")
        candidates = [env and shutil.which(env),
                      "/usr/lib/postgresql/15/bin/pg_config",
                      shutil.which("pg_config")]
        exe = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
        if exe is None:
            raise TestbedError("pg_config not found (set PG_CONFIG or install "
                               "postgresql-server-dev-15)")
        out = subprocess.run([exe, flag], check=True, capture_output=True, text=True)
        _pg_config_cache[flag] = out.stdout.strip()
    return _pg_config_cache[flag]


def pg_bindir() -> str:
    """Directory of initdb, pg_ctl, postgres (``pg_config --bindir``)."""
    return _pg_config("--bindir")


def pkglibdir() -> str:
    """Where ``make install`` puts aquapeer.so (``pg_config --pkglibdir``)."""
    return _pg_config("--pkglibdir")


def extension_installed() -> bool:
    """True when aquapeer.so is in the server's pkglibdir."""
    return os.path.exists(os.path.join(pkglibdir(), "aquapeer.so"))


def _require_extension() -> None:
    so = os.path.join(pkglibdir(), "aquapeer.so")
    if not os.path.exists(so):
        raise ExtensionNotInstalled(
            f"{so} does not exist, so a cluster with "
            "shared_preload_libraries='aquapeer' cannot start: run `make install` "
            "(as root) first, or create the cluster with preload=False")


def server_user() -> tuple[str, int, int]:
    """(name, uid, gid) of the OS user the servers run as."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam(SERVER_OS_USER)
    else:
        pw = pwd.getpwuid(os.geteuid())
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_OS_USER, "--", *argv]
    return argv


def _server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _ENV_DROP and not k.startswith(_ENV_DROP_PREFIXES)}
    env["PATH"] = _SERVER_PATH
    env["LANG"] = "C.UTF-8"
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

def outside_env(**extra: str) -> dict[str, str]:
    """The environment of a program run as a user would run it, not from inside `make test`:
    none of the outer make's variables, no PYTHON* and no virtualenv of the tests."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV") and not k.startswith("PYTHON")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p)
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, *,
             message: str | None = None,
             ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``predicate()`` until it returns something truthy; return that value.

    Exceptions of the types in ``ignore`` count as a falsy result (handy for
    ``psycopg.OperationalError`` while a server restarts).  On timeout raises
    ``TimeoutError`` naming ``message`` (or the predicate) and the last
    ignored exception, if any.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:  # type: ignore[misc]
            value, last_exc = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            extra = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    """wait_for inside an event loop: await until ``predicate()`` is truthy, polling every 20 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout} s: {predicate}")
        await asyncio.sleep(0.02)


_port_lock = threading.Lock()
_ports_in_use: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1, never handed out twice by this process."""
    with _port_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port in _ports_in_use:
                continue
            # check it is really bindable (not only ephemeral-free right now)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _ports_in_use.add(port)
            return port
    raise TestbedError("could not find a free TCP port on 127.0.0.1")


def _release_port(port: int | None) -> None:
    with _port_lock:
        _ports_in_use.discard(port)  # type: ignore[arg-type]


def conf_value(value: Any) -> str:
    """Render a Python value for postgresql.conf: numbers bare, bools on/off,
    everything else a quoted string."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    s = str(value).replace("\\", "\\\\").replace("'", "''")
    return f"'{s}'"


def _conninfo_quote(value: Any) -> str:
    s = str(value)
    if s and not re.search(r"[\s'\\]", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data.rsplit(")", 1)[1].split()
    return rest[0], int(rest[1])


def _proc_starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None) -> bool:
    """True for an existing process that is not a zombie."""
    if not pid:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _become_subreaper() -> None:
    """Make this process the child subreaper (Linux prctl), so postmasters
    orphaned by pg_ctl and children of a killed postmaster become our
    children and we can reap them at once: otherwise they linger as zombies
    until PID 1 reaps them (seconds here), and postgres refuses to start
    while a zombie holds the PID in its lock files.  Off with
    AQUAPEER_TESTBED_SUBREAPER=0."""
    if os.environ.get("AQUAPEER_TESTBED_SUBREAPER", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def _reap_our_zombies() -> None:
    """waitpid() our zombie children named postgres (never anything else, so
    subprocess's own children are not touched)."""
    me = os.getpid()
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        comm = data[data.find("(") + 1:data.rfind(")")]
        state, ppid = data.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == me and comm.startswith("postgres"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _proc_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None and st[0] not in ("Z", "X"):
            children.setdefault(st[1], []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pids_with_cwd_under(path: str) -> list[int]:
    """Live processes whose working directory is ``path`` or below it (every
    PostgreSQL process chdirs into its data directory)."""
    path = os.path.realpath(path)
    out = []
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        cwd = _proc_cwd(pid)
        if cwd and (cwd == path or cwd.startswith(path + "/")) and _alive(pid):
            out.append(pid)
    return out


def _kill_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_tree_and_dir(root_pid: int | None, path: str, timeout: float = 15.0) -> None:
    """SIGKILL ``root_pid`` with its descendants and every process running in
    ``path``; wait until they are gone (zombies count as gone)."""
    if root_pid and _alive(root_pid):
        # freeze the postmaster so it neither forks nor reacts while we collect
        _kill_all([root_pid], signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        victims: list[int] = []
        if root_pid and _alive(root_pid):
            victims.append(root_pid)
            victims += _descendants(root_pid)
        victims += [p for p in _pids_with_cwd_under(path) if p not in victims]
        if not victims:
            _reap_our_zombies()
            return
        _kill_all(victims)
        if time.monotonic() > deadline:
            raise TestbedError(f"processes {victims} survived SIGKILL")
        time.sleep(0.02)


# --------------------------------------------------------------------------
# base directories, the atexit safety net, stale reaping
# --------------------------------------------------------------------------

_registry_lock = threading.Lock()
_live_clusters: set[Cluster] = set()
_live_base_dirs: set[str] = set()
_live_signal_servers: set = set()  # Popen of `aquapeer signal` and redis-server started here
_safety_net_installed = False
_template_lock = threading.Lock()
_template_data_dir: str | None = None


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):  # e.g. a file appeared while removing: try again
        time.sleep(0.1)
        shutil.rmtree(path, ignore_errors=True)


def _cleanup_everything() -> None:
    """Kill every cluster this process made and remove their directories.
    Takes no lock (it may run in a signal handler)."""
    for server in list(_live_signal_servers):
        if server.poll() is None:
            server.kill()
    for cl in list(_live_clusters):
        try:
            cl._force_cleanup()
        except Exception:
            pass
    for d in list(_live_base_dirs):
        try:
            _kill_tree_and_dir(None, d, timeout=5)
        except Exception:
            pass
        _rmtree(d)
        _live_base_dirs.discard(d)


def _on_fatal_signal(signum, frame):  # pragma: no cover - exercised by hand
    _cleanup_everything()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_safety_net() -> None:
    global _safety_net_installed
    if _safety_net_installed:
        return
    _safety_net_installed = True
    _become_subreaper()
    atexit.register(_cleanup_everything)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                if signal.getsignal(sig) == signal.SIG_DFL:
                    signal.signal(sig, _on_fatal_signal)
            except (ValueError, OSError):
                pass


def make_base_dir(parent: str | None = None) -> str:
    """Create ``/tmp/aqp-XXXXXXXX`` (short, for unix socket paths), owned by
    the server user, registered for cleanup at exit.  ``parent`` defaults to
    ``$AQUAPEER_TESTBED_DIR`` or ``/tmp`` (deliberately not ``$TMPDIR``)."""
    _install_safety_net()
    parent = parent or os.environ.get("AQUAPEER_TESTBED_DIR") or "/tmp"
    d = tempfile.mkdtemp(prefix=BASE_DIR_PREFIX, dir=parent)
    with _registry_lock:
        _live_base_dirs.add(d)
    with open(os.path.join(d, OWNER_FILE), "w") as f:
        f.write(f"{os.getpid()} {_proc_starttime(os.getpid())}\n")
    _, uid, gid = server_user()
    os.chmod(d, 0o700)
    if os.geteuid() == 0:
        os.chown(d, uid, gid)
    return d


def remove_base_dir(path: str) -> None:
    """Kill whatever still runs under ``path`` and remove it."""
    _kill_tree_and_dir(None, path)
    _rmtree(path)
    with _registry_lock:
        _live_base_dirs.discard(path)


def reap_stale(parent: str | None = None) -> list[str]:
    """Remove ``aqp-*`` base dirs (and kill their servers) left by test
    processes that no longer exist.  Returns the removed paths."""
    parent = parent or os.environ.get("AQUAPEER_TESTBED_DIR") or "/tmp"
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for name in entries:
        if not name.startswith(BASE_DIR_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            owner = open(os.path.join(path, OWNER_FILE)).read().split()
            pid, start = int(owner[0]), owner[1]
        except (OSError, ValueError, IndexError):
            continue  # not ours, or not yet written: leave it alone
        if _alive(pid) and _proc_starttime(pid) == start:
            continue  # its owner still runs
        try:
            _kill_tree_and_dir(None, path, timeout=5)
        except TestbedError:
            continue
        _rmtree(path)
        removed.append(path)
    return removed


# --------------------------------------------------------------------------
# client side, shared by the local and the docker cluster
# --------------------------------------------------------------------------

class _Client:
    name: str

    def conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        raise NotImplementedError

    def dsn_for(self, dbname: str = "postgres") -> str:
        return " ".join(f"{k}={_conninfo_quote(v)}" for k, v in self.conninfo(dbname).items())

    @property
    def dsn(self) -> str:
        """libpq connection string for database ``postgres``."""
        return self.dsn_for("postgres")

    def connect(self, dbname: str = "postgres", **kw: Any):
        """A new psycopg 3 connection, autocommit=True unless overridden.
        The caller closes it (use it as a context manager)."""
        import psycopg

        params = {**self.conninfo(dbname), "autocommit": True, "connect_timeout": 10}
        params.update(kw)
        return psycopg.connect(**params)

    def sql(self, query: str, *params: Any, dbname: str = "postgres") -> list[tuple]:
        """Run ``query`` on a fresh autocommit connection and return all rows
        (list of tuples) of the last statement that returned rows, [] if none.

        Placeholders are psycopg's ``%s`` (positional ``*params``) or
        ``%(name)s`` (pass one dict).  With no params the text is sent
        verbatim (``%`` needs no doubling; several statements allowed)."""
        if len(params) == 1 and isinstance(params[0], Mapping):
            args: Any = params[0]
        else:
            args = params if params else None
        with self.connect(dbname) as conn:
            cur = conn.execute(query, args)
            rows: list[tuple] = []
            while True:
                if cur.description is not None:
                    rows = cur.fetchall()
                if not cur.nextset():
                    break
            return rows

    def scalar(self, query: str, *params: Any, dbname: str = "postgres") -> Any:
        """First column of the first row of :meth:`sql`, None if no row."""
        rows = self.sql(query, *params, dbname=dbname)
        return rows[0][0] if rows else None

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until ``select 1`` succeeds."""
        import psycopg

        wait_for(lambda: self.scalar("select 1") == 1, timeout,
                 message=f"{self.name} to accept connections",
                 ignore=(psycopg.OperationalError,))


# --------------------------------------------------------------------------
# the local cluster
# --------------------------------------------------------------------------

class Cluster(_Client):
    """One throwaway PostgreSQL cluster in ``base_dir/name``.

    Layout: ``data/`` (PGDATA), ``sock/`` (unix socket dir), ``server.log``.
    Call :meth:`init` once, then :meth:`start`; :meth:`destroy` at the end.
    """

    backend = "local"

    def __init__(self, name: str, base_dir: str, extra_conf: dict | None = None,
                 preload: bool = True, env: Mapping[str, str] | None = None,
                 netns: str | None = None):
        self.name = name
        # A named network namespace (``ip netns add``) the server starts in (root only):
        # it listens on that namespace's 127.0.0.1, and clients still reach it through its
        # Unix socket, which is not namespaced (tests/netlab.py).
        self.netns = netns
        self.base_dir = str(base_dir)
        self.dir = os.path.join(self.base_dir, name)
        self.data_dir = os.path.join(self.dir, "data")
        self.sock_dir = os.path.join(self.dir, "sock")
        self.log_path = os.path.join(self.dir, "server.log")
        self.conf_path = os.path.join(self.data_dir, "testbed.conf")
        self.extra_conf: dict[str, Any] = dict(extra_conf or {})
        self.preload = preload
        self.env = dict(env or {})
        self.port: int | None = None
        self._pm_pid: int | None = None
        self._initialized = False
        self._destroyed = False

    def __repr__(self) -> str:
        return f"<Cluster {self.name} port={self.port} dir={self.dir}>"

    # ---- running server commands ----

    def _run(self, argv: list[str], timeout: float = 120, check: bool = True,
             netns: str | None = None) -> subprocess.CompletedProcess:
        cmd = _as_server_user(argv)
        if netns is not None:
            if os.geteuid() != 0:
                raise TestbedError(f"{self.name}: starting in network namespace {netns} needs root")
            cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
        proc = subprocess.run(cmd, cwd=self.dir, env=_server_env(self.env),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise TestbedError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}\n"
                f"{proc.stdout}{proc.stderr}{self._log_tail()}")
        return proc

    def _bin(self, prog: str) -> str:
        return os.path.join(pg_bindir(), prog)

    # ---- setup ----

    def init(self) -> Cluster:
        """initdb and write the configuration; does not start the server."""
        if self._initialized:
            return self
        if self.preload:
            _require_extension()
        _install_safety_net()
        _, uid, gid = server_user()
        if os.geteuid() == 0 and os.stat(self.base_dir).st_uid == 0 \
                and not os.stat(self.base_dir).st_mode & 0o001:
            os.chown(self.base_dir, uid, gid)  # the server user must traverse it
        with _registry_lock:
            _live_clusters.add(self)
        os.makedirs(self.dir, mode=0o700)
        for d in (self.dir, self.sock_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
            if os.geteuid() == 0:
                os.chown(d, uid, gid)
        self._run(["cp", "-a", self._initdb_template(), self.data_dir])
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.write("\n# aquapeer testbed settings\ninclude 'testbed.conf'\n")
        self.port = free_port()
        self._write_conf()
        self._initialized = True
        return self

    def _initdb_template(self) -> str:
        """A data directory initdb made once for this process; each cluster starts as a copy
        (initdb takes about a second, a copy a tenth of that, and a run makes a hundred
        clusters).  The copies share a system identifier: nothing aquapeer keeps tells
        clusters apart by it alone (a stream epoch is drawn per database, at first start)."""
        global _template_data_dir
        with _template_lock:
            if _template_data_dir is None:
                template = os.path.join(make_base_dir(), "data")
                self._run([self._bin("initdb"), "-D", template, "--auth=trust",
                           "--encoding=UTF8", "--locale=C.UTF-8", "-U", "postgres", "--no-sync"],
                          timeout=180)
                _template_data_dir = template
            return _template_data_dir

    def settings(self) -> dict[str, Any]:
        """The settings written to ``data/testbed.conf`` (base + extra_conf)."""
        s: dict[str, Any] = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.sock_dir,
        }
        if self.preload:
            s["shared_preload_libraries"] = "aquapeer"
        s.update({
            "aquapeer.database": "postgres",
            "max_worker_processes": 20,
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "log_line_prefix": "%m [%p] %b ",
            "logging_collector": False,
        })
        s.update(self.extra_conf)
        return s

    def _write_conf(self) -> None:
        lines = ["# written by tests/testbed.py; rewritten on every change\n"]
        lines += [f"{k} = {conf_value(v)}\n" for k, v in self.settings().items()]
        tmp = self.conf_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        if os.geteuid() == 0:
            _, uid, gid = server_user()
            os.chown(tmp, uid, gid)
        os.replace(tmp, self.conf_path)

    def configure(self, settings: Mapping[str, Any] | None = None, *, reload: bool = False,
                  **kw: Any) -> Cluster:
        """Add/replace extra settings (``None`` removes one) and rewrite the
        conf file.  Takes effect at the next start, or now with reload=True
        for reloadable settings."""
        for k, v in {**(settings or {}), **kw}.items():
            if v is None:
                self.extra_conf.pop(k, None)
            else:
                self.extra_conf[k] = v
        self._write_conf()
        if reload and self.is_running():
            self.reload()
        return self

    # ---- lifecycle ----

    def _clear_stale_pidfile(self) -> None:
        """After kill9 the postmaster may linger as a zombie (PID 1 here reaps
        slowly) and postgres would refuse to start because kill(pid, 0) still
        succeeds.  Remove the pid file and the socket lock files (same check)
        when no process of ours runs."""
        if self.is_running() or _pids_with_cwd_under(self.data_dir):
            return
        stale = [os.path.join(self.data_dir, "postmaster.pid")]
        try:
            stale += [os.path.join(self.sock_dir, f) for f in os.listdir(self.sock_dir)
                      if f.startswith(".s.PGSQL.")]
        except FileNotFoundError:
            pass
        for path in stale:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def start(self, wait: bool = True) -> Cluster:
        """Start the server (pg_ctl -w -t 60).  If the port was taken
        meanwhile, pick another one and retry."""
        if not self._initialized:
            raise TestbedError(f"{self.name}: init() first")
        if self.is_running():
            return self
        _reap_our_zombies()
        for attempt in range(PORT_RETRIES):
            self._clear_stale_pidfile()
            offset = self.log_size()
            argv = [self._bin("pg_ctl"), "start", "-D", self.data_dir, "-l", self.log_path,
                    "-w" if wait else "-W", "-t", str(START_TIMEOUT)]
            proc = self._run(argv, timeout=START_TIMEOUT + 30, check=False, netns=self.netns)
            if proc.returncode == 0:
                self._pm_pid = None
                if wait:
                    self._pm_pid = self._read_pidfile()
                return self
            new_log = self.log(since=offset)
            if "Address already in use" in new_log and "port" not in self.extra_conf \
                    and attempt + 1 < PORT_RETRIES:
                old = self.port
                self.port = free_port()
                _release_port(old)
                self._write_conf()
                continue
            raise TestbedError(f"{self.name}: pg_ctl start failed ({proc.returncode})\n"
                               f"{proc.stdout}{proc.stderr}\n--- server log ---\n{new_log}")
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast", timeout: float = 60) -> float:
        """pg_ctl stop -m mode -w; returns the seconds it took."""
        t0 = time.monotonic()
        self._run([self._bin("pg_ctl"), "stop", "-D", self.data_dir, "-m", mode, "-w",
                   "-t", str(int(timeout))], timeout=timeout + 30)
        elapsed = time.monotonic() - t0
        self._pm_pid = None
        _reap_our_zombies()
        return elapsed

    def restart(self, mode: str = "fast") -> Cluster:
        if self.is_running():
            self.stop(mode)
        return self.start()

    def reload(self) -> None:
        self._run([self._bin("pg_ctl"), "reload", "-D", self.data_dir])

    def _read_pidfile(self) -> int | None:
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, None when not running."""
        for pid in (self._read_pidfile(), self._pm_pid):
            if pid and _alive(pid) and _proc_cwd(pid) == os.path.realpath(self.data_dir):
                return pid
        return None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def pids(self) -> list[int]:
        """Postmaster first, then every other live process of this server
        (its descendants and anything still running in the data dir)."""
        pm = self.postmaster_pid()
        out = [pm] + _descendants(pm) if pm else []
        out += [p for p in _pids_with_cwd_under(self.data_dir) if p not in out]
        return out

    def backend_pids(self, backend_type: str | None = None) -> list[int]:
        """PIDs from pg_stat_activity (optionally of one backend_type, e.g.
        'aquapeer worker' or 'client backend')."""
        if backend_type is None:
            rows = self.sql("select pid from pg_stat_activity where pid <> pg_backend_pid()")
        else:
            rows = self.sql("select pid from pg_stat_activity where backend_type = %s "
                            "and pid <> pg_backend_pid()", backend_type)
        return [r[0] for r in rows]

    def kill9(self) -> None:
        """SIGKILL the postmaster and all its children at once (simulates a
        crash of every server process); returns when none is left."""
        pm = self.postmaster_pid() or self._read_pidfile() or self._pm_pid
        _kill_tree_and_dir(pm if pm and _proc_cwd(pm) == os.path.realpath(self.data_dir)
                           else None, self.data_dir)
        self._pm_pid = None

    def destroy(self) -> None:
        """Stop (fast, else immediate), kill leftovers, remove the directory.
        Idempotent."""
        if self._destroyed:
            return
        errors = []
        if self._initialized and self.is_running():
            try:
                self.stop("fast", timeout=30)
            except Exception as exc:
                errors.append(exc)
                try:
                    self.stop("immediate", timeout=15)
                except Exception as exc2:
                    errors.append(exc2)
        self._force_cleanup()
        if os.path.exists(self.dir):
            raise TestbedError(f"{self.name}: could not remove {self.dir}")

    def _force_cleanup(self) -> None:
        if os.path.exists(self.dir):
            self.kill9()
            _rmtree(self.dir)
        _release_port(self.port)
        self._destroyed = True
        _live_clusters.discard(self)

    # ---- the server log ----

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log(self, since: int = 0) -> str:
        """The server log text (from byte offset ``since``; see log_size())."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, n: int = 40) -> str:
        text = self.log()
        if not text:
            return ""
        return "\n--- server log (tail) ---\n" + "\n".join(text.splitlines()[-n:])

    def wait_for_log(self, pattern: str, timeout: float = 10, since: int = 0) -> re.Match:
        """Wait until the regex ``pattern`` appears in the log after ``since``."""
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.log(since)), timeout,
                        message=f"{pattern!r} in {self.name}'s log")

    # ---- connections ----

    def conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        return {"host": self.sock_dir, "port": self.port, "user": "postgres", "dbname": dbname}

    @property
    def tcp_dsn(self) -> str:
        """Connection string over TCP 127.0.0.1 (what a peer would use)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"


# --------------------------------------------------------------------------
# the docker cluster (lazy testcontainers import)
# --------------------------------------------------------------------------

DOCKER_IMAGE_TAG = os.environ.get("AQUAPEER_TEST_IMAGE", "aquapeer-test:latest")
_docker_image_built: str | None = None
_docker_build_lock = threading.Lock()


def docker_engine_error() -> str | None:
    """None when a Docker engine answers a ping, otherwise why not."""
    try:
        import docker  # installed with testcontainers
    except ImportError as exc:
        return f"python package docker/testcontainers missing: {exc}"
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def build_docker_image(tag: str = DOCKER_IMAGE_TAG) -> str:
    """Build the repo's Dockerfile once per process; returns the tag."""
    global _docker_image_built
    with _docker_build_lock:
        if _docker_image_built == tag:
            return tag
        if not (REPO_ROOT / "Dockerfile").exists():
            raise TestbedError(f"no Dockerfile at {REPO_ROOT}")
        from testcontainers.core.image import DockerImage

        DockerImage(path=str(REPO_ROOT), tag=tag, clean_up=False).build()
        _docker_image_built = tag
        return tag


class DockerCluster(_Client):
    """A PostgreSQL server in a container of the image built from the repo's
    Dockerfile.  Assumes an image derived from the official ``postgres:15``
    one (entrypoint takes ``postgres -c k=v ...``; POSTGRES_HOST_AUTH_METHOD).
    Its port 5432 is published on 127.0.0.1 only."""

    backend = "docker"

    def __init__(self, name: str, base_dir: str | None = None,
                 extra_conf: dict | None = None, preload: bool = True,
                 env: Mapping[str, str] | None = None, image: str | None = None):
        self.name = name
        self.extra_conf = dict(extra_conf or {})
        self.preload = preload
        self.env = dict(env or {})
        self.image = image
        self.port: int | None = None
        self.host = "127.0.0.1"
        self._container = None

    def __repr__(self) -> str:
        return f"<DockerCluster {self.name} port={self.port}>"

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {}
        if self.preload:
            s["shared_preload_libraries"] = "aquapeer"
        s.update({"aquapeer.database": "postgres", "max_worker_processes": 20,
                  "fsync": False, "synchronous_commit": False, "full_page_writes": False,
                  "log_line_prefix": "%m [%p] %b "})
        s.update(self.extra_conf)
        return s

    def init(self) -> DockerCluster:
        from testcontainers.core.container import DockerContainer

        image = self.image or build_docker_image()
        cmd = ["postgres"]
        for k, v in self.settings().items():
            v = conf_value(v)
            if v.startswith("'") and v.endswith("'"):
                v = v[1:-1].replace("''", "'")
            cmd += ["-c", f"{k}={v}"]
        self.port = free_port()
        c = DockerContainer(image).with_command(cmd)
        c.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
        for k, v in self.env.items():
            c.with_env(k, str(v))
        c.ports["5432/tcp"] = ("127.0.0.1", self.port)  # loopback only
        self._container = c
        return self

    def _wrapped(self):
        return self._container.get_wrapped_container()

    def start(self, wait: bool = True) -> DockerCluster:
        if self._container is None:
            self.init()
        if getattr(self._container, "_container", None) is None:
            self._container.start()
        else:
            self._wrapped().start()
        if wait:
            self.wait_ready(START_TIMEOUT)
        return self

    def stop(self, mode: str = "fast", timeout: float = 60) -> float:
        t0 = time.monotonic()
        sig = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}[mode]
        w = self._wrapped()
        w.kill(signal=sig)
        w.wait(timeout=timeout)
        return time.monotonic() - t0

    def restart(self, mode: str = "fast") -> DockerCluster:
        if self.is_running():
            self.stop(mode)
        return self.start()

    def kill9(self) -> None:
        w = self._wrapped()
        w.kill(signal="SIGKILL")
        w.wait(timeout=30)

    def is_running(self) -> bool:
        if self._container is None or getattr(self._container, "_container", None) is None:
            return False
        w = self._wrapped()
        w.reload()
        return w.status == "running"

    def pids(self) -> list[int]:
        raise NotImplementedError("pids() is not available with the docker backend")

    def log(self, since: int = 0) -> str:
        if self._container is None or getattr(self._container, "_container", None) is None:
            return ""
        return self._wrapped().logs().decode(errors="replace")[since:]

    def log_size(self) -> int:
        return len(self.log())

    def wait_for_log(self, pattern: str, timeout: float = 10, since: int = 0):
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.log(since)), timeout,
                        message=f"{pattern!r} in {self.name}'s log")

    def destroy(self) -> None:
        if self._container is not None:
            try:
                self._container.stop()
            finally:
                self._container = None
                _release_port(self.port)

    def _force_cleanup(self) -> None:
        try:
            self.destroy()
        except Exception:
            pass

    def conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": "postgres", "dbname": dbname}

    @property
    def tcp_dsn(self) -> str:
        return self.dsn


# --------------------------------------------------------------------------
# a set of clusters
# --------------------------------------------------------------------------

class Testbed:
    """A base dir with N clusters named alice, bob, carol, ...

    ``with Testbed(2) as bed:`` creates, inits and starts them (in parallel
    threads unless parallel=False); leaving the block destroys them all and
    removes the base dir, also on an exception.  Access clusters as
    ``bed.alice``, ``bed['alice']``, ``bed[0]``, ``list(bed)`` or
    ``bed.clusters``.  Keyword arguments other than the ones below go to every
    cluster's constructor (extra_conf, preload, env).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, n: int = 2, *, names: list[str] | None = None,
                 extra_conf: dict | None = None, preload: bool = True,
                 start: bool = True, parallel: bool = True, backend: str = "local",
                 env: Mapping[str, str] | None = None):
        if names is None:
            if n > len(CLUSTER_NAMES):
                raise ValueError(f"at most {len(CLUSTER_NAMES)} default names")
            names = CLUSTER_NAMES[:n]
        if backend not in ("local", "docker"):
            raise ValueError(f"unknown backend {backend!r}")
        self.names = list(names)
        self.cluster_kw = {"extra_conf": extra_conf, "preload": preload, "env": env}
        self.autostart = start
        self.parallel = parallel
        self.backend = backend
        self.base_dir: str | None = None
        self.clusters: list[Cluster] = []
        self._closed = False

    # ---- access ----

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.clusters[key]
        for c in self.clusters:
            if c.name == key:
                return c
        raise KeyError(key)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("clusters", "names"):
            raise AttributeError(name)
        for c in self.__dict__.get("clusters", []):
            if c.name == name:
                return c
        raise AttributeError(name)

    def __iter__(self) -> Iterator[Cluster]:
        return iter(self.clusters)

    def __len__(self) -> int:
        return len(self.clusters)

    def __repr__(self) -> str:
        return f"<Testbed {self.base_dir} {[c.name for c in self.clusters]}>"

    # ---- lifecycle ----

    def _each(self, fn: Callable[[Any], Any], clusters: list) -> None:
        if self.parallel and len(clusters) > 1:
            with ThreadPoolExecutor(max_workers=len(clusters)) as ex:
                futures = [ex.submit(fn, c) for c in clusters]
                errors = [f.exception() for f in futures]
            errors = [e for e in errors if e is not None]
            if errors:
                raise errors[0]
        else:
            for c in clusters:
                fn(c)

    def setup(self) -> Testbed:
        if self.base_dir is None and self.backend == "local":
            self.base_dir = make_base_dir()
        new = [self._make(name) for name in self.names]
        self.clusters.extend(new)
        self._each(lambda c: c.init(), new)
        if self.autostart:
            self._each(lambda c: c.start(), new)
        return self

    def _make(self, name: str, **overrides: Any):
        kw = {**self.cluster_kw, **overrides}
        if self.backend == "docker":
            return DockerCluster(name, **kw)
        return Cluster(name, self.base_dir, **kw)

    def add(self, name: str | None = None, start: bool = True, **overrides: Any):
        """Add (init, and start unless start=False) one more cluster."""
        if name is None:
            taken = {c.name for c in self.clusters}
            name = next(n for n in CLUSTER_NAMES if n not in taken)
        if self.base_dir is None and self.backend == "local":
            self.base_dir = make_base_dir()
        c = self._make(name, **overrides)
        self.clusters.append(c)
        c.init()
        if start:
            c.start()
        return c

    def start_all(self) -> None:
        self._each(lambda c: c.start(), self.clusters)

    def stop_all(self, mode: str = "fast") -> None:
        self._each(lambda c: c.stop(mode) if c.is_running() else None, self.clusters)

    def close(self) -> None:
        """Destroy every cluster and remove the base dir (idempotent).
        Raises the first cleanup error after trying everything."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        try:
            self._each_collect(errors)
        finally:
            if self.base_dir is not None:
                try:
                    remove_base_dir(self.base_dir)
                except Exception as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    def _each_collect(self, errors: list) -> None:
        def destroy(c):
            try:
                c.destroy()
            except Exception as exc:
                errors.append(exc)
                c._force_cleanup()
        # parallel stop is safe and halves teardown time on 2 cores
        if self.parallel and len(self.clusters) > 1:
            with ThreadPoolExecutor(max_workers=len(self.clusters)) as ex:
                list(ex.map(destroy, self.clusters))
        else:
            for c in self.clusters:
                destroy(c)

    def __enter__(self) -> Testbed:
        try:
            return self.setup()
        except BaseException:
            try:
                self.close()
            except Exception:
                pass
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:
                pass  # don't hide the test's own exception
        return False


# --------------------------------------------------------------------------
# the signaling server, as users run it
# --------------------------------------------------------------------------

AQUAPEER_CLI = os.path.join(os.environ.get("AQUAPEER_BINDIR", "/usr/local/bin"), "aquapeer")


class SignalServer:
    """`aquapeer signal` (the installed command) on a free loopback port; with redis_url,
    one of several instances sharing registrations (`--redis`)."""

    def __init__(self, cli: str | None = None, log_path: str | None = None, redis_url: str | None = None,
                 extra_args: Iterable[str] = ()):
        self.cli = cli or AQUAPEER_CLI
        self.log_path = log_path  # where its log goes (default: nowhere)
        self.redis_url = redis_url
        self.extra_args = list(extra_args)  # more `aquapeer signal` options
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> SignalServer:
        _install_safety_net()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        argv = [self.cli, "signal", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.redis_url:
            argv += ["--redis", self.redis_url]
        argv += self.extra_args
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            if self.log_path:
                log.close()
        _live_signal_servers.add(self.proc)
        wait_for(self._listening, 10, message="the signaling server to listen")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise TestbedError(f"aquapeer signal exited with {self.proc.returncode}"
                               + (f"; see {self.log_path}" if self.log_path else ""))
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _live_signal_servers.discard(self.proc)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        _live_signal_servers.discard(self.proc)


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_OS_USER = "redis"  # Debian's redis-server package makes it


class RedisServer:
    """A throwaway redis-server on a free loopback port: no persistence, its files in a
    temporary directory, as the redis OS user when run as root (else as ourselves)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def missing() -> str | None:
        """Why no redis-server can be started here, or None."""
        if not os.path.exists(REDIS_SERVER):
            return f"{REDIS_SERVER} is not installed (apt-get install redis-server, or scripts/setup-debian)"
        return None

    def start(self) -> RedisServer:
        _install_safety_net()
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam(REDIS_OS_USER)
            as_user = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="aqp-redis-")
            if as_user:
                os.chown(self.dir, as_user["user"], as_user["group"])
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            cwd=self.dir, **as_user)
        _live_signal_servers.add(self.proc)
        wait_for(self._answering, 10, message="redis-server to answer")
        return self

    def _answering(self) -> bool:
        if self.proc.poll() is not None:
            raise TestbedError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
        return self.cli("ping").strip() == b"PONG"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cli(self, *args: str, stdin: bytes | None = None) -> bytes:
        """redis-cli against this server (-x: the last argument from stdin)."""
        argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *(["-x"] if stdin is not None else []), *args]
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=10).stdout

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _live_signal_servers.discard(self.proc)

    def close(self) -> None:
        self.kill9()
        if self.dir is not None:
            _rmtree(self.dir)
            self.dir = None
        _release_port(self.port)


def join_signaling(cluster, signal_url: str) -> None:
    """CREATE EXTENSION, register at signal_url, offer only loopback host candidates."""
    import psycopg

    cluster.sql("create extension if not exists aquapeer cascade")
    cluster.sql("insert into peer.signal_server (url) values (%s)", signal_url)
    cluster.sql("update peer.config set ice_host_addresses = '{127.0.0.1}'")
    wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null"), 20,
             message=f"{cluster.name}'s worker", ignore=(psycopg.Error,))
    cluster.sql("select peer.reload_worker()")


def befriend(a, a_name: str, b, b_name: str) -> None:
    """Make a and b friends: each adds the other's invite."""
    a.sql("select peer.add_friend(%s, %s)", b_name, b.scalar("select peer.invite()"))
    b.sql("select peer.add_friend(%s, %s)", a_name, a.scalar("select peer.invite()"))


def connected_friends(a, b, signal_url: str, friend_role: str | None = None) -> None:
    """a and b on one signaling server, friends under their cluster names, connected; each
    acting as friend_role (a login role made on both) for the other when one is given."""
    for cluster in (a, b):
        join_signaling(cluster, signal_url)
        if friend_role is not None:
            cluster.sql(f"create role {friend_role} login")
    befriend(a, a.name, b, b.name)
    if friend_role is not None:
        a.sql("select peer.set_friend_role(%s, %s)", b.name, friend_role)
        b.sql("select peer.set_friend_role(%s, %s)", a.name, friend_role)
    assert a.scalar("select peer.connect(%s)", b.name) == "connected"


def connection_state(cluster, friend: str) -> str | None:
    """The state peer.connections shows for a friend, or None."""
    rows = cluster.sql("select state from peer.connections where friend = %s", friend)
    return rows[0][0] if rows else None


def wait_connected(cluster, friend: str, timeout: float = 40) -> None:
    """Until the cluster's worker shows the friend connected (it reconnects by itself)."""
    import psycopg

    wait_for(lambda: connection_state(cluster, friend) == "connected", timeout, interval=0.2,
             message=f"{cluster.name} to be connected to {friend}", ignore=(psycopg.Error,))


# --- bundles: what tests and benchmarks of the row format share ---------------------------------

def use_row_hash_settings(conn, *, local: bool = False) -> None:
    """Put a session (a psycopg connection) under the settings bundle._row_hashes fixes
    (docs/bundles.md, "A column's text"); with local, only until its transaction ends."""
    conn.execute("select set_config(split_part(s, '=', 1), substr(s, strpos(s, '=') + 1), %s) "
                 "from pg_proc p cross join unnest(p.proconfig) s where p.oid = 'bundle._row_hashes'::regproc",
                 (local,))


def old_blob_expression(conn, relation: str) -> str:
    """The SQL expression bundle._rows_query wrote a row's blob with (alias t) before bundle._blob:
    the reference the C codec is held to and measured against."""
    return conn.execute("""
        select '''{'' || array_to_string(array['
               || string_agg(format('%%L || to_json(t.%%I::text)::text', to_json(a.attname::text)::text || ': ',
                                    a.attname), ', ' order by octet_length(a.attname), a.attname::text collate "C")
               || '], '', '') || ''}'''
        from pg_attribute a where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped""",
                        (relation,)).fetchone()[0]
