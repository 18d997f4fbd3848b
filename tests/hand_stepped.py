"""For tests that build an engine with the decode worker's factory and step it by hand: the
event loop's stand-in (engine.worker_thread.InlineLoop) and a sink that collects a request's
outputs. Imports nothing of the HTTP side, so GPU test modules can use it on a machine
without the client packages (the H200 has no openai)."""
from __future__ import annotations

from engine.worker_thread import InlineLoop

__all__ = ["InlineLoop", "Sink"]


class Sink:
    """One request's tokens, finish and error, as the engine emits them (a local seq)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finish = None
        self.error = ""

    def on_reserved(self, pages):
        raise AssertionError("a local seq reserves nothing for a KV transfer")

    def on_output(self, out):
        self.tokens += out.tokens
        self.finish, self.error = out.finish, out.error
