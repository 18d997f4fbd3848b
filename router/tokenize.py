"""Tokenization off the router's event loop.

A 5 MB prompt takes seconds to tokenize; done on the event loop it stalls every other request
(their tokens, their 503s, /health). `Tokenization` keeps the loop free:

  1. `Tokenization(tokenizer, threads=4)`: nothing starts yet. The longest vocabulary entry
     (added tokens included) is measured once: no token covers more characters than that,
     so a text of n characters has at least ceil(n / longest) tokens (`min_tokens`), which
     lets the caller reject a prompt that cannot fit before tokenizing any of it.
  2. `await encode(text)` / `await chat(messages)`: texts up to `inline_chars` characters are
     tokenized on the loop (a thread hop would cost more than the work); longer ones on a
     worker thread. HF fast tokenizers release the GIL while they encode, but one tokenizer
     object must not be used by two threads at once (its Rust state is borrowed per call), so
     every worker thread tokenizes with its own copy (made on that thread's first use).
  3. `close()` (app shutdown) stops the threads.
Errors raised by the tokenizer (a chat template that rejects the roles, say) reach the
caller unchanged.
"""
from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.tokenizer import encode_chat


class Tokenization:
    def __init__(self, tokenizer: Any, threads: int = 4, inline_chars: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.inline_chars = inline_chars
        self._threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        try:
            vocab = tokenizer.get_vocab()
            self.longest_token_chars = max((len(t) for t in vocab), default=0) or None
        except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: no early bound
            self.longest_token_chars = None

    def min_tokens(self, num_chars: int) -> int:
        """A lower bound on the tokens of a text of num_chars characters (0 when unknown)."""
        if not self.longest_token_chars:
            return 0
        return -(-num_chars // self.longest_token_chars)

    def _own(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._own().encode(text, add_special_tokens=add_special_tokens))

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
              add_special_tokens: bool = False, tools: list[dict] | None = None) -> list[int]:
        return _chat_ids(self._own(), messages, add_generation_prompt, add_special_tokens, tools)

    async def _off_loop(self, fn, *args):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= self.inline_chars:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return await self._off_loop(self._encode, text, add_special_tokens)

    async def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                   add_special_tokens: bool = False, tools: list[dict] | None = None) -> list[int]:
        """The prompt of a chat: engine.tokenizer.encode_chat (template + generation prompt);
        add_special_tokens adds the tokenizer's own (BOS, say) on top of the template's;
        tools (OpenAI tool dicts) go to the template as `tools` (router/tools.py)."""
        if sum(len(m.get("content") or "") for m in messages) <= self.inline_chars and not tools:
            return _chat_ids(self.tokenizer, messages, add_generation_prompt, add_special_tokens, tools)
        return await self._off_loop(self._chat, messages, add_generation_prompt, add_special_tokens, tools)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
              add_special_tokens: bool, tools: list[dict] | None = None) -> list[int]:
    if tools:
        if not getattr(tokenizer, "chat_template", None):
            return encode_chat(tokenizer, messages)      # raises its "no chat template" error
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if not add_special_tokens:
        return encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if not getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, messages)          # raises its "no chat template" error
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=True))
