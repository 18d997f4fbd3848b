"""The benchmark harness on every supported architecture's config (issue 14): Llama-3.1-8B,
Qwen2.5-7B and Mistral-7B-v0.3 as their tiny CPU twins, prompt ids inside each vocabulary,
Llama's prompts bit-identical to the pre-issue-14 formula."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench
from benchmarks.workloads import (FULL, MODEL_CONFIGS, TINY, resolve_model_config, token_id_range,
                                  write_model_dir)
from engine.config import ModelConfig


def _old_prompts(wl, n=None):
    """benchmarks/workloads.py's formula before issue 14: ids uniform in [1000, 120000), seed 1."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(1000, 120000, (wl.prefix_len,), generator=g).tolist()
    return [shared + torch.randint(1000, 120000, (wl.input_len - wl.prefix_len,), generator=g).tolist()
            for _ in range(wl.num_requests if n is None else n)]


def test_full_configs_carry_the_public_values():
    q = ModelConfig.from_dict(MODEL_CONFIGS["qwen2.5-7b"][0])
    assert (q.arch, q.vocab_size, q.num_layers, q.num_heads, q.num_kv_heads, q.hidden_size,
            q.intermediate_size, q.head_dim) == ("qwen2", 152064, 28, 28, 4, 3584, 18944, 128)
    assert q.attention_bias and not q.o_proj_bias and not q.tie_word_embeddings
    assert q.rope_theta == 1e6 and q.sliding_window is None
    m = ModelConfig.from_dict(MODEL_CONFIGS["mistral-7b-v0.3"][0])
    assert (m.arch, m.vocab_size, m.num_layers, m.num_heads, m.num_kv_heads, m.hidden_size,
            m.intermediate_size, m.head_dim) == ("mistral", 32768, 32, 32, 8, 4096, 14336, 128)
    assert not m.attention_bias and not m.tie_word_embeddings
    assert m.rope_theta == 1e6 and m.sliding_window is None
    for name, (full, tiny) in MODEL_CONFIGS.items():
        f, t = ModelConfig.from_dict(full), ModelConfig.from_dict(tiny)
        assert (t.arch, t.vocab_size, t.attention_bias) == (f.arch, f.vocab_size, f.attention_bias), name
        assert t.hidden_size < f.hidden_size and t.num_layers < f.num_layers, name


def test_token_id_range_by_vocabulary():
    assert token_id_range(128256) == token_id_range(152064) == (1000, 120000)
    assert token_id_range(32768) == (1000, 32768)
    assert token_id_range(500) == (50, 500)
    with pytest.raises(ValueError):
        token_id_range(1)


def test_llama_and_qwen_prompts_are_the_pre_issue_14_ids():
    for wl in TINY + FULL[:2]:
        n = None if wl in TINY else 3
        assert wl.prompts(n) == _old_prompts(wl, n), wl.name
        assert wl.prompts(n, vocab_size=128256) == _old_prompts(wl, n), wl.name
        assert wl.prompts(n, vocab_size=152064) == _old_prompts(wl, n), wl.name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_bench_runs_each_config_tiny_cpu(name, tmp_path, capsys):
    vocab = MODEL_CONFIGS[name][1]["vocab_size"]
    w1 = next(w for w in TINY if w.name == "W1")
    prompts = w1.prompts(vocab_size=vocab)
    assert len(prompts) == w1.num_requests and all(len(p) == w1.input_len for p in prompts)
    assert all(1000 <= t < vocab for p in prompts for t in p)
    if vocab < 120000:   # the old draw would have indexed past this vocabulary
        assert max(t for p in _old_prompts(w1) for t in p) >= vocab
    out = tmp_path / "r.json"
    modes = "colocated" if name == "llama-3.1-8b" else "hf,colocated"  # hf: transformers' class per arch
    rc = bench.main(["--tiny", "--device", "cpu", "--modes", modes, "--workloads", "W1",
                     "--model-config", name, "--json", str(out), "--results-md", str(tmp_path / "R.md"),
                     "--log-dir", str(tmp_path / "logs")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["model_config"]["name"] == name and r["model_config"]["vocab_size"] == vocab
    assert r["model_config"]["config"] == MODEL_CONFIGS[name][1]
    rows = {(x["mode"], x["workload"]): x for x in r["rows"]}
    row = rows[("colocated", "W1")]
    assert row["completed"] == row["requests"] == w1.num_requests
    assert row["output_tokens"] == w1.num_requests * w1.output_len
    if "hf" in modes:
        assert rows[("hf-generate", "W1")]["completed"] > 0
    assert f"model config: {name} (" in (tmp_path / "R.md").read_text()
    assert f"vocab {vocab}" in capsys.readouterr().out


def test_model_config_path_and_errors(tmp_path, capsys):
    cfg = {**MODEL_CONFIGS["mistral-7b-v0.3"][1], "vocab_size": 700}
    d = write_model_dir(tmp_path / "m", tiny=True, config=cfg)
    for spec in (str(d), str(d / "config.json")):
        name, got = resolve_model_config(spec, tiny=True)
        assert got == cfg and name == str((d / "config.json").resolve())
    lo, hi = token_id_range(700)
    assert all(lo <= t < hi for p in TINY[0].prompts(vocab_size=700) for t in p)
    assert bench.main(["--tiny", "--device", "cpu", "--modes", "colocated", "--model-config", "gpt-9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpt-9" in err[0] and "mistral-7b-v0.3" in err[0]
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"],
                                                   "model_type": "gpt2"}))
    assert bench.main(["--tiny", "--device", "cpu", "--model-config", str(tmp_path / "bad.json")]) == 2
    assert "unsupported model architecture" in capsys.readouterr().err


def test_served_and_goodput_draws_stay_in_the_vocabulary():
    from benchmarks.goodput import PromptSource, parse_mix
    from benchmarks.served import _warmup_requests

    shapes = parse_mix("W1,W2", tiny=True)
    old = torch.Generator().manual_seed(2)   # the served warm-up's formula before issue 14
    old_warm = [torch.randint(1000, 120000, (w.input_len,), generator=old).tolist() for w in TINY for _ in range(2)]
    assert [p for p, _ in _warmup_requests(TINY, 2, 128256)] == old_warm
    g = [torch.Generator().manual_seed(1 + i) for i in range(2)]   # goodput's, likewise
    old_shared = [torch.randint(1000, 120000, (s.prefix_len,), generator=x).tolist() for s, x in zip(shapes, g)]
    src = PromptSource(shapes, 128256)
    for i, s in enumerate(shapes):
        assert src.next(i) == old_shared[i] + torch.randint(1000, 120000, (s.input_len - s.prefix_len,),
                                                           generator=g[i]).tolist()
    src = PromptSource(shapes, 32768)
    assert all(1000 <= t < 32768 for i in (0, 1, 0, 1) for t in src.next(i))
    assert all(1000 <= t < 32768 for p, _ in _warmup_requests(TINY, 2, 32768) for t in p)


@pytest.mark.timeout(300)
def test_served_mistral_tiny_cpu(tmp_path, capsys):
    """A 32k vocabulary through tandem serve: the router checks every prompt id against the
    tokenizer written for that vocabulary, and the in-process run gets the same config."""
    from benchmarks.served import main as served_main

    out, md = tmp_path / "s.json", tmp_path / "R.md"
    rc = served_main(["--device", "cpu", "--tiny", "--layouts", "colocated", "--workloads", "W1",
                      "--model-config", "mistral-7b-v0.3", "--client-procs", "1", "--warmup", "1",
                      "--json", str(out), "--results-md", str(md), "--log-dir", str(tmp_path / "logs")])
    assert rc == 0, capsys.readouterr().out[-3000:]
    r = json.loads(out.read_text())
    assert r["model_config"]["name"] == "mistral-7b-v0.3" and r["model_config"]["vocab_size"] == 32768
    assert "--model-config mistral-7b-v0.3" in r["inprocess"]["command"] and "error" not in r["inprocess"]
    (row,) = r["rows"]
    assert row["failed"] == 0 and row["completed"] == row["requests"] == TINY[0].num_requests
    assert json.loads((tmp_path / "logs" / "model" / "config.json").read_text())["vocab_size"] == 32768
    assert "model config: mistral-7b-v0.3 (MistralForCausalLM" in md.read_text()


def test_goodput_rejects_an_unknown_config(capsys):
    from benchmarks.goodput import main as goodput_main

    assert goodput_main(["--device", "cpu", "--tiny", "--model-config", "no/such/config.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no/such/config.json" in err[0]
