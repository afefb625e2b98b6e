"""Bundle transfers between friends over the data channel (protocols 2 to 6): pull and push.

A pull is a have/want walk the puller drives.  It sends the ids of the
commits it has and gets back the signed commits it lacks.  Then it asks for
the trees of those commits top down, only for objects it lacks: roots, then
what they lack below them, down to the rows' blobs.  Each answer is kept at
once, in an executor's own transaction: checked against the ids, blobs in
the bundle's store and tree nodes pending until everything below them is
there.  A pull that broke off therefore resumes where it stopped.  When the
walk ends, the pending nodes and then the commits join the store.  From
protocol 4 commits come in pages and objects larger than an answer in
slices, so neither a long history nor a large row outgrows a message.  From
protocol 5 a clone asks for buckets with their blobs: one request, and one
step keeping each bucket complete, instead of the bucket, then its blobs by id,
then a walk at the end checking that each is there.  From protocol 6 the
answers are compressed with zstd, not zlib (wire.pack_body).  Moving
the head, merging and checking out are left to the caller's transaction
(bundle_store.pull).

A push asks the friend to pull from us.  Until that pull ends, the friend
may read the bundle, shared or not.  The friend then only fast-forwards its
head.

The network worker runs no SQL of its own here beyond looking up a friend.
The puller's steps run in executors connected as the worker's role
(bundle_store.store).  What a friend may read is served by executors connected as
the friend's role (bundle_store.serve), which check that it is shared.
"""

import asyncio
import collections
import os
import uuid

from ..calls import Unreachable
from ..errors import AquapeerError
from ..net import node as node_module
from ..net import transport, wire
from . import commits
from . import store as bundle_store

OBJECTS_PER_REQUEST = 5000
# A clone's buckets come with their blobs (protocol 5): about 5 kB each in a table of a million
# rows, so that 500 fill most of an answer.
BUCKETS_PER_REQUEST = 500
# Requests in flight per transfer: each holds an executor on both sides while it is served or kept.
REQUESTS_IN_FLIGHT = 2
REQUEST_TIMEOUT_S = 120.0
STORE_TIMEOUT_S = 600.0
SERVE_TIMEOUT_S = 120.0

FRIEND = """
select f.name, (select r.oid from pg_catalog.pg_roles r where r.rolname = f.role) as role
from peer.friend f where f.peer_id = $1 and f.state = 'accepted'
"""


class TransferFailed(AquapeerError):
    sqlstate = "08006"  # connection_failure


class Transfers:
    def __init__(self, db, executors, node_getter, own_role):
        self.db = db
        self.executors = executors
        self.node = node_getter           # () -> PeerNode or None
        self.own_role = own_role          # the worker's role: executors keeping what arrives
        self.waiting = {}                 # request id -> future of the bundle_data frame
        self.serving = set()              # tasks answering friends
        self.push_grants = collections.Counter()  # (peer id, bundle) -> pushes in progress

    # --- asking a friend ---------------------------------------------------------------------------

    async def link_to(self, friend, timeout_s=30.0):
        try:
            link = await self.node().connect(friend.peer_id, timeout_s)
        except node_module.ConnectError as e:
            raise Unreachable(f"{friend.name} is not reachable: {e.message}", detail=e.detail, hint=e.hint) from None
        if (link.protocol or 0) < wire.BUNDLES_PROTOCOL:
            raise AquapeerError(f"{friend.name} runs an aquapeer without bundle transfers (protocol {link.protocol})",
                                sqlstate="0A000", hint=f"{friend.name} must update aquapeer.")
        return link

    async def _ask(self, link, name, frame, unpack=True):
        """The body of the friend's answer to one request (packed bytes unless unpack)."""
        request_id = os.urandom(16)
        future = self.waiting[request_id] = asyncio.get_running_loop().create_future()
        closed = asyncio.ensure_future(link.closed.wait())
        try:
            link.send({**frame, "id": request_id}, transport.CONTROL)
            await asyncio.wait([future, closed], timeout=REQUEST_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        except transport.LinkClosed:
            pass
        finally:
            closed.cancel()
            self.waiting.pop(request_id, None)
        if not future.done():
            if link.state == "connected":
                raise TransferFailed(f"{name} did not answer a bundle request within {REQUEST_TIMEOUT_S:.0f} s")
            raise TransferFailed(f"the connection to {name} was lost during the transfer",
                                 hint="Pull again: what arrived is kept and is not sent again.")
        reply = future.result()
        if not reply["ok"]:
            error = reply["error"] or {"message": "no reason given", "sqlstate": "XX000"}
            raise AquapeerError(f"{name}: {error['message']}", sqlstate=error["sqlstate"])
        if reply["data"] is None:
            raise wire.WireError(f"{name} answered a bundle request without a body")
        return wire.unpack_body(reply["data"], wire.BODY_LIMIT) if unpack else reply["data"]

    async def _store(self, step, **args):
        reply = await self.executors.run(self.own_role, {"op": "bundle_store", "args": {"step": step, **args}},
                                         STORE_TIMEOUT_S)
        if not reply.get("ok"):
            raise AquapeerError.from_dict(reply.get("error") or {})
        return reply.get("result")

    async def head(self, friend, bundle):
        """The friend's head of a bundle and its tables, and that the bundle exists here to keep
        objects in (pulling needs both before the caller checks its tables).  A bundle made here
        for a friend who then refuses it is taken back: a refused pull leaves nothing."""
        link = await self.link_to(friend)
        # Side by side: each may have to start an executor first (a fifth of a second).
        info, created = await asyncio.gather(
            self._ask(link, friend.name, {"t": "bundle_get", "bundle": bundle, "want": "head", "ids": []}),
            self._store("create", bundle=bundle), return_exceptions=True)
        if isinstance(created, BaseException):
            raise created
        if not isinstance(info, BaseException) and not (
                isinstance(info, dict) and isinstance(info.get("tables"), list)):
            info = wire.WireError(f"{friend.name} answered with a malformed bundle head")
        if isinstance(info, BaseException):
            if created:
                await self.forget_new(bundle)
            raise info
        return {"head": info.get("head"), "tables": info["tables"]}

    async def forget_new(self, bundle):
        """Take back a bundle head() made, while nothing is kept in it."""
        await self._store("forget_new", bundle=bundle)

    async def pull(self, friend, bundle, transfer, direction="pull", link=None):
        """Fetch and keep the commits of the friend's bundle that we lack, with their objects."""
        link = link or await self.link_to(friend)
        have = await self._store("prepare", bundle=bundle)
        documents = await self._commits(link, friend.name, bundle, have)
        roots = sorted({str(d["commit"].get("tree")) for d in documents})
        rows_total = sum(d["commit"].get("rows_changed") or 0 for d in documents
                         if isinstance(d["commit"].get("rows_changed"), int))
        await self._store("start", bundle=bundle, transfer=transfer, friend=friend.name, direction=direction,
                          rows_total=rows_total)
        try:
            lacking = await self._store("lacking", bundle=bundle, objects=[[root, ""] for root in roots])
            # A clone lacks every blob a bucket names, so they may as well come with it.
            await self._walk(link, friend.name, bundle, transfer, lacking,
                             with_blobs=not have and link.protocol >= wire.BUCKET_BLOBS_PROTOCOL)
            kept = await self._store("finish", bundle=bundle, transfer=transfer, roots=roots, documents=documents)
        except BaseException as e:
            state = "cancelled" if isinstance(e, asyncio.CancelledError) else "failed"
            ending = asyncio.ensure_future(self._store("end", bundle=bundle, transfer=transfer, state=state,
                                                       error=getattr(e, "message", None) or str(e) or type(e).__name__))
            await asyncio.gather(asyncio.shield(ending), return_exceptions=True)
            raise
        return {"commits": kept, "transfer": transfer}

    async def _commits(self, link, name, bundle, have):
        """The signed commits of the friend's bundle that we lack (we have the commits have lists,
        the newest).  From protocol 4 they come in pages, newest first, and each next page starts
        from the parents we still lack."""
        known, have = set(have), [bytes.fromhex(c) for c in have]
        documents, lacking = {}, []
        while True:
            starts = {"from": [bytes.fromhex(c) for c in lacking[:wire.MAX_ITEMS]]} if lacking else {}
            page = await self._ask(link, name, {"t": "bundle_get", "bundle": bundle, "want": "commits", "ids": have,
                                                **starts})
            if not isinstance(page, list) or not all(
                    isinstance(d, dict) and isinstance(d.get("commit"), dict) and isinstance(d.get("id"), str)
                    and isinstance(d["commit"].get("parents"), list) for d in page):
                raise wire.WireError(f"{name} answered with malformed commits")
            new = {d["id"]: d for d in page if d["id"] not in documents}
            documents.update(new)
            if link.protocol < wire.LARGE_TRANSFERS_PROTOCOL or not new:
                # (A parent the friend did not send is refused when the commits are kept.)
                return list(documents.values())
            parents = {p for d in new.values() for p in d["commit"]["parents"]
                       if isinstance(p, str) and commits.ID.fullmatch(p) and p not in documents and p not in known}
            lacking = sorted((set(lacking) - new.keys()) | set(
                await self._store("unknown_commits", bundle=bundle, ids=sorted(parents)) if parents else []))
            if not lacking:
                return list(documents.values())

    async def _walk(self, link, name, bundle, transfer, lacking, with_blobs=False):
        """Ask for what the bundle lacks ([id, place] each), keep it, and go on with what it still
        lacks below that, depth first so that the list waiting stays short; with_blobs, each
        bucket with its blobs (protocol 5)."""
        work, busy = list(lacking), 0
        # Each [id, place] is asked for once: a node two parents name (a bucket under the fan nodes
        # of two commits) is lacking for both until it is kept, and with its blobs it is costly.
        queued = {tuple(o) for o in work}
        per_request = BUCKETS_PER_REQUEST if with_blobs else OBJECTS_PER_REQUEST
        blobs = {"blobs": True} if with_blobs else {}
        changed = asyncio.Condition()

        def work_left_or_all_idle():
            return work or busy == 0

        async def worker():
            nonlocal busy
            while True:
                async with changed:
                    await changed.wait_for(work_left_or_all_idle)
                    if not work:
                        return
                    batch = work[-per_request:]
                    del work[-per_request:]
                    busy += 1
                found, again = [], []
                try:
                    data = await self._ask(link, name, {"t": "bundle_get", "bundle": bundle, "want": "objects",
                                                        "ids": [bytes.fromhex(i) for i, _ in batch], **blobs},
                                           unpack=False)
                    kept = await self._store("keep", bundle=bundle, transfer=transfer, data=data, asked=batch,
                                             bare=link.protocol >= wire.BARE_OBJECTS_PROTOCOL, **blobs)
                    if len(kept["unanswered"]) == len(batch):
                        raise AquapeerError(f"{name} lacks objects of its own commits, such as {batch[0][0]}",
                                            sqlstate="XX001", hint=f"{name}'s bundle store is damaged.")
                    found, again = kept["lacking"], kept["unanswered"]
                    for object_id, place, size in kept["sliced"]:
                        found += await self._sliced(link, name, bundle, transfer, object_id, place, size)
                finally:
                    async with changed:
                        busy -= 1
                        work.extend(again)
                        for o in found:
                            if tuple(o) not in queued:
                                queued.add(tuple(o))
                                work.append(o)
                        changed.notify_all()

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(REQUESTS_IN_FLIGHT):
                    group.create_task(worker())
        except ExceptionGroup as failed:  # the first failure says what went wrong
            raise failed.exceptions[0] from None

    async def _sliced(self, link, name, bundle, transfer, object_id, place, size):
        """Fetch an object larger than one answer slice by slice (protocol 4) and keep it: the
        [id, place] of what it names that we lack."""
        if size > wire.LARGEST_OBJECT:
            raise AquapeerError(f'{name} has an object of bundle "{bundle}" of {size} bytes ({object_id}), '
                                f"more than the {wire.LARGEST_OBJECT} a transfer carries", sqlstate="54000",
                                hint="Keep rows that large out of bundles you share.")
        data, wire_bytes = bytearray(), 0
        while len(data) < size:
            packed = await self._ask(link, name, {"t": "bundle_get", "bundle": bundle, "want": "slice",
                                                  "ids": [bytes.fromhex(object_id)], "offset": len(data)},
                                     unpack=False)
            piece = wire.unpack_body(packed, wire.BODY_LIMIT)
            if not isinstance(piece, bytes) or not piece or len(data) + len(piece) > size:
                raise wire.WireError(f"{name} answered for a slice of {object_id} with no bytes or too many")
            data += piece
            wire_bytes += len(packed)
        kept = await self._store("keep_sliced", bundle=bundle, transfer=transfer, object=[object_id, place],
                                 data=bytes(data), wire_bytes=wire_bytes)
        return kept["lacking"]

    async def push(self, friend, bundle):
        """Have the friend take our commits of the bundle; refused unless that fast-forwards it."""
        mine = await self._store("head", bundle=bundle)
        if mine is None:
            raise AquapeerError(f'bundle "{bundle}" has no commits to push', sqlstate="55000")
        link = await self.link_to(friend)
        theirs = (await self._ask(link, friend.name, {"t": "bundle_get", "bundle": bundle, "want": "head",
                                                      "ids": []})).get("head")
        if theirs is not None and not await self._store("contains", bundle=bundle, commit=theirs):
            raise AquapeerError(f'{friend.name} has commits of bundle "{bundle}" that this database lacks',
                                sqlstate="55000",
                                hint=f"Pull first: select peer.pull_bundle('{friend.name}', '{bundle}').")
        key = (friend.peer_id, bundle)
        self.push_grants[key] += 1
        try:
            return await self._ask(link, friend.name, {"t": "bundle_push", "bundle": bundle,
                                                       "head": bytes.fromhex(mine)})
        finally:
            self.push_grants[key] -= 1
            if not self.push_grants[key]:
                del self.push_grants[key]

    # --- answering a friend ------------------------------------------------------------------------

    def on_frame(self, link, frame):
        kind = frame["t"]
        if kind == "bundle_data":
            future = self.waiting.get(frame["id"])
            if future is not None and not future.done():
                future.set_result(frame)
            return True
        if kind in ("bundle_get", "bundle_push"):
            task = asyncio.ensure_future(self._answer(link, frame))
            self.serving.add(task)
            task.add_done_callback(self.serving.discard)
            return True
        return False

    async def _answer(self, link, frame):
        reply = {"t": "bundle_data", "id": frame["id"], "ok": True, "data": None, "error": None}
        try:
            rows = self.db.query(FRIEND, [link.peer_id])
            self.db.commit()
            if not rows or rows[0]["role"] is None:
                raise AquapeerError("you are not a friend here, or the role you act as does not exist",
                                    sqlstate="42501")
            friend = rows[0]
            if frame["t"] == "bundle_get":
                reply["data"] = await self._serve(friend, link, frame["bundle"], frame["want"], frame["ids"],
                                                  offset=frame.get("offset", 0), starts=frame.get("from"),
                                                  blobs=frame.get("blobs", False))
            else:
                reply["data"] = wire.pack_body(await self._pushed(link, friend, frame), link.protocol)
        except AquapeerError as e:
            reply.update(ok=False, error={"message": e.message[:8000], "sqlstate": (e.sqlstate or "XX000")[:5]})
        except (TimeoutError, ConnectionError) as e:
            reply.update(ok=False, error={"message": f"the executor failed: {e or type(e).__name__}",
                                          "sqlstate": "58000"})
        if link.state == "connected":
            link.send(reply, transport.CONTROL)

    async def _serve(self, friend, link, bundle, want, ids, push=False, offset=0, starts=None, blobs=False):
        # An answer, compressed or not, must stay under what the friend accepts in one frame.
        limit = min(bundle_store.SERVE_RAW_LIMIT, (link.friend_max_message_bytes or wire.FRAGMENT_BYTES) // 2)
        reply = await self.executors.run(friend["role"], {"op": "bundle_serve", "args": {
            "bundle": bundle, "friend": friend["name"], "granted": (link.peer_id, bundle) in self.push_grants,
            "want": "push" if push else want, "ids": ids, "limit": limit, "offset": offset, "starts": starts,
            "blobs": blobs, "protocol": link.protocol}}, SERVE_TIMEOUT_S)
        if not reply.get("ok"):
            raise AquapeerError.from_dict(reply.get("error") or {})
        return reply["result"]

    async def _pushed(self, link, friend, frame):
        """A friend pushes: check it may, pull from it, then only fast-forward our head."""
        bundle, head = frame["bundle"], frame["head"].hex()
        await self._serve(friend, link, bundle, "head", [], push=True)
        pulled = await self.pull(self.node().friends.lookup(link.peer_id), bundle, str(uuid.uuid4()),
                                 "pushed to us", link)
        moved = await self._store("fast_forward", bundle=bundle, head=head)
        if not (moved.get("fast_forward") or moved.get("up_to_date")):
            raise AquapeerError(f'bundle "{bundle}" here has commits you lack, so your push would not fast-forward it',
                                sqlstate="55000", hint="Pull first, merge, then push.")
        return {**pulled, "head": moved.get("head"), "fast_forward": bool(moved.get("fast_forward"))}

    def close(self):
        for task in self.serving:
            task.cancel()
