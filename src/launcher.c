/*
 * launcher.c: aquapeer's background processes.
 *
 * - The launcher (static, only when preloaded) keeps one network worker
 *   running for the database named by aquapeer.database.
 * - A worker connects to one database, waits for the extension, and runs
 *   CALL peer.worker_main(): the PL/Python asyncio loop that holds the
 *   peer connections.
 * - An executor connects to one database as one role and runs
 *   CALL peer.executor_main(), which serves requests the worker hands it.
 *
 * The CALL goes through a top-level portal, as a client's query would, so
 * that the procedure runs in a non-atomic context and may commit.
 */
#include "aquapeer.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "parser/analyze.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "storage/lock.h"
#include "storage/shmem.h"
#include "tcop/pquery.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/portal.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

PGDLLEXPORT void aquapeer_launcher_main(Datum arg);
PGDLLEXPORT void aquapeer_worker_main(Datum arg);
PGDLLEXPORT void aquapeer_executor_main(Datum arg);
void		_PG_init(void);

AquapeerShared *aquapeer_shared = NULL;
char	   *aquapeer_database = NULL;
int			aquapeer_restart_interval = 5;
volatile sig_atomic_t aquapeer_got_sigterm = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Keys of the session lock that keeps a database to one worker. */
#define WORKER_LOCK_KEY1	0x61717065	/* "aqpe" */
#define WORKER_LOCK_KEY2	0x776f726b	/* "work" */

static void
handle_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	aquapeer_got_sigterm = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(AquapeerShared)));
}

static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	aquapeer_shared = ShmemInitStruct("aquapeer", sizeof(AquapeerShared), &found);
	if (!found)
	{
		pg_atomic_init_u32(&aquapeer_shared->launcher_pid, 0);
		pg_atomic_init_u32(&aquapeer_shared->held_by_admin, 0);
		pg_atomic_init_u32(&aquapeer_shared->start_now, 0);
		pg_atomic_init_u32(&aquapeer_shared->no_slot, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

void
_PG_init(void)
{
	/* PGC_POSTMASTER may only be defined while preloading. */
	DefineCustomStringVariable("aquapeer.database",
							   "Database whose aquapeer worker starts with the server.",
							   "Used only when aquapeer is in shared_preload_libraries.",
							   &aquapeer_database, "postgres",
							   process_shared_preload_libraries_in_progress ? PGC_POSTMASTER : PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("aquapeer.restart_interval",
							"Seconds to wait before starting a failed aquapeer worker again.",
							NULL, &aquapeer_restart_interval, 5, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	MarkGUCPrefixReserved("aquapeer");

	/*
	 * pg_upgrade runs the server in binary-upgrade mode to restore the
	 * schema; a worker there would write to a database being rebuilt.
	 */
	if (!process_shared_preload_libraries_in_progress || IsBinaryUpgrade)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;

	{
		BackgroundWorker worker;

		memset(&worker, 0, sizeof(worker));
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		worker.bgw_restart_time = 1;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "aquapeer");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "aquapeer_launcher_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, AQUAPEER_LAUNCHER_TYPE);
		snprintf(worker.bgw_type, BGW_MAXLEN, AQUAPEER_LAUNCHER_TYPE);
		RegisterBackgroundWorker(&worker);
	}
}

bool
aquapeer_is_background_process(const char *bgw_type)
{
	return MyBgworkerEntry != NULL && strcmp(MyBgworkerEntry->bgw_type, bgw_type) == 0;
}

/*
 * Probe the lock every backend takes on its database at connection time.
 * DROP DATABASE and ALTER DATABASE RENAME hold AccessExclusiveLock on it and
 * then wait 5 s for other sessions to leave; CREATE DATABASE holds ShareLock
 * on its template.  A RowExclusiveLock we cannot get means one of them waits.
 */
static StopReason
probe_database_lock(void)
{
	LOCKTAG		tag;
	LOCKMODE	modes[] = {AccessShareLock, RowExclusiveLock};
	StopReason	reasons[] = {STOP_DATABASE_CLOSING, STOP_DATABASE_COPYING};

	if (!OidIsValid(MyDatabaseId))
		return STOP_NONE;
	SET_LOCKTAG_OBJECT(tag, InvalidOid, DatabaseRelationId, MyDatabaseId, 0);
	for (size_t i = 0; i < lengthof(modes); i++)
	{
		if (LockAcquire(&tag, modes[i], true, true) == LOCKACQUIRE_NOT_AVAIL)
			return reasons[i];
		LockRelease(&tag, modes[i], true);
	}
	return STOP_NONE;
}

StopReason
aquapeer_check_stop(void)
{
	if (aquapeer_got_sigterm)
		return STOP_SHUTDOWN;
	if (!PostmasterIsAlive())
		return STOP_POSTMASTER_DIED;
	return probe_database_lock();
}

const char *
aquapeer_stop_reason_text(StopReason reason)
{
	switch (reason)
	{
		case STOP_NONE:
			return NULL;
		case STOP_SHUTDOWN:
			return "shutdown requested";
		case STOP_POSTMASTER_DIED:
			return "postmaster died";
		case STOP_DATABASE_CLOSING:
			return "database is being dropped or renamed";
		case STOP_DATABASE_COPYING:
			return "database is being used as a template";
	}
	return NULL;
}

/* The settings the loops depend on, whatever database or role defaults say. */
static void
pin_settings(const char *application_name)
{
	static const char *const pinned[][2] = {
		{"default_transaction_read_only", "off"},
		{"default_transaction_isolation", "read committed"},
		{"lock_timeout", "0"},
		{"statement_timeout", "0"},
		{"idle_in_transaction_session_timeout", "0"},
		{"search_path", "pg_catalog, pg_temp"},
		{"TimeZone", "UTC"},
		{"DateStyle", "ISO, YMD"},
		{"IntervalStyle", "postgres"},
		{"extra_float_digits", "3"},
	};

	for (size_t i = 0; i < lengthof(pinned); i++)
		SetConfigOption(pinned[i][0], pinned[i][1], PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("application_name", application_name, PGC_USERSET, PGC_S_SESSION);
	pgstat_report_appname(application_name);
}

/* Run one CALL statement the way exec_simple_query would. */
static void
run_toplevel_call(const char *sql)
{
	MemoryContext callcxt;
	MemoryContext oldcxt;
	RawStmt    *raw;
	List	   *querytrees;
	List	   *plantrees;
	Portal		portal;
	DestReceiver *receiver;
	QueryCompletion qc;
	bool		snapshot_set = false;

	/* Parse trees and plans must outlive the commits the procedure makes. */
	callcxt = AllocSetContextCreate(TopMemoryContext, "aquapeer call", ALLOCSET_DEFAULT_SIZES);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	debug_query_string = sql;
	pgstat_report_activity(STATE_RUNNING, sql);

	oldcxt = MemoryContextSwitchTo(callcxt);
	raw = linitial_node(RawStmt, pg_parse_query(sql));
	if (analyze_requires_snapshot(raw))
	{
		PushActiveSnapshot(GetTransactionSnapshot());
		snapshot_set = true;
	}
	querytrees = pg_analyze_and_rewrite_fixedparams(raw, sql, NULL, 0, NULL);
	plantrees = pg_plan_queries(querytrees, sql, CURSOR_OPT_PARALLEL_OK, NULL);
	if (snapshot_set)
		PopActiveSnapshot();

	portal = CreatePortal("", true, true);
	portal->visible = false;
	PortalDefineQuery(portal, NULL, sql, CMDTAG_CALL, plantrees, NULL);
	PortalStart(portal, NULL, 0, InvalidSnapshot);
	receiver = CreateDestReceiver(DestNone);
	InitializeQueryCompletion(&qc);
	(void) PortalRun(portal, FETCH_ALL, true, true, receiver, receiver, &qc);
	receiver->rDestroy(receiver);
	PortalDrop(portal, false);
	MemoryContextSwitchTo(oldcxt);

	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
	debug_query_string = NULL;
	MemoryContextDelete(callcxt);
}

static void
setup_signals(void)
{
	pqsignal(SIGTERM, handle_sigterm);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
}

/* Sleep on the latch for up to timeout_ms; handle reloads. */
static void
nap(long timeout_ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 timeout_ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
}

static bool
extension_exists(void)
{
	bool		exists;

	StartTransactionCommand();
	exists = OidIsValid(get_extension_oid("aquapeer", true));
	CommitTransactionCommand();
	return exists;
}

/* Exit so that the postmaster and the launcher do the right thing next. */
static void
exit_for(StopReason reason)
{
	const char *text = aquapeer_stop_reason_text(reason);

	if (text)
		elog(LOG, "%s leaving: %s", MyBgworkerEntry->bgw_type, text);
	/* A template copy ends soon: come back; otherwise stay away. */
	proc_exit(reason == STOP_DATABASE_COPYING ? 1 : 0);
}

void
aquapeer_worker_main(Datum arg)
{
	Oid			dboid = DatumGetObjectId(arg);
	LOCKTAG		tag;

	setup_signals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pin_settings(AQUAPEER_WORKER_TYPE);

	/* One worker per database, whoever started it. */
	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, WORKER_LOCK_KEY1, WORKER_LOCK_KEY2, 2);
	if (LockAcquire(&tag, ExclusiveLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
	{
		elog(LOG, "another aquapeer worker already serves database %u; this one leaves", dboid);
		proc_exit(0);
	}

	for (;;)
	{
		StopReason	reason;
		bool		waited = false;

		while ((reason = aquapeer_check_stop()) == STOP_NONE && !extension_exists())
		{
			if (!waited)
				elog(LOG, "aquapeer worker waiting for CREATE EXTENSION aquapeer");
			waited = true;
			pgstat_report_activity(STATE_IDLE, "waiting for CREATE EXTENSION aquapeer");
			nap(1000L);
		}
		if (reason != STOP_NONE)
			exit_for(reason);

		run_toplevel_call("CALL peer.worker_main()");

		reason = aquapeer_check_stop();
		if (reason != STOP_NONE)
			exit_for(reason);
		/* The loop returns on its own only when the extension was dropped. */
	}
}

void
aquapeer_executor_main(Datum arg)
{
	Oid			dboid = DatumGetObjectId(arg);
	ExecutorArgs args;

	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	setup_signals();
	BackgroundWorkerInitializeConnectionByOid(dboid, args.roleid, 0);
	pin_settings(AQUAPEER_EXECUTOR_TYPE);
	run_toplevel_call("CALL peer.executor_main()");
	exit_for(aquapeer_check_stop());
}

static void
fill_worker(BackgroundWorker *worker, const char *type, const char *function, Oid dboid)
{
	memset(worker, 0, sizeof(*worker));
	worker->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker->bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker->bgw_restart_time = BGW_NEVER_RESTART;
	worker->bgw_main_arg = ObjectIdGetDatum(dboid);
	snprintf(worker->bgw_library_name, BGW_MAXLEN, "aquapeer");
	snprintf(worker->bgw_function_name, BGW_MAXLEN, "%s", function);
	snprintf(worker->bgw_name, BGW_MAXLEN, "%s for database %u", type, dboid);
	snprintf(worker->bgw_type, BGW_MAXLEN, "%s", type);
}

static void
report_no_slot(const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
			 errmsg("could not start %s: no background worker slot is free", what),
			 errhint("All max_worker_processes (%d) slots are in use; raise max_worker_processes and restart the server.",
					 max_worker_processes)));
}

/*
 * Start a worker for dboid.  Workers started from SQL come back after
 * aquapeer.restart_interval when they fail; the launcher restarts its own.
 * Returns the pid when asked to wait for the start, else 0.
 */
static BackgroundWorkerHandle *
start_worker(Oid dboid, bool from_launcher)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;

	fill_worker(&worker, AQUAPEER_WORKER_TYPE, "aquapeer_worker_main", dboid);
	if (!from_launcher)
		worker.bgw_restart_time = aquapeer_restart_interval;
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		return NULL;
	return handle;
}

pid_t
aquapeer_register_worker(Oid dboid, bool wait_for_start)
{
	BackgroundWorkerHandle *handle = start_worker(dboid, false);
	pid_t		pid = 0;

	if (handle == NULL)
		report_no_slot("the aquapeer worker");
	if (wait_for_start && WaitForBackgroundWorkerStartup(handle, &pid) != BGWH_STARTED)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the aquapeer worker stopped right after it started"),
				 errhint("Look in the server log for the reason.")));
	return pid;
}

void
aquapeer_register_executor(Oid dboid, Oid roleid, const char *nonce)
{
	BackgroundWorker worker;
	ExecutorArgs args;

	fill_worker(&worker, AQUAPEER_EXECUTOR_TYPE, "aquapeer_executor_main", dboid);
	memset(&args, 0, sizeof(args));
	args.roleid = roleid;
	strlcpy(args.nonce, nonce, sizeof(args.nonce));
	StaticAssertStmt(sizeof(args) <= BGW_EXTRALEN, "executor arguments must fit in bgw_extra");
	memcpy(worker.bgw_extra, &args, sizeof(args));
	if (!RegisterDynamicBackgroundWorker(&worker, NULL))
		report_no_slot("an aquapeer executor");
}

/* The oid of the database called name, read from pg_database directly. */
static Oid
database_oid(const char *name)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	Oid			result = InvalidOid;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), name) == 0 && !database_is_invalid_form(db))
		{
			result = db->oid;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return result;
}

bool
aquapeer_launcher_manages(Oid dboid)
{
	return aquapeer_shared != NULL &&
		pg_atomic_read_u32(&aquapeer_shared->launcher_pid) != 0 &&
		aquapeer_database != NULL &&
		get_database_oid(aquapeer_database, true) == dboid;
}

void
aquapeer_wake_launcher(void)
{
	pid_t		pid = (pid_t) pg_atomic_read_u32(&aquapeer_shared->launcher_pid);

	/* The launcher's SIGUSR1 handler sets its latch. */
	if (pid != 0)
		kill(pid, SIGUSR1);
}

static void
launcher_exit(int code, Datum arg)
{
	pg_atomic_write_u32(&aquapeer_shared->launcher_pid, 0);
}

void
aquapeer_launcher_main(Datum arg)
{
	BackgroundWorkerHandle *handle = NULL;
	TimestampTz last_exit = 0;

	setup_signals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname(AQUAPEER_LAUNCHER_TYPE);
	pg_atomic_write_u32(&aquapeer_shared->launcher_pid, (uint32) MyProcPid);
	before_shmem_exit(launcher_exit, 0);
	elog(LOG, "aquapeer launcher started for database \"%s\"", aquapeer_database);

	while (!aquapeer_got_sigterm)
	{
		pid_t		pid;
		long		wait_ms = 1000L;

		if (handle != NULL && GetBackgroundWorkerPid(handle, &pid) == BGWH_STOPPED)
		{
			pfree(handle);
			handle = NULL;
			last_exit = GetCurrentTimestamp();
		}
		if (handle == NULL && !pg_atomic_read_u32(&aquapeer_shared->held_by_admin))
		{
			bool		now = pg_atomic_exchange_u32(&aquapeer_shared->start_now, 0) != 0;
			TimestampTz due = TimestampTzPlusMilliseconds(last_exit, aquapeer_restart_interval * 1000L);

			if (now || last_exit == 0 || GetCurrentTimestamp() >= due)
			{
				Oid			dboid = database_oid(aquapeer_database);

				if (OidIsValid(dboid))
				{
					handle = start_worker(dboid, true);
					pg_atomic_write_u32(&aquapeer_shared->no_slot, handle == NULL);
					if (handle == NULL)
						elog(WARNING, "aquapeer launcher could not start a worker: no background worker slot is free (max_worker_processes = %d)",
							 max_worker_processes);
				}
			}
			else
				wait_ms = Min(wait_ms, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), due));
		}
		nap(Max(wait_ms, 10L));
	}
	proc_exit(0);
}
