"""Durable messages between friends: the outbox, the inbox, and message handlers.

The network worker runs this; SQL sessions only write peer.outbox_message
(peer.send) and read peer.inbox.

Sending.  peer.send inserts a row in the caller's transaction and asks to
wake the worker once it commits.  The worker then numbers, per friend, what
its statement's snapshot sees committed, in the order of the sending
transactions' ids (peer.outbox_message.xact, the top-level xid) and, within
one, in the order sent; a transaction's messages stay together.  That keeps
the promise that a transaction which began after another committed is
delivered after it: it got its xid after the other committed, so its xid is
larger, and a snapshot that sees it committed sees the other committed too,
so the other is numbered in the same pass or an earlier one.  A transaction
still running (or prepared) with a smaller xid is numbered in a later pass,
after larger ones; nothing began after it committed, so no promise breaks.
Concurrent transactions are thus not delivered in commit order, and sending
transactions take no lock: they commit side by side.  To each connected
friend the worker streams what the friend has not acknowledged, at most a
window of bytes ahead of the acknowledgements; after a reconnection it
starts again from the last acknowledgement, so delivery is at least once.

Receiving.  Each msgs frame names the sender's stream epoch and the
sequence number of the frame before it on this connection, so a lost frame
is noticed.  Messages above the friend's high-water mark on topics the
friend may use are stored, the mark is moved, NOTIFY aquapeer_inbox is
queued, and the transaction commits; only then is the batch acknowledged
(with the sequence numbers refused and why).  Duplicates fall below the
mark, whether or not the inbox still holds them: users delete inbox rows.

The epoch is drawn anew when the database stops being the one that drew it
(see peer.stream_epoch): a restored copy numbers from 1 in a new epoch, and
the friend cannot mistake its messages for ones it already has.

Handlers.  A stored message whose topic has a handler is handed to an
executor connected as the sender's role; the executor marks it handled in
the handler's own transaction, so it runs once.  A handler that raises
leaves the message with its error; peer.retry_message runs it again.
"""

import asyncio
import collections
import contextlib
import json
import logging
import uuid

from .errors import AquapeerError, DatabaseError
from .net import transport, wire

log = logging.getLogger("aquapeer.messaging")

# Bytes sent and not yet acknowledged, per friend.
WINDOW_BYTES = 2 * 1024 * 1024
# Messages per msgs frame stop at about this many bytes (one larger message goes alone, fragmented).
FRAME_TARGET_BYTES = 48 * 1024
# Rows numbered per pass; whole transactions, so a larger one still goes at once.
PICKUP_ROWS = 5000
# Commits wake the worker; polling only catches a lost wake (COMMIT PREPARED,
# a worker starting), so it can be slow and cheap when idle.
POLL_S = 5.0
# Expiry is measured in days and pruning in hours: every few minutes will do,
# and lets the executor it runs in leave between runs.
RETENTION_S = 300.0
RETENTION_TIMEOUT_S = 300.0
HANDLER_BATCH = 200
# Received messages stored per transaction at most.
STORE_ITEMS = 5000
# Topics whose handler takes every message of its sender received before its own (replication's:
# it applies whole transactions), so only the newest of a batch is handed to it.
TAKES_ALL_BEFORE = frozenset({"aquapeer.changes"})
# Such a handler applies a friend's transactions whole, however large (a million rows take
# minutes): peer.config.handler_timeout, meant for one message, is too short for it.
TAKES_ALL_BEFORE_TIMEOUT_S = 3600.0

NEW_EPOCH = """
with here as (
    select s.system_identifier,
           ('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::integer
               as timeline,
           (select oid from pg_catalog.pg_database where datname = pg_catalog.current_database()) as database_oid
    from pg_catalog.pg_control_system() s
)
select (select e.epoch from peer.stream_epoch e
        where (e.system_identifier, e.timeline, e.database_oid)
              = (h.system_identifier, h.timeline, h.database_oid)) as epoch,
       h.system_identifier, h.timeline, h.database_oid
from here h
"""

# Acknowledged messages of the old epoch keep their state; the others are
# numbered again in the new one.  $1: the new epoch.
START_EPOCH = [
    """update peer.outbox_message m set final_state = 'acked', finished_at = pg_catalog.clock_timestamp()
       from peer.outbox_stream s
       where s.peer_id = m.peer_id and m.epoch = s.epoch and m.seq <= s.acked_upto and m.final_state is null""",
    """update peer.outbox_message set seq = null, epoch = null where seq is not null and final_state is null""",
    """update peer.outbox_stream set epoch = $1::uuid, last_seq = 0, sent_upto = 0, acked_upto = 0, prune_upto = 0""",
    "delete from peer.stream_epoch",
]

# Number the messages of committed transactions (whole, about PICKUP_ROWS
# rows), in the order of their transaction ids and, within one, in the order
# they were sent (see the module's docstring for why xid order is enough).
# The unnumbered messages (seq is null and final_state is null: a partial index) are read once, in
# the index's order.  Numbering one moves it out of that index, but its entry stays until a vacuum:
# a bitmap scan visits every such entry on each wake (28 ms with 47,000 kept, a worker busy at 200
# commits a second), while an index scan marks them dead as it meets them (PICKUP_PLAN).  And
# joined to the whole outbox, a plan made for the nearly empty table the outbox was at the last
# analyze hashed every message kept; chosen inlined, it ran once per unnumbered row (seconds).
# The transactions chosen are a prefix in xid order, so the greatest of them bounds them.
PICKUP_PLAN = "set local enable_bitmapscan = off"
PICKUP = """
with unnumbered as materialized (
    select m.id, m.peer_id, m.xact, m.position
    from peer.outbox_message m
    where m.seq is null and m.final_state is null
    order by m.position
), xacts as (
    select xact, count(*) as n from unnumbered group by xact
), chosen as materialized (
    select max(xact) as upto from (select *, sum(n) over (order by xact) as running from xacts) x
    where running - n < $2
), numbered as (
    select u.id, u.peer_id,
           row_number() over (partition by u.peer_id order by u.xact, u.position) as n
    from unnumbered u
    where u.xact <= (select upto from chosen)
), counts as (
    select peer_id, count(*) as n from numbered group by peer_id
), streams as (
    insert into peer.outbox_stream as s (peer_id, epoch, last_seq)
    select peer_id, $1::uuid, n from counts
    on conflict (peer_id) do update set last_seq = s.last_seq + excluded.last_seq
    returning s.peer_id, s.last_seq
), updated as (
    update peer.outbox_message m set seq = st.last_seq - c.n + nb.n, epoch = $1::uuid
    from numbered nb join counts c using (peer_id) join streams st using (peer_id)
    where m.id = nb.id
    returning m.peer_id
)
select distinct peer_id from updated
"""

# The next messages for a friend after a position, up to a byte budget (at
# least one).  Sequence numbers are dense within an epoch, so a bounded range
# keeps the plan cheap however large the backlog and however stale the
# statistics (a table that grew in seconds is planned as nearly empty).
UNSENT = """
with candidates as (
    select seq, bytes, sum(bytes) over (order by seq) as running from peer.outbox_message
    where peer_id = $1 and epoch = $2::uuid and seq > $3 and seq <= $3 + 500 and final_state is null
)
select m.seq, m.id::text as id, m.topic,
       -- a friend applies a transaction's changes once it has them all: the last one says so
       case when m.topic = 'aquapeer.changes'
            then (m.payload || pg_catalog.jsonb_build_object('end', coalesce(
                     (select n.xact <> m.xact from peer.outbox_message n
                      where n.peer_id = $1 and n.epoch = $2::uuid and n.seq > m.seq and n.topic = m.topic
                      order by n.seq limit 1), true)))::text
            else m.payload::text end as payload,
       extract(epoch from m.created_at)::float8 as sent_at, m.bytes
from candidates c
-- one index probe per chosen row, whatever the estimates ("limit 1" keeps the
-- planner from turning it into a join it may order the other way round)
cross join lateral (select * from peer.outbox_message m
                    where m.peer_id = $1 and m.epoch = $2::uuid and m.seq = c.seq limit 1) m
where c.running - c.bytes < $4 or c.seq = (select min(seq) from candidates)
order by m.seq
"""
# Where the stream goes on after a run of rejected or expired messages.
NEXT_UNSENT = """
select min(seq) from peer.outbox_message
where peer_id = $1 and epoch = $2::uuid and seq > $3 and final_state is null
"""

STORE = """
with items as (
    select * from pg_catalog.jsonb_to_recordset($2::jsonb)
        as x(seq bigint, id uuid, topic text, sent_at float8, payload text)
), judged as (
    select i.*, exists (select from peer.topic_grant g
                        where g.topic = i.topic and (g.friend = $1 or g.friend is null)) as allowed
    from items i
), stored as (
    insert into peer.inbox (id, friend, topic, payload, sent_at, received_at, handler)
    select j.id, $1, j.topic, j.payload::jsonb, pg_catalog.to_timestamp(j.sent_at), pg_catalog.clock_timestamp(),
           h.handler
    from judged j left join peer.message_handler h on h.topic = j.topic
    where j.allowed order by j.seq
    on conflict (id) do nothing
    returning id, handler is not null as handled
), notified as (
    select pg_catalog.pg_notify('aquapeer_inbox', id::text) from stored
), mark as (
    insert into peer.inbox_stream as s (peer_id, epoch, hwm) values ($3, $4::uuid, $5)
    on conflict (peer_id) do update set epoch = excluded.epoch, hwm = excluded.hwm, updated_at = pg_catalog.now()
    returning 1
)
select (select count(*) from notified) as stored,
       (select count(*) from mark) as marked,
       (select count(*) from stored where handled) as to_handle,
       (select coalesce(pg_catalog.jsonb_agg(
                            pg_catalog.jsonb_build_array(seq, 'topic "' || topic || '" is not allowed for you')),
                        '[]') from judged where not allowed)::text as rejected
"""

SERVER_STOPPING = "57P01"  # admin_shutdown: what a handler cut off by the server's shutdown is told

PENDING_HANDLERS = """
select i.id::text as id, i.friend, i.topic, i.handler::oid as handler,
       (select r.oid from pg_catalog.pg_roles r where r.rolname = f.role) as role,
       (pg_catalog.to_jsonb(i) - 'handler')::text as row,
       (select extract(epoch from handler_timeout)::float8 from peer.config) as timeout_s
from peer.inbox i join peer.friend f on f.name = i.friend
where i.handler is not null and i.handled_at is null and i.handler_error is null
order by i.position limit $1
"""


async def _news(event):
    """Until event is set, or POLL_S has passed (a lost wake); then clear it for the next news."""
    # asyncio.timeout, not wait_for: Python 3.11's wait_for returns when what it waits for is done,
    # even if its task was cancelled meanwhile.  A worker stopped as it started (a wake pending)
    # lost the cancel, and the loop went on polling: pg_ctl stop waited for it forever.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(POLL_S):
            await event.wait()
    event.clear()


class Outbound:
    """What is in flight to one friend on one link."""

    def __init__(self, link):
        self.link = link
        self.cursor = None          # the last seq sent on this link
        self.inflight = collections.deque()  # (seq, bytes), oldest first
        self.inflight_bytes = 0
        self.kick = asyncio.Event()
        self.task = None

    def acked(self, upto):
        while self.inflight and self.inflight[0][0] <= upto:
            self.inflight_bytes -= self.inflight.popleft()[1]
        self.kick.set()


class Inbound:
    """Frames from one friend waiting to be stored, and where the stream stands."""

    def __init__(self):
        self.frames = collections.deque()  # (link, frame)
        self.link_last = {}                # link -> the last seq received on it
        self.busy = False


class Messaging:
    def __init__(self, db, executors, node_getter):
        self.db = db
        self.executors = executors
        self.node = node_getter     # () -> PeerNode or None
        self.epoch = None
        self.outbound = {}          # peer id -> Outbound
        self.inbound = collections.defaultdict(Inbound)
        self.handling = set()       # (friend, topic) groups being handled
        self.wake_event = asyncio.Event()
        self.handler_event = asyncio.Event()
        # What committed while no worker ran is taken up at once.
        self.wake_event.set()
        self.handler_event.set()

    # --- the epoch -------------------------------------------------------------

    def start_epoch(self):
        """This database's stream epoch: the stored one, or a new one when it is a copy."""
        row = self.db.query(NEW_EPOCH)[0]
        if row["epoch"] is None:
            epoch = str(uuid.uuid4())
            for statement in START_EPOCH:
                self.db.query(statement, [epoch] if "$1" in statement else ())
            self.db.query("insert into peer.stream_epoch (epoch, system_identifier, timeline, database_oid) "
                          "values ($1::uuid, $2, $3, $4)",
                          [epoch, row["system_identifier"], row["timeline"], row["database_oid"]])
            log.info("new message stream epoch %s (this database was restored, copied or created)", epoch)
            row["epoch"] = epoch
        self.db.commit()
        self.epoch = row["epoch"]

    # --- sending -----------------------------------------------------------------

    def wake(self):
        self.wake_event.set()

    async def run_pickup(self):
        """Number newly visible messages whenever woken (and every POLL_S in case a wake was lost)."""
        while True:
            await _news(self.wake_event)
            while True:
                self.db.query(PICKUP_PLAN)
                peers = [r["peer_id"] for r in self.db.query(PICKUP, [self.epoch, PICKUP_ROWS])]
                self.db.commit()
                for peer_id in peers:
                    if peer_id in self.outbound:
                        self.outbound[peer_id].kick.set()
                if not peers:
                    break
                await asyncio.sleep(0)  # let the loop breathe between passes

    def on_link_up(self, link):
        """A friend is connected: update what it told us, and stream what it lacks."""
        self.db.query("update peer.friend set max_message_bytes = $2 "
                      "where peer_id = $1 and max_message_bytes is distinct from $2",
                      [link.peer_id, link.friend_max_message_bytes])
        self.db.commit()
        old = self.outbound.get(link.peer_id)
        if old is not None and old.task is not None:
            old.task.cancel()
        out = self.outbound[link.peer_id] = Outbound(link)
        out.task = asyncio.ensure_future(self._stream(out))

    async def _stream(self, out):
        link = out.link
        try:
            row = self.db.query("select acked_upto from peer.outbox_stream where peer_id = $1 and epoch = $2::uuid",
                                [link.peer_id, self.epoch])
            self.db.commit()
            position = row[0]["acked_upto"] if row else 0
            while link.state == "connected":
                out.kick.clear()  # before looking: news that comes while we look is not lost
                budget = WINDOW_BYTES - out.inflight_bytes
                rows = []
                if budget > 0 or not out.inflight:
                    rows = self.db.query(UNSENT, [link.peer_id, self.epoch, position, max(budget, 1)])
                    if rows:
                        self.db.query("update peer.outbox_stream set sent_upto = greatest(sent_upto, $2) "
                                      "where peer_id = $1", [link.peer_id, rows[-1]["seq"]])
                    self.db.commit()
                if rows:
                    self._send_rows(out, rows)
                    position = rows[-1]["seq"]
                    await asyncio.sleep(0)  # the link's writer runs on this loop too
                    continue
                if budget > 0 or not out.inflight:
                    later = self.db.scalar(NEXT_UNSENT, [link.peer_id, self.epoch, position])
                    self.db.commit()
                    if later is not None:
                        position = later - 1
                        continue
                # Nothing to send: wait for news (numbered messages, an acknowledgement), not a timer,
                # so that fifty idle friends cost nothing.
                waits = [asyncio.ensure_future(out.kick.wait()), asyncio.ensure_future(link.closed.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
        except transport.LinkClosed:
            pass
        finally:
            if self.outbound.get(link.peer_id) is out:
                del self.outbound[link.peer_id]

    def _send_rows(self, out, rows):
        epoch = uuid.UUID(self.epoch).bytes
        batch, size = [], 0
        for r in rows + [None]:
            if r is None or (batch and size + r["bytes"] > FRAME_TARGET_BYTES):
                out.link.send({"t": "msgs", "epoch": epoch, "prev": out.cursor, "items": batch})
                out.cursor = batch[-1][0]
                batch, size = [], 0
                if r is None:
                    break
            batch.append([r["seq"], uuid.UUID(r["id"]).bytes, r["topic"], r["sent_at"], r["payload"]])
            size += r["bytes"] + 64
            out.inflight.append((r["seq"], r["bytes"]))
            out.inflight_bytes += r["bytes"]

    def on_ack(self, link, frame):
        epoch = str(uuid.UUID(bytes=frame["epoch"]))
        if epoch != self.epoch:
            return  # for a stream this database no longer has
        self.db.query("update peer.outbox_stream set acked_upto = greatest(acked_upto, $3), "
                      "acked_at = pg_catalog.now() where peer_id = $1 and epoch = $2::uuid",
                      [link.peer_id, epoch, frame["upto"]])
        if frame["rejected"]:
            self.db.query(
                "update peer.outbox_message m set final_state = 'rejected', reason = r.reason, "
                "finished_at = pg_catalog.clock_timestamp() "
                "from pg_catalog.jsonb_to_recordset($3::jsonb) as r(seq bigint, reason text) "
                "where m.peer_id = $1 and m.epoch = $2::uuid and m.seq = r.seq and m.seq between $4 and $5",
                [link.peer_id, epoch, json.dumps([{"seq": s, "reason": r} for s, r in frame["rejected"]]),
                 min(s for s, _r in frame["rejected"]), max(s for s, _r in frame["rejected"])])
        self.db.commit()
        out = self.outbound.get(link.peer_id)
        if out is not None and out.link is link:
            out.acked(frame["upto"])

    # --- receiving ----------------------------------------------------------------

    def on_msgs(self, link, frame):
        inbound = self.inbound[link.peer_id]
        inbound.frames.append((link, frame))
        if not inbound.busy:
            inbound.busy = True
            asyncio.get_running_loop().call_soon(self._store, link.peer_id, inbound)

    def _store(self, peer_id, inbound):
        """Store what arrived from a friend in one transaction, then acknowledge it."""
        try:
            while inbound.frames:
                self._store_some(peer_id, inbound)
        except Exception:
            # Nothing was acknowledged: reconnecting makes the friend send it all again.
            log.exception("could not store messages from %s", peer_id)
            self.db.rollback()
            for link in {link for link, _frame in inbound.frames} | set(inbound.link_last):
                link.close("could not store the friend's messages; see the server log", failed=True)
            inbound.frames.clear()
        finally:
            inbound.busy = False

    def _store_some(self, peer_id, inbound):
        row = self.db.query("select s.epoch::text as epoch, s.hwm, f.name from peer.friend f "
                            "left join peer.inbox_stream s on s.peer_id = f.peer_id where f.peer_id = $1", [peer_id])
        if not row:
            self.db.commit()
            inbound.frames.clear()
            return
        name, epoch, hwm = row[0]["name"], row[0]["epoch"], row[0]["hwm"] or 0
        items, acks = [], {}   # acks: link -> (epoch, upto)
        while inbound.frames and len(items) < STORE_ITEMS:
            link, frame = inbound.frames.popleft()
            frame_epoch = str(uuid.UUID(bytes=frame["epoch"]))
            last = inbound.link_last.get(link)
            if frame["prev"] is not None and frame["prev"] != last:
                # A frame went missing on this connection: start it again, the friend resends.
                link.refuse(f"messages out of sequence (after {last}, the friend continued from {frame['prev']})")
                link.close("a message frame went missing; reconnecting", failed=True)
                continue
            inbound.link_last[link] = frame["items"][-1][0]
            if frame_epoch != epoch:
                epoch, hwm = frame_epoch, 0  # the friend was restored or is new: a new stream
            for seq, mid, topic, sent_at, payload in frame["items"]:
                if seq > hwm:
                    items.append({"seq": seq, "id": str(uuid.UUID(bytes=mid)), "topic": topic,
                                  "sent_at": sent_at, "payload": payload})
                    hwm = seq
            acks[link] = (frame["epoch"], frame["items"][-1][0])
        for link in [gone for gone in inbound.link_last if gone.state in ("closed", "failed")]:
            del inbound.link_last[link]
        if not acks:
            self.db.commit()
            return
        result = self._store_items(name, peer_id, epoch, hwm, items)
        rejected = json.loads(result["rejected"])
        for link, (frame_epoch, upto) in acks.items():
            if link.state == "connected":
                link.send({"t": "ack", "epoch": frame_epoch, "upto": upto,
                           "rejected": [r for r in rejected if r[0] <= upto]}, transport.CONTROL)
        if result["to_handle"]:
            self.handler_event.set()

    def _store_items(self, name, peer_id, epoch, hwm, items):
        args = [name, json.dumps(items), peer_id, epoch, hwm]
        try:
            result = self.db.query(STORE, args)[0]
        except DatabaseError as e:
            if not e.sqlstate.startswith(("22", "54")):
                raise
            # A message this server will not take (not JSON it accepts, too deep, a bad
            # time): refuse those with the reason, keep the rest.  Rare, so one by one.
            self.db.rollback()
            good, bad = [], []
            for item in items:
                try:
                    self.db.query("select $1::jsonb, pg_catalog.to_timestamp($2)", [item["payload"], item["sent_at"]])
                    good.append(item)
                except DatabaseError as refusal:
                    bad.append([item["seq"], f"refused: {refusal.message}"[:wire.MAX_REASON]])
            args[1] = json.dumps(good)
            result = self.db.query(STORE, args)[0]
            result["rejected"] = json.dumps(json.loads(result["rejected"]) + bad)
        self.db.commit()
        return result

    # --- handlers --------------------------------------------------------------------

    async def run_handlers(self):
        """Hand stored messages to their handlers, in order per (sender, topic)."""
        while True:
            await _news(self.handler_event)
            rows = self.db.query(PENDING_HANDLERS, [HANDLER_BATCH])
            self.db.commit()
            groups = collections.OrderedDict()
            for r in rows:
                groups.setdefault((r["friend"], r["topic"]), []).append(r)
            for key, messages in groups.items():
                if key not in self.handling:
                    self.handling.add(key)
                    asyncio.ensure_future(self._handle_group(key, messages))

    async def _handle_group(self, key, messages):
        if key[1] in TAKES_ALL_BEFORE:
            messages = messages[-1:]
        stopping = False
        try:
            for message in messages:
                reply = await self.handle(message)
                stopping = (reply.get("error") or {}).get("sqlstate") == SERVER_STOPPING
                if stopping:
                    break
        finally:
            self.handling.discard(key)
            if not stopping:
                self.handler_event.set()  # more may have arrived meanwhile

    async def handle(self, message):
        """Run one message's handler in an executor; record its error; return the executor's reply."""
        if message["role"] is None:
            reply = {"ok": False, "error": {"message": "the friend's role does not exist", "sqlstate": "42704"}}
        else:
            timeout_s = message["timeout_s"]
            if message["topic"] in TAKES_ALL_BEFORE:
                timeout_s = max(timeout_s, TAKES_ALL_BEFORE_TIMEOUT_S)
            try:
                reply = await self.executors.run(
                    message["role"], {"op": "handle", "args": {"function": message["handler"], "row": message["row"],
                                                               "id": message["id"],
                                                               "timeout_ms": int(timeout_s * 1000)}},
                    timeout_s)
            except (TimeoutError, AquapeerError, ConnectionError) as e:
                stopping = self.db.scalar("select peer._should_stop()")
                self.db.commit()
                if stopping is not None:
                    # The server is stopping and took the executor with it: no fault of the
                    # handler's, so the message stays pending for the next worker.
                    return {"ok": False, "error": {"message": f"not handled: {stopping}", "sqlstate": SERVER_STOPPING}}
                reply = {"ok": False, "error": {"message": f"the executor failed: {e}", "sqlstate": "58000"}}
        if not reply.get("ok"):
            error = reply.get("error") or {}
            self.db.query("update peer.inbox set handler_error = $2, handler_attempts = handler_attempts + 1 "
                          "where id = $1::uuid",
                          [message["id"], f'{error.get("sqlstate")}: {error.get("message")}'])
            self.db.commit()
        return reply

    async def retry(self, message_id):
        rows = self.db.query(
            "select i.id::text as id, i.friend, i.topic, coalesce(i.handler, h.handler)::oid as handler, "
            "(select r.oid from pg_catalog.pg_roles r where r.rolname = f.role) as role, "
            "(pg_catalog.to_jsonb(i) - 'handler')::text as row, "
            "(select extract(epoch from handler_timeout)::float8 from peer.config) as timeout_s "
            "from peer.inbox i left join peer.friend f on f.name = i.friend "
            "left join peer.message_handler h on h.topic = i.topic where i.id = $1::uuid", [message_id])
        self.db.commit()
        if not rows:
            raise AquapeerError(f"no message {message_id} in peer.inbox", sqlstate="42704")
        message = rows[0]
        if message["handler"] is None:
            raise AquapeerError(f'no handler for topic "{message["topic"]}"', sqlstate="42704",
                                hint="Register one with peer.on_message(topic, handler).")
        reply = await self.handle(message)
        if not reply.get("ok"):
            raise AquapeerError.from_dict(reply.get("error") or {})
        return True

    async def retry_newest(self, messages, topic, what):
        """Run the handler again for each friend's newest pending message on topic ([{id, friend}]),
        unless it runs now: a handler that takes all before it handles the rest too."""
        for message in messages:
            group = (message["friend"], topic)
            if group in self.handling:
                continue
            self.handling.add(group)
            try:
                await self.retry(message["id"])
            except AquapeerError as e:
                log.info("%s from %s are still pending: %s", what, message["friend"], e.message)
            finally:
                self.handling.discard(group)

    # --- retention ---------------------------------------------------------------------

    async def run_retention(self, owner_oid):
        """Expire and prune in an executor (the scans grow with the outbox; the loop must not wait)."""
        while True:
            try:
                reply = await self.executors.run(owner_oid, {"op": "retention", "args": {}}, RETENTION_TIMEOUT_S)
                if not reply.get("ok"):
                    raise AquapeerError.from_dict(reply.get("error") or {})
                for r in reply["result"]:
                    log.warning("expired %d messages to %s: %s", r["n"], r["friend"], r["reason"])
            except (TimeoutError, AquapeerError, ConnectionError) as e:
                log.warning("outbox retention failed, trying again in %.0f s: %s", RETENTION_S, e)
            await asyncio.sleep(RETENTION_S)

    # --- frames -------------------------------------------------------------------------

    def on_frame(self, link, frame):
        kind = frame["t"]
        if kind == "msgs":
            self.on_msgs(link, frame)
        elif kind == "ack":
            self.on_ack(link, frame)
        else:
            return False
        return True

    def close(self):
        for out in self.outbound.values():
            if out.task is not None:
                out.task.cancel()
        self.outbound.clear()
