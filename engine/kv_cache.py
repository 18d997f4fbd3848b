"""Paged KV pool: one K and one V tensor per layer, shaped [num_pages, page_size, num_kv_heads, head_dim].

The pool only owns memory. Which pages belong to which sequence is decided by
callers (`engine.page_allocator`, the schedulers) and passed in as page tables;
token position p of a sequence lives at page_table[p // page_size], offset
p % page_size. The flat "slot" of that token is page * page_size + offset.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.k: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        """Bytes one page costs across all layers, K and V."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * elem

    @property
    def page_bytes_per_layer(self) -> int:
        """Bytes of one page of one layer's K (same for V): the unit kvtransfer ships."""
        return self.k[0][0].numel() * self.k[0].element_size()
