"""Three-way merge of bundle rows at the level of fields (pure).

Rows are what a bundle holds of them: {column: text value}, with a NULL
column simply absent (as in a row's blob), and a row that does not exist
is None.  The caller passes, for every row key either side changed since
the common ancestor, the row as it was there (base), here (ours) and at
the friend (theirs); rows neither side changed need not be loaded.

Per row: the same on both sides, or changed on one side only, merges
cleanly.  Changed on both: each field merges the same way, and a field
changed differently on both sides is a conflict; a row deleted on one
side and changed (or added) on the other is a conflict of the whole row
(column None), never a silent loss.  Until resolved, a conflict keeps
our value.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Conflict:
    key: object          # the caller's row key, e.g. (relation, primary key)
    column: str          # None: the whole row (deleted on one side, changed on the other)
    base: object
    ours: object
    theirs: object


def _pick(base, ours, theirs):
    """(value, clean): the merged value of one thing, and whether it merged cleanly."""
    if ours == theirs or theirs == base:
        return ours, True
    if ours == base:
        return theirs, True
    return ours, False


def merge_row(key, base, ours, theirs):
    """(merged row or None, [Conflict]) for one row key."""
    merged, clean = _pick(base, ours, theirs)
    if clean:
        return merged, []
    if ours is None or theirs is None:
        return ours, [Conflict(key, None, base, ours, theirs)]
    base = base or {}
    row, conflicts = {}, []
    for column in sorted(set(base) | set(ours) | set(theirs)):
        value, clean = _pick(base.get(column), ours.get(column), theirs.get(column))
        if not clean:
            conflicts.append(Conflict(key, column, base.get(column), ours.get(column), theirs.get(column)))
        if value is not None:
            row[column] = value
    return row, conflicts


def merge(base, ours, theirs):
    """({key: merged row or None}, [Conflict]) over every key any of the three mentions;
    a key missing from a mapping is a row that does not exist there."""
    merged, conflicts = {}, []
    for key in sorted(set(base) | set(ours) | set(theirs), key=repr):
        merged[key], found = merge_row(key, base.get(key), ours.get(key), theirs.get(key))
        conflicts.extend(found)
    return merged, conflicts
