"""Where a server's memory and time go, step by step: the probes behind docs/performance.md's figures (and the
passes recorded in CHANGELOG.md, 2026-11-30).

    .venv/bin/python scripts/diag_memory.py stages  --model M   # resident memory of front end and worker
                                                                # after each step of the issue #13 session
    .venv/bin/python scripts/diag_memory.py forward --model M   # Engine.forward of 128 tokens in-process:
                                                                # no logits / last / all (streamed, collected)
    .venv/bin/python scripts/diag_memory.py lens    --model M   # the lens reduction in-process on real hidden
                                                                # states (every layer x 128 positions, KL)
    .venv/bin/python scripts/diag_memory.py norms   --model M   # peak memory of the embedding's row norms
    .venv/bin/python scripts/diag_memory.py chunks  --model M   # one head chunk of a lens: the transposed
                                                                # layout's copy against what BLAS gains on it
    .venv/bin/python scripts/diag_memory.py head    --model M   # a lens's head products over the vocabulary
                                                                # ((n_layer + 1) x 128 rows): BLAS on dequantized
                                                                # chunks (the lens) / ggml's own kernels
    MALLOC_MMAP_THRESHOLD_=N .venv/bin/python scripts/diag_memory.py pieces --model M
                                                                # the front end's wire encoding of a
                                                                # (128, n_vocab) answer in PIECE_BYTES pieces:
                                                                # messages built (before) / encoded (now)
    .venv/bin/python scripts/diag_memory.py buffers --model M   # a client's assembly buffer: pages faulted
                                                                # one by one / MAP_POPULATE / resident

`stages` runs a real server (`launch_server`); the others load the model in this process, so that one step
is timed or measured without the pipe and gRPC. Environment variables (MALLOC_MMAP_THRESHOLD_,
OPENBLAS_NUM_THREADS) reach the server's processes too, which is how alternatives were compared.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
TEXT = "The capital of France is Paris. It is a big city with many people and old buildings. " * 20


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MB."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {line.split(":")[0]: int(line.split()[1]) // 1024
            for line in open(f"/proc/{pid}/status") if line.startswith(keys)}


def _largest_mappings(pid: int, n: int = 8) -> list[tuple[str, int]]:
    rss, name = collections.Counter(), "[anon]"
    for line in open(f"/proc/{pid}/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else "[anon]"
        elif fields[0] == "Rss:":
            rss[name] += int(fields[1])
    return [(name.rsplit("/", 1)[-1], kb // 1024) for name, kb in rss.most_common(n)]


def stages(model: str) -> None:
    from bench_transformers import process_tree

    from lmscope.client import Client
    from lmscope.service.launch import launch_server

    with launch_server(model, args=("--threads", "2", "--workers", "1", "--n-ctx", "4096")) as server, \
            Client(server.address) as c:
        pids = process_tree(server.process.pid)

        def show(step: str) -> None:
            print(f"{step:14s}", "  ".join(f"{pid}: {_status(pid)}" for pid in pids), flush=True)
        show("start")
        prompt = c.tokenize(TEXT).token_ids[:128]
        c.run(prompt, logits=False)
        show("run, no logits")
        run = c.run(prompt, logits=True)
        show("run, logits")
        c.logit_lens(prompt, top_k=5)
        show("lens")
        c.nearest_tokens(" Paris", k=10)
        show("nearest emb")
        c.nearest_tokens(" Paris", k=10, table="lm_head")
        show("nearest head")
        c.unembed(run.hidden_states[-1])
        show("unembed")
        for pid in pids[1:]:
            print(pid, "largest mappings (MB):", _largest_mappings(pid))


def _engine(model: str):
    from lmscope.service.contracts import EngineConfig
    from lmscope.service.engine import Engine

    return Engine(EngineConfig(model_path=model, n_threads=2))


def forward(model: str, repeat: int) -> None:
    from lmscope.service.engine import ForwardRequest

    engine = _engine(model)
    prompt = engine.model.tokenize(TEXT)[:128]
    print("tokens per ubatch", engine.contexts.n_batch)
    for label, options in [("no logits", dict(logits="none")), ("last logits", dict(logits="last")),
                           ("all, streamed", dict(logits="all", logits_sink=lambda *a: None)),
                           ("all, collected", dict(logits="all"))]:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            engine.forward(ForwardRequest(prompts=[prompt], **options))
            times.append(round((time.perf_counter() - start) * 1e3))
        print(f"{label:15s} ms {times}", flush=True)


def lens(model: str, repeat: int) -> None:
    from lmscope.service.engine import ForwardRequest

    engine = _engine(model)
    prompt = engine.model.tokenize(TEXT)[:128]
    sites = ["embed"] + [f"blocks.{layer}.resid_post" for layer in range(engine.n_layer)]
    captured = engine.forward(ForwardRequest(prompts=[prompt], capture=sites, logits="none")).captures

    def once() -> float:
        start = time.perf_counter()
        engine.weights.lens([captured[site][0] for site in sites], top_k=5, temperature=1.0, target_ids=[],
                            reference_rows=len(prompt))
        return round(time.perf_counter() - start, 2)
    once()
    print("lens reduction s", [once() for _ in range(repeat)])


def norms(model: str) -> None:
    from lmscope.service.weights import Weights

    weights = Weights(model, n_threads=2)
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status()["VmRSS"]
    weights.inverse_row_norms("embedding")
    print("row norms: peak", _status()["VmHWM"] - before, "MB over the", before, "MB before")


def _best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return round(min(times), 3)


def chunks(model: str, repeat: int) -> None:
    import numpy as np

    from lmscope.service import weights as weights_module
    from lmscope.service.weights import Weights

    weights = Weights(model, n_threads=2)
    # a lens's chunk width: a full block of rows plus 128 positions of reference rows
    start, stop = next(weights._vocabulary_chunks(weights_module.LENS_ROWS_PER_CHUNK, extra_rows=128))
    head = weights.head
    rows = np.random.default_rng(0).standard_normal((128, head.n_cols)).astype(np.float32)
    plain, transposed = head.dequantize(start, stop).T, head.dequantize_transposed(start, stop)
    print(f"chunk of {stop - start} x {head.n_cols} ({weights_module.BYTES_PER_CELL} bytes per cell), best of "
          f"{repeat} ms: dequantize {_best_ms(lambda: head.dequantize(start, stop), repeat)}, dequantize "
          f"transposed {_best_ms(lambda: head.dequantize_transposed(start, stop), repeat)}; 128 rows times the "
          f"transposed view {_best_ms(lambda: rows @ plain, repeat)}, times the transposed layout "
          f"{_best_ms(lambda: rows @ transposed, repeat)}")


def head(model: str, repeat: int) -> None:
    import numpy as np

    from lmscope.service.weights import Weights

    weights = Weights(model, n_threads=2)
    matrix = weights.head
    n_layer = int(weights.field(f"{weights.architecture}.block_count"))
    n_rows = (n_layer + 1) * 128  # a lens of every hidden state at 128 positions
    rows = np.random.default_rng(0).standard_normal((n_rows, matrix.n_cols)).astype(np.float32)
    chunk = 16384
    spans = [(start, min(matrix.n_rows, start + chunk)) for start in range(0, matrix.n_rows, chunk)]

    def by_blas() -> None:
        multiplier = matrix.multiplier(rows)
        for start, stop in spans:
            multiplier.products(slice(0, n_rows), start, stop)

    def by_ggml() -> None:
        for start, stop in spans:
            matrix.products(rows, start, stop)

    print(f"{n_rows} rows x {matrix.name} ({matrix.n_rows} x {matrix.n_cols}), best of {repeat} s: "
          f"BLAS {_best_ms(by_blas, repeat) / 1e3:.2f}, ggml {_best_ms(by_ggml, repeat) / 1e3:.2f}")


def pieces(model: str, repeat: int) -> None:
    import numpy as np

    from lmscope.proto import tensors
    from lmscope.proto.wire import lmscope_pb2 as pb
    from lmscope.service.contracts import PIECE_BYTES, tensor_pieces
    from lmscope.service.weights import Weights

    answer = np.random.default_rng(0).standard_normal((128, Weights(model, n_threads=1).n_vocab), np.float32)

    def messages(piece) -> None:  # the front end before the fourth pass: the data copied into each message
        for start in range(0, piece.array.nbytes, tensors.CHUNK_BYTES):
            data = bytes(memoryview(piece.array).cast("B")[start:start + tensors.CHUNK_BYTES])
            chunk = pb.TensorChunk(name=piece.name, sequence=piece.sequence, dtype=pb.FLOAT32, shape=piece.shape,
                                   offset=piece.offset + start, data=data)
            pb.RunChunk(tensor=chunk).SerializeToString()

    def encoded(piece) -> None:  # the front end now
        for _ in tensors.encoded_run_chunks(piece.name, piece.array, piece.sequence, shape=piece.shape,
                                            offset=piece.offset):
            pass

    for path in (messages, encoded):
        def send(path=path) -> None:
            for piece in tensor_pieces("lens.logits", 0, answer.shape, answer):
                path(piece)
        print(f"{answer.nbytes >> 20} MiB in {PIECE_BYTES >> 10} KiB pieces, {path.__name__}, MALLOC_MMAP_THRESHOLD_="
              f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}: best of {repeat} {_best_ms(send, repeat)} ms")


def buffers(model: str, repeat: int) -> None:
    """What a client pays to assemble a (128, n_vocab) answer in fresh memory: a copy into a mapping whose pages
    fault in one by one, into one mapped with MAP_POPULATE (`tensors.new_buffer`), and into memory already
    resident (the copy alone)."""
    import mmap

    import numpy as np

    from lmscope.service.weights import Weights

    answer = np.random.default_rng(0).standard_normal((128, Weights(model, n_threads=1).n_vocab), np.float32)
    source = answer.reshape(-1).view(np.uint8)
    resident = np.empty_like(source)
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    fills = {"faulted page by page": lambda: np.frombuffer(mmap.mmap(-1, source.size, flags=private), np.uint8),
             "MAP_POPULATE": lambda: np.frombuffer(
                 mmap.mmap(-1, source.size, flags=private | mmap.MAP_POPULATE), np.uint8),
             "resident": lambda: resident}
    for label, buffer in fills.items():
        def fill(buffer=buffer) -> None:
            buffer()[:] = source
        print(f"{source.size >> 20} MiB into memory {label}: ms {sorted(_best_ms(fill, 1) for _ in range(repeat))}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=["stages", "forward", "lens", "norms", "chunks", "head", "pieces",
                                                       "buffers"])
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from lmscope.service.worker import wait_as_one_worker
    wait_as_one_worker()
    if not args.model:
        from lmscope.service.model_files import pull_default_model
        args.model = str(pull_default_model(progress=None))
    if args.probe == "stages":
        stages(args.model)
    elif args.probe == "forward":
        forward(args.model, args.repeat)
    elif args.probe == "lens":
        lens(args.model, args.repeat)
    elif args.probe == "chunks":
        chunks(args.model, args.repeat)
    elif args.probe == "head":
        head(args.model, args.repeat)
    elif args.probe == "pieces":
        pieces(args.model, args.repeat)
    elif args.probe == "buffers":
        buffers(args.model, args.repeat)
    else:
        norms(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
