"""Side-by-side peer: HuggingFace transformers `generate`, static batch, on W1 prompts.

Same config and dtype, random weights (the model is built on the device from the
config, whatever its architecture: transformers' config class for its `model_type`), greedy, a fixed number of new tokens (min_new_tokens = max_new_tokens so
EOS cannot end a row early). All W1 prompts have the same length, so the batch
needs no padding; the tokenizer-free call passes a full attention mask (left
padding would be used for ragged prompts).
"""
from __future__ import annotations

import gc
import time

import torch

from benchmarks.metrics import RequestTrace, RunResult
from benchmarks.workloads import Workload


def run_hf(config_dict: dict, wl: Workload, device: torch.device, dtype: torch.dtype,
           batch_size: int, num_batches: int) -> RunResult:
    import transformers

    fields = {k: v for k, v in config_dict.items() if k not in ("torch_dtype", "model_type", "architectures")}
    cfg = transformers.AutoConfig.for_model(config_dict["model_type"], **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    prompts = wl.prompts(batch_size * num_batches, config_dict["vocab_size"])
    traces: list[RequestTrace] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():   # warm-up (kernels, allocator)
        model.generate(torch.tensor(prompts[:1], device=device), max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0)
    sync()
    t0 = time.perf_counter()
    for b in range(num_batches):
        chunk = prompts[b * batch_size:(b + 1) * batch_size]
        ids = torch.tensor(chunk, device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=wl.output_len,
                                 min_new_tokens=wl.output_len, do_sample=False, pad_token_id=0)
        sync()
        now = time.perf_counter()
        n_new = out.shape[1] - ids.shape[1]
        for p in chunk:
            traces.append(RequestTrace(prompt_len=len(p), t_submit=t0, t_first=None, t_last=now, num_output=n_new))
    wall = time.perf_counter() - t0
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res = RunResult("hf-generate", wl.name, len(prompts), wall, traces,
                    note=f"static batch {batch_size}, {num_batches} batch(es) of W1; no per-token timing")
    return res
