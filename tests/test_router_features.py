"""Router features against the fake decode worker of tests/test_router_protocol.py (and a dead
one where no worker is needed): batched completions prompts, `usage: null` on stream chunks,
/tokenize and /detokenize, logprobs and echo shapes, a worker that omits asked-for logprobs.
"""
from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from router.backend import DecodeClient
from router.server import create_app
from test_router_protocol import (MAX_LEN, REPLY_TEXT, assert_openai_error, chat, cmpl, dead_client,  # noqa: F401
                                  free_port, gateway, make_config, run, sse_events, tokenizer)      # fixtures too

# ---------------------------------------------------------------- batched prompts, usage: null

def test_batched_prompts_each_their_own_request(tokenizer):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]

    async def body():
        async with gateway(tokenizer) as (servicer, c):
            r = await c.post("/v1/completions", json=cmpl(prompt=prompts, max_tokens=3, return_token_ids=True))
            rs = await c.post("/v1/completions", json=cmpl(prompt=["hello world", "the cat"], max_tokens=4,
                                                           stream=True, stream_options={"include_usage": True}))
            return r, rs, list(servicer.requests)

    r, rs, requests = run(body())
    assert r.status_code == 200, r.text
    out = r.json()
    assert [ch["index"] for ch in out["choices"]] == [0, 1, 2]
    assert [ch["prompt_token_ids"] for ch in out["choices"]] == prompts
    reply = tokenizer.encode(REPLY_TEXT)
    assert all(ch["token_ids"] == reply[:3] and ch["finish_reason"] == "length" for ch in out["choices"])
    assert out["usage"] == {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18,
                            "prompt_tokens_details": {"cached_tokens": 6}}
    ids = [q.request_id for q in requests[:3]]
    assert len(set(ids)) == 3 and all(i.startswith(out["id"] + "-") for i in ids)
    assert sorted(list(q.prompt_token_ids) for q in requests[:3]) == sorted(prompts)
    events = sse_events(rs.text)
    by_index: dict[int, str] = {}
    for e in events[:-1]:
        assert len(e["choices"]) == 1 and e["usage"] is None
        by_index[e["choices"][0]["index"]] = by_index.get(e["choices"][0]["index"], "") + e["choices"][0]["text"]
    assert by_index == {0: tokenizer.decode(reply[:4]), 1: tokenizer.decode(reply[:4])}
    finishes = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
    assert events[-1]["usage"]["prompt_tokens"] == len(tokenizer.encode("hello world")) + len(tokenizer.encode("the cat"))


@pytest.mark.parametrize("stream", [False, True])
def test_one_failing_prompt_fails_the_batch_and_aborts_the_others(tokenizer, stream):
    async def body():
        async with gateway(tokenizer) as (servicer, c):
            servicer.delay = 0.02
            servicer.fail_first_token = 99
            r = await c.post("/v1/completions", json=cmpl(prompt=[[5, 6], [99, 1], [7]], max_tokens=30,
                                                          stream=stream))
            for _ in range(100):
                if len(servicer.cancelled_ids) >= 2:
                    break
                await asyncio.sleep(0.02)
            return r, list(servicer.cancelled_ids), servicer.finished.is_set()

    r, cancelled, any_finished = run(body())
    if stream:
        assert r.status_code == 200
        events = sse_events(r.text)
        assert "GPU on fire" in events[-1]["error"]["message"]
    else:
        assert_openai_error(r, 500, contains="GPU on fire")
    assert len(cancelled) == 2 and not any_finished, cancelled
    assert all(not c.endswith("-1") for c in cancelled)


def test_usage_null_on_every_chunk_but_the_last_only_with_include_usage(tokenizer):
    async def body():
        async with gateway(tokenizer) as (_, c):
            out = []
            for path, b in (("/v1/completions", cmpl), ("/v1/chat/completions", chat)):
                out.append(await c.post(path, json=b(stream=True, max_tokens=4, stream_options={"include_usage": True})))
                out.append(await c.post(path, json=b(stream=True, max_tokens=4)))
            return out

    with_usage_c, without_c, with_usage_chat, without_chat = run(body())
    for r in (with_usage_c, with_usage_chat):
        events = sse_events(r.text)
        assert all("usage" in e and e["usage"] is None for e in events[:-1])
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    for r in (without_c, without_chat):
        assert all("usage" not in e for e in sse_events(r.text))


# ---------------------------------------------------------------- /tokenize, /detokenize (no worker needed)

def test_tokenize_and_detokenize(dead_client, tokenizer):
    from engine.tokenizer import encode_chat

    text = "the cat runs fast"
    r = dead_client.post("/tokenize", json={"model": "tiny", "prompt": text})
    assert r.status_code == 200, r.text
    ids = tokenizer.encode(text)
    assert r.json() == {"count": len(ids), "max_model_len": MAX_LEN, "tokens": ids, "token_strs": None}
    r = dead_client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    msgs = [{"role": "user", "content": "hello"}]
    r = dead_client.post("/tokenize", json={"model": "tiny-alias", "messages": msgs}).json()
    assert r["tokens"] == encode_chat(tokenizer, msgs) and r["count"] == len(r["tokens"])
    r2 = dead_client.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert r2["tokens"] == encode_chat(tokenizer, msgs, add_generation_prompt=False) != r["tokens"]
    d = dead_client.post("/detokenize", json={"model": "tiny", "tokens": ids})
    assert d.status_code == 200 and d.json() == {"prompt": tokenizer.decode(ids)}
    assert dead_client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": "tiny"}, 400, None),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "gpt-9"}, 404, "model"),
])
def test_tokenize_bad_input(dead_client, path, body, status, param):
    assert_openai_error(dead_client.post(path, json=body), status, param)


def test_tokenize_needs_the_api_key(tokenizer):
    config = make_config(f"127.0.0.1:{free_port()}", api_key="sekret")
    with TestClient(create_app(config, tokenizer, DecodeClient.from_config(config))) as c:
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
            assert_openai_error(c.post(path, json=body), 401)
            assert c.post(path, json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
        doc = c.get("/openapi.json").json()
        for path in ("/tokenize", "/detokenize"):
            op = doc["paths"][path]["post"]
            assert {"200", "400", "401", "404"} <= set(op["responses"]), op["responses"]
            ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in ("TokenizeResponse", "DetokenizeResponse")


# ---------------------------------------------------------------- logprobs and echo shapes

def _check_completion_logprobs(lp: dict, text: str, tokenizer, n_alts: int) -> None:
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n = len(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["text_offset"] == sorted(lp["text_offset"]) and all(0 <= o <= len(text) for o in lp["text_offset"])
    for tok, off, top, val in zip(lp["tokens"], lp["text_offset"], lp["top_logprobs"], lp["token_logprobs"]):
        assert text[off:].startswith(tok) or tok == ""
        if val is not None:
            assert top[tok] == val and len(top) <= n_alts + 1


def test_completion_logprobs_and_echo(tokenizer):
    reply = tokenizer.encode(REPLY_TEXT)
    prompt = [tokenizer.encode(w)[0] for w in ("hello", " world", " cat")]

    async def body():
        async with gateway(tokenizer) as (_, c):
            plain = await c.post("/v1/completions", json=cmpl(prompt="hello world", max_tokens=5, logprobs=2))
            echo = await c.post("/v1/completions", json=cmpl(prompt=prompt, max_tokens=4, logprobs=1, echo=True))
            echo_only = await c.post("/v1/completions", json=cmpl(prompt="hello world", max_tokens=3, echo=True))
            streamed = await c.post("/v1/completions", json=cmpl(prompt=prompt, max_tokens=4, logprobs=1, echo=True,
                                                                 stream=True))
            return plain.json(), echo.json(), echo_only.json(), streamed

    plain, echo, echo_only, streamed = run(body())
    ch = plain["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"] == tokenizer.decode(reply[:5])
    assert lp["tokens"] == [tokenizer.decode([t]) for t in reply[:5]]
    assert lp["token_logprobs"] == [-0.25, -0.5, -9999.0, -1.0, -1.25]        # -inf is sent as -9999.0
    assert lp["top_logprobs"][0] == {tokenizer.decode([reply[0]]): -0.25, tokenizer.decode([reply[0] + 1]): -1.25}
    assert "".join(lp["tokens"]) == ch["text"] and lp["text_offset"][0] == 0
    _check_completion_logprobs(lp, ch["text"], tokenizer, 2)
    # echo: the prompt's tokens first, the very first without a logprob
    ch = echo["choices"][0]
    lp = ch["logprobs"]
    prompt_text = tokenizer.decode(prompt)
    assert ch["text"] == prompt_text + tokenizer.decode(reply[:4])
    assert lp["tokens"][:3] == [tokenizer.decode([t]) for t in prompt] and len(lp["tokens"]) == 7
    assert lp["token_logprobs"][:4] == [None, -0.25, -0.5, -0.25] and lp["top_logprobs"][0] is None
    assert lp["text_offset"][3] == len(prompt_text)
    _check_completion_logprobs(lp, ch["text"], tokenizer, 1)
    assert echo_only["choices"][0]["text"].startswith("hello world") and echo_only["choices"][0]["logprobs"] is None
    # streamed: the chunks' logprobs put together are the non-streamed ones
    events = sse_events(streamed.text)
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == ch["text"]
    joined = {k: [x for e in events for x in e["choices"][0]["logprobs"][k]] for k in lp}
    assert joined == lp


def test_chat_logprobs_shape(tokenizer):
    reply = tokenizer.encode(REPLY_TEXT)

    async def body():
        async with gateway(tokenizer) as (_, c):
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=4, logprobs=True, top_logprobs=2))
            r0 = await c.post("/v1/chat/completions", json=chat(max_tokens=4, logprobs=True))
            rs = await c.post("/v1/chat/completions", json=chat(max_tokens=4, logprobs=True, top_logprobs=2,
                                                                stream=True))
            return r.json(), r0.json(), rs

    r, r0, rs = run(body())
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
    assert len(lp["content"]) == 4
    for i, (tok, e) in enumerate(zip(reply, lp["content"])):
        name = tokenizer.decode([tok])
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["token"] == name and e["bytes"] == list(name.encode()) and e["logprob"] == fake_lp(i)
        assert [t["token"] for t in e["top_logprobs"]] == [name, tokenizer.decode([tok + 1])]
        assert all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
    assert all(e["top_logprobs"] == [] for e in r0["choices"][0]["logprobs"]["content"])
    events = sse_events(rs.text)
    assert events[0]["choices"][0]["logprobs"] is None                  # the role chunk
    content = [x for e in events[1:] for x in e["choices"][0]["logprobs"]["content"]]
    assert content == lp["content"]


def fake_lp(i: int) -> float:
    return -9999.0 if i == 2 else -0.25 * (i + 1)


def test_worker_without_logprobs_is_an_error_not_a_silent_null(tokenizer):
    async def body():
        async with gateway(tokenizer) as (servicer, c):
            servicer.Generate = strip_logprobs(servicer.Generate)
            return await c.post("/v1/completions", json=cmpl(max_tokens=3, logprobs=1))

    assert_openai_error(run(body()), 502, contains="logprobs")


def strip_logprobs(generate):
    async def wrapped(request, context):
        async for resp in generate(request, context):
            del resp.logprobs[:]
            yield resp
    return wrapped
