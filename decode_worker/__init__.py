"""Decode worker: receives KV, runs continuous batching, streams tokens."""
