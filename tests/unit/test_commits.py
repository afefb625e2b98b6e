"""Bundle commits: canonical encoding, ids and signatures (no server)."""

import base64
import copy
import datetime

import pytest

from aquapeer import identity
from aquapeer.bundles import commits

TREE = "ab" * 32
PARENT = "cd" * 32


def make(me, **changes):
    fields = dict(parents=[PARENT], tree=TREE, author=me.peer_id, message="widgets: new prices",
                  time=commits.utc_time(datetime.datetime(2026, 11, 27, 9, 30, tzinfo=datetime.UTC)),
                  rows_changed=3)
    fields.update(changes)
    return commits.Commit(**fields)


@pytest.mark.parametrize("version", ["1", "2"])
def test_the_id_is_the_sha256_of_the_documented_canonical_bytes(version):
    me = identity.Identity.generate()
    commit = make(me, format=f"aquapeer-bundle/{version}")
    expected = (f'{{"author":"{me.peer_id}","format":"aquapeer-bundle/{version}","message":"widgets: new prices",'
                f'"parents":["{PARENT}"],"rows_changed":3,"time":"2026-11-27T09:30:00.000000Z","tree":"{TREE}"}}'
                ).encode()
    assert commit.encode() == expected
    assert commit.id == commits.object_id(expected) == __import__("hashlib").sha256(expected).hexdigest()
    # A commit keeps its format, and so its id, wherever it goes.
    assert commits.Commit.from_body(commit.body()) == commit


def test_new_commits_are_of_format_2():
    assert make(identity.Identity.generate()).body()["format"] == commits.FORMAT == "aquapeer-bundle/2"


def test_times_are_written_in_utc_whatever_the_zone():
    here = datetime.datetime(2026, 11, 27, 10, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    assert commits.utc_time(here) == "2026-11-27T09:30:00.000000Z"
    with pytest.raises(commits.CommitError, match="time zone"):
        commits.utc_time(datetime.datetime(2026, 11, 27))


def test_every_field_is_part_of_the_id():
    me = identity.Identity.generate()
    base = make(me)
    others = [make(me, parents=[]), make(me, parents=[PARENT, "ef" * 32]), make(me, tree="00" * 32),
              make(me, message="other"), make(me, rows_changed=4),
              make(me, time="2026-11-27T09:30:00.000001Z"), make(identity.Identity.generate())]
    assert len({base.id} | {c.id for c in others}) == len(others) + 1


def test_a_signed_commit_verifies_and_survives_a_json_round_trip():
    import json

    me = identity.Identity.generate()
    commit = make(me)
    document = json.loads(json.dumps(commits.sign(me, commit)))
    assert commits.verify(document) == commit


def test_a_commit_signed_before_a_key_rotation_still_verifies():
    me = identity.Identity.generate()
    commit = make(me)
    document = commits.sign(me, commit)
    rotated = me.rotate()
    document["chain"] = base64.b64encode(rotated.chain.to_bytes()).decode()  # the author's chain today
    assert commits.verify(document) == commit
    assert commits.verify(commits.sign(rotated, commit)) == commit


@pytest.mark.parametrize("alter,message", [
    (lambda d: d["commit"].update(message="altered"), "does not match its content"),
    (lambda d: d.update(id="00" * 32), "does not match its content"),
    (lambda d: d.update(signature=base64.b64encode(b"x" * 64).decode()), "does not verify"),
    (lambda d: d.update(key_index=5), "no usable signature"),
    (lambda d: d.update(key_index=-1), "no usable signature"),
    (lambda d: d.update(chain="!!"), "no usable signature"),
    (lambda d: d["commit"].update(format="aquapeer-bundle/9"), "not a commit of format"),
    (lambda d: d["commit"].update(extra=1), "exactly the fields"),
    (lambda d: d["commit"].update(parents="x"), "parents are a list"),
    (lambda d: d["commit"].update(tree="XYZ"), "not an object id"),
    (lambda d: d["commit"].update(time="yesterday"), "ISO 8601"),
    (lambda d: d["commit"].update(rows_changed=True), "a count"),
    (lambda d: d.update(type="blob"), "not a commit document"),
])
def test_altered_or_malformed_commits_are_refused(alter, message):
    me = identity.Identity.generate()
    document = copy.deepcopy(commits.sign(me, make(me)))
    alter(document)
    with pytest.raises(commits.CommitError, match=message):
        commits.verify(document)


def test_somebody_else_cannot_sign_as_the_author():
    me, mallory = identity.Identity.generate(), identity.Identity.generate()
    commit = make(me)
    with pytest.raises(commits.CommitError, match="only the author"):
        commits.sign(mallory, commit)
    document = commits.sign(me, commit)
    document["chain"] = base64.b64encode(mallory.chain.to_bytes()).decode()
    with pytest.raises(commits.CommitError, match="no usable signature or key chain"):
        commits.verify(document)


def test_bad_commits_cannot_be_made():
    me = identity.Identity.generate()
    for changes, message in [({"parents": [PARENT, PARENT]}, "at most two parents"),
                             ({"parents": [PARENT] * 3}, "at most two parents"),
                             ({"author": "nobody"}, "peer id"),
                             ({"message": "x" * (commits.MAX_MESSAGE + 1)}, "at most")]:
        with pytest.raises((commits.CommitError, identity.IdentityError), match=message):
            make(me, **changes)


def test_received_commits_are_kept_parents_first_in_one_pass():
    # A merge: d has parents c and b, both children of a; a is known already.
    history = ({"a": [], "b": ["a"], "c": ["a"], "d": ["c", "b"], "e": ["d", "d"]})
    assert commits.parents_first(history, known={"a"}) == ["b", "c", "d", "e"]
    assert commits.parents_first(history, known=set(history)) == []
    # A long line of commits, given newest first (as a friend's walk from its head finds them).
    line = ({f"{n:06d}": [f"{n - 1:06d}"] if n else [] for n in reversed(range(100_000))})
    assert commits.parents_first(line, known=set()) == sorted(line)


def test_commits_whose_parents_neither_are_here_nor_came_are_refused():
    with pytest.raises(commits.CommitError, match="commit b has parents this database lacks: x"):
        commits.parents_first(({"a": [], "b": ["a", "x"]}), known=set())
    with pytest.raises(commits.CommitError, match="commit b has parents this database lacks: a cycle"):
        commits.parents_first(({"b": ["c"], "c": ["b"]}), known=set())
