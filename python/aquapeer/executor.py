"""Executors: where SQL that friends cause runs, never on the network worker.

An executor is a dynamic background worker connected to the database as
the role the work must run as (not a superuser that switches role).  The
worker starts one with a random nonce in its bgw_extra; the executor
connects back to the worker's control socket and proves itself with that
nonce.  Then the worker hands it one request at a time and keeps a few idle
executors per role warm.

The worker's side (ExecutorPool) is asyncio; the executor's side (serve)
is a blocking loop in the executor process.
"""

import asyncio
import os
import secrets
import select
import signal
import socket
import time

from . import control, retention
from .bundles import store as bundle_store
from .db import current_database
from .errors import AquapeerError, DatabaseError

START_TIMEOUT_S = 10.0
# What an executor may take beyond its statement_timeout before it is given up on.
ANSWER_GRACE_S = 5.0
STOP_POLL_S = 0.25


class ExecutorConnection:
    """The worker's end of one executor's control connection."""

    def __init__(self, role_oid, pid, reader, writer):
        self.role_oid = role_oid
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.closed = asyncio.Event()
        self.idle_since = time.monotonic()

    async def request(self, message):
        await control.write_frame(self.writer, message)
        reply = await control.read_frame(self.reader)
        if reply is None:
            raise ConnectionError(f"executor {self.pid} closed its connection")
        return reply

    def cancel_request(self):
        """Cancel what the executor is running, as pg_cancel_backend would."""
        try:
            os.kill(self.pid, signal.SIGINT)
        except (ProcessLookupError, TypeError):
            pass

    def close(self):
        if not self.closed.is_set():
            self.writer.close()
            self.closed.set()


class ExecutorPool:
    """Starts executors through the database, hands them requests, keeps some warm."""

    def __init__(self, start_executor, pool_size=2, idle_timeout_s=60.0, limit=4):
        self.start_executor = start_executor  # (role_oid, nonce) -> None
        self.pool_size = pool_size
        self.idle_timeout_s = idle_timeout_s
        # Busy executors at most: each is a background worker slot, and friends
        # must not be able to take all of max_worker_processes.
        self.limit = limit
        self.slots = asyncio.Semaphore(limit)
        self.idle = {}      # role oid -> [ExecutorConnection]
        self.busy = set()
        self.pending = {}   # nonce -> (role oid, future)
        self.started = 0

    def stats(self):
        return {"idle": sum(len(v) for v in self.idle.values()), "busy": len(self.busy),
                "started": self.started}

    async def run(self, role_oid, message, timeout_s):
        """Run one request in an executor connected as role_oid; return its reply."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.slots.acquire()
        except TimeoutError:
            raise AquapeerError(f"all {self.limit} executors stayed busy for {timeout_s:g} s", sqlstate="53000",
                                hint="Raise peer.config.executor_limit, or make the work faster.") from None
        try:
            return await self._run(role_oid, message, timeout_s)
        finally:
            self.slots.release()

    async def _run(self, role_oid, message, timeout_s):
        conn = self._take_idle(role_oid) or await self._spawn(role_oid)
        self.busy.add(conn)
        try:
            reply = await asyncio.wait_for(conn.request(message), timeout_s + ANSWER_GRACE_S)
        except BaseException:
            # Timed out, lost, or the caller went away mid-request: stop the
            # work, and do not reuse an executor whose state is unknown.
            conn.cancel_request()
            conn.close()
            raise
        finally:
            self.busy.discard(conn)
        self._give_back(conn)
        return reply

    def _take_idle(self, role_oid):
        conns = self.idle.get(role_oid, [])
        while conns:
            conn = conns.pop()
            if not conn.closed.is_set():
                return conn
        return None

    def _give_back(self, conn):
        conns = self.idle.setdefault(conn.role_oid, [])
        if len(conns) >= self.pool_size:
            conn.close()
        else:
            conn.idle_since = time.monotonic()
            conns.append(conn)

    async def _spawn(self, role_oid):
        nonce = secrets.token_hex(16)
        future = asyncio.get_running_loop().create_future()
        self.pending[nonce] = (role_oid, future)
        try:
            self.start_executor(role_oid, nonce)
            self.started += 1
            return await asyncio.wait_for(future, START_TIMEOUT_S)
        except TimeoutError:
            raise AquapeerError(
                f"an aquapeer executor for role {role_oid} did not start within {START_TIMEOUT_S:.0f} s",
                hint="See the server log: the role must be allowed to log in and to connect to this database.",
            ) from None
        finally:
            self.pending.pop(nonce, None)

    async def adopt(self, hello, reader, writer):
        """Take over a connection that introduced itself as an executor; lasts as long as it does."""
        entry = self.pending.get(hello.get("nonce"))
        if entry is None or entry[1].done():
            writer.close()
            return
        role_oid, future = entry
        conn = ExecutorConnection(role_oid, hello.get("pid"), reader, writer)
        future.set_result(conn)
        await conn.closed.wait()

    def reap_idle(self):
        now = time.monotonic()
        for conns in self.idle.values():
            for conn in [c for c in conns if now - c.idle_since > self.idle_timeout_s]:
                conns.remove(conn)
                conn.close()

    def close(self):
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        for conn in list(self.busy):
            conn.close()
        self.idle.clear()


# --- the executor's side ---------------------------------------------------

def _qualified_function(db, function_oid):
    name = db.scalar(
        "select format('%I.%I', n.nspname, p.proname) from pg_catalog.pg_proc p "
        "join pg_catalog.pg_namespace n on n.oid = p.pronamespace where p.oid = $1::pg_catalog.oid",
        [function_oid])
    if name is None:
        raise DatabaseError(f"function {function_oid} does not exist", sqlstate="42883")
    return name


def _answer(db, work):
    """work() in its own transaction: its result, committed, or the error, rolled back."""
    try:
        result = work()
        db.commit()
        return {"ok": True, "result": result}
    except AquapeerError as e:
        db.rollback()
        return {"ok": False, "error": e.as_dict()}


def _bounded(db, timeout_ms, work):
    """_answer(work) under a statement timeout."""
    def armed():
        db.query("select peer._arm_statement_timeout($1::integer)", [max(1, int(timeout_ms))])
        try:
            return work()
        finally:
            db.query("select peer._arm_statement_timeout(0)")
    return _answer(db, armed)


def handle_call(db, args):
    """Run function(arg jsonb), returning jsonb as text.  peer.caller names the calling friend
    meanwhile (a setting the caller cannot make: the executor sets it, in this transaction)."""
    def work():
        db.query("select pg_catalog.set_config('peer.caller', $1, true)", [args.get("friend") or ""])
        return db.scalar(f"select {_qualified_function(db, args['function'])}($1::jsonb)::text", [args["arg"]])
    return _bounded(db, args["timeout_ms"], work)


def handle_message(db, args):
    """Run handler(message) and mark the message handled in the same transaction: it runs once."""
    def work():
        db.query(f"select {_qualified_function(db, args['function'])}"
                 "(pg_catalog.jsonb_populate_record(null::peer.inbox, $1::jsonb))", [args["row"]])
        db.query("select peer._message_handled($1::uuid)", [args["id"]])
    return _bounded(db, args["timeout_ms"], work)


def handle_retention(db, args):
    return _answer(db, lambda: retention.run(db))


HANDLERS = {"call": handle_call, "handle": handle_message, "retention": handle_retention,
            "bundle_serve": lambda db, args: _answer(db, lambda: bundle_store.serve(db, args)),
            "bundle_store": lambda db, args: _answer(db, lambda: bundle_store.store(db, args))}


def _recv_exactly(sock, n):
    chunks, have = [], 0
    while have < n:
        chunk = sock.recv(n - have)
        if not chunk:
            return None
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def serve(db):
    """The executor's loop: answer the worker's requests until it lets go."""
    nonce = db.scalar("select peer._executor_nonce()")
    database_oid, _name = current_database(db)
    db.commit()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(control.socket_path(database_oid))
        sock.sendall(control.encode_frame({"op": "executor_hello", "nonce": nonce, "pid": os.getpid()}))
        while True:
            readable, _, _ = select.select([sock], [], [], STOP_POLL_S)
            if not readable:
                stop = db.scalar("select peer._should_stop()")
                db.commit()
                if stop:
                    return
                continue
            header = _recv_exactly(sock, 4)
            if header is None:
                return  # the worker closed this executor
            message = control.decode_body(_recv_exactly(sock, control.frame_length(header)))
            handler = HANDLERS.get(message.get("op"))
            reply = (handler(db, message.get("args") or {}) if handler else
                     {"ok": False, "error": AquapeerError(f"unknown executor request {message.get('op')!r}").as_dict()})
            sock.sendall(control.encode_frame(reply))
    finally:
        sock.close()
