"""Tandem engine: model definitions, weight loading, paged KV, attention backends, sampling."""
