"""bundle._bucket_lines and bundle._bucket_misfit (src/bucket.c) held to their pure reference,
aquapeer.bundles.bucket, over good and broken buckets."""

import psycopg
import pytest

from aquapeer.bundles import bucket

KEY_A, KEY_B = "3f" + "a" * 62, "3f" + "b" * 62
ROW = '{"id": "1", "note": "é € 😀 \\\\n tab\\\\t"}'


def make(*lines):
    return bucket.HEADER + b"".join(line.encode() + b"\n" for line in lines)


BUCKETS = [
    make(f"{KEY_A} {ROW}", f'{KEY_B} {{"id": "2"}}'),
    make(f"{KEY_A} {ROW}"),
    bucket.HEADER,
    make(f'{KEY_B} {{"id": "2"}}', f"{KEY_A} {ROW}"),          # out of order
    make(f"{KEY_A} {ROW}", f"{KEY_A} {ROW}"),                  # twice
    make(f"{KEY_A.upper()} " + "{" + "é" * 100),               # not lower-case hex; shown clipped
    make(f"{KEY_A} [1]"),                                      # not a row
    b"aquapeer-bucket/1\n" + KEY_A.encode() + b" " + b"0" * 64 + b"\n",
    b"aquapeer-fan/1\n3f " + b"0" * 64 + b"\n",
    bucket.HEADER + KEY_A.encode() + b' {"x": "\xff"}\n',   # not UTF-8
]


@pytest.fixture(scope="module")
def db(shared_cluster):
    shared_cluster.sql("create extension if not exists aquapeer cascade")
    return shared_cluster


@pytest.mark.parametrize("data", BUCKETS)
def test_misfit_is_the_reference(db, data):
    for path in (None, "", "3f", "3e", "3faa"):
        assert db.scalar("select bundle._bucket_misfit(%s, %s)", data, path) == bucket.misfit(data, path)


@pytest.mark.parametrize("data", BUCKETS)
def test_lines_are_the_reference(db, data):
    try:
        expected = bucket.rows(data)
    except bucket.BucketError as e:
        with pytest.raises(psycopg.errors.DataCorrupted, match=str(e).split(":")[0]):
            db.sql("select * from bundle._bucket_lines(%s)", data)
        return
    assert db.sql("select key_hash, row_text from bundle._bucket_lines(%s)", data) == expected
