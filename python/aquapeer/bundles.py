"""Bundles in the database: committing what changed, and keeping commits received from
elsewhere (the SQL in schema bundle does the set-based work; this module signs and verifies).
See docs/bundles.md."""

import datetime
import json

from . import commits, friends
from .errors import AquapeerError


def commit(db, name, message):
    """Commit what changed in the bundle's tables since its head; the new commit's id.  During a
    merge (bundle._integrate), once no conflict is left, the commit has two parents: the head
    and the commit merged; it ends the merge."""
    bundle = db.query("select head, checked_out from bundle._bundle($1)", [name])[0]
    if bundle["head"] != bundle["checked_out"]:
        raise AquapeerError(f'bundle "{name}" has tables checked out from commit {bundle["checked_out"]}, '
                            f'not from its head {bundle["head"]} (an older commit was checked out, or a friend pushed)',
                            sqlstate="55000",
                            hint="Check the head out first: select bundle.checkout(name), with force => true "
                                 "to give up the changes made since.")
    head = bundle["head"]
    merging = db.query("select m.theirs, (select count(*) from bundle.conflicts c where c.bundle = m.bundle) as conflicts "
                       "from bundle.merge m where m.bundle = $1", [name])
    if merging and merging[0]["conflicts"]:
        raise AquapeerError(f'bundle "{name}" has {merging[0]["conflicts"]} unresolved conflict(s) from the merge of '
                            f'commit {merging[0]["theirs"]}', sqlstate="55000",
                            hint="Resolve each (see select * from bundle.conflicts): select bundle.resolve(name, relation, "
                                 "key, column_name, 'ours' | 'theirs' | 'value', value); or give the merge up with "
                                 "bundle.merge_abort(name).")
    staged = db.query("select root, rows_changed from bundle._stage($1)", [name])[0]
    if staged["rows_changed"] == 0 and not merging:
        raise AquapeerError(f'nothing to commit in bundle "{name}": its rows are as its head has them',
                            sqlstate="55000", hint="See select * from bundle.status(name).")
    parents = ([head] if head else []) + ([merging[0]["theirs"]] if merging else [])
    me = friends.load_identity(db)
    new = commits.Commit(parents=parents, tree=staged["root"], author=me.peer_id,
                         message=message or "", time=commits.utc_time(datetime.datetime.now(datetime.timezone.utc)),
                         rows_changed=staged["rows_changed"])
    _store(db, name, new, commits.sign(me, new))
    db.query("update bundle.bundle set head = $2, checked_out = $2 where name = $1", [name, new.id])
    db.query("delete from bundle.merge where bundle = $1", [name])
    return new.id


def _store(db, name, new, document):
    db.query("insert into bundle.object values ($1, $2, 'commit', $3) on conflict do nothing",
             [name, new.id, new.encode()])
    db.query("insert into bundle.commit values ($1, $2, array(select pg_catalog.jsonb_array_elements_text($3::jsonb)), "
             "$4, $5, $6, $7::timestamptz, $8, $9::jsonb) on conflict do nothing",
             [name, new.id, json.dumps(list(new.parents)), new.tree, new.author, new.message, new.time,
              new.rows_changed, json.dumps(document)])


def keep_commits(db, name, documents):
    """Verify signed commit documents received for a bundle and keep them, parents first; each
    commit's tree must already be kept (bundle._promote).  How many were new."""
    if not isinstance(documents, list):
        raise commits.CommitError("commit documents come as a JSON array")
    received = {}
    for document in documents:
        new = commits.verify(document)
        received[new.id] = (new, document)
    known = {r["id"] for r in db.query(
        "select id from bundle.commit where bundle = $1 and id in (select pg_catalog.jsonb_array_elements_text($2::jsonb))",
        [name, sorted({p for new, _ in received.values() for p in new.parents} | set(received))])}
    kept = 0
    waiting = {cid: pair for cid, pair in received.items() if cid not in known}
    while waiting:
        ready = [cid for cid, (new, _) in waiting.items() if all(p in known for p in new.parents)]
        if not ready:
            cid, (new, _) = min(waiting.items())
            lacking = sorted(p for p in new.parents if p not in known and p not in waiting)
            raise commits.CommitError(f"commit {cid} has parents this database lacks: {', '.join(lacking) or 'a cycle'}",
                                      hint="The sender must send a commit's parents with it (pull again).")
        for cid in sorted(ready):
            new, document = waiting.pop(cid)
            if not db.scalar("select exists (select from bundle.object where bundle = $1 and id = $2 and kind = 'root')",
                             [name, new.tree]):
                raise commits.CommitError(f"commit {cid} refers to tree {new.tree}, which bundle \"{name}\" lacks",
                                          hint="Its objects must be kept before it (pull again).")
            _store(db, name, new, document)
            known.add(cid)
            kept += 1
    return kept
