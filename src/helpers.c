/*
 * helpers.c: the few SQL-callable functions only C can provide.
 */
#include "aquapeer.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "utils/builtins.h"
#include "utils/timeout.h"

PG_FUNCTION_INFO_V1(aquapeer_should_stop);
PG_FUNCTION_INFO_V1(aquapeer_check_interrupts);
PG_FUNCTION_INFO_V1(aquapeer_library_version);
PG_FUNCTION_INFO_V1(aquapeer_payload_dir);
PG_FUNCTION_INFO_V1(aquapeer_register_worker_sql);
PG_FUNCTION_INFO_V1(aquapeer_launcher_hold);
PG_FUNCTION_INFO_V1(aquapeer_start_executor);
PG_FUNCTION_INFO_V1(aquapeer_executor_nonce);
PG_FUNCTION_INFO_V1(aquapeer_arm_statement_timeout);
PG_FUNCTION_INFO_V1(aquapeer_launcher_check);

/*
 * Why the calling worker or executor should stop, or NULL.  The loops call
 * it through SPI at least every 0.5 s, which also lets cancels through.
 */
Datum
aquapeer_should_stop(PG_FUNCTION_ARGS)
{
	const char *text;

	if (!aquapeer_is_background_process(AQUAPEER_WORKER_TYPE) &&
		!aquapeer_is_background_process(AQUAPEER_EXECUTOR_TYPE))
		PG_RETURN_NULL();
	text = aquapeer_stop_reason_text(aquapeer_check_stop());
	if (text == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(text));
}

/* Raise a pending cancel, statement timeout or termination now. */
Datum
aquapeer_check_interrupts(PG_FUNCTION_ARGS)
{
	CHECK_FOR_INTERRUPTS();
	PG_RETURN_VOID();
}

Datum
aquapeer_library_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(AQUAPEER_VERSION));
}

Datum
aquapeer_payload_dir(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(AQUAPEER_PAYLOAD_DIR));
}

/* Start a worker for the current database and return its pid. */
Datum
aquapeer_register_worker_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32((int32) aquapeer_register_worker(MyDatabaseId, true));
}

/*
 * When the launcher keeps this database's worker running, hold it (true:
 * peer.stop_worker()) or release it and ask for a start at once (false:
 * peer.start_worker()).  Returns whether the launcher manages this database.
 */
Datum
aquapeer_launcher_hold(PG_FUNCTION_ARGS)
{
	bool		hold = PG_GETARG_BOOL(0);

	if (!aquapeer_launcher_manages(MyDatabaseId))
		PG_RETURN_BOOL(false);
	pg_atomic_write_u32(&aquapeer_shared->held_by_admin, hold ? 1 : 0);
	if (!hold)
	{
		pg_atomic_write_u32(&aquapeer_shared->no_slot, 0);
		pg_atomic_write_u32(&aquapeer_shared->start_now, 1);
		aquapeer_wake_launcher();
	}
	PG_RETURN_BOOL(true);
}

/* Only the network worker starts executors. */
Datum
aquapeer_start_executor(PG_FUNCTION_ARGS)
{
	Oid			roleid = PG_GETARG_OID(0);
	char	   *nonce = text_to_cstring(PG_GETARG_TEXT_PP(1));

	if (!aquapeer_is_background_process(AQUAPEER_WORKER_TYPE))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only the aquapeer worker starts executors")));
	if (strlen(nonce) != AQUAPEER_NONCE_LEN - 1)
		elog(ERROR, "an executor nonce has %d characters", AQUAPEER_NONCE_LEN - 1);
	aquapeer_register_executor(MyDatabaseId, roleid, nonce);
	PG_RETURN_VOID();
}

/* The nonce an executor proves itself with to the worker. */
Datum
aquapeer_executor_nonce(PG_FUNCTION_ARGS)
{
	ExecutorArgs args;

	if (!aquapeer_is_background_process(AQUAPEER_EXECUTOR_TYPE))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("peer.executor_main() runs only in an aquapeer executor")));
	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	PG_RETURN_TEXT_P(cstring_to_text(args.nonce));
}

/*
 * Arm (ms > 0) or disarm (0) the statement timeout for the work an executor
 * is about to do.  A procedure's SPI statements do not start the timer the
 * way a client's statements do, so the executor sets it itself.
 */
Datum
aquapeer_arm_statement_timeout(PG_FUNCTION_ARGS)
{
	int32		ms = PG_GETARG_INT32(0);

	if (!aquapeer_is_background_process(AQUAPEER_EXECUTOR_TYPE))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only an aquapeer executor arms its own statement timeout")));
	if (ms > 0)
		enable_timeout_after(STATEMENT_TIMEOUT, ms);
	else
		disable_timeout(STATEMENT_TIMEOUT, false);
	PG_RETURN_VOID();
}

/* Raise the launcher's reason for not starting this database's worker, if any. */
Datum
aquapeer_launcher_check(PG_FUNCTION_ARGS)
{
	if (aquapeer_launcher_manages(MyDatabaseId) && pg_atomic_read_u32(&aquapeer_shared->no_slot))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start the aquapeer worker: no background worker slot is free"),
				 errhint("All max_worker_processes (%d) slots are in use; raise max_worker_processes and restart the server.",
						 max_worker_processes)));
	PG_RETURN_VOID();
}
