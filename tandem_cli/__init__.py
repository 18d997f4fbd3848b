"""The `tandem` command line: serve, router, prefill, decode."""
