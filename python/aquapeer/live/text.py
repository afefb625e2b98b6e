"""A text column of a live row as a Y.Text document: pure, no database.

A document is kept as its whole state (a Yjs update, bytes).  A local UPDATE becomes edits of the
document: the difference between the document's text and the new value (common prefix and suffix
trimmed, then difflib's opcodes on what is left), applied as deletions and insertions, and the
update those edits make is what the friend gets.  A friend's update merges into the document, and
the document's text is then the column's value.  Edits of different parts of the text made at the
same time on both sides both survive; Yjs orders concurrent insertions at one place the same way
everywhere.

Y.Text indexes by UTF-8 bytes in pycrdt, not by characters: offsets are converted here.
"""

import difflib
import itertools

from pycrdt import Doc, Text

ROOT = "text"
# Characters squared up to which a diff is by characters (difflib is quadratic).
CHAR_DIFF_LIMIT = 4_000_000


def _doc(state=None):
    doc = Doc()
    text = doc.get(ROOT, type=Text)
    if state is not None:
        doc.apply_update(state)
    return doc, text


def new_document(value):
    """The state of a new document holding value: the base both sides start from."""
    doc, text = _doc()
    if value:
        text += value
    return doc.get_update()


def text_of(state):
    return str(_doc(state)[1])


def _utf8_length(char):
    code = ord(char)
    return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4


def _char_spans(old, new):
    """(start, end in old, start, end in new) of the parts that differ, by characters."""
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    return [(i1, i2, j1, j2) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]


def _spans(old, new):
    """The parts that differ: by characters when the texts are short, else by lines first (a
    character diff of long texts is quadratic) and by characters within the lines that changed."""
    if len(old) * len(new) <= CHAR_DIFF_LIMIT:
        return _char_spans(old, new)
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    old_at = list(itertools.accumulate(map(len, old_lines), initial=0))
    new_at = list(itertools.accumulate(map(len, new_lines), initial=0))
    spans = []
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        a, b = old_at[i1], new_at[j1]
        old_part, new_part = old[a:old_at[i2]], new[b:new_at[j2]]
        if len(old_part) * len(new_part) <= CHAR_DIFF_LIMIT:
            spans += [(a + s1, a + s2, b + t1, b + t2) for s1, s2, t1, t2 in _char_spans(old_part, new_part)]
        else:
            spans.append((a, old_at[i2], b, new_at[j2]))
    return spans


def edits(old, new):
    """The edits that make new of old, as (byte offset in old, bytes to delete, text to insert),
    last first, so that each offset is still right when it is applied."""
    limit = min(len(old), len(new))
    prefix = 0
    while prefix < limit and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and old[-1 - suffix] == new[-1 - suffix]:
        suffix += 1
    old_middle, new_middle = old[prefix:len(old) - suffix], new[prefix:len(new) - suffix]
    if not old_middle and not new_middle:
        return []
    # the byte offset of each character of old's middle, from the start of old
    offsets = list(itertools.accumulate(map(_utf8_length, old_middle), initial=len(old[:prefix].encode())))
    return [(offsets[i1], offsets[i2] - offsets[i1], new_middle[j1:j2])
            for i1, i2, j1, j2 in reversed(_spans(old_middle, new_middle))]


def edit(state, value):
    """A local write: the document's state with its text made value, and the update that carries
    the change to the friend (None when the text is value already)."""
    doc, text = _doc(state)
    changes = edits(str(text), value)
    if not changes:
        return state, None
    before = doc.get_state()
    with doc.transaction():
        for offset, length, insert in changes:
            if length:
                del text[offset:offset + length]
            if insert:
                text.insert(offset, insert)
    return doc.get_update(), doc.get_update(before)


def merge(state, update):
    """A friend's update merged into the document: its new state and text."""
    doc, text = _doc(state)
    doc.apply_update(update)
    return doc.get_update(), str(text)
