"""Buckets of object format 2, the pure reference (aquapeer.bundles.bucket) of src/bucket.c."""

import pytest

from aquapeer.bundles import bucket

KEY_A, KEY_B = "3f" + "a" * 62, "3f" + "b" * 62


def make(*lines):
    return bucket.HEADER + b"".join(line.encode() + b"\n" for line in lines)


def test_rows_are_key_hashes_and_texts():
    data = make(f'{KEY_A} {{"id": "1"}}', f'{KEY_B} {{"id": "é", "n": "a b"}}')
    assert bucket.rows(data) == [(KEY_A, '{"id": "1"}'), (KEY_B, '{"id": "é", "n": "a b"}')]
    assert bucket.rows(b"aquapeer-bucket/1\n" + KEY_A.encode() + b" " + b"0" * 64 + b"\n") == []
    assert bucket.rows(bucket.HEADER) == []
    with pytest.raises(bucket.BucketError, match="not a key hash and a row"):
        bucket.rows(make("short line"))
    with pytest.raises(bucket.BucketError, match="not UTF-8"):
        bucket.rows(bucket.HEADER + KEY_A.encode() + b' {"x": "\xff"}\n')


def test_a_bucket_fits_when_every_line_is_a_key_hash_under_its_path_then_a_row():
    good = make(f'{KEY_A} {{"id": "1"}}', f'{KEY_B} {{"id": "2"}}')
    assert bucket.misfit(good) is None and bucket.misfit(good, "3f") is None and bucket.misfit(good, "") is None
    assert bucket.misfit(good, "3e") == f'{KEY_A} {{"id": "1"}}'
    assert bucket.misfit(make(f'{KEY_B} {{"id": "2"}}', f'{KEY_A} {{"id": "1"}}')) == f'{KEY_A} {{"id": "1"}}'
    assert bucket.misfit(make(f'{KEY_A} {{"id": "1"}}', f'{KEY_A} {{"id": "1"}}')) == f'{KEY_A} {{"id": "1"}}'
    assert bucket.misfit(make(f'{KEY_A.upper()} {{"id": "1"}}')) == f'{KEY_A.upper()} {{"id": "1"}}'
    assert bucket.misfit(make(f'{KEY_A} ["1"]')) == f'{KEY_A} ["1"]'
    long = f"{KEY_A.upper()} " + "{" + "é" * 100  # shown up to 140 bytes, in whole characters
    assert bucket.misfit(make(long)) == long[:66 + 37]
    assert bucket.misfit(b"aquapeer-fan/1\n") == "(not a bucket of format 2)"
    assert bucket.misfit(bucket.HEADER + KEY_A.encode() + b' {"x": "\xff"}\n') == "(bytes that are not UTF-8)"
