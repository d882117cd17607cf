"""Where one decode's time goes: llama.cpp's graph timed node by node, per weight format.

A speed target is only worth chasing where the kernels can reach it. This script decodes one prompt
in-process (no server, no capture, no LM head: the request of every hidden state) and reports

- the decode's wall time as it runs in the server (the graph computed in one piece), the median of --repeat;
- the same graph paused after every node by an eval callback that asks for each one: the time between two
  pauses is that node's, summed over the layers by the node's name without its layer number (`ffn_gate`,
  `Qcur`, ...) and by its op, with the weights' type for matrix products. Pausing adds a thread wake-up and a
  Python call per node (about 20 % here), so the shares are what to read, and `est. ms` scales them to the
  unpaused time.

With --requantize, the same for copies of each model in other weight formats (`service/requantize.py`, made
once and cached as `lmscope serve --requantize` makes them): what llama.cpp's own kernels give each format on
this CPU, which bounds what a faster kernel for the shipped format can gain.

    .venv/bin/python scripts/diag_ops.py [--model PATH ...] [--requantize q4_0,q8_0,f32] [--tokens 128]
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import statistics
import time

from lmscope.service.worker import wait_as_one_worker

wait_as_one_worker()

from lmscope.service import ggml, llama_log  # noqa: E402  (after the wait policy: OpenMP reads it at start)
from lmscope.service.model_files import pull_default_model  # noqa: E402
from lmscope.service.native import CPU_VARIANT  # noqa: E402
from lmscope.service.native import llama as lc  # noqa: E402
from lmscope.service.requantize import requantized  # noqa: E402

MUL_MAT = ggml.OP_CODES["MUL_MAT"]
OP_NAMES = {code: name for name, code in ggml.OP_CODES.items()}


class Profile:
    """One model file loaded with one context (no LM head, flash attention, as the server decodes)."""

    def __init__(self, path: str, n_threads: int, n_tokens: int):
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        self.paused = False
        self.times: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.last = 0.0
        self.callback = lc.ggml_backend_sched_eval_callback(self._node_done)
        params = lc.llama_context_default_params()
        params.n_ctx = max(1024, n_tokens)
        params.n_batch = max(512, n_tokens)  # one llama_decode call, in ubatches of 512 tokens as the server's
        params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_logits = True
        params.cb_eval = self.callback
        params.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(self.model, params)
        vocab = lc.llama_model_get_vocab(self.model)
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        self.tokens = [(i * 7919) % (n_vocab - 200) + 100 for i in range(n_tokens)]  # any ids, no special ones

    def _node_done(self, tensor, ask, user_data):
        if ask:
            return self.paused
        now = time.perf_counter()
        stem = ggml.name_of(tensor).decode().rsplit("-", 1)[0]
        op = ggml.op_of(tensor)
        if stem.startswith("node_"):  # unnamed (ggml numbers it): known by its op
            stem = OP_NAMES[op]
        kind = "MUL_MAT " + ggml.type_name(ggml.type_of(ggml.sources_of(tensor)[0])) if op == MUL_MAT else ""
        self.times[(stem, kind)] += now - self.last
        self.last = time.perf_counter()
        return True

    def decode(self) -> float:
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        batch = lc.llama_batch_init(len(self.tokens), 0, 1)
        for i, token in enumerate(self.tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(self.tokens)
        start = self.last = time.perf_counter()
        status = lc.llama_decode(self.ctx, batch)
        elapsed = time.perf_counter() - start
        lc.llama_batch_free(batch)
        if status != 0:
            raise SystemExit(f"llama_decode returned {status}")
        return elapsed * 1e3

    def close(self) -> None:
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def report(path: str, n_tokens: int, repeat: int, n_threads: int, top: int) -> None:
    profile = Profile(path, n_threads, n_tokens)
    profile.decode()  # the first decode reserves buffers
    whole = statistics.median(profile.decode() for _ in range(repeat))
    profile.paused = True
    profile.decode()
    profile.times.clear()
    paused = statistics.median(profile.decode() for _ in range(repeat))
    profile.close()
    total = sum(profile.times.values())
    print(f"\n{pathlib.Path(path).name}: {n_tokens} tokens, {whole:.0f} ms (median of {repeat}); paused after "
          f"every node {paused:.0f} ms")
    print(f"{'node (every layer)':24s} {'op, weights':16s} {'share':>6s} {'est. ms':>8s}")
    by_kind: dict[str, float] = collections.defaultdict(float)
    for (stem, kind), seconds in sorted(profile.times.items(), key=lambda item: -item[1]):
        by_kind[kind or "other ops"] += seconds
        if top > 0:
            top -= 1
            print(f"{stem:24s} {kind:16s} {seconds / total:6.1%} {whole * seconds / total:8.1f}")
    for kind, seconds in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"{'all':24s} {kind:16s} {seconds / total:6.1%} {whole * seconds / total:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="GGUF file (repeatable; default: the default model)")
    parser.add_argument("--requantize", default="", help="also these copies of each model: q4_0, q8_0, f32 "
                                                         "(comma-separated; made once, cached)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="node names to list, the slowest first")
    args = parser.parse_args()
    llama_log.install()  # llama.cpp's log only with LMSCOPE_LLAMA_VERBOSE
    lc.llama_backend_init()
    print(f"CPU variant: {CPU_VARIANT}; {args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    for model in args.model or [str(pull_default_model(progress=None))]:
        model = str(pathlib.Path(model).expanduser())
        paths = [model] + [str(requantized(model, target)) for target in args.requantize.split(",") if target]
        for path in paths:
            report(path, args.tokens, args.repeat, args.threads, args.top)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
