"""Trying pending changes again: those of a paused subscription, so that fixing what paused it
(adding the missing column, granting the privilege) is all a user has to do, and those a
deadlock with a local writer sent back.  And asking again for the chunk of a copy the friend
did not answer (peer._ask_stalled_copies)."""

import asyncio
import logging

log = logging.getLogger("aquapeer.replication")

RETRY_S = 5.0

# The newest pending message of each friend with changes pending for a while: its handler
# applies everything pending before it too.
PENDING = """
select i.id::text as id, f.name as friend
from peer.friend f
-- one index probe per friend with subscriptions, however long its inbox
cross join lateral (select i.id, i.received_at from peer.inbox i
                    where i.friend = f.name and i.topic = 'aquapeer.changes'
                    order by i.position desc limit 1) i
where exists (select from peer.subscription s where s.friend = f.name)
  and i.received_at < pg_catalog.clock_timestamp() - interval '2 s'
"""


async def run(db, messaging):
    while True:
        await asyncio.sleep(RETRY_S)
        asked = db.scalar("select peer._ask_stalled_copies()")
        rows = db.query(PENDING)
        db.commit()
        if asked:
            log.info("asked again for %d chunks of copies friends did not answer", asked)
        await messaging.retry_newest(rows, "aquapeer.changes", "changes")
