"""The per-column last-writer-wins resolution of replicated changes (pure)."""

from aquapeer.replication.resolve import NOTHING, resolve

A, B = "A-peer", "B-peer"
DEFAULT = (0, "")


def change(op, v=None, c=100, o=B, k=None, **extra):
    return {"op": op, "k": k or {"id": 1}, "v": v or {}, "c": c, "o": o, **extra}


def state(columns=None, born=None, deleted=None):
    return {"columns": columns or {}, "born": born, "deleted": deleted}


def test_an_insert_of_a_new_row_writes_every_column_and_stamps_them():
    d = resolve(change("I", {"id": 1, "v": "x"}), DEFAULT, None, None)
    assert d.action == "insert" and d.values == {"id": 1, "v": "x"}
    assert d.state == {"columns": {"id": [100, B], "v": [100, B]}, "born": [100, B], "deleted": None}


def test_a_newer_column_wins_an_older_one_loses_and_is_a_conflict():
    local = {"id": 1, "a": "mine", "b": "old"}
    s = state({"a": [200, A], "b": [50, A]}, born=[10, A])
    d = resolve(change("U", {"a": "theirs", "b": "new"}, c=100), DEFAULT, s, local)
    assert d.action == "update" and d.values == {"b": "new"}
    assert d.state["columns"] == {"a": [200, A], "b": [100, B]}
    assert [(c["column"], c["winner"], c["local_value"], c["remote_value"]) for c in d.conflicts] == \
        [("a", "local", "mine", "theirs")]


def test_edits_of_different_columns_both_survive_in_either_order():
    row = {"id": 1, "a": "0", "b": "0"}
    from_a = change("U", {"a": "A"}, c=100, o=A)
    from_b = change("U", {"b": "B"}, c=101, o=B)
    # at B: B's edit is local, A's arrives
    at_b = resolve(from_a, DEFAULT, state({"b": [101, B]}), {**row, "b": "B"})
    # at A: A's edit is local, B's arrives
    at_a = resolve(from_b, DEFAULT, state({"a": [100, A]}), {**row, "a": "A"})
    assert at_b.values == {"a": "A"} and at_a.values == {"b": "B"}


def test_equal_clocks_are_ordered_by_origin():
    d = resolve(change("U", {"a": "B"}, c=100, o=B), DEFAULT, state({"a": [100, A]}), {"id": 1, "a": "A"})
    assert d.values == {"a": "B"}  # "B-peer" > "A-peer"
    d = resolve(change("U", {"a": "A"}, c=100, o=A), DEFAULT, state({"a": [100, B]}), {"id": 1, "a": "B"})
    assert d.action == NOTHING and d.conflicts[0]["winner"] == "local"


def test_a_change_no_newer_than_what_is_stored_does_nothing():
    d = resolve(change("U", {"a": "x"}, c=100, o=A), DEFAULT, state({"a": [100, A]}), {"id": 1, "a": "x"})
    assert d.action == NOTHING and d.state is None and d.conflicts == []


def test_a_delete_leaves_a_tombstone_and_a_late_update_does_not_bring_the_row_back():
    d = resolve(change("D", c=300), DEFAULT, state({"a": [100, A]}, born=[10, A]), {"id": 1, "a": "x"})
    assert d.action == "delete" and d.state["deleted"] == [300, B]
    late = resolve(change("U", {"a": "y"}, c=200, o=A), DEFAULT, d.state, None)
    assert late.action == NOTHING and late.conflicts[0]["column"] == "*"
    newer_update = resolve(change("U", {"a": "y"}, c=400, o=A), DEFAULT, d.state, None)
    assert newer_update.action == NOTHING  # an update never brings a row back


def test_an_insert_after_a_delete_is_ordered_by_clock():
    tomb = state({}, born=[10, A], deleted=[300, B])
    assert resolve(change("I", {"id": 1, "a": "old"}, c=200), DEFAULT, tomb, None).action == NOTHING
    again = resolve(change("I", {"id": 1, "a": "new"}, c=400), DEFAULT, tomb, None)
    assert again.action == "insert" and again.state["deleted"] is None and again.state["born"] == [400, B]
    # a delete older than the row's new birth does not remove it
    assert resolve(change("D", c=350), DEFAULT, again.state, {"id": 1, "a": "new"}).action == NOTHING


def test_insert_against_insert_of_the_same_key_merges_by_column():
    local = {"id": 1, "a": "A", "b": None}
    s = state({"id": [100, A], "a": [100, A], "b": [100, A]}, born=[100, A])
    d = resolve(change("I", {"id": 1, "a": "B", "b": "b"}, c=100, o=B), DEFAULT, s, local)
    assert d.action == "update" and d.values == {"a": "B", "b": "b"}
    assert d.state["born"] == [100, B]


def test_unstamped_local_columns_lose_and_an_initial_copy_uses_its_own_stamps():
    d = resolve(change("U", {"a": "x"}, c=5), DEFAULT, None, {"id": 1, "a": "local"})
    assert d.values == {"a": "x"}
    copy = {"op": "I", "k": {"id": 1}, "v": {"id": 1, "a": "copied"}, "stamps": {"a": [900, A]}}
    d = resolve(copy, (0, A), None, None)
    assert d.state["columns"] == {"id": [0, A], "a": [900, A]}
    # an initial copy's unstamped column loses to any change made since
    d = resolve({**copy, "stamps": None}, (0, A), state({"a": [1, B]}), {"id": 1, "a": "changed"})
    assert d.action == NOTHING
