"""Trying pending changes again: those of a paused subscription, so that fixing what paused it
(adding the missing column, granting the privilege) is all a user has to do, and those a
deadlock with a local writer sent back."""

import asyncio
import logging

log = logging.getLogger("aquapeer.replication")

RETRY_S = 5.0

# The newest pending message of each friend with changes pending for a while, in the shape
# messaging.Messaging.handle takes (its handler applies everything pending before it too).
PENDING = """
select distinct on (i.friend) i.id::text as id, i.friend, i.topic, h.handler::oid as handler,
       (select r.oid from pg_catalog.pg_roles r where r.rolname = f.role) as role,
       (pg_catalog.to_jsonb(i) - 'handler')::text as row,
       (select extract(epoch from handler_timeout)::float8 from peer.config) as timeout_s
from peer.inbox i
join peer.friend f on f.name = i.friend
join peer.message_handler h on h.topic = i.topic
where i.topic = 'aquapeer.changes'
  and i.received_at < pg_catalog.clock_timestamp() - interval '2 s'
order by i.friend, i.position desc
"""


async def run(db, messaging):
    while True:
        await asyncio.sleep(RETRY_S)
        rows = db.query(PENDING)
        db.commit()
        for message in rows:
            group = (message["friend"], message["topic"])
            if group in messaging.handling:
                continue  # its handler runs now, and applies what it can
            messaging.handling.add(group)
            try:
                await messaging.handle(message)
            finally:
                messaging.handling.discard(group)
