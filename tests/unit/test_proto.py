"""The checked-in gRPC stubs are exactly what scripts/dev_gen_proto.py makes from proto/lmscope.proto."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "dev_gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    gen_proto.generate(tmp_path)
    for name in gen_proto.STUB_NAMES:
        fresh = (tmp_path / name).read_text()
        checked_in = (ROOT / "proto" / "wire" / name).read_text()
        assert fresh == checked_in, f"proto/wire/{name} is stale: run python scripts/dev_gen_proto.py"

