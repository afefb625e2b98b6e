"""Presence and soft locks, on the worker (docs/presence.md).

Our soft locks are rows of peer.soft_lock the worker writes in its own
transactions, so friends see a lock as soon as it is taken, whatever the
taker's transaction does.  A friend learns of the locks on the tables it
has (peer._lock_audience) in ``locks`` frames: all of them when the link
comes up (``sync`` … ``done``), then what changes.  The link is the lease:
a friend's locks stay while it is connected and expire their TTL after it
went away.

What a friend sends is bounded: at most peer.config.max_soft_locks held and
soft_lock_rate new ones a second; the rest is refused and counted
(peer.friend_presence.locks_refused), never stored.
"""

import asyncio
import json
import logging
import time
import uuid

from .errors import AquapeerError
from .net import wire
from .net.transport import CONTROL

log = logging.getLogger(__name__)

SWEEP_S = 1.0
REFUSED_LOG_INTERVAL_S = 60.0


def _ids(n):
    """SQL for parameter n, a JSON array of uuids, as uuid[]."""
    return f"array(select pg_catalog.jsonb_array_elements_text(${n})::uuid)"


# Our locks as wire items: [id, relation, key, note, ttl_s, remaining_s or nil].
ITEMS = ("select l.id::text, peer._relation_name(l.relation) as relation, l.key::text, l.note, "
         "extract(epoch from l.ttl)::float8 as ttl_s, "
         "extract(epoch from l.expires_at - now())::float8 as remaining_s "
         "from peer.soft_lock l where l.holder is null and ")


def _item(row):
    return [uuid.UUID(row["id"]).bytes, row["relation"], None if row["key"] is None else json.loads(row["key"]),
            row["note"], row["ttl_s"], None if row["remaining_s"] is None else max(0.0, row["remaining_s"])]


def _batches(items, drops=()):
    n = max(len(items), len(drops), 1)
    return [(items[i:i + wire.MAX_LOCK_ITEMS], list(drops[i:i + wire.MAX_LOCK_ITEMS]))
            for i in range(0, n, wire.MAX_LOCK_ITEMS)]


class Presence:
    def __init__(self, db, node_getter):
        self.db = db
        self._node = node_getter
        self.rates = {}       # peer id -> wire.RateLimit of the locks it may take
        self.syncing = {}     # peer id -> ids of its locks seen since its sync began
        self.sent_status = None
        self.audience = set()  # {(relation, friend)} our locks went to, to notice when that changes
        self._refusals_logged = {}
        # A friend's locks from before this worker last ran: their lease runs from now.
        db.query("update peer.soft_lock set expires_at = now() + ttl where holder is not null and expires_at is null")
        db.commit()

    # --- our locks ------------------------------------------------------------

    async def take_locks(self, args):
        """Our soft locks on rows of a table (a key of None: all of them); their ids."""
        ids = [r["id"] for r in self.db.query(
            "insert into peer.soft_lock (id, relation, key, note, ttl, expires_at, pid, backend_start) "
            "select gen_random_uuid(), $1::oid::regclass, nullif(k, 'null'), $3, t.ttl, "
            "       case when not $4 then now() + t.ttl end, "
            "       case when $4 then $5::integer end, case when $4 then $6::timestamptz end "
            "from jsonb_array_elements($2) k, "
            "     (select coalesce($7::float8 * interval '1 s', c.soft_lock_ttl) as ttl from peer.config c) t "
            "returning id::text",
            [int(args["relation"]), list(args["keys"]), args.get("note"), bool(args["session"]),
             args.get("pid"), args.get("backend_start"), args.get("ttl_s")])]
        # Friends' locks on the same rows: this database now edits under them.
        self.db.query("select peer._notify_soft_locks(array(select l from peer.soft_lock l "
                      "where l.holder is not null and l.relation = $1::oid::regclass "
                      "and (l.key is null or $2 or l.key in (select k from jsonb_array_elements($3) k))), 'overlap')",
                      [int(args["relation"]), None in args["keys"], list(args["keys"])])
        self.db.commit()
        self._tell_audience(args["relation"], ids, [])
        return ids

    async def release_lock(self, args):
        rows = self.db.query("delete from peer.soft_lock where id = $1::uuid and holder is null "
                             "returning relation::oid as relation", [str(args["id"])])
        self.db.commit()
        if rows:
            self._tell_audience(rows[0]["relation"], [], [str(args["id"])])
        return bool(rows)

    def _connected(self, names=None):
        """Connected links that speak presence: to the friends named, or to all."""
        node = self._node()
        if node is None:
            return []
        if names is None:
            links = node.links.values()
        else:
            friends = [node.friends.by_name(name) for name in names]
            links = [node.links.get(f.peer_id) for f in friends if f is not None]
        return [link for link in links if link is not None and link.state == "connected"
                and link.protocol >= wire.PRESENCE_PROTOCOL]

    def _tell_audience(self, relation, set_ids, drop_ids):
        names = [r["friend"] for r in self.db.query("select peer._lock_audience($1::oid::regclass) as friend",
                                                     [int(relation)])]
        self.audience.update((int(relation), name) for name in names)
        items = [_item(r) for r in self.db.query(ITEMS + f"l.id = any({_ids(1)})", [set_ids])] if set_ids else []
        self.db.commit()
        drops = [uuid.UUID(i).bytes for i in drop_ids]
        for link in self._connected(names):
            for batch, dropped in _batches(items, drops):
                link.send({"t": "locks", "sync": False, "done": False, "set": batch, "drop": dropped}, CONTROL)

    def _sync(self, link):
        """Everything of ours a friend is to know: what it had of our locks is replaced."""
        friend = self._node().friends.lookup(link.peer_id)
        items = [_item(r) for r in self.db.query(
            ITEMS + "l.relation in (select r.relation from (select distinct relation from peer.soft_lock "
            "where holder is null) r where $1 in (select peer._lock_audience(r.relation))) order by l.since",
            [friend.name])]
        status = self.db.scalar("select status from peer.config")
        self.db.commit()
        link.send({"t": "presence", "status": status}, CONTROL)
        batches = _batches(items)
        for n, (batch, _) in enumerate(batches):
            link.send({"t": "locks", "sync": n == 0, "done": n == len(batches) - 1, "set": batch, "drop": []},
                      CONTROL)

    # --- links ----------------------------------------------------------------

    def on_link_up(self, link):
        self.db.query("insert into peer.friend_presence (friend, last_connected) "
                      "select name, now() from peer.friend where peer_id = $1 "
                      "on conflict (friend) do update set last_connected = excluded.last_connected",
                      [link.peer_id])
        self.db.commit()
        if link.protocol >= wire.PRESENCE_PROTOCOL:
            self._sync(link)

    def on_link_down(self, link):
        """The friend's lease on its locks ends a TTL from now, unless it is back already."""
        self.syncing.pop(link.peer_id, None)
        current = self._node().links.get(link.peer_id) if self._node() is not None else None
        if current is not None and current.state == "connected":
            return  # replaced by a new link, which synced the friend's locks anew
        try:
            self._lease_ends(link.peer_id)
        except AquapeerError as e:  # the extension may be going away with the worker
            self.db.rollback()
            log.warning("could not start the expiry of a friend's soft locks: %s", e.message)

    def _lease_ends(self, peer_id):
        self.db.query("update peer.soft_lock l set expires_at = now() + l.ttl from peer.friend f "
                      "where f.peer_id = $1 and l.holder = f.name and l.expires_at is null", [peer_id])
        self.db.query("update peer.friend_presence p set last_disconnected = now() from peer.friend f "
                      "where f.peer_id = $1 and p.friend = f.name", [peer_id])
        self.db.commit()

    # --- what friends send ----------------------------------------------------

    def on_frame(self, link, frame):
        kind = frame["t"]
        if kind == "locks":
            self._on_locks(link, frame)
        elif kind == "presence":
            self.db.query("insert into peer.friend_presence (friend, status, status_at) "
                          "select name, $2, now() from peer.friend where peer_id = $1 "
                          "on conflict (friend) do update set status = excluded.status, status_at = excluded.status_at "
                          "where friend_presence.status is distinct from excluded.status",
                          [link.peer_id, frame["status"]])
            self.db.commit()
        else:
            return False
        return True

    def _rate(self, peer_id, config):
        rate = self.rates.get(peer_id)
        if rate is None or (rate.rate, rate.burst) != (config["soft_lock_rate"], config["max_soft_locks"]):
            rate = self.rates[peer_id] = wire.RateLimit(config["soft_lock_rate"], config["max_soft_locks"])
        return rate

    def _on_locks(self, link, frame):
        friend = self._node().friends.lookup(link.peer_id)
        config = self.db.query("select max_soft_locks, soft_lock_rate from peer.config")[0]
        rate = self._rate(link.peer_id, config)
        if frame["sync"]:
            self.syncing[link.peer_id] = set()
        items = [{"id": str(uuid.UUID(bytes=i[0])), "relation": i[1], "key": i[2], "note": i[3], "ttl_s": i[4],
                  "remaining_s": i[5]} for i in frame["set"]]
        # (A hashed NOT IN: "<> all" compares every pair, and a sync may hold 10,000 of each.)
        held = self.db.scalar("select count(*) from peer.soft_lock where holder = $1 and id not in "
                              "(select x::uuid from jsonb_array_elements_text($2) x)",
                              [friend.name, [i["id"] for i in items]])
        room = max(0, min(config["max_soft_locks"] - held, int(rate.available())))
        taken, refused = items[:room], max(0, len(items) - room)
        rate.allow(len(taken))
        dropped = [str(uuid.UUID(bytes=i)) for i in frame["drop"]]
        if link.peer_id in self.syncing:
            self.syncing[link.peer_id].update(i["id"] for i in taken)
            if frame["done"]:
                kept = list(self.syncing.pop(link.peer_id))
                dropped += [r["id"] for r in self.db.query(
                    "select id::text from peer.soft_lock where holder = $1 and id not in "
                    "(select x::uuid from jsonb_array_elements_text($2) x)",
                    [friend.name, kept])]
        if taken:
            # An id that is another holder's already is not taken over: ids are random, so a friend
            # that sends one misbehaves.
            self.db.query(
                "with taken as (insert into peer.soft_lock as l (id, holder, relation, key, note, ttl, expires_at) "
                "  select x.id, $1, pg_catalog.to_regclass(x.relation), x.key, x.note, x.ttl_s * interval '1 s', "
                "         now() + x.remaining_s * interval '1 s' "
                "  from jsonb_to_recordset($2) x(id uuid, relation text, key jsonb, note text, ttl_s float8, "
                "                                remaining_s float8) "
                "  where pg_catalog.to_regclass(x.relation) is not null "
                "  on conflict (id) do update set note = excluded.note, ttl = excluded.ttl, "
                "      expires_at = excluded.expires_at where l.holder = excluded.holder "
                "  returning l, xmax = 0 as inserted) "
                "select peer._notify_soft_locks(array(select t.l from taken t where t.inserted "
                "    and peer._lock_overlaps((t.l).relation, (t.l).key)), 'overlap')",
                [friend.name, taken])
        if dropped:
            self.db.query(
                "with gone as (delete from peer.soft_lock l where l.holder = $1 and l.id = any(" + _ids(2) + ") "
                "  returning l) "
                "select peer._notify_soft_locks(array(select g.l from gone g "
                "    where peer._lock_overlaps((g.l).relation, (g.l).key)), 'released')", [friend.name, dropped])
        if refused:
            self.db.query("insert into peer.friend_presence (friend, locks_refused) values ($1, $2) "
                          "on conflict (friend) do update set locks_refused = friend_presence.locks_refused + $2",
                          [friend.name, refused])
        self.db.commit()
        if refused:
            now = time.monotonic()
            if now - self._refusals_logged.get(link.peer_id, -1e9) >= REFUSED_LOG_INTERVAL_S:
                self._refusals_logged[link.peer_id] = now
                log.warning("refused %d soft locks from %s: over peer.config.max_soft_locks (%d, %d held) "
                            "or soft_lock_rate (%d a second)", refused, friend.name, config["max_soft_locks"],
                            held, config["soft_lock_rate"])

    # --- the sweep ------------------------------------------------------------

    def sweep(self):
        """Locks whose session ended or whose time passed go; a changed status or audience is told."""
        gone = self.db.query(
            "with gone as (delete from peer.soft_lock l where l.expires_at < now() "
            "  or (l.pid is not null and not exists (select from pg_catalog.pg_stat_activity a "
            "      where a.pid = l.pid and a.backend_start = l.backend_start)) "
            "  returning l), "
            "notified as (select peer._notify_soft_locks(array(select g.l from gone g "
            "  where (g.l).holder is not null and peer._lock_overlaps((g.l).relation, (g.l).key)), 'released')) "
            "select (g.l).id::text, (g.l).relation::oid as relation from gone g, notified where (g.l).holder is null")
        status = self.db.scalar("select status from peer.config")
        told = self.db.query(
            "select r.relation::oid as relation, f as friend from (select distinct relation from peer.soft_lock "
            "where holder is null) r left join lateral peer._lock_audience(r.relation) f on true")
        self.db.commit()
        ours = {}
        for row in gone:
            ours.setdefault(row["relation"], []).append(row["id"])
        for relation, ids in ours.items():
            self._tell_audience(relation, [], ids)
        links = self._connected()
        if status != self.sent_status:
            self.sent_status = status
            for link in links:
                link.send({"t": "presence", "status": status}, CONTROL)
        audience = {(r["relation"], r["friend"]) for r in told if r["friend"] is not None}
        # Friends who now have a locked table (peer.watch, a new share) or no longer have one that
        # still has locks learn our locks anew.
        locked = {r["relation"] for r in told}
        changed = {friend for relation, friend in (audience - self.audience)
                   | {pair for pair in self.audience - audience if pair[0] in locked}}
        names = {link.friend_name: link for link in links}
        for friend in changed:
            if friend in names:
                self._sync(names[friend])
        self.audience = audience

    async def run(self):
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                self.sweep()
            except AquapeerError as e:
                self.db.rollback()
                log.warning("the soft lock sweep failed: %s", e.message)
