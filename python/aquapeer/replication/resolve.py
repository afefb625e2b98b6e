"""Deciding what a friend's row change does to the local row (pure).

Every column of a replicated row carries a stamp: the hybrid logical clock
(48 bits of milliseconds, 16 of counter) of the write that set it and the
peer id of the database where that write happened.  Stamps compare by clock,
then origin, so every database orders any two writes the same way.

- A column takes the remote value when the remote stamp is newer than the
  local one (or the local column has no stamp: written before replication
  or by a session that is not replicated).  Concurrent edits of different
  columns of one row therefore both survive.
- A remote value that loses to a newer local one is a conflict when the
  values differ; it is returned, to be kept in peer.replication_conflicts.
- A delete leaves a tombstone stamp.  It removes the row unless the row was
  born (inserted) after it; an update never brings a deleted row back; an
  insert older than the tombstone is dropped, a newer one inserts again.
- A change whose stamps are no newer than what is stored does nothing, and
  is not forwarded to other friends: that is what keeps pairs and rings of
  databases from echoing.

States and changes are plain JSON values as the database holds them:
state = {"columns": {column: [clock, origin]}, "born": stamp, "deleted": stamp}
change = {"op": "I"|"U"|"D", "k": key, "v": {column: value},
          optional "c", "o" (the change's own stamp) and "stamps" (an initial copy's column stamps)}.
"""

import dataclasses

NOTHING = "none"


@dataclasses.dataclass
class Decision:
    action: str                  # "insert", "update", "delete" or "none"
    values: dict                 # the columns to write (insert: all; update: those that won)
    state: dict | None           # the row's new stamps (None: unchanged)
    stamp: tuple                 # the change's stamp, forwarded with what it wrote
    conflicts: list              # [{column, local_value, local_stamp, remote_value, remote_stamp, winner}]


def _stamp(value):
    return None if value is None else (int(value[0]), str(value[1]))


def _newer(a, b):
    """Whether stamp a is newer than stamp b (None is older than any stamp)."""
    return b is None or (a is not None and a > b)


def resolve(change, default_stamp, state, local_row):
    """What the change does, given the row's stamps (state, or None) and the local row (None: absent)."""
    op = change["op"]
    stamp = (int(change.get("c", default_stamp[0])), str(change.get("o", default_stamp[1])))
    state = state or {}
    columns = {name: _stamp(s) for name, s in (state.get("columns") or {}).items()}
    born, deleted = _stamp(state.get("born")), _stamp(state.get("deleted"))
    copied = change.get("stamps")
    copy_stamps = {name: _stamp(s) for name, s in (copied or {}).items()}

    def column_stamp(name):
        return copy_stamps.get(name, stamp)

    def unchanged(conflicts=()):
        return Decision(NOTHING, {}, None, stamp, list(conflicts))

    if op == "D":
        if not _newer(stamp, deleted) or (born is not None and born > stamp):
            return unchanged()
        new_state = {"columns": {}, "born": _list(born), "deleted": list(stamp)}
        return Decision("delete" if local_row is not None else NOTHING, {}, new_state, stamp, [])

    values = change.get("v") or {}
    if op == "I" and deleted is not None and deleted > stamp:
        return unchanged()  # inserted before it was deleted
    if local_row is None:
        if op != "I":
            # Deleted here (or never arrived): an update does not bring a row back.
            if deleted is None:
                return unchanged()
            return unchanged([_conflict("*", None, deleted, values, stamp, "local")])
        new_state = {"columns": {name: list(column_stamp(name)) for name in values},
                     "born": list(max(born, stamp) if born else stamp), "deleted": None}
        return Decision("insert", dict(values), new_state, stamp, [])

    won, conflicts = {}, []
    new_columns = dict(columns)
    for name, value in values.items():
        remote = column_stamp(name)
        local = columns.get(name)
        if _newer(remote, local):
            new_columns[name] = remote
            if local_row.get(name) != value:
                won[name] = value  # (an equal value takes the stamp only: nothing to write)
        elif remote != local and local_row.get(name) != value:
            conflicts.append(_conflict(name, local_row.get(name), local, value, remote, "local"))
    new_born = born
    if op == "I":
        new_born = max(born, stamp) if born else stamp
    if not won and new_born == born and new_columns == columns:
        return unchanged(conflicts)
    new_state = {"columns": {name: list(s) for name, s in new_columns.items()},
                 "born": _list(new_born), "deleted": None}
    return Decision("update" if won else NOTHING, won, new_state, stamp, conflicts)


def _list(stamp):
    return None if stamp is None else list(stamp)


def _conflict(column, local_value, local_stamp, remote_value, remote_stamp, winner):
    return {"column": column, "local_value": local_value, "local_stamp": _list(local_stamp),
            "remote_value": remote_value, "remote_stamp": _list(remote_stamp), "winner": winner}
