/*
 * rowcodec.c: a row's blob (docs/bundles.md, "A column's text"), one call per
 * row instead of an SQL expression per column.
 *
 * bundle._blob(t) returns, byte for byte, what PostgreSQL prints for
 *   jsonb_strip_nulls(jsonb_build_object('col', t.col::text, ...))::text
 * so blob ids stay as they were.  python/aquapeer/bundles/rowtext.py is the
 * reference the tests hold it against.  The caller fixes the settings that
 * output functions read (bundle._row_hashes).
 */
#include "aquapeer.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "parser/parse_coerce.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/typcache.h"

PG_FUNCTION_INFO_V1(aquapeer_blob);

/* How one column turns into its text, the way "::text" turns it. */
typedef struct BlobColumn
{
	int			attno;			/* index into the row type's attributes */
	char	   *key;			/* the name as a JSON string, then ": " */
	int			key_len;
	CoercionPathType path;		/* the value is text already, a cast function, or I/O */
	FmgrInfo	function;		/* the cast or the output function */
	Oid			collation;		/* what a cast function gets as the input's collation */
} BlobColumn;

/* What the blobs of one row type need; kept in fn_extra for the rows that follow. */
typedef struct BlobCodec
{
	Oid			type_id;
	int32		typmod;
	TupleDesc	desc;
	Datum	   *values;			/* one row's attributes, dropped ones too */
	bool	   *nulls;
	int			ncolumns;
	BlobColumn	columns[FLEXIBLE_ARRAY_MEMBER];	/* in jsonb's key order */
} BlobCodec;

/* jsonb's key order: shorter names first, then bytewise. */
int
aquapeer_jsonb_key_order(const char *a, const char *b)
{
	size_t		len_a = strlen(a);
	size_t		len_b = strlen(b);

	if (len_a != len_b)
		return len_a < len_b ? -1 : 1;
	return memcmp(a, b, len_a);
}

static int
compare_key_order(const void *a, const void *b, void *arg)
{
	TupleDesc	desc = (TupleDesc) arg;

	return aquapeer_jsonb_key_order(NameStr(TupleDescAttr(desc, ((const BlobColumn *) a)->attno)->attname),
									NameStr(TupleDescAttr(desc, ((const BlobColumn *) b)->attno)->attname));
}

static BlobCodec *
blob_codec(FmgrInfo *flinfo, Oid type_id, int32 typmod)
{
	BlobCodec  *codec = (BlobCodec *) flinfo->fn_extra;
	MemoryContext old_context;
	TupleDesc	desc;

	if (codec != NULL && codec->type_id == type_id && codec->typmod == typmod)
		return codec;

	old_context = MemoryContextSwitchTo(flinfo->fn_mcxt);
	desc = lookup_rowtype_tupdesc_copy(type_id, typmod);
	codec = palloc(offsetof(BlobCodec, columns) + desc->natts * sizeof(BlobColumn));
	codec->type_id = type_id;
	codec->typmod = typmod;
	codec->desc = desc;
	codec->values = palloc(desc->natts * sizeof(Datum));
	codec->nulls = palloc(desc->natts * sizeof(bool));
	codec->ncolumns = 0;
	for (int attno = 0; attno < desc->natts; attno++)
	{
		Form_pg_attribute attr = TupleDescAttr(desc, attno);
		BlobColumn *column;
		StringInfoData key;
		Oid			function;
		bool		is_varlena;

		if (attr->attisdropped)
			continue;
		column = &codec->columns[codec->ncolumns++];
		column->attno = attno;
		initStringInfo(&key);
		escape_json(&key, NameStr(attr->attname));
		appendStringInfoString(&key, ": ");
		column->key = key.data;
		column->key_len = key.len;
		/* A few types cast to text otherwise than they print: booleans, inet, char(n). */
		column->path = find_coercion_pathway(TEXTOID, attr->atttypid, COERCION_EXPLICIT, &function);
		if (column->path == COERCION_PATH_COERCEVIAIO)
			getTypeOutputInfo(attr->atttypid, &function, &is_varlena);
		else if (column->path != COERCION_PATH_FUNC && column->path != COERCION_PATH_RELABELTYPE)
			elog(ERROR, "column \"%s\" of type %s has no cast to text",
				 NameStr(attr->attname), format_type_be(attr->atttypid));
		if (OidIsValid(function))
			fmgr_info_cxt(function, &column->function, flinfo->fn_mcxt);
		column->collation = attr->attcollation;
	}
	qsort_arg(codec->columns, codec->ncolumns, sizeof(BlobColumn), compare_key_order, desc);
	MemoryContextSwitchTo(old_context);
	flinfo->fn_extra = codec;
	return codec;
}

/*
 * A column's text, as "::text" gives it, or NULL when a cast function
 * returns NULL (the blob then leaves the column out, as jsonb_strip_nulls).
 */
static char *
column_text(BlobColumn *column, Datum value)
{
	LOCAL_FCINFO(cast, 3);
	Datum		result;

	switch (column->path)
	{
		case COERCION_PATH_COERCEVIAIO:
			return OutputFunctionCall(&column->function, value);
		case COERCION_PATH_RELABELTYPE:
			return TextDatumGetCString(value);
		default:
			/* As the parser calls a cast function: to text without a typmod, explicitly. */
			InitFunctionCallInfoData(*cast, &column->function, column->function.fn_nargs,
									 column->collation, NULL, NULL);
			cast->args[0].value = value;
			cast->args[0].isnull = false;
			cast->args[1].value = Int32GetDatum(-1);
			cast->args[1].isnull = false;
			cast->args[2].value = BoolGetDatum(true);
			cast->args[2].isnull = false;
			result = FunctionCallInvoke(cast);
			return cast->isnull ? NULL : TextDatumGetCString(result);
	}
}

/* bundle._blob(record): the row's blob, its non-NULL columns' texts in jsonb's key order. */
Datum
aquapeer_blob(PG_FUNCTION_ARGS)
{
	HeapTupleHeader row = PG_GETARG_HEAPTUPLEHEADER(0);
	BlobCodec  *codec = blob_codec(fcinfo->flinfo, HeapTupleHeaderGetTypeId(row),
									HeapTupleHeaderGetTypMod(row));
	HeapTupleData tuple;
	StringInfoData blob;
	bool		first = true;

	tuple.t_len = HeapTupleHeaderGetDatumLength(row);
	ItemPointerSetInvalid(&tuple.t_self);
	tuple.t_tableOid = InvalidOid;
	tuple.t_data = row;
	heap_deform_tuple(&tuple, codec->desc, codec->values, codec->nulls);

	/* Written after room for the header of the text it becomes, which saves a copy. */
	initStringInfo(&blob);
	appendStringInfoSpaces(&blob, VARHDRSZ);
	appendStringInfoChar(&blob, '{');
	for (int i = 0; i < codec->ncolumns; i++)
	{
		BlobColumn *column = &codec->columns[i];
		char	   *value;

		if (codec->nulls[column->attno])
			continue;
		value = column_text(column, codec->values[column->attno]);
		if (value == NULL)
			continue;
		if (!first)
			appendBinaryStringInfo(&blob, ", ", 2);
		first = false;
		appendBinaryStringInfo(&blob, column->key, column->key_len);
		escape_json(&blob, value);
		pfree(value);
	}
	appendStringInfoChar(&blob, '}');
	SET_VARSIZE(blob.data, blob.len);
	PG_RETURN_TEXT_P((text *) blob.data);
}
