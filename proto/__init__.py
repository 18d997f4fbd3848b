"""Protobuf schema and generated gRPC stubs for every Tandem process boundary.

Regenerate after editing tandem.proto with `python -m proto.gen`
(tests/test_proto.py fails when the checked-in stubs are stale).
"""
