"""A live row's text column as a Y.Text document (pure): local writes become edits, friends'
updates merge, and both sides converge with every edit of a different part kept."""

import random

import pytest

from aquapeer.live import text


def both_ways(base_value, mine, theirs):
    """Each side edits the same base at once and merges the other's update: both texts."""
    base = text.new_document(base_value)
    my_state, my_update = text.edit(base, mine)
    their_state, their_update = text.edit(base, theirs)
    _, here = text.merge(my_state, their_update)
    _, there = text.merge(their_state, my_update)
    return here, there


def apply_edits(old, edits):
    data = old.encode()
    for offset, length, insert in edits:  # last first: earlier offsets stay right
        data = data[:offset] + insert.encode() + data[offset + length:]
    return data.decode()


def test_a_document_holds_its_value():
    assert text.text_of(text.new_document("hello")) == "hello"
    assert text.text_of(text.new_document("")) == ""


def test_an_unchanged_value_makes_no_update():
    state = text.new_document("same")
    assert text.edit(state, "same") == (state, None)


@pytest.mark.parametrize("old, new", [
    ("abc", "abXc"), ("abc", ""), ("", "abc"), ("abcdef", "azcdxf"), ("héllo 😀 wörld", "hällo 😀😀 world!"),
    ("日本語のテキスト", "日本のテキストです"), ("a\nb\nc\n", "a\nB\nc\nd\n"),
])
def test_edits_are_utf8_byte_offsets_that_make_the_new_value(old, new):
    assert apply_edits(old, text.edits(old, new)) == new
    base = text.new_document(old)
    state, update = text.edit(base, new)
    assert text.text_of(state) == new
    # the friend, holding the same base, gets there from the update alone
    assert text.merge(base, update)[1] == new


def test_concurrent_edits_of_different_parts_both_survive_on_both_sides():
    assert both_ways("hello world", "Hello world", "hello world!") == ("Hello world!", "Hello world!")


def test_concurrent_edits_of_non_ascii_text_converge_by_characters():
    here, there = both_ways("naïve café 😀 über", "naïve Café 😀 über", "naïve café 😀😀 übermorgen")
    assert here == there == "naïve Café 😀😀 übermorgen"


def test_concurrent_edits_at_the_start_and_the_end_of_10_kb_both_survive():
    value = "".join(random.Random(1).choice("abcdefghij \n") for _ in range(10_000))
    here, there = both_ways(value, "START " + value, value + " END")
    assert here == there == "START " + value + " END"


def test_long_texts_diff_by_lines_and_keep_edits_between_the_changed_lines():
    lines = [f"line {i} of a long text, long enough that characters squared pass the limit\n" for i in range(2000)]
    value = "".join(lines)
    assert len(value) ** 2 > text.CHAR_DIFF_LIMIT
    mine = value.replace("line 10 of", "LINE 10 of").replace("line 1990 of", "LINE 1990 of")
    theirs = value.replace("line 1000 of", "line one thousand of")
    here, there = both_ways(value, mine, theirs)
    assert here == there == mine.replace("line 1000 of", "line one thousand of")


def test_both_sides_converge_after_random_concurrent_edits():
    rng = random.Random(7)
    alphabet = "abc é😀\n"
    base_value = "".join(rng.choice(alphabet) for _ in range(200))
    here_state = there_state = text.new_document(base_value)
    for _ in range(30):
        here_value, there_value = text.text_of(here_state), text.text_of(there_state)
        assert here_value == there_value
        here_state, here_update = text.edit(here_state, _mutate(rng, here_value, alphabet))
        there_state, there_update = text.edit(there_state, _mutate(rng, there_value, alphabet))
        if there_update is not None:
            here_state, _ = text.merge(here_state, there_update)
        if here_update is not None:
            there_state, _ = text.merge(there_state, here_update)
    assert text.text_of(here_state) == text.text_of(there_state)


def _mutate(rng, value, alphabet):
    start = rng.randrange(len(value) + 1)
    end = min(len(value), start + rng.randrange(5))
    return value[:start] + "".join(rng.choice(alphabet) for _ in range(rng.randrange(4))) + value[end:]
