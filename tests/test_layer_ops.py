"""Fused Triton layer ops (engine/layer_ops_triton.py) against the torch reference ops.

CPU: TRITON_INTERPRET=1, float32 and float16. CUDA: compiled kernels, bfloat16 too:
    python3 -m pytest -q tests/test_layer_ops.py
Inputs are random (seeded per case); rows are ragged in count, strided where the
model passes strided views (q/k split out of a fused qkv output).
"""
from __future__ import annotations

import pytest
import torch

from triton_interp import ON_GPU, interpreter, interpreter_env  # noqa: F401 - interpreter: fixture

with interpreter_env():   # on a CPU, the kernels (and triton's own library) are jit-decorated on import
    pytest.importorskip("triton")
    import engine.layer_ops_triton  # noqa: F401 - loaded here so that get_layer_ops finds it decorated
from engine.layer_ops import TorchLayerOps, get_layer_ops  # noqa: E402
from engine.rope import cos_sin, inv_freq  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreter")    # ... and the interpreter reads it while they run

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Max |out - ref| in units of the reference's magnitude. fp32 matches to rounding;
# 16-bit kernels keep float32 intermediates where torch rounds them, so they may
# differ from the reference by an ulp or two of the output dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REF = TorchLayerOps()
TRI = get_layer_ops("triton")


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1.0), (err, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (7, 96), (5, 256)])
def test_rms_norm(dtype, rows, n):
    x = _rand(rows, n, dtype=dtype, seed=rows * n) * 3
    w = _rand(n, dtype=dtype, seed=1)
    _close(TRI.rms_norm(x, w, 1e-5), REF.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (9, 128), (3, 200)])
def test_add_rms_norm(dtype, rows, n):
    x = _rand(rows, n, dtype=dtype, seed=rows)
    r = _rand(rows, n, dtype=dtype, seed=rows + 100) * 4
    w = _rand(n, dtype=dtype, seed=2)
    out, s = TRI.add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_s = REF.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, ref_s)          # the residual sum is rounded exactly like torch
    _close(out, ref_out, dtype)
    assert torch.equal(x, _rand(rows, n, dtype=dtype, seed=rows))   # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_3d(dtype):
    """Qwen3's q/k norm: [T, heads, D] normalised per head, from a strided view."""
    qkv = _rand(6, 5 * 32, dtype=dtype, seed=3)
    q = qkv[:, :4 * 32].view(6, 4, 32)
    w = _rand(32, dtype=dtype, seed=4)
    _close(TRI.rms_norm(q, w, 1e-6), REF.rms_norm(q, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,KVH,D", [(1, 4, 1, 32), (11, 8, 2, 64), (5, 3, 3, 16)])
def test_rotary_in_place_on_fused_qkv_views(dtype, T, H, KVH, D):
    qkv = _rand(T, (H + 2 * KVH) * D, dtype=dtype, seed=T * H + D)
    pos = torch.tensor([(7 * i) % 50 + i for i in range(T)], device=DEVICE)
    cos, sin = cos_sin(pos, inv_freq(D, 10000.0).to(DEVICE), dtype)
    q_ref = qkv[:, :H * D].reshape(T, H, D).clone()
    k_ref = qkv[:, H * D:(H + KVH) * D].reshape(T, KVH, D).clone()
    v_before = qkv[:, (H + KVH) * D:].clone()
    ref_q, ref_k = REF.rotary(q_ref, k_ref, cos, sin)
    q, k, _ = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    out_q, out_k = TRI.rotary(q.view(T, H, D), k.view(T, KVH, D), cos, sin)
    _close(out_q, ref_q, dtype)
    _close(out_k, ref_k, dtype)
    assert torch.equal(qkv[:, (H + KVH) * D:], v_before)      # v is never written
    _close(qkv[:, :H * D].view(T, H, D), ref_q, dtype)        # in place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,inter", [(1, 64), (6, 200), (3, 1500)])
def test_silu_and_mul(dtype, T, inter):
    gu = _rand(T, 2 * inter, dtype=dtype, seed=T + inter) * 2
    _close(TRI.silu_and_mul(gu), REF.silu_and_mul(gu), dtype)


def test_unknown_ops_name():
    with pytest.raises(ValueError, match="unknown layer ops"):
        get_layer_ops("cutlass")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_forward_with_triton_ops_matches_torch_ops(arch):
    """A whole (tiny, fused-projection) model: the Triton layer ops give the logits
    of the torch ops, through the same torch attention backend."""
    from engine.attention import build_metadata, get_attention_backend
    from engine.config import ModelConfig
    from engine.kv_cache import KVCache
    from engine.model import CausalLM
    from engine.tiny_models import tiny_config_dict

    d = tiny_config_dict(arch, vocab_size=300, bos=1, eos=2, pad=0)
    cfg = ModelConfig.from_dict({**d, "model_type": arch})
    torch.manual_seed(0)
    model = CausalLM(cfg, device=DEVICE, dtype=torch.float32)
    for p in model.parameters():      # norms away from 1, so a mixed-up weight shows
        torch.nn.init.normal_(p, 0.0, 0.3 if p.dim() == 1 else 0.05)
    model.fuse_projections()
    starts, news = [0, 5], [7, 3]
    tables = [[0, 1], [2, 3]]
    meta = build_metadata(starts, news, tables, 4, DEVICE, 4)
    ids = torch.randint(3, 300, (sum(news),), device=DEVICE)
    backend = get_attention_backend("torch")
    out = {}
    for name in ("torch", "triton"):
        kv = KVCache(cfg.num_layers, 4, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, DEVICE)
        model.ops = get_layer_ops(name)
        with torch.inference_mode():
            out[name] = model.compute_logits(model(ids, meta, kv, backend))
    err = ((out["triton"] - out["torch"]).norm() / out["torch"].norm()).item()
    assert err < 1e-5, err
