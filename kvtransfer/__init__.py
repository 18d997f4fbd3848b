"""KV cache transfer between prefill and decode workers.

Roles and states live in `kvtransfer.base`; backends ("grpc", later "nixl") are
imported only through `get_backend(name)`, never by importing this package.
"""
from kvtransfer.base import (Backend, Destination, KVReceiver, KVSender, SendHandle, TransferError,
                             TransferState, available_backends, get_backend)

__all__ = ["Backend", "Destination", "KVReceiver", "KVSender", "SendHandle", "TransferError",
           "TransferState", "available_backends", "get_backend"]
