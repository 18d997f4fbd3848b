"""Attention backend registry: backends are chosen by name and imported lazily,
so a CPU-only install never imports Triton/CUDA code."""
from __future__ import annotations

import importlib
from types import MappingProxyType

from engine.attention.base import AttentionBackend, AttentionMetadata, build_metadata
from engine.errors import EngineStartupError

_BACKENDS = MappingProxyType({
    "torch": ("engine.attention.torch_ref", "TorchRefBackend"),
    "triton": ("engine.attention.triton_backend", "TritonBackend"),
})


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_attention_backend(name: str) -> AttentionBackend:
    """Instantiate the backend registered under `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # never fall back silently to another backend
        raise EngineStartupError(
            f"attention backend {name!r} cannot be used: importing it failed ({type(exc).__name__}: {exc}); "
            f"install its package{' (pip install triton)' if name == 'triton' else ''} "
            "or pass --attention-backend torch") from None
    return getattr(module, cls_name)()


__all__ = ["AttentionBackend", "AttentionMetadata", "build_metadata", "get_attention_backend",
           "available_backends"]
