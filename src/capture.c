/*
 * capture.c: peer._capture_changes, the statement-level trigger of a published
 * table (docs/replication.md, "Capture").
 *
 * It reads the statement's transition tables once, row by row, and hands each
 * 1,000 changes to peer._queue_changes as a jsonb array of
 *   {"op": "I"|"U"|"D", "k": {key column: value}, "v": {column: value}, "r": row}
 * ("v" is the whole row for an insert, only the columns that changed for an
 * update, absent for a delete; "r" is the row, for row filters).  Memory is
 * one chunk's, whatever the statement's size: PostgreSQL keeps the
 * transition tables in tuplestores that spill to disk.
 *
 * An UPDATE's old and new transition tables hold each updated row at the same
 * position.  When an update changes a key, a row's old and new images are no
 * longer the same key's: such a statement is captured by a set-based query
 * that pairs the images by key instead (a key that only moved is deleted at
 * its old value, inserted at its new one).
 */
#include "aquapeer.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(aquapeer_capture_changes);

/* Changes per call of peer._queue_changes, and so per message. */
#define CHANGES_PER_CHUNK 1000

static SPIPlanPtr queue_plan = NULL;
static SPIPlanPtr tick_plan = NULL;
static SPIPlanPtr nonce_plan = NULL;

/* A column of the row, in jsonb's key order. */
typedef struct CaptureColumn
{
	int			attno;			/* index into the tuple descriptor */
	bool		is_key;
} CaptureColumn;

/* One statement's capture: the relation's shape and the chunk being built. */
typedef struct Capture
{
	Oid			relid;
	TupleDesc	desc;
	int			ncolumns;
	CaptureColumn *columns;		/* live columns in jsonb's key order */
	bool	   *changed;		/* per attno: the update changed it */
	int			nkeys;
	int		   *key_attnos;		/* the key columns' attnos, in key order */
	FmgrInfo	to_jsonb;
	Datum		stamp;
	bool		stamp_null;
	Datum		applying;
	bool		applying_null;
	MemoryContext chunk_context;
	JsonbParseState *chunk;
	int			chunk_changes;
} Capture;

static int
compare_column_order(const void *a, const void *b, void *arg)
{
	TupleDesc	desc = (TupleDesc) arg;

	return aquapeer_jsonb_key_order(NameStr(TupleDescAttr(desc, ((const CaptureColumn *) a)->attno)->attname),
									NameStr(TupleDescAttr(desc, ((const CaptureColumn *) b)->attno)->attname));
}

static SPIPlanPtr
saved_plan(SPIPlanPtr *plan, const char *query, int nargs, Oid *types)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	prepared = SPI_prepare(query, nargs, types);

		if (prepared == NULL)
			elog(ERROR, "SPI_prepare(\"%s\") failed: %s", query, SPI_result_code_string(SPI_result));
		SPI_keepplan(prepared);
		*plan = prepared;
	}
	return *plan;
}

/* The first column of the first row of a saved plan run without arguments. */
static Datum
run_for_value(SPIPlanPtr *plan, const char *query, bool *isnull)
{
	int			ret = SPI_execute_plan(saved_plan(plan, query, 0, NULL), NULL, NULL, false, 1);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "\"%s\" failed: %s", query, SPI_result_code_string(ret));
	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, isnull);
}

static void
capture_begin(Capture *capture, TriggerData *trigdata)
{
	Relation	rel = trigdata->tg_relation;
	TupleDesc	desc = RelationGetDescr(rel);
	Trigger    *trigger = trigdata->tg_trigger;
	FuncExpr   *call;
	const char *applying = GetConfigOption("peer.applying_from", true, false);

	capture->relid = RelationGetRelid(rel);
	capture->desc = desc;
	capture->changed = palloc0(desc->natts * sizeof(bool));
	capture->columns = palloc(desc->natts * sizeof(CaptureColumn));
	capture->ncolumns = 0;
	capture->nkeys = trigger->tgnargs;
	capture->key_attnos = palloc(trigger->tgnargs * sizeof(int));
	for (int i = 0; i < trigger->tgnargs; i++)
	{
		int			attnum = SPI_fnumber(desc, trigger->tgargs[i]);

		if (attnum <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("key column \"%s\" of %s is gone", trigger->tgargs[i], RelationGetRelationName(rel)),
					 errhint("peer.unpublish() and peer.publish() the table again.")));
		capture->key_attnos[i] = attnum - 1;
	}
	for (int attno = 0; attno < desc->natts; attno++)
	{
		if (TupleDescAttr(desc, attno)->attisdropped)
			continue;
		capture->columns[capture->ncolumns].attno = attno;
		capture->columns[capture->ncolumns].is_key = false;
		for (int i = 0; i < capture->nkeys; i++)
			if (capture->key_attnos[i] == attno)
				capture->columns[capture->ncolumns].is_key = true;
		capture->ncolumns++;
	}
	qsort_arg(capture->columns, capture->ncolumns, sizeof(CaptureColumn), compare_column_order, desc);

	/* to_jsonb(anyelement) learns its argument's type from the call's expression. */
	fmgr_info(F_TO_JSONB, &capture->to_jsonb);
	call = makeFuncExpr(F_TO_JSONB, JSONBOID,
						list_make1(makeNullConst(rel->rd_rel->reltype, -1, InvalidOid)),
						InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
	fmgr_info_set_expr((Node *) call, &capture->to_jsonb);

	/* A friend's changes being applied keep their own stamps; a local write takes a new one. */
	capture->applying_null = applying == NULL || applying[0] == '\0';
	capture->applying = capture->applying_null ? (Datum) 0 : CStringGetTextDatum(applying);
	capture->stamp_null = true;
	capture->stamp = (Datum) 0;
	if (capture->applying_null)
		capture->stamp = run_for_value(&tick_plan, "select peer._clock_tick()", &capture->stamp_null);
	else
		(void) run_for_value(&nonce_plan, "select peer._executor_nonce()", &capture->stamp_null);

	capture->chunk_context = AllocSetContextCreate(CurrentMemoryContext, "aquapeer capture chunk",
												   ALLOCSET_DEFAULT_SIZES);
	capture->chunk = NULL;
	capture->chunk_changes = 0;
}

static void
flush_chunk(Capture *capture)
{
	Oid			types[4] = {OIDOID, JSONBOID, INT8OID, TEXTOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', capture->stamp_null ? 'n' : ' ', capture->applying_null ? 'n' : ' '};
	MemoryContext old_context;
	int			ret;

	if (capture->chunk_changes == 0)
		return;
	old_context = MemoryContextSwitchTo(capture->chunk_context);
	values[0] = ObjectIdGetDatum(capture->relid);
	values[1] = JsonbPGetDatum(JsonbValueToJsonb(pushJsonbValue(&capture->chunk, WJB_END_ARRAY, NULL)));
	values[2] = capture->stamp;
	values[3] = capture->applying;
	MemoryContextSwitchTo(old_context);
	ret = SPI_execute_plan(saved_plan(&queue_plan, "select peer._queue_changes($1, $2, $3, $4)", 4, types),
						   values, nulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "peer._queue_changes failed: %s", SPI_result_code_string(ret));
	SPI_freetuptable(SPI_tuptable);
	MemoryContextReset(capture->chunk_context);
	capture->chunk = NULL;
	capture->chunk_changes = 0;
}

static void
push_key(JsonbParseState **state, const char *key)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = (char *) key;
	v.val.string.len = strlen(key);
	pushJsonbValue(state, WJB_KEY, &v);
}

static void
push_string(JsonbParseState **state, const char *key, const char *value)
{
	JsonbValue	v;

	push_key(state, key);
	v.type = jbvString;
	v.val.string.val = (char *) value;
	v.val.string.len = strlen(value);
	pushJsonbValue(state, WJB_VALUE, &v);
}

static void
push_container(JsonbParseState **state, const char *key, Jsonb *value)
{
	JsonbValue	v;

	push_key(state, key);
	v.type = jbvBinary;
	v.val.binary.data = &value->root;
	v.val.binary.len = VARSIZE(value) - VARHDRSZ;
	pushJsonbValue(state, WJB_VALUE, &v);
}

/*
 * Add one change: row is the row as jsonb, with_values whether "v" goes along
 * (only_changed: just the columns capture->changed marks).
 */
static void
add_change(Capture *capture, const char *op, Jsonb *row, bool with_values, bool only_changed)
{
	JsonbParseState **state = &capture->chunk;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken token;
	int			column = 0;

	if (capture->chunk_changes == 0)
		pushJsonbValue(state, WJB_BEGIN_ARRAY, NULL);
	pushJsonbValue(state, WJB_BEGIN_OBJECT, NULL);
	push_string(state, "op", op);
	push_container(state, "r", row);

	/* The row's keys come in jsonb's key order, which is capture->columns' order. */
	push_key(state, "k");
	pushJsonbValue(state, WJB_BEGIN_OBJECT, NULL);
	it = JsonbIteratorInit(&row->root);
	while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (token != WJB_KEY)
			continue;
		if (capture->columns[column].is_key)
		{
			pushJsonbValue(state, WJB_KEY, &v);
			token = JsonbIteratorNext(&it, &v, true);
			pushJsonbValue(state, WJB_VALUE, &v);
		}
		column++;
	}
	pushJsonbValue(state, WJB_END_OBJECT, NULL);

	if (with_values)
	{
		push_key(state, "v");
		pushJsonbValue(state, WJB_BEGIN_OBJECT, NULL);
		column = 0;
		it = JsonbIteratorInit(&row->root);
		while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (token != WJB_KEY)
				continue;
			if (!only_changed || capture->changed[capture->columns[column].attno])
			{
				pushJsonbValue(state, WJB_KEY, &v);
				token = JsonbIteratorNext(&it, &v, true);
				pushJsonbValue(state, WJB_VALUE, &v);
			}
			column++;
		}
		pushJsonbValue(state, WJB_END_OBJECT, NULL);
	}
	pushJsonbValue(state, WJB_END_OBJECT, NULL);
	if (++capture->chunk_changes == CHANGES_PER_CHUNK)
		flush_chunk(capture);
}

static Jsonb *
row_as_jsonb(Capture *capture, TupleTableSlot *slot)
{
	return DatumGetJsonbP(FunctionCall1(&capture->to_jsonb, ExecFetchSlotHeapTupleDatum(slot)));
}

/* Inserted or deleted rows: each one a change. */
static void
capture_rows(Capture *capture, Tuplestorestate *rows, const char *op)
{
	TupleTableSlot *slot = MakeSingleTupleTableSlot(capture->desc, &TTSOpsMinimalTuple);

	tuplestore_rescan(rows);
	while (tuplestore_gettupleslot(rows, true, false, slot))
	{
		MemoryContext old_context = MemoryContextSwitchTo(capture->chunk_context);

		add_change(capture, op, row_as_jsonb(capture, slot), op[0] == 'I', false);
		MemoryContextSwitchTo(old_context);
	}
	ExecDropSingleTupleTableSlot(slot);
}

static bool
same_value(Form_pg_attribute attr, Datum a, bool a_null, Datum b, bool b_null)
{
	if (a_null || b_null)
		return a_null == b_null;
	return datumIsEqual(a, b, attr->attbyval, attr->attlen);
}

/*
 * Updated rows, old and new images side by side: the columns that changed.
 * False, with nothing captured, when an update changed a key.
 */
static bool
capture_updates(Capture *capture, Tuplestorestate *old_rows, Tuplestorestate *new_rows, bool capture_them)
{
	TupleTableSlot *old_slot = MakeSingleTupleTableSlot(capture->desc, &TTSOpsMinimalTuple);
	TupleTableSlot *new_slot = MakeSingleTupleTableSlot(capture->desc, &TTSOpsMinimalTuple);
	bool		keys_kept = true;

	tuplestore_rescan(old_rows);
	tuplestore_rescan(new_rows);
	while (tuplestore_gettupleslot(old_rows, true, false, old_slot))
	{
		bool		any_changed = false;

		if (!tuplestore_gettupleslot(new_rows, true, false, new_slot))
			elog(ERROR, "an update's transition tables differ in length");
		slot_getallattrs(old_slot);
		slot_getallattrs(new_slot);
		for (int i = 0; i < capture->ncolumns; i++)
		{
			int			attno = capture->columns[i].attno;
			bool		same = same_value(TupleDescAttr(capture->desc, attno),
										  old_slot->tts_values[attno], old_slot->tts_isnull[attno],
										  new_slot->tts_values[attno], new_slot->tts_isnull[attno]);

			if (!same && capture->columns[i].is_key)
				keys_kept = false;
			capture->changed[attno] = !same;
			any_changed |= !same;
		}
		if (!keys_kept)
			break;
		if (capture_them && any_changed)
		{
			MemoryContext old_context = MemoryContextSwitchTo(capture->chunk_context);

			add_change(capture, "U", row_as_jsonb(capture, new_slot), true, true);
			MemoryContextSwitchTo(old_context);
		}
	}
	ExecDropSingleTupleTableSlot(old_slot);
	ExecDropSingleTupleTableSlot(new_slot);
	return keys_kept;
}

/*
 * An update that changed keys, set-based: images paired by key; a key only in
 * the old images is deleted, one only in the new ones inserted.
 */
static void
capture_key_changes(Capture *capture, TriggerData *trigdata)
{
	Oid			types[4] = {OIDOID, INT8OID, TEXTOID, TEXTARRAYOID};
	Datum		values[4];
	char		nulls[4] = {' ', capture->stamp_null ? 'n' : ' ', capture->applying_null ? 'n' : ' ', ' '};
	Datum	   *keys = palloc(capture->nkeys * sizeof(Datum));
	int			ret;

	/* Planned per call: the transition tables are this trigger's. */
	for (int i = 0; i < capture->nkeys; i++)
		keys[i] = CStringGetTextDatum(trigdata->tg_trigger->tgargs[i]);
	values[0] = ObjectIdGetDatum(capture->relid);
	values[1] = capture->stamp;
	values[2] = capture->applying;
	values[3] = PointerGetDatum(construct_array(keys, capture->nkeys, TEXTOID, -1, false, TYPALIGN_INT));
	if (SPI_register_trigger_data(trigdata) != SPI_OK_TD_REGISTER)
		elog(ERROR, "SPI_register_trigger_data failed");
	ret = SPI_execute_with_args(
		"select peer._queue_changes($1, jsonb_agg(jsonb_build_object('op', op, 'k', key, 'r', coalesce(nj, oj))"
		"                                          || case when vals is null then '{}' else jsonb_build_object('v', vals) end),"
		"                            $2, $3)"
		" from (select case when o.key is null then 'I' when n.key is null then 'D' else 'U' end as op,"
		"              coalesce(n.key, o.key) as key, n.j as nj, o.j as oj,"
		"              case when o.key is null then n.j"
		"                   when n.key is not null then (select jsonb_object_agg(e.key, e.value) from jsonb_each(n.j) e"
		"                                                where e.value is distinct from o.j -> e.key) end as vals,"
		"              (row_number() over () - 1) / " CppAsString2(CHANGES_PER_CHUNK) " as chunk"
		"       from (select peer._key_of(to_jsonb(n.*), $4) as key, to_jsonb(n.*) as j from new_rows n) n"
		"       full join (select peer._key_of(to_jsonb(o.*), $4) as key, to_jsonb(o.*) as j from old_rows o) o"
		"           on o.key = n.key) x"
		" where op <> 'U' or vals is not null"
		" group by chunk",
		4, types, values, nulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "capturing an update of keys failed: %s", SPI_result_code_string(ret));
}

/* peer._capture_changes(key columns...): after each INSERT, UPDATE, DELETE statement. */
Datum
aquapeer_capture_changes(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Capture		capture;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event))
		elog(ERROR, "peer._capture_changes() runs as an AFTER ... FOR EACH STATEMENT trigger only");

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	capture_begin(&capture, trigdata);
	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		capture_rows(&capture, trigdata->tg_newtable, "I");
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		capture_rows(&capture, trigdata->tg_oldtable, "D");
	else if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		/* Keys checked before anything is queued: a statement goes one way or the other. */
		if (capture_updates(&capture, trigdata->tg_oldtable, trigdata->tg_newtable, false))
			capture_updates(&capture, trigdata->tg_oldtable, trigdata->tg_newtable, true);
		else
			capture_key_changes(&capture, trigdata);
	}
	flush_chunk(&capture);
	SPI_finish();
	return PointerGetDatum(NULL);
}
