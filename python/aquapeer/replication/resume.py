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
with newest as (
    -- one index probe per friend with subscriptions, however long its inbox
    select i.id from peer.friend f
    cross join lateral (select i.id, i.received_at from peer.inbox i
                        where i.friend = f.name and i.topic = 'aquapeer.changes'
                        order by i.position desc limit 1) i
    where exists (select from peer.subscription s where s.friend = f.name)
      and i.received_at < pg_catalog.clock_timestamp() - interval '2 s'
)
select i.id::text as id, i.friend, i.topic, h.handler::oid as handler,
       (select r.oid from pg_catalog.pg_roles r where r.rolname = f.role) as role,
       (pg_catalog.to_jsonb(i) - 'handler')::text as row,
       (select extract(epoch from handler_timeout)::float8 from peer.config) as timeout_s
from newest n
join peer.inbox i on i.id = n.id
join peer.friend f on f.name = i.friend
join peer.message_handler h on h.topic = i.topic
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
