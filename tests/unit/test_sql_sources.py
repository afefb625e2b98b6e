"""The SQL sources' layout and the release discipline, without a server.

sql/incremental: run-once steps (tables, types); sql/idempotent: every
function, view and trigger, once, as CREATE OR REPLACE; sql/grants.sql: every
privilege.  Released scripts are frozen by sql/released.sha256, and the
scripts of this tree's version are what scripts/build_sql.py makes of the
sources.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SQL = REPO / "sql"

sys.path.insert(0, str(REPO / "scripts"))
import build_sql  # noqa: E402

VERSION = build_sql.control_version()


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def frozen() -> dict[str, str]:
    """sql/released.sha256: path -> sha256 of every released file."""
    out = {}
    for line in (SQL / "released.sha256").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, path = line.split(maxsplit=1)
            out[path.lstrip("*")] = digest
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




# --- releases ------------------------------------------------------------------


def test_releases_are_recorded_in_order():
    rows = build_sql.releases()
    assert rows, "releases.txt records no release"
    versions = [v for v, _ in rows]
    assert versions == sorted(versions, key=version_key), versions
    assert len(set(versions)) == len(versions)
    for version, commit in rows:
        assert re.fullmatch(r"[0-9a-f]{40}", commit), f"{version}: {commit!r} is not a full commit id"
    newest = versions[-1]
    assert version_key(VERSION) >= version_key(newest), (
        f"aquapeer.control says {VERSION}, older than the newest release {newest}")


def test_released_files_are_unchanged():
    changed = [path for path, digest in frozen().items() if sha256(REPO / path) != digest]
    assert not changed, (
        f"released files changed: {changed}. A release never changes: put the change in a new "
        "run-once step or a source file, and make a new version (aquapeer.control, CHANGELOG.md).")


def test_every_shipped_script_is_released_or_built_for_this_version():
    released = frozen()
    mine = {f"sql/aquapeer--{VERSION}.sql"} | {f"sql/aquapeer--{v}--{VERSION}.sql"
                                                for v in build_sql.upgrade_sources(VERSION)}
    for script in SQL.glob("aquapeer--*.sql"):
        path = str(script.relative_to(REPO))
        assert path in released or path in mine, f"{path} is neither released nor this version's"


def test_this_versions_scripts_are_built_from_the_sources():
    install = SQL / f"aquapeer--{VERSION}.sql"
    upgrades = [(SQL / f"aquapeer--{v}--{VERSION}.sql", build_sql.build(VERSION, v))
                for v in build_sql.upgrade_sources(VERSION)]
    scripts = [(install, build_sql.build(VERSION)), *upgrades]
    stale = [p.name for p, text in scripts if not p.is_file() or p.read_text() != text]
    if str(install.relative_to(REPO)) in frozen():
        assert not stale, (
            f"the SQL sources changed after {VERSION} was released ({stale} would differ): "
            "bump default_version in aquapeer.control and add a CHANGELOG.md entry")
    else:
        assert not stale, f"{stale} are out of date: run make"


def test_released_run_once_steps_are_frozen_with_their_release():
    released = frozen()
    for step in build_sql.incremental_steps():
        path = str(step.relative_to(REPO))
        if f"sql/aquapeer--{VERSION}.sql" in released:
            assert path in released, f"{path} is in the released {VERSION} but not frozen"


def test_upgrades_reach_this_version_from_every_release_in_one_script():
    """An update runs one script from each release: PostgreSQL would chain older ones, and an
    older script's check of the payload (sql/tail.sql) refuses this version's."""
    for version, _ in build_sql.releases():
        if version != VERSION:
            assert (SQL / f"aquapeer--{version}--{VERSION}.sql").is_file(), (
                f"no upgrade script from {version} to {VERSION}: run make")


# --- one home for every object -------------------------------------------------

CREATE_ROUTINE = re.compile(r"^create\s+(or\s+replace\s+)?(function|procedure)\s+([\w.\"]+)\s*\(([^)]*)\)",
                            re.I | re.M)


def routines(text: str) -> list[tuple[bool, str]]:
    """(or replace?, name(argument text)) of each CREATE FUNCTION/PROCEDURE at a line's start."""
    out = []
    for m in CREATE_ROUTINE.finditer(text):
        args = re.sub(r"\s+", " ", m.group(4)).strip()
        out.append((bool(m.group(1)), f"{m.group(3)}({args})"))
    return out


def test_every_function_is_defined_once_as_create_or_replace():
    found = Counter()
    for path in build_sql.idempotent_files():
        for or_replace, name in routines(path.read_text()):
            assert or_replace, f"{path.name}: {name} must be CREATE OR REPLACE (it is re-run on upgrades)"
            found[name] += 1
    assert found, "no functions found in sql/idempotent"
    twice = [name for name, n in found.items() if n > 1]
    assert not twice, f"defined more than once in sql/idempotent: {twice}"


def test_run_once_steps_and_grants_hold_no_functions():
    for path in [*build_sql.incremental_steps(), SQL / "grants.sql", SQL / "head.sql", SQL / "tail.sql"]:
        assert not routines(path.read_text()), f"{path.name} defines a function: its home is sql/idempotent"


@pytest.mark.parametrize("path", [*build_sql.incremental_steps(), *build_sql.idempotent_files(),
                                  SQL / "head.sql", SQL / "tail.sql"], ids=lambda p: p.name)
def test_privileges_live_only_in_grants_sql(path):
    statements = re.findall(r"^\s*(grant|revoke)\b", path.read_text(), re.I | re.M)
    assert not statements, f"{path.name}: GRANT/REVOKE belong in sql/grants.sql"


def test_run_once_steps_are_numbered_and_wrapped():
    steps = build_sql.incremental_steps()
    numbers = [int(step.name.split("-")[0]) for step in steps]
    assert numbers == list(range(1, len(steps) + 1)), [s.name for s in steps]
    script = build_sql.build(VERSION)
    for step in steps:
        assert f"step constant text := '{step.stem}';" in script
