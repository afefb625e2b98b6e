"""Benchmark a row's blob: bundle._blob (C) against the SQL expression it replaced, beside PostgreSQL
turning the same rows into text.

Run with `.venv/bin/python bench/row_codec.py --rows 1000000`.  One cluster (the test bed's
settings), bench/bundles.py's widget table, one session with parallel query off and the settings
of bundle._row_hashes; each figure is the best of --rounds:

- `COPY widget TO '/dev/null'` and the whole row's text, `select t::text`: PostgreSQL's own ways
  to print every row;
- every row's blob, the old SQL expression against bundle._blob;
- the object format's floor for a first commit as bench/bundles.py times it
  (floor_row_hashes_s): every row's key, blob and their SHA-256s, with each way of writing the
  blob.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402
from bundles import WIDGET_ROWS, WIDGET_TABLE, timed  # noqa: E402

HASHES = ("select count(*) from (select r.key, encode(sha256(convert_to(r.key::text, 'UTF8')), 'hex') as key_hash, "
          "encode(sha256(convert_to(r.blob, 'UTF8')), 'hex') as blob_id "
          "from (select jsonb_build_array(t.id::text) as key, {blob} as blob from only public.widget t offset 0) r) h "
          "where h.key_hash is not null and h.blob_id is not null")


def best_of(conn, rounds, query):
    return min(timed(lambda: conn.execute(query))[1] for _ in range(rounds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the widget table (default: 1000000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each statement; the best counts (default: 3)")
    args = parser.parse_args()
    with tb.Testbed(1, names=["codec"]) as bed:
        cluster = bed[0]
        cluster.sql("create extension aquapeer cascade")
        cluster.sql(WIDGET_TABLE)
        cluster.sql(WIDGET_ROWS.replace("%s", str(args.rows)))
        with cluster.connect() as conn:
            conn.execute("set max_parallel_workers_per_gather = 0")
            tb.use_row_hash_settings(conn)
            old_blob = tb.old_blob_expression(conn, "public.widget")
            new_blob = "bundle._blob(t.*)"
            same = conn.execute(f"select count(*) from public.widget t where {old_blob} is distinct from {new_blob}")
            assert same.fetchone()[0] == 0, "bundle._blob differs from the old expression"
            figures = {
                "COPY widget TO '/dev/null'": "copy public.widget to '/dev/null'",
                "select t::text": "select count(*) from (select t::text as r from public.widget t offset 0) s "
                                  "where s.r is not null",
                "blob, old SQL expression": f"select count(*) from (select {old_blob} as b from public.widget t "
                                            "offset 0) s where s.b is not null",
                "blob, bundle._blob": f"select count(*) from (select {new_blob} as b from public.widget t "
                                      "offset 0) s where s.b is not null",
                "floor_row_hashes, old expression": HASHES.format(blob=old_blob),
                "floor_row_hashes, bundle._blob": HASHES.format(blob=new_blob),
            }
            print(f"{args.rows:,} widget rows, best of {args.rounds}, one session, parallel query off:")
            for label, query in figures.items():
                print(f"  {label:<36} {best_of(conn, args.rounds, query):6.2f} s", flush=True)


if __name__ == "__main__":
    main()
