"""The README's feature list names only what docs/sql-reference.md lists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_sql_name_in_the_feature_list_is_in_the_sql_reference():
    readme = (REPO / "README.md").read_text()
    features = readme.split("What exists so far", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\b(?:peer|bundle)\.[a-z_]+\b", features))
    reference = (REPO / "docs" / "sql-reference.md").read_text()
    listed = set(re.findall(r"^#### `((?:peer|bundle)\.[a-z_]+)\b", reference, re.M))
    assert len(named) > 20, "the feature list names the SQL it offers"
    assert named - listed == set()
