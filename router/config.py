"""Router (gateway) configuration.

One frozen dataclass, built once by the CLI (or a test) and handed to
`router.server.create_app` / `router.process.run_router`. Nothing here reads the
environment or argv.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RouterConfig:
    model_path: str                             # HF model dir: tokenizer, chat template, config.json
    decode_addresses: tuple[str, ...]           # gRPC "host:port" of every decode worker (proto.Decode)
    prefill_addresses: tuple[str, ...] = ()     # gRPC "host:port" of prefill workers; () = colocated (decode prefills itself)
    served_model_names: tuple[str, ...] = ()    # names accepted in `model`; () = (model_path,)
    max_request_bytes: int = 8 << 20            # larger bodies get 413 before they are read whole
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None                  # when set, /v1/* requires "Authorization: Bearer <api_key>"
    max_model_len: int | None = None            # prompt tokens + max_tokens must fit; None = config.json's
                                                # max_position_embeddings (see `resolved`)
    request_timeout_s: float = 600.0            # deadline of one whole Generate call (prefill + all decode steps)
    etcd_endpoints: tuple[str, ...] = ()        # "host:port" of etcd; () = the static address lists above
    etcd_prefix: str = "/tandem"                # key prefix of this cluster's members
    placement: str = "cache_aware"              # "round_robin" | "least_load" | "cache_aware"
    max_queued_per_worker: int | None = 256     # requests waiting on a decode worker beyond its batch
                                                # (--max-queued-requests); all full: 503 + Retry-After
    queue_timeout_s: float = 30.0               # longest wait for a decode worker with free KV pages
    migration_limit: int = 3                    # times a stream may move to another decode worker after
                                                # its own died mid-stream (0 = never)
    cluster_token: str = field(default="", repr=False)  # sent on every gRPC call to a worker
                                                # (engine/cluster_auth.py); "" = none (workers run open)
    tool_call_parser: str | None = None         # tool_choice "auto": "hermes" | "llama3_json"; None = from
                                                # the chat template (router/tools.py)

    def __post_init__(self) -> None:
        if not self.decode_addresses and not self.etcd_endpoints:
            raise ValueError("RouterConfig needs decode_addresses or etcd_endpoints")
        if self.placement not in ("round_robin", "least_load", "cache_aware"):
            raise ValueError(f"unknown placement policy {self.placement!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_queued_per_worker is not None and self.max_queued_per_worker < 0:
            raise ValueError(f"max_queued_per_worker must be >= 0, got {self.max_queued_per_worker}")
        if self.queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be > 0, got {self.queue_timeout_s}")
        if self.tool_call_parser not in (None, "hermes", "llama3_json"):
            raise ValueError(f"unknown tool call parser {self.tool_call_parser!r} (hermes or llama3_json)")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        # Normalise sequences handed in as lists so the dataclass stays hashable.
        for name in ("decode_addresses", "prefill_addresses", "served_model_names", "etcd_endpoints"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names a request may use in `model`; the first is the canonical one."""
        return self.served_model_names or (self.model_path,)

    def resolved(self) -> "RouterConfig":
        """This config with max_model_len filled in from the model's config.json."""
        if self.max_model_len is not None:
            return self
        from engine.config import ModelConfig

        try:
            limit = ModelConfig.from_dir(self.model_path).max_position_embeddings
        except Exception as exc:  # noqa: BLE001 - say what to do instead of a parser traceback
            raise ValueError(f"max_model_len not given and not readable from {self.model_path}/config.json: "
                             f"{exc}") from exc
        return replace(self, max_model_len=limit)
