"""The extension as a whole, end to end: CREATE EXTENSION, the payload checks,
privileges, the aquapeer_admin role, pg_dump of peer.config.

Most tests run in a database of their own on the session's shared cluster
(the worker serves only database postgres, so there only the SQL side runs).
The payload tests briefly change the installed payload and always restore it.
"""

import contextlib
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

import testbed as tb
from aquapeer import identity

REPO = tb.REPO_ROOT
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
MOVED_SUFFIX = ".moved-by-test"
SAVED_SUFFIX = ".saved-by-test"


def control_version():
    text = (REPO / "aquapeer.control").read_text()
    m = re.search(r"^\s*default_version\s*=\s*'([^']+)'", text, re.M)
    assert m, "no default_version in aquapeer.control"
    return m.group(1)


@contextlib.contextmanager
def fresh_db(cluster, tag):
    """A database for one test, dropped at the end (with any session still in it)."""
    name = f"aqp_{tag}_{uuid.uuid4().hex[:8]}"
    cluster.sql(f'create database "{name}"')
    try:
        yield name
    finally:
        cluster.sql(f'drop database if exists "{name}" with (force)')


@contextlib.contextmanager
def login_role(cluster, name):
    cluster.sql(f'drop role if exists "{name}"')
    cluster.sql(f'create role "{name}" login')
    try:
        yield name
    finally:
        cluster.sql(f'drop role if exists "{name}"')


def _client_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "LC_", "PYTHON")) and k not in ("VIRTUAL_ENV", "LANG")}
    env["LANG"] = "C.UTF-8"
    return env


def run_as_server_user(cluster, prog, *args, timeout=60):
    """Run a PostgreSQL client program as the server's OS user against cluster."""
    argv = [os.path.join(tb.pg_bindir(), prog), "-h", cluster.sock_dir, "-p", str(cluster.port),
            "-U", "postgres", *args]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", tb.server_user()[0], "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                          env=_client_env(), stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------
# the payload on disk
# --------------------------------------------------------------------------

def _heal_payload(payload: Path) -> None:
    """Undo what a run killed in the middle of a payload test left behind."""
    package, moved = payload / "aquapeer", payload / ("aquapeer" + MOVED_SUFFIX)
    if moved.exists() and not package.exists():
        moved.rename(package)
    saved = package / ("__init__.py" + SAVED_SUFFIX)
    if saved.exists():
        st = saved.stat()
        shutil.copyfile(saved, package / "__init__.py")
        os.utime(package / "__init__.py", ns=(st.st_atime_ns, st.st_mtime_ns))
        saved.unlink()


@pytest.fixture(scope="module")
def payload(shared_cluster):
    """The payload directory compiled into aquapeer.so."""
    with fresh_db(shared_cluster, "payload") as db:
        shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        path = Path(shared_cluster.scalar("select peer._payload_dir()", dbname=db))
    assert (path / "aquapeer" / "__init__.py").is_file(), f"{path}: run `make install`"
    return path


def assert_extension_works_in_new_session(cluster):
    with fresh_db(cluster, "after") as db:
        cluster.sql("create extension aquapeer cascade", dbname=db)
        assert cluster.scalar("select peer.version()", dbname=db) == control_version()


def assert_nothing_left(cluster, db):
    assert cluster.scalar("select count(*) from pg_namespace where nspname = 'peer'", dbname=db) == 0
    assert cluster.sql("select extname from pg_extension where extname in ('aquapeer', 'plpython3u')",
                       dbname=db) == []


# --------------------------------------------------------------------------
# 1. CREATE EXTENSION and versions
# --------------------------------------------------------------------------

def test_create_extension_cascade_installs_everything_and_versions_agree(shared_cluster):
    version = control_version()
    with fresh_db(shared_cluster, "create") as db:
        assert shared_cluster.sql("select 1 from pg_extension where extname = 'plpython3u'",
                                  dbname=db) == []
        shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        assert shared_cluster.scalar(
            "select count(*) from pg_namespace where nspname = 'peer'", dbname=db) == 1
        assert shared_cluster.scalar(
            "select count(*) from pg_extension where extname = 'plpython3u'", dbname=db) == 1
        row = shared_cluster.sql(
            "select peer.version(), peer._library_version(), "
            "(select extversion from pg_extension where extname = 'aquapeer'), "
            "(select n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace "
            " where e.extname = 'aquapeer')", dbname=db)[0]
        assert row == (version, version, version, "peer")


# --------------------------------------------------------------------------
# 2. payload missing or of another version
# --------------------------------------------------------------------------

def test_create_extension_fails_clearly_without_the_payload(shared_cluster, payload):
    _heal_payload(payload)
    package, moved = payload / "aquapeer", payload / ("aquapeer" + MOVED_SUFFIX)
    with fresh_db(shared_cluster, "nopayload") as db:
        package.rename(moved)
        try:
            with pytest.raises(psycopg.Error) as err:
                shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        finally:
            if moved.exists():
                moved.rename(package)
        diag = err.value.diag
        assert "payload is not installed" in (diag.message_primary or ""), str(err.value)
        assert "make install" in (diag.message_hint or ""), str(err.value)
        assert_nothing_left(shared_cluster, db)
    assert package.is_dir() and not moved.exists()
    assert_extension_works_in_new_session(shared_cluster)


def test_create_extension_fails_with_a_payload_of_another_version(shared_cluster, payload):
    _heal_payload(payload)
    init = payload / "aquapeer" / "__init__.py"
    saved = init.with_name(init.name + SAVED_SUFFIX)
    original = init.read_bytes()
    st = init.stat()
    assert f'__version__ = "{control_version()}"'.encode() in original
    with fresh_db(shared_cluster, "otherversion") as db:
        shutil.copy2(init, saved)  # lets _heal_payload repair a killed run
        try:
            init.write_bytes(original.replace(
                f'__version__ = "{control_version()}"'.encode(), b'__version__ = "9.9.9"'))
            # Same size as the original: a newer mtime makes Python ignore a
            # compiled copy in __pycache__ (which the server cannot rewrite).
            os.utime(init, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
            with pytest.raises(psycopg.Error) as err:
                shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        finally:
            init.write_bytes(original)
            os.utime(init, ns=(st.st_atime_ns, st.st_mtime_ns))
            saved.unlink(missing_ok=True)
        message = err.value.diag.message_primary or ""
        assert "9.9.9" in message, str(err.value)
        assert control_version() in message, str(err.value)
        assert "make install" in (err.value.diag.message_hint or ""), str(err.value)
        assert_nothing_left(shared_cluster, db)
    assert init.read_bytes() == original and init.stat().st_mtime_ns == st.st_mtime_ns
    assert_extension_works_in_new_session(shared_cluster)


# --------------------------------------------------------------------------
# 3. a payload module already imported from elsewhere
# --------------------------------------------------------------------------

def test_module_imported_from_elsewhere_is_refused_naming_both_paths(shared_cluster, payload):
    with fresh_db(shared_cluster, "conflict") as db:
        shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        shared_cluster.sql(
            "create function public.import_system_cryptography() returns text "
            "language plpython3u as $$\n"
            "import sys\n"
            f"sys.path.append('{DIST_PACKAGES}')\n"
            "import cryptography\n"
            "return cryptography.__file__\n"
            "$$", dbname=db)
        with shared_cluster.connect(db) as conn:
            try:
                where = conn.execute("select public.import_system_cryptography()").fetchone()[0]
            except psycopg.Error as exc:
                pytest.skip(f"Debian's python3-cryptography cannot be imported in PL/Python: {exc}")
            if not where.startswith(DIST_PACKAGES + "/"):
                pytest.skip(f"cryptography came from {where}, not from {DIST_PACKAGES} "
                            "(python3-cryptography not installed?)")
            with pytest.raises(psycopg.Error) as err:
                conn.execute("select peer.version()")
        message = err.value.diag.message_primary or ""
        assert '"cryptography"' in message, str(err.value)
        assert where in message or DIST_PACKAGES in message, str(err.value)
        assert str(payload) in message, str(err.value)
        # A new session is not affected.
        assert shared_cluster.scalar("select peer.version()", dbname=db) == control_version()


# --------------------------------------------------------------------------
# 4. privileges
# --------------------------------------------------------------------------

REFUSED_TO_ORDINARY_ROLES = [
    "select peer.start_worker()",
    "select peer.stop_worker()",
    "select peer.ping_worker()",
    "select * from peer.worker_status()",
    "select peer.nudge_worker()",
    "select peer.run_in_executor('{role}'::regrole, 'pg_catalog.now()'::regprocedure, '{{}}'::jsonb)",
    "select peer._start_executor('{role}'::regrole::oid, repeat('a', 32))",
    "select peer._register_worker()",
    "select peer._launcher_hold(false)",
    "select peer._launcher_hold(true)",
    "select peer._run_in_executor('{role}'::regrole::oid, 'pg_catalog.now()'::regprocedure::oid, "
    "'{{}}'::jsonb, 1.0)",
    "select peer._worker_answers()",
    "call peer.worker_main()",
    "select * from peer.config",
    "update peer.config set executor_pool_size = 3",
]


def test_ordinary_roles_are_refused_what_changes_state_or_reveals_it(shared_cluster):
    with fresh_db(shared_cluster, "privs") as db, login_role(shared_cluster, "aqp_ordinary") as role:
        shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        allowed = []
        with shared_cluster.connect(db, user=role) as conn:
            for statement in REFUSED_TO_ORDINARY_ROLES:
                statement = statement.format(role=role)
                try:
                    conn.execute(statement)
                except psycopg.errors.InsufficientPrivilege as exc:
                    assert "permission denied" in str(exc), (statement, str(exc))
                except psycopg.Error as exc:
                    allowed.append(f"{statement}: not refused for lack of privilege but "
                                   f"{type(exc).__name__}: {exc}")
                else:
                    allowed.append(f"{statement}: ran")
        assert not allowed, "\n".join(allowed)
        assert shared_cluster.scalar("select executor_pool_size from peer.config", dbname=db) == 2


def test_executor_entry_points_are_callable_but_refuse_outside_executors(shared_cluster):
    with fresh_db(shared_cluster, "entry") as db, login_role(shared_cluster, "aqp_entry") as role:
        shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        with shared_cluster.connect(db, user=role) as conn:
            assert conn.execute("select peer._should_stop()").fetchone()[0] is None
            conn.execute("select peer._check_interrupts()")
            with pytest.raises(psycopg.Error, match="runs only in an aquapeer executor"):
                conn.execute("select peer._executor_nonce()")
            with pytest.raises(psycopg.Error, match="runs only in an aquapeer executor"):
                conn.execute("call peer.executor_main()")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only an aquapeer executor"):
                conn.execute("select peer._arm_statement_timeout(100)")
        # Not even a superuser gets past the process checks.
        with shared_cluster.connect(db) as conn:
            assert conn.execute("select peer._should_stop()").fetchone()[0] is None
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="only the aquapeer worker starts executors"):
                conn.execute(f"select peer._start_executor('{role}'::regrole::oid, repeat('a', 32))")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only an aquapeer executor"):
                conn.execute("select peer._arm_statement_timeout(100)")
            with pytest.raises(psycopg.Error, match="runs only in an aquapeer executor"):
                conn.execute("select peer._executor_nonce()")
            with pytest.raises(psycopg.Error, match="runs only in an aquapeer executor"):
                conn.execute("call peer.executor_main()")
        assert shared_cluster.scalar(
            "select count(*) from pg_stat_activity where backend_type like 'aquapeer%%' "
            "and datname = %s", db) == 0


def test_aquapeer_admin_configures_and_watches_the_worker(cluster):
    # A fresh cluster: the role comes from CREATE EXTENSION, nowhere else.
    assert cluster.scalar("select count(*) from pg_roles where rolname = 'aquapeer_admin'") == 0
    cluster.sql("create extension aquapeer cascade")
    assert cluster.sql("select rolcanlogin from pg_roles where rolname = 'aquapeer_admin'") == [(False,)]
    tb.wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null"), 30,
                message="the worker to answer", ignore=(psycopg.Error,))
    cluster.sql("create role aqp_admin login in role aquapeer_admin")
    with cluster.connect(user="aqp_admin") as conn:
        assert conn.execute("select executor_pool_size from peer.config").fetchall() == [(2,)]
        conn.execute("update peer.config set executor_pool_size = 4")
        assert conn.execute("select executor_pool_size from peer.config").fetchall() == [(4,)]
        assert conn.execute("select extract(epoch from peer.ping_worker())").fetchone()[0] > 0
        status = conn.execute("select state, database, aquapeer_version from peer.worker_status()").fetchall()
        assert status == [("running", "postgres", control_version())]
        assert conn.execute("select peer.nudge_worker()").fetchone()[0] is True
        assert conn.execute("select peer.start_worker()").fetchone()[0].startswith("already running")
        # Running work as other roles stays with superusers.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("select peer.run_in_executor('aqp_admin'::regrole, "
                         "'pg_catalog.now()'::regprocedure, '{}'::jsonb)")
    assert cluster.scalar("select executor_pool_size from peer.config") == 4


# --------------------------------------------------------------------------
# 5. the aquapeer_admin role across DROP/CREATE EXTENSION
# --------------------------------------------------------------------------

def test_admin_role_survives_drop_and_create_extension(shared_cluster):
    with fresh_db(shared_cluster, "roles") as db:
        shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        assert shared_cluster.sql(
            "select rolcanlogin from pg_roles where rolname = 'aquapeer_admin'") == [(False,)]
        shared_cluster.sql("drop extension aquapeer", dbname=db)
        # PostgreSQL keeps the schema it made from the control file's `schema`
        # (it cannot be a member of the extension it contains); it is left empty.
        assert shared_cluster.scalar(
            "select (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "        where n.nspname = 'peer') "
            "     + (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
            "        where n.nspname = 'peer')", dbname=db) == 0
        # Roles are cluster-wide and outlive the extension ...
        assert shared_cluster.scalar(
            "select count(*) from pg_roles where rolname = 'aquapeer_admin'") == 1
        # ... and creating it again reuses the role.
        shared_cluster.sql("create extension aquapeer", dbname=db)
        assert shared_cluster.sql(
            "select rolcanlogin from pg_roles where rolname = 'aquapeer_admin'") == [(False,)]
        assert shared_cluster.scalar(
            "select has_table_privilege('aquapeer_admin', 'peer.config', 'UPDATE') "
            "and has_function_privilege('aquapeer_admin', 'peer.ping_worker()', 'EXECUTE')",
            dbname=db) is True
        assert shared_cluster.scalar("select peer.version()", dbname=db) == control_version()


# --------------------------------------------------------------------------
# 6. pg_dump keeps the configuration
# --------------------------------------------------------------------------

def test_pg_dump_and_restore_keep_the_configuration(shared_cluster):
    dump = os.path.join(shared_cluster.dir, f"dump-{uuid.uuid4().hex[:8]}.sql")
    try:
        with fresh_db(shared_cluster, "dumpsrc") as src, fresh_db(shared_cluster, "dumpdst") as dst:
            shared_cluster.sql("create extension aquapeer cascade", dbname=src)
            shared_cluster.sql("update peer.config set executor_pool_size = 5, "
                               "executor_idle_timeout = '7 s', max_message_bytes = 4096", dbname=src)
            # Messages, grants and friends are the user's data: kept.  The stream
            # epoch is not, so the restored copy numbers its messages anew.
            ghost = identity.make_invite(identity.Identity.generate(), [], "ghost")
            shared_cluster.sql("select peer.add_friend('ghost', %s)", ghost, dbname=src)
            shared_cluster.sql("select peer.allow_topic('chat', 'ghost'), peer.send('ghost', 'chat', '1')",
                               dbname=src)
            out = run_as_server_user(shared_cluster, "pg_dump", "-d", src, "-f", dump)
            assert out.returncode == 0, out.stdout + out.stderr
            out = run_as_server_user(shared_cluster, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                                     "-d", dst, "-f", dump)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "ERROR" not in out.stderr, out.stderr
            rows = shared_cluster.sql(
                "select executor_pool_size, extract(epoch from executor_idle_timeout)::int "
                "from peer.config", dbname=dst)
            assert rows == [(5, 7)]
            assert shared_cluster.sql(
                "select max_message_bytes, (select count(*) from peer.outbox where state = 'queued'), "
                "(select count(*) from peer.topic_grant where topic not like 'aquapeer.%'), "
                "(select count(*) from peer.stream_epoch) "
                "from peer.config", dbname=dst) == [(4096, 1, 1, 0)]
            assert shared_cluster.scalar("select peer.version()", dbname=dst) == control_version()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dump)


# --------------------------------------------------------------------------
# 7. peer.config refuses bad values
# --------------------------------------------------------------------------

def test_config_refuses_bad_values(shared_cluster):
    with fresh_db(shared_cluster, "config") as db:
        shared_cluster.sql("create extension aquapeer cascade", dbname=db)
        for assignment in ("executor_pool_size = -1", "executor_pool_size = 65",
                           "executor_idle_timeout = '0 s'"):
            with pytest.raises(psycopg.errors.CheckViolation):
                shared_cluster.sql(f"update peer.config set {assignment}", dbname=db)
        with pytest.raises(psycopg.errors.NotNullViolation):
            shared_cluster.sql("update peer.config set executor_pool_size = null", dbname=db)
        # Still one row, the default one.
        shared_cluster.sql("insert into peer.config (executor_pool_size) values (9)", dbname=db)
        assert shared_cluster.sql("select executor_pool_size from peer.config", dbname=db) == [(9,)]
        with pytest.raises(psycopg.errors.CheckViolation):
            shared_cluster.sql("update peer.config set singleton = false", dbname=db)


# --------------------------------------------------------------------------
# 8. the install script is not for psql
# --------------------------------------------------------------------------

def test_install_script_cannot_be_sourced_in_psql(shared_cluster):
    script = REPO / "sql" / f"aquapeer--{control_version()}.sql"
    lines = [line for line in script.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("--")]
    assert re.fullmatch(r'\\echo Use "CREATE EXTENSION aquapeer CASCADE".*\\quit\s*', lines[0]), lines[0]
    installed = Path(os.path.join(tb._pg_config("--sharedir"), "extension", script.name))
    assert installed.read_bytes() == script.read_bytes(), f"{installed} differs: run `make install`"
    # No upgrade script is for psql either.
    upgrades = sorted(REPO.glob("sql/aquapeer--*--*.sql"))
    assert upgrades
    for upgrade in upgrades:
        assert upgrade.read_text().startswith("-- aquapeer ")
        assert '\\echo Use "ALTER EXTENSION aquapeer UPDATE"' in upgrade.read_text().splitlines()[1]
    with fresh_db(shared_cluster, "psqlsrc") as db:
        out = run_as_server_user(shared_cluster, "psql", "-X", "-v", "ON_ERROR_STOP=1",
                                 "-d", db, "-f", str(installed))
        assert out.returncode == 0, out.stdout + out.stderr
        assert 'Use "CREATE EXTENSION aquapeer CASCADE"' in out.stdout
        assert shared_cluster.scalar(
            "select count(*) from pg_namespace where nspname = 'peer'", dbname=db) == 0
