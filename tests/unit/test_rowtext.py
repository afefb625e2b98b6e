"""The reference encoding of a row's blob (no server); tests/db/test_row_codec.py holds the
server's blobs against it."""

import json

from aquapeer.bundles import rowtext


def test_columns_come_in_jsonb_key_order_shorter_names_first_then_bytewise():
    row = {"zz": "1", "a": "2", "Z": "3", "é": "4", "b": "5", "aaa": "6", "ab": "7"}
    # "é" is two bytes in UTF-8, so it sorts among the two-letter names, after "zz" (0xc3 > 0x7a).
    assert rowtext.blob(row) == '{"Z": "3", "a": "2", "b": "5", "ab": "7", "zz": "1", "é": "4", "aaa": "6"}'


def test_null_columns_are_left_out_and_an_all_null_row_is_an_empty_object():
    assert rowtext.blob({"id": "1", "name": None, "note": ""}) == '{"id": "1", "note": ""}'
    assert rowtext.blob({"id": None, "name": None}) == "{}"
    assert rowtext.blob({}) == "{}"


def test_names_and_texts_are_escaped_as_postgresql_escapes_json():
    row = {'say "hi"': 'a "quote" and a \\ backslash', "ctl": "\b\f\n\r\t\x01\x1f\x7f end"}
    assert rowtext.blob(row) == ('{"ctl": "\\b\\f\\n\\r\\t\\u0001\\u001f\x7f end", '
                                 '"say \\"hi\\"": "a \\"quote\\" and a \\\\ backslash"}')


def test_non_ascii_stays_as_it_is():
    assert rowtext.blob({"naïve": "ünï € 😀 / <>"}) == '{"naïve": "ünï € 😀 / <>"}'


def test_the_blob_is_json_that_reads_back_as_the_row():
    row = {"k": "1", "quoted \"name\"": "tab\there\nnewline \\ \x02 😀", "gone": None}
    assert json.loads(rowtext.blob(row)) == {k: v for k, v in row.items() if v is not None}
