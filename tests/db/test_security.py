"""The extension's privileges and search_path settings, read from the catalog
of a fresh install and held to what the docs and the lint allowlist say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SQL_REFERENCE = REPO / "docs" / "sql-reference.md"
PGSPOT_IGNORE = REPO / "sql" / "pgspot.ignore"
PINNED = "search_path=pg_catalog, pg_temp"
DBNAME = "security_catalog"

MEMBER_FUNCTIONS = """
    select p.oid, n.nspname || '.' || p.proname, l.lanname, p.prosecdef, p.proconfig,
           n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
           has_function_privilege('public', p.oid, 'execute')
    from pg_proc p
    join pg_namespace n on n.oid = p.pronamespace
    join pg_language l on l.oid = p.prolang
    join pg_depend d on d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e'
    join pg_extension e on e.oid = d.refobjid and e.extname = 'aquapeer'
"""


@pytest.fixture(scope="module")
def functions(shared_cluster):
    """(oid, name, language, security definer, proconfig, signature, PUBLIC
    may execute) of every function of a fresh install."""
    shared_cluster.sql(f"create database {DBNAME}")
    try:
        shared_cluster.sql("create extension aquapeer cascade", dbname=DBNAME)
        yield shared_cluster.sql(MEMBER_FUNCTIONS, dbname=DBNAME)
    finally:
        shared_cluster.sql(f"drop database {DBNAME} with (force)")


def test_every_security_definer_function_pins_search_path(functions):
    definers = [f for f in functions if f[3]]
    assert len(definers) > 10, "the catalog query found the extension's SECURITY DEFINER functions"
    unpinned = [f[5] for f in definers if PINNED not in (f[4] or [])]
    assert unpinned == [], f"SECURITY DEFINER without {PINNED}: {unpinned}"


def test_sql_functions_without_a_pinned_search_path_are_the_inlined_helpers(functions):
    """The SQL and PL/pgSQL functions left without a SET clause (so that they
    are inlined) are exactly those sql/pgspot.ignore lets pgspot pass."""
    allowed = {re.match(r"--proc-without-search-path=([^(]+)\(", line).group(1)
               for line in PGSPOT_IGNORE.read_text().splitlines()
               if line.startswith("--proc-without-search-path=")}
    unpinned = {f[1] for f in functions
                if f[2] in ("sql", "plpgsql") and PINNED not in (f[4] or [])}
    assert allowed, "sql/pgspot.ignore lists the inlined helpers"
    assert unpinned == allowed


def _documented_public_functions():
    text = SQL_REFERENCE.read_text()
    section = text.split("\n## Executable by PUBLIC\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.M))


def test_public_executes_only_what_the_sql_reference_lists(functions):
    documented = _documented_public_functions()
    assert documented, f"{SQL_REFERENCE} lists the functions PUBLIC can execute"
    assert {f[5] for f in functions if f[6]} == documented


def test_public_has_no_privilege_on_any_table_view_or_sequence(shared_cluster, functions):
    granted = shared_cluster.sql("""
        select c.oid::regclass::text, a.privilege_type
        from pg_class c
        join pg_depend d on d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e'
        join pg_extension e on e.oid = d.refobjid and e.extname = 'aquapeer'
        cross join aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
        where a.grantee = 0""", dbname=DBNAME)
    assert granted == []
