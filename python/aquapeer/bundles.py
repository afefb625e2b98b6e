"""Bundles in the database: committing what changed (the SQL in schema bundle does the
set-based work; this module signs).  See docs/bundles.md."""

import datetime

from . import commits, friends
from .errors import AquapeerError


def commit(db, name, message):
    """Commit what changed in the bundle's tables since its head; the new commit's id."""
    head = db.scalar("select head from bundle._bundle($1)", [name])
    staged = db.query("select root, rows_changed from bundle._stage($1)", [name])[0]
    if staged["rows_changed"] == 0:
        raise AquapeerError(f'nothing to commit in bundle "{name}": its rows are as its head has them',
                            sqlstate="55000", hint="See select * from bundle.status(name).")
    me = friends.load_identity(db)
    new = commits.Commit(parents=[head] if head else [], tree=staged["root"], author=me.peer_id,
                         message=message or "", time=commits.utc_time(datetime.datetime.now(datetime.timezone.utc)),
                         rows_changed=staged["rows_changed"])
    document = commits.sign(me, new)
    db.query("insert into bundle.object values ($1, 'commit', $2) on conflict do nothing", [new.id, new.encode()])
    db.query("insert into bundle.commit values ($1, array(select pg_catalog.jsonb_array_elements_text($2::jsonb)), "
             "$3, $4, $5, $6::timestamptz, $7, $8::jsonb)",
             [new.id, list(new.parents), new.tree, new.author, new.message, new.time, new.rows_changed, document])
    db.query("update bundle.bundle set head = $2 where name = $1", [name, new.id])
    return new.id
