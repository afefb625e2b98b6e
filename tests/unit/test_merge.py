"""Three-way merge of bundle rows at the level of fields (no server)."""

from aquapeer.bundles.merge import Conflict, merge, merge_row

K = ("public.widget", '["w-1"]')
BASE = {"sku": "w-1", "name": "widget", "price": "10"}


def test_one_side_changed_merges_cleanly_either_way():
    ours = dict(BASE, price="12")
    assert merge_row(K, BASE, ours, BASE) == (ours, [])
    assert merge_row(K, BASE, BASE, ours) == (ours, [])
    assert merge_row(K, BASE, ours, ours) == (ours, [])


def test_different_fields_changed_on_each_side_merge():
    ours, theirs = dict(BASE, price="12"), dict(BASE, name="gadget")
    assert merge_row(K, BASE, ours, theirs) == ({"sku": "w-1", "name": "gadget", "price": "12"}, [])


def test_the_same_field_changed_differently_is_a_conflict_keeping_ours():
    ours, theirs = dict(BASE, price="12", name="gadget"), dict(BASE, price="15")
    row, conflicts = merge_row(K, BASE, ours, theirs)
    assert row == ours
    assert conflicts == [Conflict(K, "price", "10", "12", "15")]


def test_null_is_an_absent_field_and_merges_like_any_value():
    ours = {k: v for k, v in BASE.items() if k != "name"}          # name set to NULL here
    theirs = dict(BASE, price="15")
    assert merge_row(K, BASE, ours, theirs) == ({"sku": "w-1", "price": "15"}, [])
    # a new column, filled on one side only
    assert merge_row(K, BASE, dict(BASE, color="red"), BASE) == (dict(BASE, color="red"), [])
    _, conflicts = merge_row(K, BASE, dict(BASE, color="red"), dict(BASE, color="blue"))
    assert conflicts == [Conflict(K, "color", None, "red", "blue")]


def test_delete_against_update_is_a_conflict_of_the_whole_row_both_ways():
    updated = dict(BASE, price="12")
    assert merge_row(K, BASE, None, updated) == (None, [Conflict(K, None, BASE, None, updated)])
    assert merge_row(K, BASE, updated, None) == (updated, [Conflict(K, None, BASE, updated, None)])
    # deleted on both sides, or on one side only: clean
    assert merge_row(K, BASE, None, None) == (None, [])
    assert merge_row(K, BASE, None, BASE) == (None, [])


def test_rows_added_on_both_sides_merge_by_field():
    ours, theirs = {"sku": "w-9", "price": "1"}, {"sku": "w-9", "name": "new"}
    assert merge_row(K, None, ours, theirs) == ({"sku": "w-9", "price": "1", "name": "new"}, [])
    _, conflicts = merge_row(K, None, ours, {"sku": "w-9", "price": "2"})
    assert conflicts == [Conflict(K, "price", None, "1", "2")]


def test_merge_covers_every_key_either_side_changed():
    k2, k3 = ("public.widget", '["w-2"]'), ("public.part", '[7, "a"]')
    base = {K: BASE, k2: {"sku": "w-2"}}
    ours = {K: dict(BASE, price="12"), k2: None}
    # A key missing from a mapping is a row that does not exist there.
    theirs = {K: dict(BASE, name="gadget"), k2: {"sku": "w-2"}, k3: {"id": "7", "kind": "a"}}
    merged, conflicts = merge(base, ours, theirs)
    assert merged == {K: {"sku": "w-1", "name": "gadget", "price": "12"}, k2: None, k3: {"id": "7", "kind": "a"}}
    assert conflicts == []
