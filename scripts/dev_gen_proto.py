"""Regenerate the gRPC stubs in proto/wire/ from proto/lmscope.proto.

Usage: python scripts/dev_gen_proto.py [OUT_DIR]   (default: proto/wire)

protoc writes `import lmscope_pb2` into the gRPC stub; inside the installed package the module lives at
`lmscope.proto.wire`, so the import is rewritten to a relative one. tests/unit/test_proto.py regenerates into a
temporary folder and fails when the checked-in stubs differ.
"""
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
STUB_NAMES = ("lmscope_pb2.py", "lmscope_pb2.pyi", "lmscope_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "lmscope.proto"),
    ])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    grpc_stub = out_dir / "lmscope_pb2_grpc.py"
    grpc_stub.write_text(grpc_stub.read_text().replace(
        "import lmscope_pb2 as lmscope__pb2", "from . import lmscope_pb2 as lmscope__pb2"))


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "proto" / "wire")
