"""Live rows in the database: local writes of text cells as edits sent to the friend, and the
friend's messages on topic aquapeer.live handled in an executor connected as the friend's role.

A friend's edit takes the row's lock first and then the document's, the order a local writer
takes them in (its UPDATE, then the trigger), so the two never wait for each other crosswise.
The merged text is then written to the column by the friend's role (its GRANTs and row-level
security decide); the trigger finds the column equal to the document's text and sends nothing.
"""

import base64
import json

from ..db import quote_ident
from ..errors import AquapeerError
from . import text

TOPIC = "aquapeer.live"



def edit_cells(db, cells):
    """Local writes of text cells ([{share, column, value}], in share and column order, the order
    documents are locked in) as edits of their documents, queued to the friend."""
    for cell in cells:
        found = db.query("select d.state, s.friend from peer.live_text d join peer.live_share s on s.id = d.share "
                         "where d.share = $1::uuid and d.\"column\" = $2 for update of d",
                         [cell["share"], cell["column"]])
        if not found:
            continue
        state, update = text.edit(bytes(found[0]["state"]), cell["value"])
        db.query("update peer.live_text set state = $3, value = $4 where share = $1::uuid and \"column\" = $2",
                 [cell["share"], cell["column"], state, cell["value"]])
        if update is not None:
            db.query("select peer.send($1, $2, $3::jsonb)", [found[0]["friend"], TOPIC, json.dumps(
                {"op": "edit", "id": cell["share"], "column": cell["column"],
                 "update": base64.b64encode(update).decode()})])


def new_documents(db, share, row):
    """The documents of a new share's text columns, holding the row's text: {column: state in base64}."""
    documents = {}
    for r in db.query("select c::text as name, ($2::jsonb ->> c::text) as value from peer.live_share s "
                      "cross join unnest(peer._live_text_columns(s.relation)) c where s.id = $1::uuid", [share, row]):
        value = r["value"] or ""
        state = text.new_document(value)
        db.query("insert into peer.live_text (share, \"column\", value, state) values ($1::uuid, $2, $3, $4)",
                 [share, r["name"], value, state])
        documents[r["name"]] = base64.b64encode(state).decode()
    return documents


def merge(db, friend, share, column, update):
    """A friend's edit merged into its document (locked here): the new text, or None when the
    share is not live."""
    found = db.query("select d.state from peer.live_text d join peer.live_share s on s.id = d.share "
                     "where d.share = $1::uuid and d.\"column\" = $2 and s.state = 'live' "
                     "and s.friend = (peer._applying_friend($3)).name for update of d", [share, column, friend])
    if not found:
        return None
    state, value = text.merge(bytes(found[0]["state"]), base64.b64decode(update))
    db.query("update peer.live_text set state = $3, value = $4 where share = $1::uuid and \"column\" = $2",
             [share, column, state, value])
    return value


def handle(db, friend, upto):
    """The handler of topic aquapeer.live: the friend's messages up to inbox position upto, in
    order (one that failed before is handled again, before those after it)."""
    for r in db.query("select m::text as payload from peer._live_take($1, $2) m", [friend, upto]):
        message = json.loads(r["payload"])
        op = message.get("op")
        if op == "request":
            db.query("select peer._live_requested($1, $2::jsonb)", [friend, r["payload"]])
        elif op == "accept":
            db.query("select peer._live_accepted($1, $2::uuid)", [friend, message["id"]])
        elif op == "end":
            db.query("select peer._live_ended($1, $2::uuid, $3)", [friend, message["id"], message.get("reason")])
        elif op == "edit":
            _apply_edit(db, friend, message)
        else:
            raise AquapeerError(f'"{friend}" sent a live message this version does not know ({op!r})',
                                hint="Upgrade aquapeer here; then peer.retry_message() it.", sqlstate="0A000")


def _apply_edit(db, friend, message):
    target = db.query("select relation, key::text as key from peer._live_target($1, $2::uuid)", [friend, message["id"]])
    if not target:
        return  # ended here meanwhile
    relation, key = target[0]["relation"], target[0]["key"]
    match = " and ".join(f"t.{quote_ident(k)} = k.{quote_ident(k)}" for k in json.loads(key))
    source = f"pg_catalog.jsonb_populate_record(null::{relation}, $1::jsonb) k"
    db.query(f"select from only {relation} t join {source} on {match} for update of t", [key])
    value = db.scalar("select peer._live_merge($1, $2::uuid, $3, $4)",
                      [friend, message["id"], message["column"], message["update"]])
    if value is not None:
        column = quote_ident(message["column"])
        db.query(f"update only {relation} t set {column} = $2 from {source} "
                 f"where {match} and t.{column} is distinct from $2", [key, value])
