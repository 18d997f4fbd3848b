"""Prefill worker: computes prompt KV, samples the first token, sends KV to decode."""
