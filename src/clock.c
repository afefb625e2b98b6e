/*
 * clock.c: peer._clock_tick, the next stamp of this database's hybrid logical
 * clock (docs/replication.md, "Conflicts"): 48 bits of Unix milliseconds, 16
 * of counter, past every stamp it gave and saw.  The sequence peer.clock keeps
 * it across restarts; a session advisory lock, held for its two sequence
 * calls only, keeps concurrent ticks from setting it back.  Every published
 * statement ticks, so this is C: in PL/pgSQL a tick cost 13 us.
 */
#include "aquapeer.h"

#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "commands/sequence.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(aquapeer_clock_tick);

Datum
aquapeer_clock_tick(PG_FUNCTION_ARGS)
{
	int64		at_least = PG_GETARG_INT64(0);
	int64		unix_ms = GetCurrentTimestamp() / 1000 +
		(int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;
	int64		floor = Max(unix_ms << 16, at_least + 1);
	Oid			clock = get_relname_relid("clock", LookupExplicitNamespace("peer", false));
	Datum		lock_space = DirectFunctionCall1Coll(hashtext, C_COLLATION_OID, CStringGetTextDatum("aquapeer"));
	Datum		lock_key = DirectFunctionCall1Coll(hashtext, C_COLLATION_OID, CStringGetTextDatum("clock"));
	int64		stamp;

	if (!OidIsValid(clock))
		elog(ERROR, "sequence peer.clock is missing");
	DirectFunctionCall2(pg_advisory_lock_int4, lock_space, lock_key);
	stamp = DatumGetInt64(DirectFunctionCall1(nextval_oid, ObjectIdGetDatum(clock)));
	if (stamp < floor)
		stamp = DatumGetInt64(DirectFunctionCall2(setval_oid, ObjectIdGetDatum(clock), Int64GetDatum(floor)));
	DirectFunctionCall2(pg_advisory_unlock_int4, lock_space, lock_key);
	PG_RETURN_INT64(stamp);
}
