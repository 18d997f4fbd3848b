"""Cluster credentials: one shared token on every gRPC call between Tandem processes.

Lifecycle:
  1. Each process gets the token once at start from `--cluster-token-file PATH`, or else
     from the `TANDEM_CLUSTER_TOKEN` environment variable (`resolve_token`, called by the
     CLI only). `tandem serve` makes a fresh one per run (`new_token`, written 0600 into a
     private temporary directory by `write_token_file`) and passes the file to every
     process it starts. Without a token a process runs open: it says so once at start
     (`warn_open`: a warning, and the caller counts it in its `fallbacks` metric).
  2. Servers: `engine.grpc_util.make_server(cluster_token=...)` installs a
     `ClusterTokenInterceptor`. A call whose metadata does not carry the token (compared in
     constant time) ends with UNAUTHENTICATED before its handler runs, whatever its
     streaming shape; the first refusal is logged with the caller's address, later ones
     once a minute, and each one reaches the `on_reject(method)` hook (a metric).
  3. Clients: `aio_channel(...)` and `channel(...)` (blocking) open channels that add the
     token to every call's metadata, so no call site adds it by hand; an empty token sends
     nothing (for talking to an open worker).

What stays open: methods under `/grpc.health.v1.Health/` (no Tandem server registers the
standard health service today). Load-balancer and Kubernetes gRPC probes cannot send custom
metadata, and an answer tells a caller only whether the server is serving; anything that
reaches a model, a KV pool or cache contents needs the token. Readiness waits
(`tandem_cli.procs.wait_grpc_ready`) use channel connectivity and need no RPC.

What this does not do: the token crosses the network in clear text, like the rest of
the gRPC traffic (KV included), so between hosts the network must be trusted or the
channels wrapped in TLS. NIXL transfers stay gated as before by each transfer's own token
and by the agent bound in its Session, which is itself a call that needs this token.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "TANDEM_CLUSTER_TOKEN"
METADATA_KEY = "tandem-cluster-token"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
MIN_TOKEN_CHARS = 16
_REFUSAL = ("missing or wrong cluster token: this worker only answers members of its cluster "
            "(--cluster-token-file or $" + TOKEN_ENV + ")")


class ClusterTokenError(ValueError):
    """A token file or value that cannot be used (one line, for the CLI)."""


def check_token(token: str, where: str) -> str:
    """`token` if it is usable as gRPC metadata and long enough to be a secret."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ClusterTokenError(f"the cluster token from {where} has {len(token)} characters; "
                                f"use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
    if not all("!" <= c <= "~" for c in token):
        raise ClusterTokenError(f"the cluster token from {where} must be printable ASCII without spaces")
    return token


def resolve_token(path: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The token of `--cluster-token-file path` (surrounding whitespace dropped), else
    $TANDEM_CLUSTER_TOKEN, else "" (run open)."""
    if path:
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ClusterTokenError(f"cannot read --cluster-token-file {path}: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None
        return check_token(text.strip(), path)
    value = environ.get(TOKEN_ENV, "")
    return check_token(value.strip(), "$" + TOKEN_ENV) if value else ""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token_file(directory: str, token: str) -> str:
    """Write `token` to a new file readable by this user only; its path."""
    path = os.path.join(directory, "cluster-token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    return path


def warn_open(consequence: str) -> None:
    """Say once at start that this process runs without a token, and what follows from it; the
    caller also counts it (what="cluster_auth_off" in its fallbacks metric)."""
    log.warning("no cluster token (--cluster-token-file or $%s): %s; `tandem serve` sets one up "
                "by itself", TOKEN_ENV, consequence)


# ---- server side -----------------------------------------------------------------


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED and before the handler runs, every call without the
    token (OPEN_METHOD_PREFIXES excepted: see the module docstring)."""

    LOG_EVERY_S = 60.0

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        self._expected = check_token(token, "the server's configuration").encode("ascii")
        self.on_reject = on_reject      # called with the method name of each refused call
        self.rejected = 0
        self._logged_at: float | None = None
        self._unlogged = 0

    def authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == METADATA_KEY:
                given = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if (handler is None or details.method.startswith(OPEN_METHOD_PREFIXES)
                or self.authorized(details.invocation_metadata)):
            return handler
        self.rejected += 1
        if self.on_reject is not None:
            self.on_reject(details.method)
        return self._refusal(handler, details.method)

    def _note(self, method: str, peer: str) -> None:
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.LOG_EVERY_S:
            extra = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
            log.warning("refused %s from %s: missing or wrong cluster token%s", method, peer, extra)
            self._logged_at, self._unlogged = now, 0
        else:
            self._unlogged += 1

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A handler of the same streaming shape that ends the call at once (a unary-request
        shape for a streaming method would wait for a first message the caller may never send)."""

        async def refuse(_request, context) -> None:
            self._note(method, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        return make[(bool(handler.request_streaming), bool(handler.response_streaming))](refuse)


# ---- client side -----------------------------------------------------------------


def _with_token(details, token: str):
    """Blocking call details (a namedtuple) with the token appended."""
    return details._replace(metadata=(*tuple(details.metadata or ()), (METADATA_KEY, token)))


class _WithToken:
    """A multicallable whose calls carry the token besides whatever metadata the caller gives
    (stream-request calls may pass metadata as their third positional argument)."""

    __slots__ = ("_inner", "_token", "_pos")

    def __init__(self, inner, token: str, metadata_pos: int | None) -> None:
        self._inner, self._token, self._pos = inner, (METADATA_KEY, token), metadata_pos

    def __call__(self, *args, **kwargs):
        if self._pos is not None and len(args) > self._pos:
            md = args[self._pos]
            args = (*args[:self._pos], (*tuple(md or ()), self._token), *args[self._pos + 1:])
        else:
            kwargs["metadata"] = (*tuple(kwargs.get("metadata") or ()), self._token)
        return self._inner(*args, **kwargs)


class _TokenChannel(grpc.aio.Channel):
    """A grpc.aio channel whose every call carries the token. Not grpc.aio's client
    interceptors: they run each call in an extra task and each streamed message through an
    extra async generator (benchmarks/auth_overhead.py measured both); this adds one
    function call per RPC and nothing per message."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._channel, self._token = channel, token

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _WithToken(self._channel.unary_unary(method, request_serializer, response_deserializer,
                                                    _registered_method), self._token, None)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _WithToken(self._channel.unary_stream(method, request_serializer, response_deserializer,
                                                     _registered_method), self._token, None)

    def stream_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _WithToken(self._channel.stream_unary(method, request_serializer, response_deserializer,
                                                     _registered_method), self._token, 2)

    def stream_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _WithToken(self._channel.stream_stream(method, request_serializer, response_deserializer,
                                                      _registered_method), self._token, 2)

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc_val, exc_tb):
        await self._channel.close(None)

    async def close(self, grace: float | None = None):
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False):
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state):
        return await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self):
        await self._channel.channel_ready()


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self._token), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self._token), request_iterator)


def aio_channel(address: str, *, token: str, options=()) -> grpc.aio.Channel:
    """A grpc.aio channel to a Tandem process whose every call carries `token` ("" = none)."""
    ch = grpc.aio.insecure_channel(address, options=list(options))
    return _TokenChannel(ch, token) if token else ch


def channel(address: str, *, token: str, options=()) -> grpc.Channel:
    """The blocking counterpart of `aio_channel` (tests, benchmarks, CLI helpers)."""
    ch = grpc.insecure_channel(address, options=list(options))
    return grpc.intercept_channel(ch, _SyncToken(token)) if token else ch
