"""Remote calls: peer.call on one side, an exposed function run in an executor on the other.

The caller's worker sends ``call`` with a random id and waits for
``result``; when the connection drops it reconnects and sends the same
call again while time remains.  The callee runs each call id at most once:
a repeated id joins the running call or gets the remembered result.  The
callee finds the function only through peer.exposed_function, never by
looking the name up in the catalog, and runs it in an executor connected as
the caller's friend role, with a statement timeout, in its own transaction.
"""

import asyncio
import collections
import os
import time

from .errors import AquapeerError
from .net import node as node_module
from .net import transport

# Results are remembered this long, for callers that retry after a drop.
REMEMBER_S = 300.0
REMEMBER_MAX = 10000
# A remote statement timeout needs a moment to come back before the caller gives up.
ANSWER_GRACE_S = 0.5
RESEND_PAUSE_S = 0.2

EXPOSED = """
select e.function::oid as function, f.name as friend,
       (select r.oid from pg_catalog.pg_roles r where r.rolname = f.role) as role
from peer.friend f join peer.exposed_function e on e.friend = f.name or e.friend is null
where f.peer_id = $1 and f.state = 'accepted' and e.name = $2
order by e.friend is null limit 1
"""


class CallTimeout(AquapeerError):
    sqlstate = "57014"  # query_canceled


class Unreachable(AquapeerError):
    sqlstate = "08001"  # sqlclient_unable_to_establish_sqlconnection


class Calls:
    def __init__(self, db, executors, node_getter):
        self.db = db
        self.executors = executors
        self.node = node_getter           # () -> PeerNode or None
        self.waiting = {}                 # call id -> future of the result frame
        self.running = {}                 # (peer id, call id) -> task
        self.remembered = collections.OrderedDict()  # (peer id, call id) -> (at, result frame)

    # --- the caller's side -------------------------------------------------------

    async def call(self, friend, function, arg, timeout_s):
        """The result (JSON text) of function(arg) at friend, or a clear error."""
        node = self.node()
        deadline = time.monotonic() + timeout_s
        call_id = os.urandom(16)
        future = self.waiting[call_id] = asyncio.get_running_loop().create_future()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CallTimeout(f"peer.call to {friend.name} timed out after {timeout_s:g} s")
                try:
                    link = await node.connect(friend.peer_id, remaining)
                except node_module.ConnectError as e:
                    raise Unreachable(f"{friend.name} is not reachable: {e.message}",
                                      detail=e.detail, hint=e.hint) from None
                limit = link.friend_max_message_bytes or 0
                if len(arg) > limit:
                    raise AquapeerError(f"the argument of {len(arg)} bytes is larger than {friend.name} "
                                        f"accepts ({limit} bytes)", sqlstate="54000")
                link.send({"t": "call", "id": call_id, "fn": function, "arg": arg,
                           "timeout_ms": max(1, int((deadline - time.monotonic()) * 1000))}, transport.CONTROL)
                closed = asyncio.ensure_future(link.closed.wait())
                try:
                    await asyncio.wait([future, closed], timeout=deadline - time.monotonic() + ANSWER_GRACE_S,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                if future.done():
                    return self._outcome(friend, timeout_s, future.result())
                if link.state == "connected":  # no answer in time
                    link.send({"t": "cancel", "id": call_id}, transport.CONTROL)
                    raise CallTimeout(f"peer.call to {friend.name} timed out after {timeout_s:g} s")
                await asyncio.sleep(RESEND_PAUSE_S)  # the link dropped: the same call again
        except asyncio.CancelledError:
            link = node.links.get(friend.peer_id)
            if link is not None and link.state == "connected":
                link.send({"t": "cancel", "id": call_id}, transport.CONTROL)
            raise
        finally:
            self.waiting.pop(call_id, None)

    @staticmethod
    def _outcome(friend, timeout_s, frame):
        if frame["ok"]:
            return frame["result"]
        error = frame["error"] or {"message": "no reason given", "sqlstate": "XX000"}
        if error["sqlstate"] == "57014":
            raise CallTimeout(f"peer.call to {friend.name} timed out after {timeout_s:g} s",
                              detail=f"{friend.name}: {error['message']}")
        raise AquapeerError(f"{friend.name}: {error['message']}", sqlstate=error["sqlstate"])

    def on_result(self, link, frame):
        future = self.waiting.get(frame["id"])
        if future is not None and not future.done():
            future.set_result(frame)

    # --- the callee's side ---------------------------------------------------------

    def on_call(self, link, frame):
        key = (link.peer_id, frame["id"])
        remembered = self.remembered.get(key)
        if remembered is not None:
            link.send(remembered[1], transport.CONTROL)
        elif key not in self.running:
            self.running[key] = asyncio.ensure_future(self._run(key, frame))

    def on_cancel(self, link, frame):
        task = self.running.get((link.peer_id, frame["id"]))
        if task is not None:
            task.cancel()

    async def _run(self, key, frame):
        peer_id = key[0]
        try:
            result = {"t": "result", "id": frame["id"], "ok": True, "result": None, "error": None}
            try:
                result["result"] = await self._execute(peer_id, frame)
            except AquapeerError as e:
                result.update(ok=False, error={"message": e.message[:8000], "sqlstate": (e.sqlstate or "XX000")[:5]})
            except (TimeoutError, ConnectionError) as e:
                result.update(ok=False, error={"message": f"the executor failed: {e or type(e).__name__}",
                                               "sqlstate": "58000"})
            link = self.node().links.get(peer_id)
            limit = link.friend_max_message_bytes if link is not None else None
            if result["ok"] and limit and len(result["result"] or "") > limit:
                result.update(ok=False, result=None, error={
                    "message": f"the result is larger than you accept ({limit} bytes)", "sqlstate": "54000"})
            self._remember(key, result)
            if link is not None and link.state == "connected":
                link.send(result, transport.CONTROL)
        except asyncio.CancelledError:
            pass
        finally:
            self.running.pop(key, None)

    async def _execute(self, peer_id, frame):
        rows = self.db.query(EXPOSED, [peer_id, frame["fn"]])
        self.db.commit()
        if not rows:
            raise AquapeerError(f'function "{frame["fn"]}" is not exposed to you', sqlstate="42883")
        if rows[0]["role"] is None:
            raise AquapeerError("the role you act as here does not exist", sqlstate="42704")
        timeout_ms = frame["timeout_ms"]
        reply = await self.executors.run(
            rows[0]["role"], {"op": "call", "args": {"function": rows[0]["function"], "arg": frame["arg"],
                                                     "friend": rows[0]["friend"], "timeout_ms": timeout_ms}},
            timeout_ms / 1000.0)
        if not reply.get("ok"):
            raise AquapeerError.from_dict(reply.get("error") or {})
        return reply.get("result")

    def _remember(self, key, result):
        now = time.monotonic()
        self.remembered[key] = (now, result)
        while self.remembered and (len(self.remembered) > REMEMBER_MAX
                                   or next(iter(self.remembered.values()))[0] < now - REMEMBER_S):
            self.remembered.popitem(last=False)

    def on_frame(self, link, frame):
        handler = {"call": self.on_call, "result": self.on_result, "cancel": self.on_cancel}.get(frame["t"])
        if handler is None:
            return False
        handler(link, frame)
        return True

    def close(self):
        for task in self.running.values():
            task.cancel()
