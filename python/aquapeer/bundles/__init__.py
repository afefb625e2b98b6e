"""Bundles: versioned, signed copies of tables that friends pull, push and merge.

commits and merge are pure (the commit format; the three-way merge of rows);
store is the bundle store in the database (committing, keeping what arrives,
serving what friends read); integrate brings a kept commit into a bundle
(fast-forward or merge); transfer moves commits and objects between friends
over the data channel.  See docs/bundles.md.
"""
