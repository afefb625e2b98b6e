/*
 * helpers.c: the few SQL-callable functions only C can provide.
 */
#include "aquapeer.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "access/xact.h"
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
PG_FUNCTION_INFO_V1(aquapeer_wake_at_commit);

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

/*
 * Waking the worker after a commit.  Background workers cannot LISTEN, and
 * a nudge sent before the commit may reach the worker before the rows are
 * visible; a transaction callback runs after the commit is visible to new
 * snapshots (after ProcArrayEndTransaction), so the worker finds the rows.
 */
static bool wake_registered = false;
static bool wake_pending = false;

static void
wake_worker_now(void)
{
	/* A control frame {"id": 0, "op": "wake"}: 4-byte big-endian length, then msgpack. */
	static const char frame[] = {0, 0, 0, 13, (char) 0x82, (char) 0xa2, 'i', 'd', 0x00,
		(char) 0xa2, 'o', 'p', (char) 0xa4, 'w', 'a', 'k', 'e'};
	struct sockaddr_un addr;
	int			sock;

	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	/* Relative to the data directory, every backend's working directory. */
	snprintf(addr.sun_path, sizeof(addr.sun_path), "pg_aquapeer/%u.sock", MyDatabaseId);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (sock < 0)
		return;
	/* Best effort: the worker also polls, so a missed wake only costs latency. */
	if (connect(sock, (struct sockaddr *) &addr, sizeof(addr)) == 0)
		(void) send(sock, frame, sizeof(frame), MSG_NOSIGNAL | MSG_DONTWAIT);
	close(sock);
}

static void
wake_at_commit_callback(XactEvent event, void *arg)
{
	if (!wake_pending)
		return;
	if (event == XACT_EVENT_COMMIT)
	{
		wake_pending = false;
		wake_worker_now();
	}
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PREPARE)
		wake_pending = false;
}

/* Wake this database's worker when the current transaction commits. */
void
aquapeer_wake_worker_at_commit(void)
{
	if (!wake_registered)
	{
		RegisterXactCallback(wake_at_commit_callback, NULL);
		wake_registered = true;
	}
	wake_pending = true;
}

Datum
aquapeer_wake_at_commit(PG_FUNCTION_ARGS)
{
	aquapeer_wake_worker_at_commit();
	PG_RETURN_VOID();
}
