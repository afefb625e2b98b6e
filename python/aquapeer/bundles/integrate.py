"""Bringing a commit kept from elsewhere into a bundle (what a pull does once the commit and
its objects are kept): fast-forward, up to date, or a three-way merge of the rows both sides
changed since their common ancestor, field by field (merge.py), written to the tables as a
checkout writes them.  The set-based work is SQL (bundle._merge_rows, bundle._apply); only
the rows both sides changed come here.  See docs/bundles.md."""

import json

from ..errors import AquapeerError
from . import merge

REFUSE_ADVICE = ("Commit them first, or pull with checkout => false (that keeps the commits and only moves "
                 "the head when it fast-forwards).")


def _is_ancestor(db, name, older, newer):
    return db.scalar("select exists (select from bundle._ancestors($1, $3) a where a = $2)", [name, older, newer])


def integrate(db, name, theirs, checkout):
    """A summary: fast_forward, up_to_date, conflicts, head (after), merging."""
    db.query("select bundle._bundle($1)", [name])
    bundle = db.query("select head, checked_out from bundle.bundle where name = $1 for update", [name])[0]
    if not db.scalar("select exists (select from bundle.commit where bundle = $1 and id = $2)", [name, theirs]):
        raise AquapeerError(f'bundle "{name}" has no commit {theirs}', sqlstate="42704",
                            hint="Keep the commit and its objects first (bundle._keep, bundle._promote, "
                                 "bundle._keep_commits).")
    merging = db.scalar("select theirs from bundle.merge where bundle = $1", [name])
    if merging:
        raise AquapeerError(f'bundle "{name}" has a merge of commit {merging} in progress', sqlstate="55000",
                            hint="Finish it (bundle.resolve each conflict, then bundle.commit) or give it up: "
                                 "select bundle.merge_abort(name).")
    head = bundle["head"]
    summary = {"fast_forward": False, "up_to_date": False, "conflicts": 0, "head": head, "merging": False}
    if head is not None and _is_ancestor(db, name, theirs, head):
        summary["up_to_date"] = True
        return summary
    if head is None or _is_ancestor(db, name, head, theirs):
        if checkout:
            db.query("select bundle._refuse_uncommitted($1, $2)", [name, REFUSE_ADVICE])
        db.query("update bundle.bundle set head = $2 where name = $1", [name, theirs])
        if checkout:
            db.query("select bundle.checkout($1, $2)", [name, theirs])
        summary.update(fast_forward=True, head=theirs)
        return summary
    if not checkout:
        return summary  # diverged: merging needs the tables
    if bundle["checked_out"] != head:
        raise AquapeerError(f'bundle "{name}" has tables checked out from commit {bundle["checked_out"]}, not from its '
                            f'head {head}, so it cannot merge into them', sqlstate="55000",
                            hint="Check the head out first: select bundle.checkout(name).")
    db.query("select bundle._refuse_uncommitted($1, $2)", [name, REFUSE_ADVICE])
    base = db.scalar("select bundle._merge_base($1, $2, $3)", [name, head, theirs])
    rows, conflicts = [], []
    for r in db.query("select relation::oid as relation, key::text, base_fields::text, our_fields::text, "
                      "their_fields::text from bundle._merge_rows($1, $2, $3, $4)", [name, base, head, theirs]):
        ours = _fields(r["our_fields"])
        merged, found = merge.merge_row(None, _fields(r["base_fields"]), ours, _fields(r["their_fields"]))
        key = json.loads(r["key"])
        if merged != ours:
            rows.append({"relation": r["relation"], "key": key, "fields": merged})
        conflicts += [{"relation": r["relation"], "key": key, "column": c.column,
                       "base": c.base, "ours": c.ours, "theirs": c.theirs} for c in found]
    db.query("insert into pg_temp.bundle_apply (relation, key, row_text) "
             "select (x->>'relation')::oid::regclass, x->'key', nullif(x->'fields', 'null')::text "
             "from pg_catalog.jsonb_array_elements($1::jsonb) x", [json.dumps(rows)])
    db.query("insert into bundle.merge (bundle, theirs, ours, base) values ($1, $2, $3, $4)",
             [name, theirs, head, base])
    # A whole-row conflict keeps the rows as JSON text, a field conflict the field's text.
    db.query("insert into bundle.conflicts select $1, (x->>'relation')::oid::regclass, x->'key', x->>'column', "
             "case when x->>'column' is null then nullif(x->'base', 'null')::text else x->>'base' end, "
             "case when x->>'column' is null then nullif(x->'ours', 'null')::text else x->>'ours' end, "
             "case when x->>'column' is null then nullif(x->'theirs', 'null')::text else x->>'theirs' end "
             "from pg_catalog.jsonb_array_elements($2::jsonb) x", [name, json.dumps(conflicts)])
    db.query("select bundle._apply($1, $2)", [name, f"merge commit {theirs}"])
    summary.update(merging=True, conflicts=len(conflicts))
    return summary


def _fields(text):
    return None if text is None else json.loads(text)
