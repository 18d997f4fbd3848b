"""ChunkEvents (router/sse.py) writes a streamed chunk by hand; it must be exactly what
sse_event writes for the chunk's dict, for any text (quotes, backslashes, control characters,
non-ASCII, surrogate-free unicode), finish, logprobs and delta, completions and chat, with and
without usage."""
from __future__ import annotations

import json
import random

from router.sse import ChunkEvents, sse_event

ALPHABET = ['a', ' ', '"', '\\', '\n', '\t', '\x00', '\x1f', '\x7f', 'é', '中', '😀', '\u2028', '</', '{', '}', ',']


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 12)))


def test_chunk_events_equal_sse_event_of_the_dict():
    rng = random.Random(7)
    for case in range(400):
        rid, model = f"cmpl-{_text(rng)}", rng.choice(["m", "llama-3", _text(rng)])
        usage = case % 2 == 0
        created = rng.randrange(0, 2 ** 40)
        finish = rng.choice([None, "stop", "length", "tool_calls"])
        logprobs = rng.choice([None, {"tokens": [_text(rng)], "token_logprobs": [-0.5], "top_logprobs": None,
                                      "text_offset": [3]}, {"content": [{"token": _text(rng), "logprob": -9999.0}]}])
        extra = {"usage": None} if usage else {}
        text = _text(rng)
        ev = ChunkEvents(rid, "text_completion", created, model, usage)
        want = sse_event({"id": rid, "object": "text_completion", "created": created, "model": model,
                          "choices": [{"index": case % 3, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                          **extra})
        assert ev.completion(case % 3, text, finish, logprobs) == want
        ev = ChunkEvents(rid, "chat.completion.chunk", created, model, usage)
        for delta in ({"content": text}, {"role": "assistant"}, {}, {"tool_calls": [{"index": 0, "id": text}]},
                      {"content": text, "role": "assistant"}):
            want = sse_event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                              "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                              **extra})
            assert ev.chat(0, delta, finish, logprobs) == want
    line = ChunkEvents("r", "text_completion", 1, "m", True).completion(0, 'a"\n', None)
    assert json.loads(line[len("data: "):]) == {"id": "r", "object": "text_completion", "created": 1, "model": "m",
                                                 "choices": [{"index": 0, "text": 'a"\n', "logprobs": None,
                                                              "finish_reason": None}], "usage": None}
