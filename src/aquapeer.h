/*
 * aquapeer.h: what the launcher (launcher.c) and the SQL-callable helpers
 * (helpers.c) share, and the row codecs (rowcodec.c, capture.c).
 */
#ifndef AQUAPEER_H
#define AQUAPEER_H

#include "postgres.h"

#include <signal.h>

#include "fmgr.h"
#include "port/atomics.h"

#define AQUAPEER_WORKER_TYPE	"aquapeer worker"
#define AQUAPEER_EXECUTOR_TYPE	"aquapeer executor"
#define AQUAPEER_LAUNCHER_TYPE	"aquapeer launcher"

/* An executor's nonce: 32 hex digits and a NUL. */
#define AQUAPEER_NONCE_LEN		33

/* What a started executor finds in bgw_extra. */
typedef struct ExecutorArgs
{
	Oid			roleid;
	char		nonce[AQUAPEER_NONCE_LEN];
} ExecutorArgs;

/* Why a worker or executor should leave its loop. */
typedef enum StopReason
{
	STOP_NONE = 0,
	STOP_SHUTDOWN,				/* SIGTERM: server stop, peer.stop_worker() */
	STOP_POSTMASTER_DIED,
	STOP_DATABASE_CLOSING,		/* DROP DATABASE or ALTER DATABASE RENAME waits */
	STOP_DATABASE_COPYING		/* CREATE DATABASE uses this one as template */
} StopReason;

/* Shared memory, present only when preloaded. */
typedef struct AquapeerShared
{
	pg_atomic_uint32 launcher_pid;
	pg_atomic_uint32 held_by_admin; /* peer.stop_worker() asked the launcher to wait */
	pg_atomic_uint32 start_now;		/* peer.start_worker() asked for a start without delay */
	pg_atomic_uint32 no_slot;		/* the launcher's last start found no free worker slot */
} AquapeerShared;

extern AquapeerShared *aquapeer_shared;
extern char *aquapeer_database;
extern int	aquapeer_restart_interval;
extern volatile sig_atomic_t aquapeer_got_sigterm;

extern StopReason aquapeer_check_stop(void);
extern const char *aquapeer_stop_reason_text(StopReason reason);
extern bool aquapeer_is_background_process(const char *bgw_type);
extern bool aquapeer_launcher_manages(Oid dboid);
extern void aquapeer_wake_launcher(void);
extern pid_t aquapeer_register_worker(Oid dboid, bool wait_for_start);
extern void aquapeer_register_executor(Oid dboid, Oid roleid, const char *nonce);
extern int	aquapeer_jsonb_key_order(const char *a, const char *b);
extern void aquapeer_wake_worker_at_commit(void);
extern Datum aquapeer_clock_tick(PG_FUNCTION_ARGS);

#endif
