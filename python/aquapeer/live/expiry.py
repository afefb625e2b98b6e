"""Ending live shares on time, on the worker: those idle longer than their ttl, requests not
accepted within it, and those of friends away longer than peer.config.soft_lock_ttl (the friend
is told when it comes back).  And handling again the live messages whose handler failed (a
deadlock with a local writer, a privilege granted since): a friend's later edits depend on them."""

import asyncio
import logging
import time

log = logging.getLogger("aquapeer.live")

CHECK_S = 1.0
RETRY_S = 5.0

# Friends with live shares, and how long peer.config.soft_lock_ttl lets them be away.
FRIENDS = """
select distinct f.name, f.peer_id, (select extract(epoch from soft_lock_ttl)::float8 from peer.config) as away_s
from peer.live_share s join peer.friend f on f.name = s.friend where s.state = 'live'
"""

# The newest live message of each friend whose handler failed: its handler handles those before it.
FAILED = """
select distinct on (i.friend) i.id::text as id, i.friend from peer.inbox i
where i.topic = 'aquapeer.live' and i.handler_error is not null
order by i.friend, i.position desc
"""


async def run(db, messaging, node_getter):
    away_since = {}  # friend -> when it was first seen not connected
    last_retry = 0.0
    while True:
        await asyncio.sleep(CHECK_S)
        node = node_getter()
        connected = set() if node is None else {
            peer_id for peer_id, link in node.links.items() if link.state == "connected"}
        now = time.monotonic()
        friends = db.query(FRIENDS)
        away_since = {f["name"]: away_since.get(f["name"], now) for f in friends if f["peer_id"] not in connected}
        away = [f["name"] for f in friends if now - away_since.get(f["name"], now) > f["away_s"]]
        ended = db.scalar("select peer._expire_live(array(select pg_catalog.jsonb_array_elements_text($1::jsonb)))",
                          [away])
        db.commit()
        if ended:
            log.info("ended %d live shares", ended)
        if now - last_retry >= RETRY_S:
            last_retry = now
            await _retry_failed(db, messaging)


async def _retry_failed(db, messaging):
    rows = db.query(FAILED)
    db.commit()
    await messaging.retry_newest(rows, "aquapeer.live", "live edits")
