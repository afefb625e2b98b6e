"""Following friends' bundles (peer.follow_bundle): the worker pulls each new commit by itself.

Every second, for each followed bundle whose friend is connected, the worker asks the friend
for its head (Transfers.head, as peer.pull_bundle's first step does).  When the friend has a
commit this database has not taken yet, an executor connected as the worker's role runs
peer._follow_pull: peer.pull_bundle itself, in the executor's transaction, so that keeping
what arrives, tracking a new bundle's tables, fast-forwarding or merging and checking out are
exactly those of a manual pull.  With uncommitted changes in the tables it pulls with
checkout => false (state 'behind'); a merge with conflicts stops (state 'conflicts') until it
is resolved.

The loop's SQL stays short (one query a tick, one update when nothing needs pulling); the
pull's work runs in executors.  One bundle per friend at a time, and a few friends at once:
each pull holds an executor while the transfer it runs needs others.
"""

import asyncio
import json
import logging
import time
import types

from ..errors import AquapeerError, DatabaseError

log = logging.getLogger("aquapeer.bundles")

POLL_S = 1.0
# After an error, and while the tables keep uncommitted changes, ask again less often.
ERROR_RETRY_S = 30.0
BEHIND_RECHECK_S = 10.0
PULL_TIMEOUT_S = 24 * 3600.0

FOLLOWED = """
select f.friend, fr.peer_id, f.bundle, f.state, f.last_head, b.head, b.checked_out,
       exists (select from bundle.merge m where m.bundle = f.bundle) as merging,
       exists (select from bundle.changed_key k where k.bundle = f.bundle) as changed
from peer.bundle_follow f
join peer.friend fr on fr.name = f.friend and fr.state = 'accepted'
left join bundle.bundle b on b.name = f.bundle
order by f.friend, f.since, f.bundle
"""


class Follower:
    def __init__(self, transfers):
        self.transfers = transfers
        self.db = transfers.db
        self.busy = {}       # friend -> its task (one bundle per friend at a time)
        self.links = {}      # friend -> the link its last attempts used (a new one: try again at once)
        self.not_before = {}  # (friend, bundle) -> monotonic time before which it is not asked again (errors)
        self.recheck = {}     # (friend, bundle) -> when to look at a 'behind' one's changes again
        self.pulls = asyncio.Semaphore(max(1, transfers.executors.limit // 2))
        self.function = None

    def _connected(self, peer_id):
        node = self.transfers.node()
        link = node.links.get(peer_id) if node is not None else None
        return link if link is not None and link.state == "connected" else None

    async def run(self):
        try:
            while True:
                await asyncio.sleep(POLL_S)
                try:
                    self.tick()
                except DatabaseError as e:  # e.g. during ALTER EXTENSION: try again next tick
                    self.db.rollback()
                    log.warning("following bundles: %s", e.message)
        finally:
            for task in list(self.busy.values()):
                task.cancel()

    def tick(self):
        rows = self.db.query(FOLLOWED)
        self.db.commit()
        by_friend = {}
        for row in rows:
            by_friend.setdefault(row["friend"], []).append(row)
        now = time.monotonic()
        for friend, follows in by_friend.items():
            if friend in self.busy:
                continue
            link = self._connected(follows[0]["peer_id"])
            if link is None:
                continue
            if self.links.get(friend) is not link:  # (re)connected: whatever waited is asked now
                self.links[friend] = link
                for row in follows:
                    self.not_before.pop((friend, row["bundle"]), None)
            for row in follows:  # peer.follow_bundle took it out of 'error': try again now
                if row["state"] != "error":
                    self.not_before.pop((friend, row["bundle"]), None)
            due = [row for row in follows if self.not_before.get((friend, row["bundle"]), 0.0) <= now]
            if due:
                task = asyncio.ensure_future(self._follow_friend(friend, follows[0]["peer_id"], due))
                self.busy[friend] = task
                task.add_done_callback(lambda _t, f=friend: self.busy.pop(f, None))
        followed = {(r["friend"], r["bundle"]) for r in rows}
        for waits in (self.not_before, self.recheck):
            for key in [k for k in waits if k not in followed]:
                del waits[key]

    async def _follow_friend(self, name, peer_id, follows):
        friend = types.SimpleNamespace(name=name, peer_id=peer_id)
        for row in follows:
            if self._connected(peer_id) is None:
                return
            try:
                await self._follow(friend, row)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one bundle's failure must not stop the others
                message = getattr(e, "message", None) or str(e) or type(e).__name__
                if isinstance(e, DatabaseError):  # (on the worker's connection: no await since)
                    self.db.rollback()
                self.not_before[(name, row["bundle"])] = time.monotonic() + ERROR_RETRY_S
                self._record_error(name, row["bundle"], message)

    async def _follow(self, friend, row):
        key = (friend.name, row["bundle"])
        if row["merging"]:  # a merge waits for the user: nothing can be taken until it ends
            if row["state"] != "conflicts":
                self._set_state(friend.name, row["bundle"], "conflicts", None)
            return
        try:
            theirs = (await self.transfers.head(friend, row["bundle"]))["head"]
        except AquapeerError:
            # head() made the bundle here to keep objects in; a refused first pull leaves nothing.
            if row["head"] is None:
                await self.transfers.forget_new(row["bundle"])
            raise
        if theirs is None:  # the friend has not committed yet
            if row["state"] == "error":
                self._set_state(friend.name, row["bundle"], "following", None)
            return
        if row["state"] == "behind":
            # Kept without checkout: pull again when the friend moves on, at once when the
            # tables have no changed keys left, and now and then to look at bundle.status.
            if theirs == row["last_head"] and row["changed"] and time.monotonic() < self.recheck.get(key, 0.0):
                return
        elif theirs == row["last_head"] and row["state"] == "following":
            return
        elif theirs == row["head"] == row["checked_out"] and row["state"] == "following":
            self._set_state(friend.name, row["bundle"], "following", theirs)  # pulled by hand
            return
        summary = await self._pull(friend.name, row["bundle"], theirs)
        state = summary.get("state")
        self.recheck.pop(key, None)
        if state == "error":
            self.not_before[key] = time.monotonic() + ERROR_RETRY_S
            if row["head"] is None:
                await self.transfers.forget_new(row["bundle"])
        elif state == "behind":
            self.recheck[key] = time.monotonic() + BEHIND_RECHECK_S

    async def _pull(self, friend, bundle, theirs):
        """peer._follow_pull in an executor connected as the worker's role: its summary."""
        if self.function is None:
            self.function = self.db.scalar("select 'peer._follow_pull(jsonb)'::pg_catalog.regprocedure::oid")
            self.db.commit()
        async with self.pulls:
            reply = await self.transfers.executors.run(
                self.transfers.own_role,
                {"op": "call", "args": {"function": self.function, "timeout_ms": int(PULL_TIMEOUT_S * 1000),
                                        "arg": json.dumps({"friend": friend, "bundle": bundle, "theirs": theirs})}},
                PULL_TIMEOUT_S)
        if not reply.get("ok"):
            raise AquapeerError.from_dict(reply.get("error") or {})
        return json.loads(reply.get("result") or "{}")

    def _set_state(self, friend, bundle, state, head):
        self.db.query("update peer.bundle_follow set state = $3, last_error = null, "
                      "last_head = coalesce($4, last_head) where friend = $1 and bundle = $2",
                      [friend, bundle, state, head])
        self.db.commit()

    def _record_error(self, friend, bundle, message):
        try:
            self.db.query("update peer.bundle_follow set state = 'error', last_error = $3 "
                          "where friend = $1 and bundle = $2", [friend, bundle, message[:8000]])
            self.db.commit()
        except DatabaseError:
            self.db.rollback()


async def run(transfers):
    """The worker's task: follow bundles until cancelled."""
    await Follower(transfers).run()
