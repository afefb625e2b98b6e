"""`make installcheck` (what `pgxn check` runs): the pg_regress files in test/
against a running server, here a throwaway one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_make_installcheck_passes(shared_cluster):
    regress_files = sorted((REPO / "test" / "sql").glob("*.sql"))
    env = {**os.environ, "PGHOST": shared_cluster.sock_dir, "PGPORT": str(shared_cluster.port),
           "PGUSER": "postgres"}
    try:
        run = subprocess.run(["make", "installcheck"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    finally:
        # pg_regress leaves its database behind for a look; the shared cluster wants it gone.
        shared_cluster.sql("drop database if exists contrib_regression with (force)")
    diffs = REPO / "regression.diffs"
    assert run.returncode == 0, (diffs.read_text() if diffs.exists() else "") + run.stdout + run.stderr
    assert f"All {len(regress_files)} tests passed." in run.stdout
