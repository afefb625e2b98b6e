# aquapeer: PostgreSQL extension (PGXS) + Python payload for PL/Python + CLI.
#
#   make                 build the C background-worker launcher (no network)
#   make install         install the extension, the Python payload and the CLI
#   make uninstall       remove all of that again
#   make dist            aquapeer-$(EXTVERSION).zip from git HEAD (PGXN release)
#   make test            setup-debian, build, install, .venv, lint, pytest tests
#   make test-unit       .venv, pytest tests/unit (no server, seconds)
#   make test-db         like test, tests/db only (one cluster, no network)
#   make test-net        like test, tests/net only (several clusters, aiortc)
#   make lint            ruff over the Python, and lint-sql
#   make lint-sql        pgspot over the built install and upgrade scripts
#   make docs/sql-reference.md   the SQL reference, from a fresh install's catalog
#   make demo            setup-debian, build, install, .venv, scripts/demo.py
#   make lab             the network lab (docs/netlab.md) with two databases, kept up
#   make lab-down        take it down again
#
# Variables: PG_CONFIG, AQUAPEER_LIBDIR, AQUAPEER_BINDIR, PYTHON, VENV,
# PYTEST_ARGS, DESTDIR (staged installs; the CLI keeps the final paths).

EXTENSION = aquapeer
# Single source of truth for the version: aquapeer.control.
EXTVERSION := $(shell sed -n "s/^[[:space:]]*default_version[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" aquapeer.control)
ifeq ($(EXTVERSION),)
$(error could not read default_version from aquapeer.control)
endif

MODULE_big = aquapeer
OBJS = $(patsubst %.c,%.o,$(wildcard src/*.c))
# SQL: the install script and an upgrade script from each earlier release (an
# update runs one script: a chain would run an older script's check against
# this version's payload) are built from sql/'s sources by scripts/build_sql.py,
# and committed when released (sql/released.sha256 then freezes them).  The scripts of the
# versions before the first release are frozen history, installed as they are.
# releases.txt records each release (version, commit); UPGRADE_SOURCES are those
# before this version.
SQL_SOURCES = sql/head.sql $(sort $(wildcard sql/incremental/*.sql sql/idempotent/*.sql)) sql/grants.sql sql/tail.sql
SQL_INSTALL = sql/aquapeer--$(EXTVERSION).sql
UPGRADE_SOURCES := $(shell awk '!/^\#/ && NF && $$1 != "$(EXTVERSION)" {print $$1}' releases.txt)
SQL_UPGRADES = $(foreach v,$(UPGRADE_SOURCES),sql/aquapeer--$(v)--$(EXTVERSION).sql)
SQL_BUILT = $(SQL_INSTALL) $(SQL_UPGRADES)
DATA = $(sort $(wildcard sql/aquapeer--*.sql) $(SQL_BUILT))

# make installcheck (and pgxn check): test/sql/*.sql against test/expected/,
# in a new database of the running server PGHOST, PGPORT and PGUSER name, with
# the extension installed (tests/db/test_installcheck.py runs it).
REGRESS = $(patsubst test/sql/%.sql,%,$(sort $(wildcard test/sql/*.sql)))
REGRESS_OPTS = --inputdir=test --load-extension=plpython3u --load-extension=aquapeer

# Where the Python payload (pinned wheels + the aquapeer package) lives:
# one directory per extension version, compiled into the C library.
AQUAPEER_LIBDIR ?= /usr/local/lib/aquapeer
AQUAPEER_BINDIR ?= /usr/local/bin
AQUAPEER_PAYLOAD_DIR = $(AQUAPEER_LIBDIR)/$(EXTVERSION)

PG_CPPFLAGS += -DAQUAPEER_VERSION='"$(EXTVERSION)"' -DAQUAPEER_PAYLOAD_DIR='"$(AQUAPEER_PAYLOAD_DIR)"'
# Warnings on top of PostgreSQL's own; its headers trip -Wunused-parameter.
# In CI (CI set in the environment) any warning fails the build.
PG_CFLAGS += -Wall -Wextra -Wno-unused-parameter
ifdef CI
PG_CFLAGS += -Werror
endif

# Both are compiled in: a tree built for another version or directory is rebuilt, or an
# upgrade would install a library that loads the old payload. Changed warning
# flags rebuild too, so CI's -Werror sees every file.
BUILD_FLAGS = src/.build-flags
# This rule comes before PGXS's `all`; a bare `make` still builds.
.DEFAULT_GOAL := all
$(BUILD_FLAGS): FORCE
	@echo '$(EXTVERSION) $(AQUAPEER_PAYLOAD_DIR) $(PG_CFLAGS)' | cmp -s - $@ || echo '$(EXTVERSION) $(AQUAPEER_PAYLOAD_DIR) $(PG_CFLAGS)' > $@
$(OBJS): $(BUILD_FLAGS)
.PHONY: FORCE
FORCE:

EXTRA_CLEAN = aquapeer-*.zip $(BUILD_FLAGS)

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifneq ($(PGXS),)
include $(PGXS)
else
# No pg_config yet (fresh machine): `make test` / `make demo` / `make setup`
# still work, because they install the Debian packages first and then re-run
# make. Everything else needs PGXS.
all install uninstall installcheck clean:
	@echo "aquapeer: '$(PG_CONFIG)' not found. Run 'scripts/setup-debian' (or 'make test'), or set PG_CONFIG=/path/to/pg_config." >&2
	@exit 1
endif

# The interpreter PL/Python is linked against (PGXS sets it from configure;
# Debian: /usr/bin/python3). Used for the payload, the CLI and the test venv.
PYTHON ?= /usr/bin/python3

PG_SHAREDIR = $(shell $(PG_CONFIG) --sharedir 2>/dev/null)
PG_MAJOR = $(shell $(PG_CONFIG) --version 2>/dev/null | sed -n 's/^PostgreSQL \([0-9]*\).*/\1/p')

PIP_FLAGS = --disable-pip-version-check --no-input --root-user-action=ignore --no-warn-script-location
PAYLOAD_STAMP = .aquapeer-lock.sha256

VENV ?= .venv
VENV_STAMP = $(VENV)/.aquapeer-venv-stamp
PYTEST_ARGS ?=

.PHONY: check-plpython install-payload install-cli uninstall-payload uninstall-cli \
	setup prepare venv test demo dist

all: $(SQL_BUILT)
$(SQL_INSTALL): $(SQL_SOURCES) scripts/build_sql.py
	$(PYTHON) scripts/build_sql.py $(EXTVERSION) $@
$(SQL_UPGRADES): sql/aquapeer--%--$(EXTVERSION).sql: $(SQL_SOURCES) scripts/build_sql.py releases.txt
	$(PYTHON) scripts/build_sql.py $(EXTVERSION) $@ --from $*

# --- install ---------------------------------------------------------------

# PL/Python must be installed for this PostgreSQL before anything is copied.
installdirs installdirs-lib: check-plpython
install: install-payload install-cli

check-plpython:
	@if [ ! -f '$(PG_SHAREDIR)/extension/plpython3u.control' ]; then \
	  echo "aquapeer: PL/Python (plpython3u) is not installed for PostgreSQL $(PG_MAJOR):" >&2; \
	  echo "  $(PG_SHAREDIR)/extension/plpython3u.control is missing." >&2; \
	  echo "  On Debian/Ubuntu: apt-get install postgresql-plpython3-$(PG_MAJOR)" >&2; \
	  exit 1; \
	fi

# Pinned wheels into $(AQUAPEER_PAYLOAD_DIR) (never into site-packages).
# Skipped when the stamp records the same lock hash; otherwise installed into
# a temporary sibling and renamed into place. The aquapeer package itself is
# copied every time (cheap), also via a temporary directory and rename.
install-payload: check-plpython
	@set -e; \
	dir='$(DESTDIR)$(AQUAPEER_PAYLOAD_DIR)'; \
	hash=$$(sha256sum python/requirements.lock | cut -d' ' -f1); \
	if [ -f "$$dir/$(PAYLOAD_STAMP)" ] && [ "$$(cat "$$dir/$(PAYLOAD_STAMP)")" = "$$hash" ]; then \
	  echo "aquapeer: payload in $$dir is up to date"; \
	else \
	  echo "aquapeer: installing pinned Python payload into $$dir"; \
	  mkdir -p "$$(dirname "$$dir")"; \
	  rm -rf "$$dir".tmp-* "$$dir".old-*; \
	  tmp="$$dir.tmp-$$$$"; \
	  mkdir "$$tmp"; \
	  $(PYTHON) -m pip install $(PIP_FLAGS) --target "$$tmp" --require-hashes --no-deps \
	    --only-binary=:all: -r python/requirements.lock; \
	  echo "$$hash" > "$$tmp/$(PAYLOAD_STAMP)"; \
	  chmod -R a+rX "$$tmp"; \
	  if [ -e "$$dir" ]; then mv "$$dir" "$$dir.old-$$$$"; fi; \
	  mv "$$tmp" "$$dir"; \
	  rm -rf "$$dir.old-$$$$"; \
	fi; \
	new="$$dir/aquapeer.new-$$$$"; \
	rm -rf "$$dir"/aquapeer.new-* "$$dir"/aquapeer.old-*; \
	mkdir -p "$$new"; \
	for f in $$(cd python/aquapeer && find . -name __pycache__ -prune -o -type f -name '*.py' -print); do \
	  install -D -m 644 "python/aquapeer/$$f" "$$new/$$f"; \
	done; \
	if [ -e "$$dir/aquapeer" ]; then mv "$$dir/aquapeer" "$$dir/aquapeer.old-$$$$"; fi; \
	mv "$$new" "$$dir/aquapeer"; \
	rm -rf "$$dir/aquapeer.old-$$$$"; \
	$(PYTHON) -m compileall -q "$$dir/aquapeer" >/dev/null; \
	chmod -R a+rX "$$dir/aquapeer"; \
	echo "aquapeer: python/aquapeer copied into $$dir/aquapeer"

# The CLI: scripts/aquapeer.in with the interpreter and payload path filled in.
install-cli: check-plpython
	@case '$(PYTHON)' in /*) ;; *) echo "aquapeer: PYTHON must be an absolute path, got '$(PYTHON)'" >&2; exit 1;; esac
	$(MKDIR_P) '$(DESTDIR)$(AQUAPEER_BINDIR)'
	sed -e 's|@PYTHON@|$(PYTHON)|g' \
	    -e 's|@PAYLOAD_DIR@|$(AQUAPEER_PAYLOAD_DIR)|g' \
	    -e 's|@VERSION@|$(EXTVERSION)|g' \
	    scripts/aquapeer.in > '$(DESTDIR)$(AQUAPEER_BINDIR)/.aquapeer.tmp'
	chmod 755 '$(DESTDIR)$(AQUAPEER_BINDIR)/.aquapeer.tmp'
	mv -f '$(DESTDIR)$(AQUAPEER_BINDIR)/.aquapeer.tmp' '$(DESTDIR)$(AQUAPEER_BINDIR)/aquapeer'

uninstall: uninstall-payload uninstall-cli

uninstall-payload:
	rm -rf '$(DESTDIR)$(AQUAPEER_PAYLOAD_DIR)'
	@rmdir '$(DESTDIR)$(AQUAPEER_LIBDIR)' 2>/dev/null || true

uninstall-cli:
	rm -f '$(DESTDIR)$(AQUAPEER_BINDIR)/aquapeer'

# --- release -----------------------------------------------------------------

dist:
	@if [ -n "$$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then \
	  echo "aquapeer: warning: uncommitted changes are not in the zip (it is built from HEAD)" >&2; fi
	git archive --format=zip --prefix=aquapeer-$(EXTVERSION)/ --output=aquapeer-$(EXTVERSION).zip.tmp HEAD \
	  || { rm -f aquapeer-$(EXTVERSION).zip.tmp; exit 1; }
	mv -f aquapeer-$(EXTVERSION).zip.tmp aquapeer-$(EXTVERSION).zip
	@echo "aquapeer: wrote aquapeer-$(EXTVERSION).zip"

# --- demo and tests (Debian 12, as root) ------------------------------------

setup:
	bash scripts/setup-debian

# Debian packages, build, install, venv: each a fresh make, because on a new
# machine pg_config only exists after scripts/setup-debian.
prepare:
	bash scripts/setup-debian
	$(MAKE) all
	$(MAKE) install
	$(MAKE) venv

# .venv from $(PYTHON) with both hashed locks; skipped when the stamp (the
# interpreter and the hashes of both locks) matches.
venv:
	@set -e; \
	want="$$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])') \
	$$(sha256sum python/requirements.lock tests/requirements.lock | cut -d' ' -f1 | tr '\n' ' ')"; \
	if [ -x '$(VENV)/bin/python' ] && [ -f '$(VENV_STAMP)' ] && [ "$$(cat '$(VENV_STAMP)')" = "$$want" ]; then \
	  echo "aquapeer: $(VENV) is up to date"; \
	else \
	  echo "aquapeer: creating $(VENV) from $(PYTHON)"; \
	  rm -f '$(VENV_STAMP)'; \
	  $(PYTHON) -m venv --clear '$(VENV)'; \
	  '$(VENV)/bin/python' -m pip install $(PIP_FLAGS) --require-hashes --only-binary=:all: \
	    -r python/requirements.lock -r tests/requirements.lock; \
	  echo "$$want" > '$(VENV_STAMP)'; \
	fi

# What the tests and the demo need to find the installed extension.
TEST_ENV = AQUAPEER_LIBDIR='$(AQUAPEER_LIBDIR)' AQUAPEER_BINDIR='$(AQUAPEER_BINDIR)' AQUAPEER_PYTHON='$(PYTHON)' PG_CONFIG='$(PG_CONFIG)'

.PHONY: lint test-unit test-db test-net

lint: venv
	'$(VENV)/bin/ruff' check python tests bench scripts

# pgspot over the scripts this tree builds; its allowlist, with the reasons,
# is sql/pgspot.ignore (one option a line).
.PHONY: lint-sql
lint-sql: venv $(SQL_BUILT)
	grep -v -e '^#' -e '^$$' sql/pgspot.ignore | tr '\n' '\0' | xargs -0 '$(VENV)/bin/pgspot' $(SQL_BUILT)
lint: lint-sql

# The SQL reference: install this tree, create the extension in a throwaway
# cluster and describe its catalog (tests/db/test_sql_reference.py checks it).
docs/sql-reference.md: $(SQL_BUILT) scripts/sql_reference.py | venv
	$(MAKE) install
	$(TEST_ENV) '$(VENV)/bin/python' scripts/sql_reference.py -o $@

# lint as a fresh make after prepare: the venv it needs exists by then.
test: prepare
	$(MAKE) lint
	$(TEST_ENV) '$(VENV)/bin/python' -m pytest tests $(PYTEST_ARGS)

# The tiers: tests/unit needs no server, so only the venv.
test-unit: venv
	$(TEST_ENV) '$(VENV)/bin/python' -m pytest tests/unit $(PYTEST_ARGS)

test-db test-net: test-%: prepare
	$(TEST_ENV) '$(VENV)/bin/python' -m pytest tests/$* $(PYTEST_ARGS)

demo: prepare
	$(TEST_ENV) '$(VENV)/bin/python' scripts/demo.py

# The network lab (tests/netlab.py, docs/netlab.md), as root: namespaces, two NAT routers,
# coturn and the signaling server, alice in home1 and bob in home2; a background process
# keeps it until lab-down.
.PHONY: lab lab-down
lab: prepare
	$(TEST_ENV) '$(VENV)/bin/python' tests/netlab.py up

lab-down:
	$(TEST_ENV) '$(VENV)/bin/python' tests/netlab.py down

# Benchmarks: aquapeer beside PostgreSQL's own paths, in one run.
bench: prepare
	'$(VENV)/bin/python' bench/bench_worker.py $(BENCH_ARGS)
	'$(VENV)/bin/python' bench/connect.py $(CONNECT_BENCH_ARGS)
	'$(VENV)/bin/python' bench/messaging.py $(MESSAGING_BENCH_ARGS)
	'$(VENV)/bin/python' bench/bundles.py $(BUNDLES_BENCH_ARGS)
	'$(VENV)/bin/python' bench/replication.py $(REPLICATION_BENCH_ARGS)
	'$(VENV)/bin/python' bench/presence.py $(PRESENCE_BENCH_ARGS)
	'$(VENV)/bin/python' bench/signaling.py $(SIGNALING_BENCH_ARGS)
