"""The network worker: one asyncio loop per database, inside CALL peer.worker_main().

Rules this loop lives by (learned the hard way on PostgreSQL 15):
- plpy is called only from this thread, and SQL work stays short: aiortc's
  ICE consent checks share the loop;
- every unit of database work ends with a commit before the loop awaits
  the network, so an idle worker holds no snapshot and no transaction id;
- SIGTERM only sets a flag in C; the loop polls peer._should_stop() at
  least every 0.5 s, which also lets PostgreSQL process cancels;
- no Python signal handlers are installed.
"""

import asyncio
import collections
import datetime
import importlib.metadata
import logging
import os
import platform
import time

from . import __version__, control, friends
from .bundles import follow as bundle_follow
from .bundles.transfer import Transfers
from .calls import Calls
from .db import current_database
from .errors import UNDEFINED_OBJECT_STATES, AquapeerError, DatabaseError
from .executor import ExecutorPool
from .live import expiry as live_expiry
from .messaging import Messaging
from .net import transport
from .net.node import PeerNode
from .presence import Presence
from .replication import resume as replication_resume

STOP_POLL_S = 0.25
LAG_TICK_S = 0.1
LAG_WINDOW_S = 60
REAP_INTERVAL_S = 5.0
IDENTITY_POLL_S = 1.0

log = logging.getLogger(__name__)


def restored_copy_problem(peer_id):
    """Why a copy restored from a dump stays offline, and the two ways on (docs/moving.md)."""
    return (f"this database was restored from a dump of peer {peer_id}; run `select peer.keep_identity()` "
            "if it replaces the original (the original must stop), or `select peer.reset_identity()` "
            "to become a new peer (friends must add it again)")


async def cancel_and_wait(tasks):
    """Cancel tasks and wait until each has ended.  One cancel may be lost: Python 3.11's
    asyncio.wait_for returns as usual when what it waits for finished as its task was cancelled,
    and a loop around it goes on.  So cancel again every STOP_POLL_S until none is left."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_POLL_S)
    await asyncio.gather(*tasks, return_exceptions=True)  # (each has ended: their errors, retrieved)


class LoopLag:
    """How late the loop wakes up, as the maximum per second over a recent window."""

    def __init__(self, window_s=LAG_WINDOW_S):
        self.window_s = window_s
        self.per_second = collections.deque(maxlen=window_s)  # [second, max lag in s]

    def record(self, now, lag):
        second = int(now)
        if self.per_second and self.per_second[-1][0] == second:
            self.per_second[-1][1] = max(self.per_second[-1][1], lag)
        else:
            self.per_second.append([second, lag])

    def max_ms(self, now):
        recent = [lag for second, lag in self.per_second if second > now - self.window_s]
        return round(max(recent, default=0.0) * 1000.0, 3)

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            self.record(time.time(), max(0.0, loop.time() - before - LAG_TICK_S))


class Worker:
    def __init__(self, db):
        self.db = db
        self.database_oid, self.database_name = current_database(db)
        # Retention runs in an executor connected as this worker's own role.
        self.retention_role = db.scalar("select oid from pg_catalog.pg_roles where rolname = current_user")
        config = db.query("select executor_pool_size, executor_limit, "
                          "extract(epoch from executor_idle_timeout)::float8 as idle_s from peer.config")
        # What the worker acknowledges to friends must survive a crash,
        # whatever the database's default.
        db.query("set synchronous_commit = on")
        # Transfers are driven by the worker: any still running lost theirs.
        db.query("update peer.transfer set state = 'failed', error = 'the worker stopped during the transfer', "
                 "finished_at = now(), updated_at = now() where state = 'running'")
        db.commit()
        pool_size, limit, idle_s = (config[0]["executor_pool_size"], config[0]["executor_limit"],
                                    config[0]["idle_s"])
        self.started_at = datetime.datetime.now(datetime.UTC)
        self.lag = LoopLag()
        self.executors = ExecutorPool(self._start_executor, pool_size, idle_s, limit)
        self.wakeups = 0
        self.requests = 0
        self.node = None
        self.problem = None  # why this worker does not reach friends, when it does not
        self.messaging = Messaging(db, self.executors, lambda: self.node)
        self.calls = Calls(db, self.executors, lambda: self.node)
        self.transfers = Transfers(db, self.executors, lambda: self.node, self.retention_role)
        self.presence = Presence(db, lambda: self.node)
        self.ops = {"ping": self.op_ping, "status": self.op_status, "exec": self.op_exec,
                    "connect": self.op_connect, "disconnect": self.op_disconnect,
                    "connections": self.op_connections, "reload": self.op_reload,
                    "call": self.op_call, "retry": self.op_retry,
                    "bundle_head": self.op_bundle_head, "bundle_forget_new": self.op_bundle_forget_new,
                    "pull": self.op_pull, "push": self.op_push,
                    "take_locks": self.presence.take_locks, "release_lock": self.presence.release_lock}

    # --- the peer node ------------------------------------------------------

    def _ice_servers(self):
        """STUN and TURN servers, the preferred ones first, and the ICE settings."""
        config = self.db.query(
            "select (select array_agg(pg_catalog.host(a)) from unnest(ice_host_addresses) a) as hosts, "
            "ice_host_addresses is not null as restricted, ice_transport_policy, stun_server_id, turn_server_id "
            "from peer.config")[0]
        stun = [r["url"] for r in self.db.query(
            "select url from peer.stun_server order by id is distinct from $1, priority, id",
            [config["stun_server_id"] or 0])]
        turn = [(r["url"], r["username"], r["credential"]) for r in self.db.query(
            "select url, username, credential from peer.turn_server "
            "order by id is distinct from $1, priority, id", [config["turn_server_id"] or 0])]
        transport.configure_ice(config["hosts"] or [] if config["restricted"] else None)
        return transport.IceServers(stun, turn, relay_only=config["ice_transport_policy"] == "relay")

    async def start_node(self):
        """Register at the signaling server and keep friends connected; a no-op without one."""
        restored_from = self.db.scalar("select peer_id from peer.identity_restored")
        self.db.commit()
        if restored_from is not None:
            # Two live copies of one peer would take each other's registration and links.
            self.problem = restored_copy_problem(restored_from)
            log.warning("%s", self.problem)
            return
        urls = friends.signal_urls(self.db)
        me = friends.load_identity(self.db)
        ice = self._ice_servers()
        book = friends.DbFriendBook(self.db)
        self.db.commit()
        if not urls:
            return
        self.node = PeerNode(me, book, urls[0], ice, name=self._display_name, fallback_signal_urls=urls[1:],
                             on_frame=self.on_frame, on_connected=self.on_link_up,
                             on_disconnected=self.presence.on_link_down,
                             message_limit=self._message_limit)
        await self.node.start()

    async def stop_node(self):
        if self.node is not None:
            node, self.node = self.node, None
            await node.stop()

    def _display_name(self):
        name = friends.display_name(self.db)
        self.db.commit()
        return name

    def _message_limit(self):
        limit = self.db.scalar("select max_message_bytes from peer.config")
        self.db.commit()
        return limit

    def on_link_up(self, link):
        self.messaging.on_link_up(link)
        self.presence.on_link_up(link)

    def on_frame(self, link, frame):
        """Frames for messaging, calls, transfers and presence; anything else a friend sends is refused."""
        try:
            handled = (self.messaging.on_frame(link, frame) or self.calls.on_frame(link, frame)
                       or self.transfers.on_frame(link, frame) or self.presence.on_frame(link, frame))
        except AquapeerError as e:  # a well-formed frame whose content the database refuses
            self.db.rollback()
            link.refuse(f"{frame['t']} frame refused: {e.message}")
            return
        if not handled:
            link.refuse(f"unexpected {frame['t']} frame")

    def _node(self):
        if self.problem is not None:
            raise AquapeerError(self.problem, sqlstate="55000")
        if self.node is None:
            raise AquapeerError("no signaling server is configured, so this database cannot reach friends",
                                hint="INSERT INTO peer.signal_server (url) VALUES ('wss://…'); "
                                     "then SELECT peer.reload_worker().")
        return self.node

    # --- database work, always committed before the loop awaits ---------

    def _start_executor(self, role_oid, nonce):
        self.db.query("select peer._start_executor($1::pg_catalog.oid, $2)", [role_oid, nonce])
        self.db.commit()

    def poll_stop(self):
        """Why to stop, or None: a stop request, a dying postmaster, a closing database, a dropped extension."""
        try:
            reason = self.db.scalar("select peer._should_stop()")
        except DatabaseError as e:
            if e.sqlstate not in UNDEFINED_OBJECT_STATES:
                raise
            reason = "extension aquapeer was dropped"
        self.db.commit()
        return reason

    async def watch_stop(self):
        while True:
            reason = self.poll_stop()
            if reason:
                return reason
            await asyncio.sleep(STOP_POLL_S)

    async def reap(self):
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            self.executors.reap_idle()

    # --- the control channel ---------------------------------------------

    async def serve_connection(self, reader, writer):
        try:
            while True:
                message = await control.read_frame(reader)
                if message is None:
                    break
                op = message.get("op")
                if op == "executor_hello":
                    await self.executors.adopt(message, reader, writer)
                    return
                if op == "wake":
                    self.wakeups += 1
                    self.messaging.wake()
                    continue
                reply = await self.answer_unless_caller_leaves(message, reader)
                if reply is None:
                    break
                await control.write_frame(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError, AquapeerError):
            pass
        finally:
            writer.close()

    async def answer_unless_caller_leaves(self, message, reader):
        """The answer, or None when the caller hung up first (cancelled, timed out)."""
        answer = asyncio.create_task(self.answer(message))
        # Callers send one request at a time, so anything readable now is the end.
        caller_left = asyncio.create_task(reader.read(1))
        done, _ = await asyncio.wait({answer, caller_left}, return_when=asyncio.FIRST_COMPLETED)
        if answer in done:
            caller_left.cancel()
            await asyncio.gather(caller_left, return_exceptions=True)
            return answer.result()
        await cancel_and_wait([answer])
        return None

    async def answer(self, message):
        self.requests += 1
        reply = {"id": message.get("id")}
        handler = self.ops.get(message.get("op"))
        try:
            if handler is None:
                raise AquapeerError(f"unknown control request {message.get('op')!r}",
                                    hint="The SQL functions and the worker are of different versions; "
                                         "restart the worker.")
            reply.update(ok=True, result=await handler(message.get("args") or {}))
        except AquapeerError as e:
            reply.update(ok=False, error=e.as_dict())
        return reply

    async def op_ping(self, args):
        return {"pid": os.getpid(), "at": time.time()}

    async def op_status(self, args):
        try:
            aiortc_version = importlib.metadata.version("aiortc")
        except importlib.metadata.PackageNotFoundError:
            aiortc_version = None
        return {
            "pid": os.getpid(),
            "state": "running",
            "started_at": self.started_at.isoformat(),
            "database": self.database_name,
            "python_version": platform.python_version(),
            "aiortc_version": aiortc_version,
            "aquapeer_version": __version__,
            "loop_lag_max_ms": self.lag.max_ms(time.time()),
            "executors": self.executors.stats(),
            "requests": self.requests,
            "wakeups": self.wakeups,
            "problem": self.problem,
        }

    def _accepted_friend(self, name):
        friend = self._node().friends.by_name(name)
        if friend is None:
            raise friends.unknown_friend(name)
        if not friend.accepted:
            raise AquapeerError(f'friend "{friend.name}" is blocked', sqlstate="42501")
        return friend

    async def op_connect(self, args):
        friend = self._accepted_friend(args["name"])
        await self.node.connect(friend.peer_id, float(args["timeout"]))
        return "connected"

    async def op_call(self, args):
        """peer.call: the result of a friend's exposed function, as JSON text."""
        friend = self._accepted_friend(args["name"])
        return await self.calls.call(friend, args["function"], args["arg"], float(args["timeout"]))

    async def op_bundle_head(self, args):
        """The friend's head of a bundle and its tables; the bundle made to exist here."""
        return await self.transfers.head(self._accepted_friend(args["name"]), args["bundle"])

    async def op_bundle_forget_new(self, args):
        """A first pull's bundle, when the caller refused the friend's tables before anything came."""
        await self.transfers.forget_new(args["bundle"])

    async def op_pull(self, args):
        """peer.pull_bundle's fetch: keep what the friend has of the bundle and we lack."""
        return await self.transfers.pull(self._accepted_friend(args["name"]), args["bundle"], args["transfer"])

    async def op_push(self, args):
        return await self.transfers.push(self._accepted_friend(args["name"]), args["bundle"])

    async def op_retry(self, args):
        """peer.retry_message: run a message's handler again, now."""
        return await self.messaging.retry(args["id"])

    async def op_disconnect(self, args):
        if self.node is None:
            return False  # no signaling server, so no connections
        friend = self.node.friends.by_name(args["name"])
        return friend is not None and self.node.disconnect(friend.peer_id)

    async def op_connections(self, args):
        if self.node is None:
            return []
        names = {f.peer_id: f.name for f in self.node.friends.everyone()}
        return [{"friend": names[peer_id], **link.stats()}
                for peer_id, link in {**self.node.last_closed, **self.node.links}.items() if peer_id in names]

    async def op_reload(self, args):
        """peer.reload_worker(): take up changed servers and ICE settings; every link is remade."""
        await self.stop_node()
        await self.start_node()
        return True

    async def watch_identity(self):
        """Take up peer.rotate_identity() and peer.reset_identity() once they commit; leave
        after ALTER EXTENSION aquapeer UPDATE, so that a new process loads the new code; end,
        for the loop to start again, when a restore marks the identity or the mark goes."""
        seen = None
        while True:
            await asyncio.sleep(IDENTITY_POLL_S)
            row = self.db.query("select peer_id, rotated_at::text as rotated, (select extversion from "
                                "pg_catalog.pg_extension where extname = 'aquapeer') as version, "
                                "exists (select from peer.identity_restored) as restored from peer.identity")
            self.db.commit()
            if row and row[0]["version"] != __version__:
                raise AquapeerError(f"the extension is now version {row[0]['version']}, this worker runs "
                                    f"{__version__}: leaving, to be restarted with the new version")
            if row and row[0]["restored"] != (self.problem is not None):
                # Started afresh, the loop draws the stream epoch and goes online (or stays offline) anew.
                log.info("the identity was marked restored, kept or reset: starting the loop again")
                return "the identity was marked restored, kept or reset"
            current = (row[0]["peer_id"], row[0]["rotated"]) if row else None
            if None not in (seen, current) and current != seen and self.node is not None:
                if current[0] != seen[0]:
                    await self.op_reload({})  # a new peer altogether
                else:
                    self.node.set_identity(friends.load_identity(self.db))
                    self.db.commit()
            seen = current

    async def op_exec(self, args):
        """Run function(arg) in an executor connected as the given role."""
        reply = await self.executors.run(
            int(args["role"]),
            {"op": "call", "args": {"function": int(args["function"]), "arg": args["arg"],
                                    "timeout_ms": int(args["timeout_ms"])}},
            int(args["timeout_ms"]) / 1000.0)
        if not reply.get("ok"):
            raise AquapeerError.from_dict(reply.get("error") or {})
        return reply.get("result")

    # --- the loop ----------------------------------------------------------

    async def run(self):
        server, path = await control.start_server(self.database_oid, self.serve_connection)
        self.messaging.start_epoch()
        tasks = [asyncio.create_task(coro) for coro in (
            self.watch_stop(), self.lag.run(), self.reap(), self.watch_identity(), self.messaging.run_pickup(),
            self.messaging.run_handlers(), self.messaging.run_retention(self.retention_role),
            replication_resume.run(self.db, self.messaging),
            live_expiry.run(self.db, self.messaging, lambda: self.node),
            bundle_follow.run(self.transfers), self.presence.run())]
        try:
            await self.start_node()
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for ending in (tasks[0], tasks[3]):  # a stop, or a restored identity's mark that changed
                if ending in done:
                    return ending.result()
            # Any other task ends only by failing: fail loudly, and be restarted.
            failed = done.pop()
            failed.result()
            raise AquapeerError(f"worker task {failed.get_coro().__qualname__} ended")
        finally:
            server.close()
            self.messaging.close()
            self.calls.close()
            self.transfers.close()
            await self.stop_node()
            self.executors.close()
            await cancel_and_wait(tasks)
            if os.path.exists(path):
                os.unlink(path)


def main(db):
    """Run the worker's loop until a stop is requested or the extension is dropped."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(Worker(db).run())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
