"""What the SQL functions in schema peer call: the bridge from plpy to the modules.

Only this module and db.PlpyDatabase touch plpy.  Errors a user can act on
(AquapeerError) become PostgreSQL errors with their SQLSTATE, detail and hint.
"""

import datetime
import functools
import json
import logging
import os
import sys
import threading
import time
import uuid

import plpy

from . import control, executor, friends, identity
from .bundles import integrate
from .bundles import store as bundle_store
from .db import PlpyDatabase, current_database
from .errors import AquapeerError, WorkerUnavailable
from .live import apply as live_apply
from .replication import apply as replication_apply

_db = PlpyDatabase(plpy)


class _SQLError(plpy.Error):
    """Reported by PL/Python as "aquapeer: <message>" with the error's SQLSTATE, detail and hint."""


_SQLError.__module__ = "__main__"  # PL/Python then prefixes only the class name
_SQLError.__name__ = _SQLError.__qualname__ = "aquapeer"


def sql_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AquapeerError as e:
            error = _SQLError(e.message)
            error.sqlstate, error.detail, error.hint = e.sqlstate, e.detail, e.hint
            raise error from None
    return wrapper


def _check_interrupts():
    _db.query("select peer._check_interrupts()")


def _client():
    return control.ControlClient(*current_database(_db), check_interrupts=_check_interrupts)


@sql_errors
def ping_worker():
    """Round trip to the worker over the control channel, in seconds."""
    with _client() as client:
        client.connect()
        started = time.perf_counter()
        client.request("ping", timeout=5.0)
        return time.perf_counter() - started


STATUS_COLUMNS = ("pid", "state", "started_at", "database", "python_version", "aiortc_version",
                  "aquapeer_version", "loop_lag_max_ms", "executors", "requests", "wakeups", "problem")


@sql_errors
def worker_status():
    try:
        with _client() as client:
            status = client.request("status", timeout=2.0)
        status["executors"] = json.dumps(status["executors"])
    except WorkerUnavailable:
        # No loop answers: the process may still be starting, or there is none.
        pid = _db.scalar("select peer._worker_pid()")
        status = {"pid": pid, "state": "starting" if pid else "stopped",
                  "database": _db.scalar("select pg_catalog.current_database()::text")}
    return [{column: status.get(column) for column in STATUS_COLUMNS}]


@sql_errors
def run_in_executor(role_oid, function_oid, arg, timeout_s):
    with _client() as client:
        return client.request(
            "exec", {"role": role_oid, "function": function_oid, "arg": arg,
                     "timeout_ms": int(timeout_s * 1000)},
            timeout=timeout_s + executor.ANSWER_GRACE_S + executor.START_TIMEOUT_S)


@sql_errors
def nudge_worker():
    """Wake the worker; best effort, as it runs after the caller's commit is decided."""
    try:
        with _client() as client:
            client.notify("wake")
    except AquapeerError:
        return False
    return True


def worker_answers():
    """Whether this database's worker answers on its control socket right now."""
    try:
        with _client() as client:
            client.request("ping", timeout=1.0)
    except AquapeerError:
        return False
    return True


class _ServerLogHandler(logging.Handler):
    """Python logging into the server log, from the loop's thread only (plpy is not thread-safe)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def emit(self, record):
        text = self.format(record)
        if threading.get_ident() != self.thread:
            sys.stderr.write(text + "\n")
        elif record.levelno >= logging.WARNING:
            plpy.warning(text)
        else:
            plpy.log(text)


def worker_main():
    handler = _ServerLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("aquapeer")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Imported here: it brings aiortc, which SQL sessions never need (140 ms to load in each).
    from . import worker
    try:
        worker.main(_db)
    finally:
        logger.removeHandler(handler)


def executor_main():
    executor.serve(_db)


# --- identity and friends ----------------------------------------------------

@sql_errors
def reload_worker():
    with _client() as client:
        return client.request("reload", {"full": True}, timeout=15.0)


def new_identity():
    friends.store_identity(_db, identity.Identity.generate())


@sql_errors
def invite():
    return identity.make_invite(friends.load_identity(_db), friends.signal_urls(_db), friends.display_name(_db))


@sql_errors
def rotate_identity():
    friends.store_identity(_db, friends.load_identity(_db).rotate(), rotated=True)
    return _db.scalar("select peer_id from peer.identity")


@sql_errors
def reset_identity():
    new_identity()
    return _db.scalar("select peer_id from peer.identity")


@sql_errors
def add_friend(name, invite_text):
    return friends.add_friend(_db, name, invite_text)


@sql_errors
def accept_friend(peer_id, name):
    return friends.accept_friend(_db, peer_id, name)


@sql_errors
def introduce(friend_a, friend_b, note):
    friends.introduce(_db, friends.load_identity(_db), friend_a, friend_b, note)


@sql_errors
def introduction_message(friend, message_id):
    """The handler of topic aquapeer.introduce (in an executor connected as the friend's role)."""
    return friends.receive_introduction(_db, friend, message_id)


def _end_friendship(name, statement):
    friends.friend_peer_id(_db, name)  # unknown friend: a clear error
    disconnect(name)
    _db.query(statement, [name])
    return True


@sql_errors
def remove_friend(name, reason):
    _db.query("update peer.outbox_message m set final_state = 'expired', reason = $2, "
              "finished_at = pg_catalog.clock_timestamp() "
              "where m.friend = $1 and m.final_state is null and not exists ("
              "select from peer.outbox_stream s where s.peer_id = m.peer_id and s.epoch = m.epoch "
              "and m.seq <= s.acked_upto)", [name, reason or "the friend was removed"])
    return _end_friendship(name, "delete from peer.friend where name = $1")


@sql_errors
def block(name):
    return _end_friendship(name, "update peer.friend set state = 'blocked' where name = $1")


@sql_errors
def connect(name, timeout_s):
    with _client() as client:
        return client.request("connect", {"name": name, "timeout": timeout_s}, timeout=timeout_s + 2.0)


@sql_errors
def disconnect(name):
    try:
        with _client() as client:
            return client.request("disconnect", {"name": name}, timeout=5.0)
    except WorkerUnavailable:
        return False


CONNECTION_COLUMNS = ("friend", "state", "connected_since", "rtt_ms", "bytes_sent", "bytes_received",
                      "local_candidate", "remote_candidate", "last_error", "protocol", "frames_refused",
                      "last_refusal")


@sql_errors
def connections():
    with _client() as client:
        rows = client.request("connections", timeout=5.0)
    for row in rows:
        if row.get("connected_since"):
            row["connected_since"] = datetime.datetime.fromtimestamp(
                row["connected_since"], datetime.UTC).isoformat()
    return [{c: row.get(c) for c in CONNECTION_COLUMNS} for row in rows]


def online_links():
    """Friends connected now and the round trip: none while the worker does not answer."""
    try:
        with _client() as client:
            rows = client.request("connections", timeout=2.0)
    except WorkerUnavailable:
        return []
    return [{"friend": row["friend"], "rtt_ms": row.get("rtt_ms")} for row in rows if row["state"] == "connected"]


# --- soft locks --------------------------------------------------------------------

_session = {}  # this backend's start and type, and the (relation, key) it auto-locked


def _backend(field):
    if not _session:
        _session.update(_db.query("select backend_start::text, backend_type from pg_catalog.pg_stat_activity "
                                  "where pid = pg_catalog.pg_backend_pid()")[0])
    return _session[field]


def _take_locks(relation_oid, keys, note, ttl_s, session, timeout):
    with _client() as client:
        return client.request("take_locks", {"relation": relation_oid, "keys": keys, "note": note, "ttl_s": ttl_s,
                                             "session": session, "pid": os.getpid(),
                                             "backend_start": _backend("backend_start")}, timeout=timeout)


@sql_errors
def take_locks(relation_oid, keys_json, note, ttl_s, session):
    return _take_locks(relation_oid, json.loads(keys_json), note, ttl_s, session, timeout=10.0)


AUTO_LOCK_TIMEOUT_S = 1.0


def take_auto_locks(relation_oid, keys_json):
    """Session locks on the keys this session has not locked yet.  Never fails the writer's
    statement: without a worker, the locks are not taken.  Only a client's edits are ours to
    announce: an executor writes what a friend sent or asked for."""
    if _backend("backend_type") != "client backend":
        return
    taken = _session.setdefault("auto_locked", set())
    if (relation_oid, None) in taken:
        return
    keys = [None if k is None else tuple(k) for k in json.loads(keys_json)]
    new = [k for k in dict.fromkeys(keys) if (relation_oid, k) not in taken]
    if not new:
        return
    try:
        _take_locks(relation_oid, [None if k is None else list(k) for k in new], None, None, True,
                    timeout=AUTO_LOCK_TIMEOUT_S)
    except AquapeerError:
        return
    taken.update((relation_oid, k) for k in new)


@sql_errors
def release_lock(lock_id):
    with _client() as client:
        return client.request("release_lock", {"id": lock_id}, timeout=10.0)


# --- messages and calls ----------------------------------------------------------

@sql_errors
def call(name, function, arg, timeout_s):
    if timeout_s is None or timeout_s <= 0:
        raise AquapeerError(f"timeout must be positive, not {timeout_s}", sqlstate="22023")
    with _client() as client:
        return client.request("call", {"name": name, "function": function, "arg": arg, "timeout": timeout_s},
                              timeout=timeout_s + 2.0)


@sql_errors
def retry_message(message_id):
    with _client() as client:
        return client.request("retry", {"id": message_id}, timeout=executor.START_TIMEOUT_S + executor.ANSWER_GRACE_S
                              + _db.scalar("select extract(epoch from handler_timeout)::float8 from peer.config"))


@sql_errors
def apply_changes(friend, position):
    """The handler of a friend's changes (in an executor connected as the friend's role)."""
    replication_apply.apply_pending(_db, friend, position)


# --- bundles -------------------------------------------------------------------------

@sql_errors
def bundle_commit(name, message):
    return bundle_store.commit(_db, name, message)


@sql_errors
def bundle_keep_commits(name, documents):
    return bundle_store.keep_commits(_db, name, json.loads(documents))


# How often a long pull tells its caller how far it got.
PROGRESS_NOTICE_S = 5.0


def _transfer_client(transfer):
    """A control client whose waits also raise a NOTICE with the transfer's progress now and then."""
    last = [time.monotonic()]

    def check():
        _check_interrupts()
        if time.monotonic() - last[0] >= PROGRESS_NOTICE_S:
            last[0] = time.monotonic()
            done = bundle_store.transfer_progress(_db, transfer)
            if done["bytes_done"]:
                total = f" of {done['rows_total']}" if done["rows_total"] else ""
                plpy.notice(f"aquapeer: {done['rows_done']}{total} rows, {done['objects_done']} objects, "
                            f"{done['bytes_done'] / 1e6:.1f} MB received")
    return control.ControlClient(*current_database(_db), check_interrupts=check)


@sql_errors
def pull_bundle(friend, name, checkout):
    transfer = str(uuid.uuid4())
    with _transfer_client(transfer) as client:
        return json.dumps(bundle_store.pull(_db, client, friend, name, checkout, transfer))


@sql_errors
def push_bundle(friend, name):
    with _client() as client:
        return json.dumps(bundle_store.push(_db, client, friend, name))


@sql_errors
def bundle_integrate(name, theirs, checkout):
    return json.dumps(integrate.integrate(_db, name, theirs, checkout))


# --- live rows -----------------------------------------------------------------------

@sql_errors
def live_edits(cells):
    live_apply.edit_cells(_db, json.loads(cells))


@sql_errors
def live_documents(share, row):
    return json.dumps(live_apply.new_documents(_db, share, row))


@sql_errors
def live_merge(friend, share, column, update):
    return live_apply.merge(_db, friend, share, column, update)


@sql_errors
def live_message(friend, position):
    """The handler of topic aquapeer.live (in an executor connected as the friend's role)."""
    live_apply.handle(_db, friend, position)
