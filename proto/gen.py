"""Generate proto/tandem_pb2.py and proto/tandem_pb2_grpc.py from tandem.proto.

Usage: python -m proto.gen [--out DIR]   (DIR defaults to the repository root)
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(out_dir: pathlib.Path) -> None:
    """Runs grpc_tools' protoc in a child process: loading its native library into a
    process that already holds other native libraries (nixl's bundled protobuf) can
    crash, and a child keeps the caller clean."""
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "proto/tandem.proto",
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed: {done.stderr.strip()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT)
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    main(sys.argv[1:])
