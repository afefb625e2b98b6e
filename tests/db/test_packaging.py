"""Packaging checks: versions agree, make install's payload and CLI, PGXN.

No PostgreSQL server is needed. Runs in .venv under `make test`, after
`make install`; install locations come from AQUAPEER_LIBDIR / AQUAPEER_BINDIR
/ AQUAPEER_PYTHON / PG_CONFIG (the Makefile exports them) with the Makefile's
defaults otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

import testbed as tb

REPO = Path(__file__).resolve().parents[2]
LIBDIR = Path(os.environ.get("AQUAPEER_LIBDIR") or "/usr/local/lib/aquapeer")
BINDIR = Path(os.environ.get("AQUAPEER_BINDIR") or "/usr/local/bin")
SYSTEM_PYTHON = os.environ.get("AQUAPEER_PYTHON") or "/usr/bin/python3"
PG_CONFIG = os.environ.get("PG_CONFIG") or "pg_config"


def _control_version() -> str:
    text = (REPO / "aquapeer.control").read_text()
    m = re.search(r"^\s*default_version\s*=\s*'([^']+)'", text, re.M)
    assert m, "aquapeer.control has no default_version"
    return m.group(1)


VERSION = _control_version()
PAYLOAD = LIBDIR / VERSION
CLI = BINDIR / "aquapeer"


def _run(cmd, *, cwd=None, env=None, timeout=600, check=True):
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _norm_req(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def _lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", path.read_text(), re.M):
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


# --- versions ------------------------------------------------------------------


def test_versions_agree():
    meta = json.loads((REPO / "META.json").read_text())
    assert meta["version"] == VERSION
    assert meta["provides"]["aquapeer"]["version"] == VERSION
    assert meta["provides"]["aquapeer"]["file"] == f"sql/aquapeer--{VERSION}.sql"
    assert meta["meta-spec"]["version"] == "1.0.0"

    pyproject = tomllib.loads((REPO / "python/pyproject.toml").read_text())
    assert pyproject["project"]["version"] == VERSION

    init = (REPO / "python/aquapeer/__init__.py").read_text()
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init, re.M)
    assert m, "python/aquapeer/__init__.py has no __version__"
    assert m.group(1) == VERSION


def test_pyproject_dependencies_match_requirements_in():
    pyproject = tomllib.loads((REPO / "python/pyproject.toml").read_text())
    deps = sorted(_norm_req(d) for d in pyproject["project"]["dependencies"])
    reqs = sorted(_norm_req(r) for r in _requirement_lines(REPO / "python/requirements.in"))
    assert deps == reqs
    assert pyproject["project"]["scripts"]["aquapeer"] == "aquapeer.cli:main"


def test_locks_are_hashed_and_agree():
    runtime = _lock_pins(REPO / "python/requirements.lock")
    tests = _lock_pins(REPO / "tests/requirements.lock")
    for name in ("aiortc", "msgpack", "cryptography", "websockets", "rich", "psycopg",
                 "psycopg-binary", "aioice", "av", "pyee", "pylibsrtp", "pyopenssl",
                 "google-crc32c", "dnspython", "ifaddr"):
        assert name in runtime, f"{name} missing from python/requirements.lock"
    assert runtime["aiortc"] == "1.16.0"
    for name in ("pytest", "pytest-timeout", "testcontainers"):
        assert name in tests, f"{name} missing from tests/requirements.lock"
    for name in set(runtime) & set(tests):
        assert runtime[name] == tests[name], f"{name}: locks disagree"
    for lock in ("python/requirements.lock", "tests/requirements.lock"):
        text = (REPO / lock).read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
        for block in blocks:
            if re.match(r"[A-Za-z0-9]", block):
                assert "--hash=sha256:" in block, f"{lock}: no hash for {block.split()[0]}"


# --- make install: CLI and payload -------------------------------------------------


def test_cli_version_and_help():
    assert CLI.is_file(), f"{CLI} missing: run `make install`"
    first = CLI.read_text().splitlines()[0]
    assert first == f"#!{SYSTEM_PYTHON} -I"

    # -I: a stray PYTHONPATH must not matter; neither must the cwd.
    env = tb.outside_env(PYTHONPATH="/nonexistent")
    out = _run([CLI, "--version"], cwd="/", env=env)
    assert out.stdout.strip() == f"aquapeer {VERSION}"

    out = _run([CLI, "--help"], cwd="/", env=env)
    assert "usage: aquapeer" in out.stdout
    assert "status" in out.stdout

    out = _run([CLI], cwd="/", env=env, check=False)
    assert out.returncode == 2
    assert "usage: aquapeer" in out.stderr


def test_cli_status_reports_connection_errors(tmp_path):
    # No server: a socket directory with nothing in it fails fast and cleanly.
    out = _run(
        [CLI, "status", "--dbname", f"host={tmp_path} port=1 dbname=x connect_timeout=5"],
        cwd="/",
        env=tb.outside_env(),
        check=False,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "aquapeer status:" in out.stderr
    assert "Traceback" not in out.stderr


def test_payload_dir():
    assert PAYLOAD.is_dir(), f"{PAYLOAD} missing: run `make install`"
    init = (PAYLOAD / "aquapeer/__init__.py").read_text()
    assert re.search(rf"^__version__\s*=\s*['\"]{re.escape(VERSION)}['\"]", init, re.M)

    stamp = (PAYLOAD / ".aquapeer-lock.sha256").read_text().strip()
    assert stamp == _sha256(REPO / "python/requirements.lock"), "payload is from another lock"

    # The installed package is exactly python/aquapeer's .py files.
    src = REPO / "python/aquapeer"
    want = {p.relative_to(src) for p in src.rglob("*.py") if "__pycache__" not in p.parts}
    got = {p.relative_to(PAYLOAD / "aquapeer") for p in (PAYLOAD / "aquapeer").rglob("*.py")
           if "__pycache__" not in p.parts}
    assert got == want
    for rel in want:
        assert _sha256(src / rel) == _sha256(PAYLOAD / "aquapeer" / rel), f"{rel} differs"

    leftovers = [p.name for p in LIBDIR.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers


def test_payload_imports_with_system_python_and_wins_over_dist_packages():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import aiortc, msgpack, cryptography, websockets, rich, psycopg, aquapeer;"
        "mods = (aiortc, msgpack, cryptography, websockets, rich, psycopg, aquapeer);"
        "bad = [m.__name__ for m in mods if not m.__file__.startswith(sys.argv[1])];"
        "assert not bad, bad;"
        "print(aquapeer.__version__, psycopg.pq.__impl__)"
    )
    out = _run([SYSTEM_PYTHON, "-I", "-c", code, PAYLOAD], cwd="/", env=tb.outside_env())
    assert out.stdout.split() == [VERSION, "binary"]


def test_nothing_installed_into_system_site_packages():
    out = _run([SYSTEM_PYTHON, "-c", "import aiortc"], cwd="/", env=tb.outside_env(), check=False)
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr


# --- make dist and pgxn install ----------------------------------------------------


def _tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


@pytest.mark.timeout(1200)
def test_make_dist_and_pgxn_install_match_make_install(tmp_path):
    """`make dist` zip installs with pgxn exactly like `make install` does.

    Both installs go to DESTDIR staging trees, so the system's installation is
    not touched; the HEAD commit is cloned so the working tree stays clean.
    """
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the repository has no commit yet (make dist archives HEAD)")
    pg_config = shutil.which(PG_CONFIG)
    assert pg_config, f"{PG_CONFIG} not found"
    assert shutil.which("pgxn"), "pgxn (Debian package pgxnclient) not found"

    clone = tmp_path / "clone"
    _run(["git", "clone", "--quiet", REPO, clone])
    env = tb.outside_env(PG_CONFIG=pg_config)

    # make dist
    _run(["make", "-s", "dist", f"PG_CONFIG={pg_config}"], cwd=clone, env=env)
    zpath = clone / f"aquapeer-{VERSION}.zip"
    assert zpath.is_file()
    prefix = f"aquapeer-{VERSION}/"
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
        assert all(n.startswith(prefix) for n in names)
        for need in ("META.json", "Makefile", "aquapeer.control",
                     "sql/aquapeer--0.1.0.sql", "python/requirements.lock",
                     "python/aquapeer/__init__.py", "scripts/aquapeer.in"):
            assert prefix + need in names, f"{need} missing from {zpath.name}"
        assert json.loads(zf.read(prefix + "META.json"))["version"] == VERSION

    # pgxn install from the zip, staged with DESTDIR (pgxn passes the
    # environment on to make).
    pgxn_root = tmp_path / "pgxn-root"
    _run(["pgxn", "install", "--pg_config", pg_config, f"./{zpath.name}"],
         cwd=clone, env={**env, "DESTDIR": str(pgxn_root)}, timeout=1200)

    # plain make install of the same commit, staged the same way.
    plain_root = tmp_path / "plain-root"
    _run(["make", "-s", "install", f"PG_CONFIG={pg_config}", f"DESTDIR={plain_root}"],
         cwd=clone, env=env, timeout=1200)
    again = _run(["make", "install", f"PG_CONFIG={pg_config}", f"DESTDIR={plain_root}"],
                 cwd=clone, env=env, timeout=1200)
    assert "is up to date" in again.stdout, "second make install reinstalled the payload"

    def pgdir(flag: str) -> str:
        return _run([pg_config, flag]).stdout.strip().lstrip("/")

    pkglibdir, sharedir = pgdir("--pkglibdir"), pgdir("--sharedir")
    payload = str(PAYLOAD).lstrip("/")
    expected = [
        f"{pkglibdir}/aquapeer.so",
        f"{sharedir}/extension/aquapeer.control",
        f"{sharedir}/extension/aquapeer--{VERSION}.sql",
        f"{payload}/aquapeer/__init__.py",
        f"{payload}/.aquapeer-lock.sha256",
        f"{str(CLI).lstrip('/')}",
    ]
    for root in (pgxn_root, plain_root):
        for rel in expected:
            assert (root / rel).is_file(), f"{rel} missing under {root.name}"
    for rel, src in ((expected[1], clone / "aquapeer.control"),
                     (expected[2], clone / f"sql/aquapeer--{VERSION}.sql"),
                     (expected[3], clone / "python/aquapeer/__init__.py")):
        assert _sha256(pgxn_root / rel) == _sha256(src), rel
        assert _sha256(plain_root / rel) == _sha256(src), rel

    # Same files; same bytes except build outputs that embed build paths/times.
    pgxn_tree, plain_tree = _tree(pgxn_root), _tree(plain_root)
    assert sorted(pgxn_tree) == sorted(plain_tree)
    differ = [rel for rel in pgxn_tree
              if not rel.endswith((".so", ".bc", ".pyc"))
              and _sha256(pgxn_tree[rel]) != _sha256(plain_tree[rel])]
    assert not differ, differ
