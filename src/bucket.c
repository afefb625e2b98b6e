/*
 * bucket.c: the lines of a bucket of object format 2 (docs/bundles.md), one
 * call per bucket instead of SQL string functions per line.
 *
 * A bucket/2 is "aquapeer-bucket/2\n" then "<key hash> <row text>\n" per row,
 * by key hash.  python/aquapeer/bundles/bucket.py is the reference the tests
 * hold these to.
 */
#include "aquapeer.h"

#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"

#define BUCKET2_HEADER "aquapeer-bucket/2\n"
#define BUCKET2_HEADER_LEN 18
#define KEY_HASH_LEN 64
#define MISFIT_SHOWN 140

PG_FUNCTION_INFO_V1(aquapeer_bucket_lines);
PG_FUNCTION_INFO_V1(aquapeer_bucket_misfit);

static bool
is_bucket2(const char *p, const char *end)
{
	return end - p >= BUCKET2_HEADER_LEN && memcmp(p, BUCKET2_HEADER, BUCKET2_HEADER_LEN) == 0;
}

static bool
is_key_hash(const char *p)
{
	for (int i = 0; i < KEY_HASH_LEN; i++)
		if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
			return false;
	return true;
}

/* A text of len bytes of UTF-8, in the database's encoding. */
static text *
utf8_text(const char *p, int len)
{
	char	   *converted = pg_any_to_server(p, len, PG_UTF8);

	return converted == p ? cstring_to_text_with_len(p, len) : cstring_to_text(converted);
}

/*
 * bundle._bucket_lines(data bytea) returns table (key_hash text, row_text text):
 * a bucket/2's rows; none for bytes that are not a bucket/2.  An error for a
 * line that is not a key hash, a space and a row, or bytes not UTF-8.
 */
Datum
aquapeer_bucket_lines(PG_FUNCTION_ARGS)
{
	bytea	   *data = PG_GETARG_BYTEA_PP(0);
	const char *p = VARDATA_ANY(data);
	const char *end = p + VARSIZE_ANY_EXHDR(data);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	if (!is_bucket2(p, end))
		return (Datum) 0;
	if (!pg_verify_mbstr(PG_UTF8, p, end - p, true))
		ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("a bucket is not UTF-8")));
	for (p += BUCKET2_HEADER_LEN; p < end;)
	{
		const char *newline = memchr(p, '\n', end - p);
		const char *line_end = newline ? newline : end;
		int			len = line_end - p;

		if (len > 0)
		{
			Datum		values[2];
			bool		nulls[2] = {false, false};

			if (len < KEY_HASH_LEN + 2 || p[KEY_HASH_LEN] != ' ')
				ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED),
								errmsg("a line of a bucket is not a key hash and a row: \"%s\"",
									   pnstrdup(p, pg_mbcliplen(p, len, Min(len, 80))))));
			values[0] = PointerGetDatum(cstring_to_text_with_len(p, KEY_HASH_LEN));
			values[1] = PointerGetDatum(utf8_text(p + KEY_HASH_LEN + 1, len - KEY_HASH_LEN - 1));
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
		p = line_end + 1;
	}
	return (Datum) 0;
}

/*
 * bundle._bucket_misfit(data bytea, path text) returns text: the first line of
 * a bucket/2 that does not fit (its first bytes), or null when all do.  Each
 * line is a key hash (64 lower-case hex digits, starting with path unless
 * path is null), above the line before it, a space and a row (a JSON object's
 * text); the bytes are UTF-8.
 */
Datum
aquapeer_bucket_misfit(PG_FUNCTION_ARGS)
{
	bytea	   *data;
	const char *p;
	const char *end;
	const char *path = NULL;
	int			path_len = 0;
	const char *before = NULL;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	data = PG_GETARG_BYTEA_PP(0);
	p = VARDATA_ANY(data);
	end = p + VARSIZE_ANY_EXHDR(data);
	if (!PG_ARGISNULL(1))
	{
		text	   *t = PG_GETARG_TEXT_PP(1);

		path = VARDATA_ANY(t);
		path_len = VARSIZE_ANY_EXHDR(t);
	}
	if (!is_bucket2(p, end))
		PG_RETURN_TEXT_P(cstring_to_text("(not a bucket of format 2)"));
	if (!pg_verify_mbstr(PG_UTF8, p, end - p, true))
		PG_RETURN_TEXT_P(cstring_to_text("(bytes that are not UTF-8)"));
	for (p += BUCKET2_HEADER_LEN; p < end;)
	{
		const char *newline = memchr(p, '\n', end - p);
		const char *line_end = newline ? newline : end;
		int			len = line_end - p;

		if (len > 0)
		{
			if (len < KEY_HASH_LEN + 2 || !is_key_hash(p) || p[KEY_HASH_LEN] != ' ' || p[KEY_HASH_LEN + 1] != '{'
				|| (path && (path_len > KEY_HASH_LEN || memcmp(p, path, path_len) != 0))
				|| (before && memcmp(before, p, KEY_HASH_LEN) >= 0))
				PG_RETURN_TEXT_P(utf8_text(p, pg_mbcliplen(p, len, Min(len, MISFIT_SHOWN))));
			before = p;
		}
		p = line_end + 1;
	}
	PG_RETURN_NULL();
}
