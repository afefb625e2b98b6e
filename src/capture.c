/*
 * capture.c: peer._capture_changes, the statement-level trigger of a published
 * table (docs/replication.md, "Capture").
 *
 * It reads the statement's transition tables once, row by row, into chunks
 * of 1,000 changes
 *   {"op": "I"|"U"|"D", "k": {key column: value}, "v": {column: value}, "r": row}
 * ("v" is the whole row for an insert, only the columns that changed for an
 * update, absent for a delete; "r" is the row, for row filters), and queues
 * each chunk as one message on topic aquapeer.changes to each friend the
 * table is published to: the friend's columns, of the rows its filter
 * selects.  Memory is one chunk's, whatever the statement's size: PostgreSQL
 * keeps transition tables in tuplestores that spill to disk.  What needs SQL
 * stays in SQL functions it calls: a row filter, the stamps of a table that
 * friends also write to, what a friend's applied changes forward.
 *
 * An UPDATE's old and new transition tables hold each updated row at the same
 * position.  When an update changes a key, a row's old and new images are no
 * longer the same key's: such a statement is captured by a set-based query
 * that pairs the images by key instead (a key only in the old images is
 * deleted, one only in the new ones inserted).
 */
#include "aquapeer.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
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
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/array.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(aquapeer_capture_changes);
PG_FUNCTION_INFO_V1(aquapeer_recipients_changed);

/* Changes per message. */
#define CHANGES_PER_CHUNK 1000

static SPIPlanPtr nonce_plan = NULL;
static SPIPlanPtr recipients_plan = NULL;
static SPIPlanPtr stamp_plan = NULL;
static SPIPlanPtr filter_plan = NULL;
static SPIPlanPtr forward_plan = NULL;
static SPIPlanPtr insert_plan = NULL;

/* A friend the table is published to. */
typedef struct Recipient
{
	char	   *friend;
	Datum		peer_id;		/* text */
	int			ncolumns;		/* -1: all columns */
	char	  **columns;
	Datum		row_filter;		/* text, or 0: every row */
} Recipient;

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
	char	   *name;			/* schema-qualified and quoted, as friends name it */
	char	   *origin;			/* this database's peer id */
	bool		stamped;		/* a local write to a table friends also write to */
	int			nrecipients;
	Recipient *recipients;
	bool		queued;
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

/*
 * Each published table's recipients, per backend: reading them cost a
 * single-row write a fifth of its time.  Kept until a relcache invalidation
 * of peer.publication, which the triggers peer._recipients_changed on
 * peer.publication, peer.subscription, peer.friend and peer.identity send
 * (at commit, to every backend; at once, to their own).
 */
typedef struct CachedRecipients
{
	Oid			relid;			/* the hash key */
	char	   *origin;
	bool		subscribed;
	int			nrecipients;
	Recipient  *recipients;
} CachedRecipients;

static HTAB *recipients_cache = NULL;
static MemoryContext recipients_context = NULL;
static Oid	publication_relid = InvalidOid;
/* Invalidations seen, and how many the cache had seen when it was emptied last. */
static uint64 recipients_invalidations = 0;
static uint64 recipients_cache_invalidations = 0;

static void
forget_recipients(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == publication_relid)
		recipients_invalidations++;
}

static Oid
peer_publication_relid(void)
{
	return get_relname_relid("publication", LookupExplicitNamespace("peer", false));
}

/* Read one table's recipients into the cache's memory. */
static CachedRecipients *
read_recipients(Oid relid)
{
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(relid)};
	MemoryContext old_context;
	CachedRecipients *entry;
	bool		found;
	int			ret;

	ret = SPI_execute_plan(saved_plan(&recipients_plan,
									  "select i.peer_id, exists (select from peer.subscription s where s.relation = $1),"
									  "       p.friend, f.peer_id, p.columns::text[], p.row_filter"
									  " from peer.identity i"
									  " left join (peer.publication p join peer.friend f on f.name = p.friend and f.state = 'accepted')"
									  "     on p.relation = $1",
									  1, types),
						   values, NULL, true, 0);
	if (ret != SPI_OK_SELECT || SPI_processed < 1)
		elog(ERROR, "reading the publications of relation %u failed: %s", relid, SPI_result_code_string(ret));
	if (recipients_cache == NULL)
	{
		HASHCTL		info = {.keysize = sizeof(Oid), .entrysize = sizeof(CachedRecipients), .hcxt = recipients_context};

		recipients_cache = hash_create("aquapeer recipients", 16, &info, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	old_context = MemoryContextSwitchTo(recipients_context);
	entry = hash_search(recipients_cache, &relid, HASH_ENTER, &found);
	entry->origin = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	entry->subscribed = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &(bool) {false}));
	entry->recipients = palloc(SPI_processed * sizeof(Recipient));
	entry->nrecipients = 0;
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	row = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Recipient  *recipient = &entry->recipients[entry->nrecipients];
		bool		isnull;
		Datum		columns;
		char	   *row_filter;

		recipient->friend = SPI_getvalue(row, desc, 3);
		if (recipient->friend == NULL)
			continue;			/* no friend to send to, only stamps to keep */
		recipient->peer_id = CStringGetTextDatum(SPI_getvalue(row, desc, 4));
		columns = SPI_getbinval(row, desc, 5, &isnull);
		recipient->ncolumns = -1;
		if (!isnull)
		{
			Datum	   *names;

			deconstruct_array(DatumGetArrayTypeP(columns), TEXTOID, -1, false, TYPALIGN_INT,
							  &names, NULL, &recipient->ncolumns);
			recipient->columns = palloc(recipient->ncolumns * sizeof(char *));
			for (int c = 0; c < recipient->ncolumns; c++)
				recipient->columns[c] = TextDatumGetCString(names[c]);
		}
		row_filter = SPI_getvalue(row, desc, 6);
		recipient->row_filter = row_filter == NULL ? (Datum) 0 : CStringGetTextDatum(row_filter);
		entry->nrecipients++;
	}
	MemoryContextSwitchTo(old_context);
	SPI_freetuptable(SPI_tuptable);
	return entry;
}

/*
 * Whom the table is published to, with their columns and filters; whether it
 * is stamped.  A copy: the cache may be emptied while the statement's changes
 * are queued.
 */
static void
load_recipients(Capture *capture)
{
	CachedRecipients *entry = NULL;

	if (recipients_context == NULL)
	{
		recipients_context = AllocSetContextCreate(CacheMemoryContext, "aquapeer recipients",
												   ALLOCSET_SMALL_SIZES);
		CacheRegisterRelcacheCallback(forget_recipients, (Datum) 0);
	}
	/* Emptied when anything changed since; what changes while it is read empties it next time. */
	if (recipients_cache_invalidations != recipients_invalidations || !OidIsValid(publication_relid))
	{
		MemoryContextReset(recipients_context);
		recipients_cache = NULL;
		recipients_cache_invalidations = recipients_invalidations;
		publication_relid = peer_publication_relid();
	}
	if (recipients_cache != NULL)
		entry = hash_search(recipients_cache, &capture->relid, HASH_FIND, NULL);
	if (entry == NULL)
		entry = read_recipients(capture->relid);

	capture->origin = pstrdup(entry->origin);
	capture->stamped = capture->applying_null && entry->subscribed;
	capture->nrecipients = entry->nrecipients;
	capture->recipients = palloc(entry->nrecipients * sizeof(Recipient));
	for (int i = 0; i < entry->nrecipients; i++)
	{
		Recipient  *from = &entry->recipients[i];
		Recipient  *to = &capture->recipients[i];

		to->friend = pstrdup(from->friend);
		to->peer_id = datumCopy(from->peer_id, false, -1);
		to->ncolumns = from->ncolumns;
		if (from->ncolumns >= 0)
		{
			to->columns = palloc(from->ncolumns * sizeof(char *));
			for (int c = 0; c < from->ncolumns; c++)
				to->columns[c] = pstrdup(from->columns[c]);
		}
		to->row_filter = from->row_filter ? datumCopy(from->row_filter, false, -1) : (Datum) 0;
	}
}

/* peer._recipients_changed(): after a change of whom published tables go to, every backend reads it anew. */
Datum
aquapeer_recipients_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "peer._recipients_changed() runs as a trigger only");
	CacheInvalidateRelcacheByRelid(peer_publication_relid());
	return PointerGetDatum(NULL);
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
	capture->stamp_null = !capture->applying_null;
	capture->stamp = capture->applying_null ? DirectFunctionCall1(aquapeer_clock_tick, Int64GetDatum(0)) : (Datum) 0;
	if (!capture->applying_null &&
		SPI_execute_plan(saved_plan(&nonce_plan, "select peer._executor_nonce()", 0, NULL), NULL, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "peer._executor_nonce() failed");

	capture->name = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
											  RelationGetRelationName(rel));
	load_recipients(capture);
	capture->queued = false;
	capture->chunk_context = AllocSetContextCreate(CurrentMemoryContext, "aquapeer capture chunk",
												   ALLOCSET_DEFAULT_SIZES);
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

/* A saved plan's jsonb result (NULL for SQL NULL), copied out of SPI's memory. */
static Jsonb *
run_for_changes(SPIPlanPtr *plan, const char *query, Oid *types, Datum *values)
{
	int			ret = SPI_execute_plan(saved_plan(plan, query, 3, types), values, NULL, false, 1);
	bool		isnull;
	Datum		result;

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "\"%s\" failed: %s", query, SPI_result_code_string(ret));
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? NULL : DatumGetJsonbPCopy(result);
}

static bool
selected_column(Recipient *recipient, const JsonbValue *name)
{
	if (recipient->ncolumns < 0)
		return true;
	for (int c = 0; c < recipient->ncolumns; c++)
		if (strlen(recipient->columns[c]) == (size_t) name->val.string.len &&
			memcmp(recipient->columns[c], name->val.string.val, name->val.string.len) == 0)
			return true;
	return false;
}

/* A change as the friend gets it: without the row, with only the friend's columns. */
static void
push_sent_change(JsonbParseState **state, Recipient *recipient, JsonbContainer *change)
{
	JsonbIterator *it = JsonbIteratorInit(change);
	JsonbValue	v;
	JsonbIteratorToken token;

	while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (token != WJB_KEY)
		{
			pushJsonbValue(state, token, token == WJB_BEGIN_OBJECT || token == WJB_END_OBJECT ? NULL : &v);
			continue;
		}
		if (v.val.string.len == 1 && v.val.string.val[0] == 'r')
		{
			(void) JsonbIteratorNext(&it, &v, true);
			continue;
		}
		if (v.val.string.len == 1 && v.val.string.val[0] == 'v' && recipient->ncolumns >= 0)
		{
			JsonbIterator *values;
			JsonbValue	value;
			JsonbIteratorToken value_token;
			bool		take = false;

			pushJsonbValue(state, WJB_KEY, &v);
			(void) JsonbIteratorNext(&it, &v, true);
			values = JsonbIteratorInit(v.val.binary.data);
			while ((value_token = JsonbIteratorNext(&values, &value, true)) != WJB_DONE)
			{
				if (value_token == WJB_KEY)
					take = selected_column(recipient, &value);
				if (value_token == WJB_BEGIN_OBJECT || value_token == WJB_END_OBJECT)
					pushJsonbValue(state, value_token, NULL);
				else if (take)
					pushJsonbValue(state, value_token, &value);
			}
			continue;
		}
		pushJsonbValue(state, WJB_KEY, &v);
		token = JsonbIteratorNext(&it, &v, true);
		pushJsonbValue(state, WJB_VALUE, &v);
	}
}

/* Whether the friend gets the change: an update only when it changed one of the friend's columns. */
static bool
sent_to(Recipient *recipient, JsonbContainer *change)
{
	JsonbValue *op = getKeyJsonValueFromContainer(change, "op", 2, NULL);
	JsonbValue *values;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken token;

	if (recipient->ncolumns < 0 || op == NULL || op->type != jbvString || op->val.string.len != 1 ||
		op->val.string.val[0] != 'U')
		return true;
	values = getKeyJsonValueFromContainer(change, "v", 1, NULL);
	if (values == NULL || values->type != jbvBinary)
		return false;
	it = JsonbIteratorInit(values->val.binary.data);
	while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		if (token == WJB_KEY && selected_column(recipient, &v))
			return true;
	return false;
}

/* The message a friend gets for a chunk of changes, or NULL when none is for it. */
static Jsonb *
message_for(Capture *capture, Recipient *recipient, Jsonb *changes)
{
	JsonbParseState *state = NULL;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken token;
	int			sent = 0;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	push_string(&state, "r", capture->name);
	push_string(&state, "o", capture->origin);
	push_key(&state, "c");
	if (capture->stamp_null)
		v.type = jbvNull;
	else
	{
		v.type = jbvNumeric;
		v.val.numeric = int64_to_numeric(DatumGetInt64(capture->stamp));
	}
	pushJsonbValue(&state, WJB_VALUE, &v);
	push_key(&state, "rows");
	pushJsonbValue(&state, WJB_BEGIN_ARRAY, NULL);
	it = JsonbIteratorInit(&changes->root);
	while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (token != WJB_ELEM || v.type != jbvBinary || !sent_to(recipient, v.val.binary.data))
			continue;
		push_sent_change(&state, recipient, v.val.binary.data);
		sent++;
	}
	pushJsonbValue(&state, WJB_END_ARRAY, NULL);
	if (sent == 0)
		return NULL;
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

/* Stamp (when the table is stamped) and queue a chunk of changes to each friend it is for. */
static void
queue_chunk(Capture *capture, Jsonb *changes)
{
	Oid			types[3] = {OIDOID, JSONBOID, TEXTOID};
	Datum		values[3] = {ObjectIdGetDatum(capture->relid), JsonbPGetDatum(changes), (Datum) 0};

	if (capture->stamped)
	{
		Oid			stamp_types[3] = {OIDOID, JSONBOID, INT8OID};

		values[2] = capture->stamp;
		if (SPI_execute_plan(saved_plan(&stamp_plan, "select peer._stamp_changes($1, $2, $3)", 3, stamp_types),
							 values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "peer._stamp_changes failed");
	}
	for (int i = 0; i < capture->nrecipients; i++)
	{
		Recipient *recipient = &capture->recipients[i];
		Jsonb	   *selected = changes;
		Jsonb	   *message;
		Oid			insert_types[4] = {TEXTOID, TEXTOID, JSONBOID, INT4OID};
		Datum		insert_values[4];
		char	   *text;

		if (recipient->row_filter)
		{
			values[1] = JsonbPGetDatum(selected);
			values[2] = recipient->row_filter;
			selected = run_for_changes(&filter_plan, "select peer._filtered_changes($1, $2, $3)", types, values);
		}
		if (selected != NULL && !capture->applying_null)
		{
			values[1] = JsonbPGetDatum(selected);
			values[2] = recipient->peer_id;
			selected = run_for_changes(&forward_plan, "select peer._forwarded_changes($1, $2, $3)", types, values);
		}
		message = selected == NULL ? NULL : message_for(capture, recipient, selected);
		if (message == NULL)
			continue;
		/* bytes: the size peer.send counts, the message's text */
		text = JsonbToCString(NULL, &message->root, VARSIZE(message));
		insert_values[0] = recipient->peer_id;
		insert_values[1] = CStringGetTextDatum(recipient->friend);
		insert_values[2] = JsonbPGetDatum(message);
		insert_values[3] = Int32GetDatum(strlen(text));
		if (SPI_execute_plan(saved_plan(&insert_plan,
										"insert into peer.outbox_message (peer_id, friend, topic, payload, bytes)"
										" values ($1, $2, 'aquapeer.changes', $3, $4)",
										4, insert_types),
							 insert_values, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "queuing changes to \"%s\" failed", recipient->friend);
		capture->queued = true;
	}
}

static void
flush_chunk(Capture *capture)
{
	MemoryContext old_context;

	if (capture->chunk_changes == 0)
		return;
	old_context = MemoryContextSwitchTo(capture->chunk_context);
	queue_chunk(capture, JsonbValueToJsonb(pushJsonbValue(&capture->chunk, WJB_END_ARRAY, NULL)));
	MemoryContextSwitchTo(old_context);
	MemoryContextReset(capture->chunk_context);
	capture->chunk = NULL;
	capture->chunk_changes = 0;
}

/* Which of a row's columns push_columns takes. */
typedef enum ColumnsTaken
{
	COLUMNS_KEY,
	COLUMNS_CHANGED,
	COLUMNS_ALL
} ColumnsTaken;

/* "name": {column: value} of the row's columns taken. */
static void
push_columns(Capture *capture, const char *name, Jsonb *row, ColumnsTaken taken)
{
	JsonbParseState **state = &capture->chunk;
	JsonbIterator *it = JsonbIteratorInit(&row->root);
	JsonbValue	v;
	JsonbIteratorToken token;
	int			column = 0;		/* the row's keys come in capture->columns' order, jsonb's */

	push_key(state, name);
	pushJsonbValue(state, WJB_BEGIN_OBJECT, NULL);
	while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		CaptureColumn *c;

		if (token != WJB_KEY)
			continue;
		c = &capture->columns[column++];
		if (taken == COLUMNS_ALL || (taken == COLUMNS_KEY && c->is_key) ||
			(taken == COLUMNS_CHANGED && capture->changed[c->attno]))
		{
			pushJsonbValue(state, WJB_KEY, &v);
			(void) JsonbIteratorNext(&it, &v, true);
			pushJsonbValue(state, WJB_VALUE, &v);
		}
	}
	pushJsonbValue(state, WJB_END_OBJECT, NULL);
}

/*
 * Add one change: row is the row as jsonb, with_values whether "v" goes along
 * (only_changed: just the columns capture->changed marks).
 */
static void
add_change(Capture *capture, const char *op, Jsonb *row, bool with_values, bool only_changed)
{
	JsonbParseState **state = &capture->chunk;

	if (capture->chunk_changes == 0)
		pushJsonbValue(state, WJB_BEGIN_ARRAY, NULL);
	pushJsonbValue(state, WJB_BEGIN_OBJECT, NULL);
	push_string(state, "op", op);
	push_container(state, "r", row);

	push_columns(capture, "k", row, COLUMNS_KEY);
	if (with_values)
		push_columns(capture, "v", row, only_changed ? COLUMNS_CHANGED : COLUMNS_ALL);
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

/* Whether an update changed a key: its old and new images, side by side, differ in one. */
static bool
update_changes_a_key(Capture *capture, Tuplestorestate *old_rows, Tuplestorestate *new_rows)
{
	TupleTableSlot *old_slot = MakeSingleTupleTableSlot(capture->desc, &TTSOpsMinimalTuple);
	TupleTableSlot *new_slot = MakeSingleTupleTableSlot(capture->desc, &TTSOpsMinimalTuple);
	bool		changed = false;

	tuplestore_rescan(old_rows);
	tuplestore_rescan(new_rows);
	while (!changed && tuplestore_gettupleslot(old_rows, true, false, old_slot))
	{
		if (!tuplestore_gettupleslot(new_rows, true, false, new_slot))
			elog(ERROR, "an update's transition tables differ in length");
		for (int i = 0; i < capture->nkeys && !changed; i++)
		{
			int			attno = capture->key_attnos[i];
			bool		old_null;
			bool		new_null;
			Datum		old_value = slot_getattr(old_slot, attno + 1, &old_null);
			Datum		new_value = slot_getattr(new_slot, attno + 1, &new_null);

			changed = !same_value(TupleDescAttr(capture->desc, attno), old_value, old_null, new_value, new_null);
		}
	}
	ExecDropSingleTupleTableSlot(old_slot);
	ExecDropSingleTupleTableSlot(new_slot);
	return changed;
}

/* Updated rows that kept their keys, old and new images side by side: the columns that changed. */
static void
capture_updates(Capture *capture, Tuplestorestate *old_rows, Tuplestorestate *new_rows)
{
	TupleTableSlot *old_slot = MakeSingleTupleTableSlot(capture->desc, &TTSOpsMinimalTuple);
	TupleTableSlot *new_slot = MakeSingleTupleTableSlot(capture->desc, &TTSOpsMinimalTuple);

	tuplestore_rescan(old_rows);
	tuplestore_rescan(new_rows);
	while (tuplestore_gettupleslot(old_rows, true, false, old_slot) &&
		   tuplestore_gettupleslot(new_rows, true, false, new_slot))
	{
		bool		any_changed = false;

		slot_getallattrs(old_slot);
		slot_getallattrs(new_slot);
		for (int i = 0; i < capture->ncolumns; i++)
		{
			int			attno = capture->columns[i].attno;

			capture->changed[attno] = !same_value(TupleDescAttr(capture->desc, attno),
												  old_slot->tts_values[attno], old_slot->tts_isnull[attno],
												  new_slot->tts_values[attno], new_slot->tts_isnull[attno]);
			any_changed |= capture->changed[attno];
		}
		if (any_changed)
		{
			MemoryContext old_context = MemoryContextSwitchTo(capture->chunk_context);

			add_change(capture, "U", row_as_jsonb(capture, new_slot), true, true);
			MemoryContextSwitchTo(old_context);
		}
	}
	ExecDropSingleTupleTableSlot(old_slot);
	ExecDropSingleTupleTableSlot(new_slot);
}

/*
 * An update that changed keys, set-based: images paired by key; a key only in
 * the old images is deleted, one only in the new ones inserted.
 */
static void
capture_key_changes(Capture *capture, TriggerData *trigdata)
{
	Oid			types[1] = {TEXTARRAYOID};
	Datum		values[1];
	Datum	   *keys = palloc(capture->nkeys * sizeof(Datum));
	Portal		chunks;

	for (int i = 0; i < capture->nkeys; i++)
		keys[i] = CStringGetTextDatum(trigdata->tg_trigger->tgargs[i]);
	values[0] = PointerGetDatum(construct_array(keys, capture->nkeys, TEXTOID, -1, false, TYPALIGN_INT));
	if (SPI_register_trigger_data(trigdata) != SPI_OK_TD_REGISTER)
		elog(ERROR, "SPI_register_trigger_data failed");
	/* Planned per call: the transition tables are this trigger's. */
	chunks = SPI_cursor_open_with_args(
		NULL,
		"select jsonb_agg(jsonb_build_object('op', op, 'k', key, 'r', coalesce(nj, oj))"
		"                 || case when vals is null then '{}' else jsonb_build_object('v', vals) end)"
		" from (select case when o.key is null then 'I' when n.key is null then 'D' else 'U' end as op,"
		"              coalesce(n.key, o.key) as key, n.j as nj, o.j as oj,"
		"              case when o.key is null then n.j"
		"                   when n.key is not null then (select jsonb_object_agg(e.key, e.value) from jsonb_each(n.j) e"
		"                                                where e.value is distinct from o.j -> e.key) end as vals,"
		"              (row_number() over () - 1) / " CppAsString2(CHANGES_PER_CHUNK) " as chunk"
		"       from (select peer._key_of(to_jsonb(n.*), $1) as key, to_jsonb(n.*) as j from new_rows n) n"
		"       full join (select peer._key_of(to_jsonb(o.*), $1) as key, to_jsonb(o.*) as j from old_rows o) o"
		"           on o.key = n.key) x"
		" where op <> 'U' or vals is not null"
		" group by chunk",
		1, types, values, NULL, true, 0);
	for (;;)
	{
		MemoryContext old_context;
		bool		isnull;

		SPI_cursor_fetch(chunks, true, 1);
		if (SPI_processed == 0)
			break;
		old_context = MemoryContextSwitchTo(capture->chunk_context);
		queue_chunk(capture, DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
															   &isnull)));
		MemoryContextSwitchTo(old_context);
		MemoryContextReset(capture->chunk_context);
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(chunks);
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
		if (update_changes_a_key(&capture, trigdata->tg_oldtable, trigdata->tg_newtable))
			capture_key_changes(&capture, trigdata);
		else
			capture_updates(&capture, trigdata->tg_oldtable, trigdata->tg_newtable);
	}
	flush_chunk(&capture);
	if (capture.queued)
		aquapeer_wake_worker_at_commit();
	SPI_finish();
	return PointerGetDatum(NULL);
}
