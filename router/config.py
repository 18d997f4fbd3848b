"""Router (gateway) configuration.

One frozen dataclass, built once by the CLI (or a test) and handed to
`router.server.create_app` / `run_router`. Nothing here reads the
environment or argv.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    model: str                                  # HF model dir or id: the tokenizer and chat template come from here
    decode_addresses: tuple[str, ...]           # gRPC "host:port" of every decode worker (proto.Decode)
    prefill_addresses: tuple[str, ...] = ()     # gRPC "host:port" of prefill workers; () = colocated (decode prefills itself)
    served_model_names: tuple[str, ...] = ()    # names accepted in `model`; () = (model,)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None                  # when set, /v1/* requires "Authorization: Bearer <api_key>"
    max_model_len: int = 4096                   # prompt tokens + max_tokens must fit
    request_timeout_s: float = 600.0            # deadline of one whole Generate call (prefill + all decode steps)

    def __post_init__(self) -> None:
        if not self.decode_addresses:
            raise ValueError("RouterConfig.decode_addresses must name at least one decode worker")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        # Normalise sequences handed in as lists so the dataclass stays hashable.
        for name in ("decode_addresses", "prefill_addresses", "served_model_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names a request may use in `model`; the first is the canonical one."""
        return self.served_model_names or (self.model,)
