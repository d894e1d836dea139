"""Data: sources of text, corpus preparation into token shards, and batch loading."""
