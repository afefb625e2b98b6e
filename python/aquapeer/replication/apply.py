"""Applying a friend's changes, in an executor connected as the friend's role.

The handler of topic aquapeer.changes (peer._apply_changes) calls apply_pending
for each message that arrives.  It applies, in order, each of the friend's
transactions whose messages have all arrived (the sender marks the last one,
"end"), each atomically: its rows are resolved against the local stamps
(resolve.py), written with one statement per kind of write and set of
columns, and the messages deleted, in one subtransaction.  A row the database
refuses (a unique or foreign-key violation, row-level security, a value that
does not convert) is set aside in peer.apply_errors and the others go on;
later changes to its key wait behind it.  What stops every row (a missing
column, a missing table privilege, a clock too far ahead) pauses the
subscription: the transaction stays pending and is tried again when the next
message arrives or the worker retries paused subscriptions.

An initial copy comes in chunks on the same stream (copy_id, and on a chunk's
last message its marker).  Applying a chunk moves the copy's checkpoint and asks
for the next chunk in the same transaction (peer._copy_chunk_applied).  While
a copy runs, an update to a row it has not brought yet is kept
(peer.change_ahead_of_copy) and applied right after the copy brings the row,
where its stamp beats the copy's.  When the friend dropped changes it kept for
us too long (peer.config.change_retention), it says so on the stream ("resync"):
the table is compared with the friend's by row hashes, and only the rows that
differ are copied, the same way (peer._start_resync).
"""

import json

from ..db import quote_ident
from ..errors import AquapeerError, DatabaseError
from . import resolve

PRIVILEGES = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}
# Rows read, resolved and written together at most: whole transactions of the friend per
# subtransaction (a larger one goes alone, in batches of this size).
STEP_ROWS = 5000
# What stops every change of a transaction, not one row: the subscription pauses.
PAUSING_STATES = frozenset({"22008", "42703"})
# A deadlock with a local writer, a serialization failure, a lock timeout: the transaction stays
# pending and is tried again (replication.resume), nothing is set aside.
TRANSIENT_STATES = frozenset({"40P01", "40001", "55P03"})


class Paused(AquapeerError):
    def __init__(self, relation, message, *, hint=None, sqlstate="55000"):
        super().__init__(message, hint=hint, sqlstate=sqlstate)
        self.relation = relation


def _canon(key):
    """A key, {column: value}, as a dict key: its items, or its JSON text when a value is a JSON
    array or object (a json or array key column).  Four times a row: JSON text always took a
    fifth of the apply's time."""
    if any(isinstance(v, (dict, list)) for v in key.values()):
        return json.dumps(key, sort_keys=True, separators=(",", ":"))
    return tuple(sorted(key.items()))


def _loads(text):
    return None if text is None else json.loads(text)


def apply_pending(db, friend, upto):
    """Apply the friend's complete transactions received up to inbox position upto, in steps of
    about STEP_ROWS rows (whole transactions), each step in a subtransaction of its own."""
    steps, step, step_rows, transaction = [], [], 0, []
    for message in db.query("select id::text as id, rows, ends from peer._pending_changes($1, $2)", [friend, upto]):
        transaction.append((message["id"], message["rows"]))
        step_rows += message["rows"]
        if message["ends"]:
            step += transaction
            transaction = []
            if step_rows >= STEP_ROWS:
                steps.append(step)
                step, step_rows = [], 0
    if step:
        steps.append(step)
    tables = {}
    for step in steps:
        if not _apply_step(db, friend, step, tables):
            return


def _copy_kind(payload):
    """What a message's rows are: None for changes, "chunk" for a chunk of a copy, "whole" for the copy
    of a friend of 0.20.0, all at once.  (_start_resync's deletes are of a kind of their own, "resync".)"""
    if not payload.get("copy"):
        return None
    return "chunk" if "copy_id" in payload else "whole"


def _apply_step(db, friend, messages, tables):
    tally, chunks, whole_rows = {}, [], {}
    try:
        with db.savepoint():
            batch, batch_key = [], None
            for payload in _payloads(db, friend, messages):
                if payload.get("resync"):
                    _apply_rows(db, friend, tables, batch_key, batch, tally)
                    batch, batch_key = [], None
                    _start_resync(db, friend, tables, payload["r"], tally)
                    continue
                key = (payload["r"], _copy_kind(payload))
                if batch and (key != batch_key or len(batch) >= STEP_ROWS):
                    _apply_rows(db, friend, tables, batch_key, batch, tally)
                    batch = []
                batch_key = key
                default_stamp = (int(payload.get("c") or 0), str(payload.get("o") or ""))
                for change in payload.get("rows") or ():  # each keeps its stamp, also when set aside
                    change.setdefault("c", default_stamp[0])
                    change.setdefault("o", default_stamp[1])
                    batch.append(change)
                if "chunk" in payload:
                    chunks.append((payload["r"], payload["chunk"]))
                elif key[1] == "whole":
                    whole_rows[payload["r"]] = whole_rows.get(payload["r"], 0) + len(payload.get("rows") or ())
                    if payload.get("end", True):
                        chunks.append((payload["r"], {"rows": whole_rows.pop(payload["r"])}))
            _apply_rows(db, friend, tables, batch_key, batch, tally)
            # after the chunks' rows, in their transaction: the checkpoint and the next request
            finished = [relation for relation, chunk in chunks
                        if db.scalar("select peer._copy_chunk_applied($1, $2, $3::jsonb)", [friend, relation, chunk])]
    except Paused as paused:
        db.query("select peer._pause_subscription($1, $2, $3)",
                 [friend, paused.relation, f"{paused.message} ({paused.hint})" if paused.hint else paused.message])
        return False
    except DatabaseError as e:
        if e.sqlstate in TRANSIENT_STATES:
            return False
        raise
    db.query("select peer._applied($1, $2::uuid[], $3::jsonb)",
             [friend, "{" + ",".join(m for m, _rows in messages) + "}", list(tally.values())])
    for relation in finished:
        tables.pop(relation, None)  # its copy ended: changes are no longer held for it
    return True


def _start_resync(db, friend, tables, relation, tally):
    """Changes the friend kept for us were dropped: copy the rows that differ from the friend's, and
    delete here those the friend no longer has."""
    deletes = [json.loads(r["change"]) for r in db.query(
        "select c::text as change from peer._start_resync($1, $2) c", [friend, relation])]
    tables.pop(relation, None)  # a copy runs now: updates of rows it brings wait for them
    _apply_rows(db, friend, tables, (relation, "resync"), deletes, tally)


def _payloads(db, friend, messages):
    """The messages' payloads in order, read about STEP_ROWS rows at a time."""
    group, rows = [], 0
    for message_id, n in messages + [(None, 0)]:
        if group and (message_id is None or rows + n > STEP_ROWS):
            for r in db.query("select p::text as payload from peer._change_messages($1, $2::uuid[]) p",
                              [friend, "{" + ",".join(group) + "}"]):
                yield json.loads(r["payload"])
            group, rows = [], 0
        if message_id is not None:
            group.append(message_id)
            rows += n


class Subscribed:
    """A subscribed table as the applying role sees it: columns, privileges, key."""

    def __init__(self, db, friend, relation):
        found = db.query("select relation::oid as oid, key_columns::text[] as key_columns "
                         "from peer._subscribed($1, $2)", [friend, relation])
        self.found = bool(found)
        if not found:
            return
        self.oid = found[0]["oid"]
        self.table = Table(relation, found[0]["key_columns"])
        self.columns = {r["name"] for r in db.query(
            "select attname::text as name from pg_catalog.pg_attribute "
            "where attrelid = $1::oid and attnum > 0 and not attisdropped", [self.oid])}
        self.privileges = {r["privilege"]: r["granted"] for r in db.query(
            "select p as privilege, pg_catalog.has_table_privilege($1::oid, p) as granted "
            "from unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p", [self.oid])}
        self.role = db.scalar("select current_user::text")
        self.copying = db.scalar("select peer._copy_in_progress($1, $2)", [friend, relation])

    def check(self, rows):
        """Pause on what stops every row: a column missing here, a table privilege missing."""
        relation = self.table.name
        sent, ops = set(), set()
        for change in rows:
            sent.update(change.get("v") or ())
            sent.update(change["k"])
            ops.add(change["op"])
        missing = sorted(sent - self.columns)
        if missing:
            raise Paused(relation, f"column {missing[0]} of {relation} does not exist here",
                         hint="Add it (ALTER TABLE ... ADD COLUMN); the subscription then resumes by itself.",
                         sqlstate="42703")
        for needed in ["SELECT"] + [PRIVILEGES[op] for op in sorted(ops)]:
            if not self.privileges[needed]:
                raise Paused(relation, f"role {self.role} lacks the {needed} privilege on {relation}",
                             hint=f"GRANT {needed} ON {relation} TO {self.role}; "
                                  "the subscription then resumes by itself.",
                             sqlstate="42501")


def _apply_rows(db, friend, tables, key, rows, tally):
    if not rows:
        return
    relation, copy = key
    # "copied" ends the initializing state of a subscription to a friend of 0.20.0; a chunked copy
    # ends it with its last chunk
    entry = tally.setdefault(relation, {"relation": relation, "applied": 0, "conflicts": 0, "clock": None,
                                        "copied": False})
    entry["copied"] = entry["copied"] or copy == "whole"
    subscribed = tables.get(relation)
    if subscribed is None:
        subscribed = tables[relation] = Subscribed(db, friend, relation)
    if not subscribed.found:
        db.query("select peer._set_aside($1, $2, $3::jsonb, '42501', $4)",
                 [friend, relation, rows, f'{relation} is not subscribed from "{friend}"'])
        return
    subscribed.check(rows)
    for batch in _distinct_key_runs(rows):
        _apply_batch(db, friend, subscribed, batch, entry, copy is not None)
    if copy is not None and subscribed.copying:
        held = [json.loads(r["change"]) for r in db.query(
            "select c::text as change from peer._take_held_changes($1, $2::oid::regclass, $3::jsonb) c",
            [friend, subscribed.oid, [r["k"] for r in rows]])]
        for batch in _distinct_key_runs(held):
            _apply_batch(db, friend, subscribed, batch, entry, False)


def _distinct_key_runs(rows):
    """The rows in order, cut where a key comes again (changes retried together, say): each run
    is resolved against the stamps the run before it wrote."""
    run, keys = [], set()
    for change in rows:
        key = _canon(change["k"])
        if key in keys:
            yield run
            run, keys = [], set()
        run.append(change)
        keys.add(key)
    if run:
        yield run


def _apply_batch(db, friend, subscribed, rows, entry, copied):
    table, oid = subscribed.table, subscribed.oid
    relation, key_columns = table.name, table.key_columns
    # The local rows first, locked, then their stamps: a local write takes the row's lock before
    # it stamps, so the stamps read are current and the two never wait for each other crosswise.
    lock = " for update of t" if subscribed.privileges["UPDATE"] else ""
    keys = [r["k"] for r in rows]
    local = {}
    for r in db.query(f"select pg_catalog.to_jsonb(t)::text as row from only {relation} t "
                      f"join pg_catalog.jsonb_populate_recordset(null::{relation}, $1::jsonb) s on {table.key_match}"
                      f"{lock}", [keys]):
        row = json.loads(r["row"])
        local[_canon({k: row.get(k) for k in key_columns})] = row
    states = {_canon(json.loads(r["key"])): r for r in db.query(
        "select key::text as key, columns::text as columns, born::text as born, deleted::text as deleted, waiting "
        "from peer._row_states($1, $2::oid::regclass, $3::jsonb)", [friend, oid, keys])}
    decisions, waiting, held = [], {}, []   # waiting: apply error id -> the changes behind it
    for change in rows:
        key = _canon(change["k"])
        state = states.get(key) or {}
        if state.get("waiting") is not None:
            waiting.setdefault(state["waiting"], []).append(change)
            continue
        if (subscribed.copying and not copied and change["op"] == "U" and key not in local
                and state.get("deleted") is None):
            # the copy has not brought the row yet (an update alone would be dropped here)
            held.append(change)
            continue
        stored = {"columns": _loads(state.get("columns")), "born": _loads(state.get("born")),
                  "deleted": _loads(state.get("deleted"))}
        decisions.append((change, resolve.resolve(change, (change["c"], change["o"]), stored, local.get(key))))
    for error_id, changes in waiting.items():
        db.query("select peer._set_aside($1, $2, $3::jsonb, null, $4)",
                 [friend, relation, changes, f"waiting behind apply error {error_id} of the same key"])
    if held:
        db.query("select peer._hold_changes($1, $2::oid::regclass, $3::jsonb)", [friend, oid, held])
    for _change, decision in _write_all(db, friend, oid, table, decisions):
        if decision.action != resolve.NOTHING:
            entry["applied"] += 1
        entry["conflicts"] += len(decision.conflicts)
        clock = decision.stamp[0]
        entry["clock"] = clock if entry["clock"] is None else max(entry["clock"], clock)


class Table:
    """The statements that write resolved changes into one table."""

    def __init__(self, name, key_columns):
        self.name = name
        self.key_columns = key_columns
        self.key_match = " and ".join(f"t.{quote_ident(k)} = s.{quote_ident(k)}" for k in key_columns)

    def exists(self, db, key):
        return db.scalar(f"select exists (select from only {self.name} t join pg_catalog.jsonb_populate_record("
                         f"null::{self.name}, $1::jsonb) s on {self.key_match})", [key])

    def statements(self, decisions):
        """(sql, rows) to run, deletes first (they may free unique values), then updates, then inserts."""
        deletes = [change["k"] for change, d in decisions if d.action == "delete"]
        if deletes:
            yield (f"delete from only {self.name} t using pg_catalog.jsonb_populate_recordset(null::{self.name}, "
                   f"$1::jsonb) s where {self.key_match}", deletes)
        for action in ("update", "insert"):
            groups = {}
            for change, d in decisions:
                if d.action == action:
                    groups.setdefault(tuple(sorted(d.values)), []).append({**change["k"], **d.values})
            for columns, rows in groups.items():
                names = ", ".join(quote_ident(c) for c in columns)
                if action == "update":
                    sets = ", ".join(f"{quote_ident(c)} = s.{quote_ident(c)}" for c in columns)
                    yield (f"update only {self.name} t set {sets} from pg_catalog.jsonb_populate_recordset("
                           f"null::{self.name}, $1::jsonb) s where {self.key_match}", rows)
                else:
                    yield (f"insert into {self.name} ({names}) select {names} from "
                           f"pg_catalog.jsonb_populate_recordset(null::{self.name}, $1::jsonb)", rows)



def _write(db, friend, oid, table, decisions):
    states, conflicts, forward, newest = [], [], [], None
    for change, d in decisions:
        if d.state is not None:
            states.append({"key": change["k"], **d.state})
        for c in d.conflicts:
            local, remote = c["local_stamp"] or [None, None], c["remote_stamp"] or [None, None]
            conflicts.append({"key": change["k"], "column": c["column"], "local_value": c["local_value"],
                              "local_clock": local[0], "local_origin": local[1], "remote_value": c["remote_value"],
                              "remote_clock": remote[0], "remote_origin": remote[1], "winner": c["winner"]})
        if d.action != resolve.NOTHING:
            forward.append({"key": change["k"], "clock": d.stamp[0], "origin": d.stamp[1]})
        newest = d.stamp[0] if newest is None else max(newest, d.stamp[0])
    # What the capture trigger forwards first, then the rows, then their stamps: a local writer
    # writes the row before it stamps, so a new key's row and stamp are locked in the same order.
    record = "select peer._record_apply($1, $2::oid::regclass, $3::jsonb, $4::jsonb, $5::jsonb, $6::bigint)"
    db.query(record, [friend, oid, [], [], forward, newest])
    for sql, rows in table.statements(decisions):
        db.query(sql, [rows])
    db.query(record, [friend, oid, states, conflicts, [], None])


def _write_all(db, friend, oid, table, decisions):
    """All rows in one go; when the database refuses, row by row, setting aside what it refuses.
    Returns the decisions written."""
    if len(decisions) > 1:
        try:
            with db.savepoint():
                _write(db, friend, oid, table, decisions)
            return decisions
        except DatabaseError as e:
            _pause_if_every_row(table, e)
    written = []
    for one in decisions:
        try:
            with db.savepoint():
                _write(db, friend, oid, table, [one])
            written.append(one)
        except DatabaseError as e:
            _pause_if_every_row(table, e)
            if e.sqlstate == "23505" and one[1].action == "insert" and table.exists(db, one[0]["k"]):
                # A local insert of the same key committed meanwhile: merge with it, next time round.
                raise DatabaseError(e.message, sqlstate="40001") from None
            _set_aside(db, friend, table.name, one[0], e)
    return written


def _pause_if_every_row(table, error):
    if error.sqlstate in TRANSIENT_STATES:
        raise error
    if error.sqlstate in PAUSING_STATES:
        raise Paused(table.name, error.message, hint=error.hint, sqlstate=error.sqlstate) from None


def _set_aside(db, friend, relation, change, error):
    db.query("select peer._set_aside($1, $2, $3::jsonb, $4, $5)",
             [friend, relation, [change], error.sqlstate, error.message])
