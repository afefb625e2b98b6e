"""docs/sql-reference.md is the catalog of a fresh install, and every object
it lists says what it does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DBNAME = "sql_reference"

EXTENSION_MEMBERS = """
    join pg_depend d on d.classid = '{catalog}'::regclass and d.objid = {oid} and d.deptype = 'e'
    join pg_extension e on e.oid = d.refobjid and e.extname = 'aquapeer'
"""


@pytest.fixture(scope="module")
def fresh_install(shared_cluster):
    shared_cluster.sql(f"create database {DBNAME}")
    try:
        shared_cluster.sql("create extension aquapeer cascade", dbname=DBNAME)
        yield shared_cluster
    finally:
        shared_cluster.sql(f"drop database {DBNAME} with (force)")


def test_the_committed_reference_is_the_catalogs(fresh_install):
    generated = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sql_reference.py"),
         "--dsn", fresh_install.dsn_for(DBNAME)],
        capture_output=True, text=True, check=True, timeout=120).stdout
    committed = (REPO / "docs" / "sql-reference.md").read_text()
    assert generated == committed, "docs/sql-reference.md is stale: run make docs/sql-reference.md"


def test_every_listed_function_table_and_view_has_a_comment(fresh_install):
    """What users call or read (no leading underscore, or executable by
    PUBLIC) carries a COMMENT, which is its entry in the reference."""
    functions = fresh_install.sql(f"""
        select p.oid::regprocedure::text from pg_proc p {EXTENSION_MEMBERS.format(catalog="pg_proc", oid="p.oid")}
        where (p.proname !~ '^_' or has_function_privilege('public', p.oid, 'execute'))
          and obj_description(p.oid, 'pg_proc') is null
        order by 1""", dbname=DBNAME)
    relations = fresh_install.sql(f"""
        select c.oid::regclass::text from pg_class c {EXTENSION_MEMBERS.format(catalog="pg_class", oid="c.oid")}
        where c.relname !~ '^_' and c.relkind in ('r', 'p', 'v', 'm')
          and (c.relkind in ('v', 'm')
               or exists (select from aclexplode(c.relacl) a where a.grantee <> c.relowner))
          and obj_description(c.oid, 'pg_class') is null
        order by 1""", dbname=DBNAME)
    uncommented = [r[0] for r in functions + relations]
    assert uncommented == [], f"no COMMENT on: {', '.join(uncommented)}"
