#!/usr/bin/env python3
"""Build the extension's install and upgrade scripts from sql/'s sources.

    build_sql.py VERSION OUTPUT             the full install script of VERSION
    build_sql.py VERSION OUTPUT --from PREV the upgrade script from release PREV

Both run the same steps, in this order (pgai's layout):
    sql/head.sql            the record of run-once steps, and the roles
    sql/incremental/*.sql   table and type changes, each run once and recorded
                            in peer.migration; never edited once released
    sql/idempotent/*.sql    functions, views and triggers as CREATE OR REPLACE,
                            one home each, re-run on every install and upgrade
    sql/grants.sql          every privilege
    sql/tail.sql            checks and data that depend on the functions

An upgrade script differs from the install script only in its first line and,
from a release made before this layout, in recording the steps that release's
tables already stand for.  Standard library only: `make` runs it before the
test venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SQL = REPO / "sql"

# 0.11.0 and earlier were built from the frozen scripts sql/aquapeer--0.1.0.sql
# and sql/aquapeer--<a>--<b>.sql; their tables are what these steps create.
PRE_LAYOUT_STEPS = {
    "0.11.0": ["001-peer_settings", "002-peer_friends", "003-peer_messages", "004-bundles"],
}


def control_version() -> str:
    """This tree's version: default_version in aquapeer.control."""
    return re.search(r"^default_version = '([^']+)'", (REPO / "aquapeer.control").read_text(), re.M).group(1)


def releases() -> list[tuple[str, str]]:
    """(version, commit) of each release releases.txt records, oldest first."""
    rows = []
    for line in (REPO / "releases.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            version, commit, _date = line.split("\t")
            rows.append((version, commit))
    return rows


def upgrade_sources(version: str) -> list[str]:
    """The releases an update reaches version from, each in one step (one script from each).  A
    chain of scripts would run an older release's script against this version's payload, which
    that script's check of the payload (sql/tail.sql) refuses."""
    return [v for v, _ in releases() if v != version]


def previous_release(version: str) -> tuple[str, str]:
    """The newest release other than version, which its upgrade script starts from."""
    return [row for row in releases() if row[0] != version][-1]


def incremental_steps() -> list[Path]:
    return sorted((SQL / "incremental").glob("*.sql"))


def idempotent_files() -> list[Path]:
    return sorted((SQL / "idempotent").glob("*.sql"))


def sources() -> list[Path]:
    """Every file a script is built from, in build order."""
    return [SQL / "head.sql", *incremental_steps(), *idempotent_files(), SQL / "grants.sql", SQL / "tail.sql"]


def body_sha256(step: Path) -> str:
    return hashlib.sha256(step.read_bytes()).hexdigest()


def run_once(step: Path, version: str) -> str:
    """A step wrapped so that it runs only where peer.migration does not record it."""
    body = step.read_text()
    if "$step_body$" in body:
        raise SystemExit(f"{step}: must not contain $step_body$, the quote its wrapper uses")
    return f"""-- {step.relative_to(SQL.parent)}, run once
do $run_once$
declare
    step constant text := '{step.stem}';
    step_sha256 constant text := '{body_sha256(step)}';
    recorded text;
begin
    select m.body_sha256 into recorded from peer.migration m where m.name = step;
    if found then
        if recorded <> step_sha256 then
            raise warning 'aquapeer: the run-once step % has changed since it ran here', step
                using hint = 'Released steps must never change; put the change in a new step.';
        end if;
        return;
    end if;
    execute $step_body${body}$step_body$;
    insert into peer.migration (name, body_sha256, applied_in) values (step, step_sha256, '{version}');
end
$run_once$;
"""


def record_pre_layout_steps(previous: str) -> str:
    steps = PRE_LAYOUT_STEPS[previous]
    by_name = {s.stem: s for s in incremental_steps()}
    rows = ",\n    ".join(f"('{name}', '{body_sha256(by_name[name])}', '{previous}')" for name in steps)
    return f"""-- {previous} made these tables through the scripts before this layout.
insert into peer.migration (name, body_sha256, applied_in) values
    {rows}
on conflict (name) do nothing;
"""


def build(version: str, previous: str | None = None) -> str:
    if previous:
        title = f"-- aquapeer {previous} -> {version}"
        guard = '\\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \\quit'
    else:
        title = f"-- aquapeer {version}"
        guard = '\\echo Use "CREATE EXTENSION aquapeer CASCADE" to load this file. \\quit'
    parts = [f"{title}: generated by scripts/build_sql.py from sql/; edit the sources, not this file.\n{guard}\n",
             (SQL / "head.sql").read_text()]
    if previous in PRE_LAYOUT_STEPS:
        parts.append(record_pre_layout_steps(previous))
    parts += [run_once(step, version) for step in incremental_steps()]
    parts += [f"-- {path.relative_to(SQL.parent)}\n{path.read_text()}" for path in idempotent_files()]
    parts += [f"-- {path.relative_to(SQL.parent)}\n{path.read_text()}"
              for path in (SQL / "grants.sql", SQL / "tail.sql")]
    return "\n".join(part.rstrip("\n") + "\n" for part in parts)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version")
    parser.add_argument("output", type=Path)
    parser.add_argument("--from", dest="previous", help="build the upgrade script from this release")
    args = parser.parse_args(argv)
    text = build(args.version, args.previous)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.output)


if __name__ == "__main__":
    main(sys.argv[1:])
