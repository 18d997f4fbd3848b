"""The checked-in gRPC stubs must match proto/tandem.proto (run `make proto`)."""
from pathlib import Path

from proto.gen import ROOT, generate


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in ("tandem_pb2.py", "tandem_pb2_grpc.py"):
        fresh = (tmp_path / "proto" / name).read_text()
        checked_in = (ROOT / "proto" / name).read_text()
        assert fresh == checked_in, f"proto/{name} is stale: run `make proto`"


def test_messages_round_trip() -> None:
    from proto import tandem_pb2 as pb

    msg = pb.KVChunk(transfer_id="t", layer=3, page_offset=2, num_pages=1, dtype="float16", k=b"\x00\x01", v=b"\x02")
    back = pb.KVChunk.FromString(msg.SerializeToString())
    assert back == msg and back.layer == 3 and back.k == b"\x00\x01"
