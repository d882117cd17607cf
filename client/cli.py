"""The `lmscope` command.

    lmscope pull [NAME]          fetch and verify the default model (or a named one), print its path
    lmscope serve [--model P]    serve a model (needs the server extra: pip install "lmscope[server]")
    lmscope rpc-worker [--port]  lend this host's CPU to a server that splits a model with --rpc
    lmscope info [--server A]    describe the model a server holds
    lmscope lens "PROMPT"        the logit lens of the prompt's last token, one line per layer
    lmscope collect FILE DIR     activations of many prompts into an activation store (resumable)
    lmscope abliterate --model P --direction D --out F   a copy of the model with a direction projected out
    lmscope demo                 start a server on the default model and show what lmscope does

Commands that talk to a server take `--server HOST:PORT` (default `$LMSCOPE_SERVER`) or `--model PATH`;
with neither they use the server at 127.0.0.1:50051 if one runs there, else start one on the default model
for the command (`lmscope.client.serving`). When no server answers, the error says how to start one.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import LmscopeError
from .serving import MissingServer, connected


def _server_extra(name: str):
    try:
        import importlib

        return importlib.import_module(f"lmscope.service.{name}")
    except ImportError as exc:
        sys.exit(f"error: this command needs the server extra ({exc.name} is missing): "
                 f"pip install 'lmscope[server]'")


def _pull(args) -> int:
    models = _server_extra("model_files")
    try:
        print(models.pull_model(args.name, force=args.force, progress=lambda m: print(m, file=sys.stderr)))
    except models.ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _abliterate(args) -> int:
    """`lmscope abliterate`: a local file job (no server): read the direction, project it out of the model."""
    import time

    models = _server_extra("model_files")
    ablation = _server_extra("abliterate")
    try:
        source = models.resolve_model_path(args.model)
        direction, layer, fingerprint = _read_direction(args.direction, args.layer)
        report = ablation.abliterate(source, direction, args.out, layer=layer, threads=args.threads,
                                     expected_sha256=fingerprint, progress=lambda m: print(m, file=sys.stderr))
    except (models.ModelError, ablation.AbliterationError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.report:
        for edit in report.edits:
            print(f"{edit.name:28s} {edit.type_name:5s} moved {edit.change:.3e}  re-quantization error "
                  f"{edit.requantize_error:.3e}  direction's write surviving {edit.surviving_write:.3e}")
    if args.check_load:
        from llama_cpp import Llama

        start = time.perf_counter()
        model = Llama(str(report.path), n_ctx=256, verbose=False)
        print(f"plain llama.cpp (llama_cpp.Llama) loaded it in {time.perf_counter() - start:.1f} s "
              f"({model.n_vocab()} tokens)")
        model.close()
    return 0


def _read_direction(path: str, layer: int | None):
    """(unit vector, layer, model fingerprint) from a `RefusalDirection.save` .npz (its chosen layer, or
    `layer`) or a .npy vector (layer -1 unless given)."""
    import numpy as np

    if path.endswith(".npz"):
        from .steering import RefusalDirection

        direction = RefusalDirection.load(path)
        chosen = direction._layer(layer)
        return direction.vector(chosen), chosen, direction.model_fingerprint
    vector = np.load(path, allow_pickle=False)
    if vector.ndim != 1:
        raise ValueError(f"{path}: a direction is one vector (n_embd,), not an array of shape {vector.shape}")
    return vector, -1 if layer is None else layer, ""


def _info(args) -> int:
    with connected(args.server, args.model) as client:
        info = client.model_info()
        print(info)
        if info.cpu_variant:  # empty from a server older than the field
            print(f"llama.cpp back end: {info.backend}, CPU kernels: {info.cpu_variant}")
        print("\n".join(info.memory_lines()))
    return 0


def _lens(args) -> int:
    with connected(args.server, args.model) as client:
        lens = client.logit_lens(args.prompt, top_k=args.top_k, temperature=args.temperature,
                                 targets=args.target, positions=None if args.html else [args.position],
                                 chat=args.chat)
        print(lens.table(position=args.position))
        if args.html:
            lens.to_html(args.html)
    return 0


def _collect(args) -> int:
    from .store import read_prompts

    positions = None if args.positions == "all" else [int(p) for p in args.positions.split(",")]
    with connected(args.server, args.model) as client:
        try:
            store = client.collect(read_prompts(args.prompts), args.path, sites=args.sites.split(","),
                                   positions=positions, dtype=args.dtype, chat=args.chat,
                                   batch_size=args.batch_size, progress=not args.no_progress)
        except (OSError, ValueError) as exc:  # a store that refuses the request, a path that cannot be written
            print(f"error: {exc}", file=sys.stderr)
            return 1
    stats = store.stats
    print(f"{store}\n{stats.computed} prompts computed, {stats.skipped} already stored, {stats.seconds:.1f} s, "
          f"{stats.bytes_on_disk / 1e6:.1f} MB on disk")
    return 0


def _demo(args) -> int:
    from .demo import demo

    with connected(args.server, args.model, use_running=False) as client:
        return demo(client)


def _add_server_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", default=os.environ.get("LMSCOPE_SERVER"),
                         help="HOST:PORT of a running server (default $LMSCOPE_SERVER; without it, the server on "
                              "127.0.0.1:50051 if one runs, else one started for this command)")
    command.add_argument("--model", help="start a server on this GGUF file for this command")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmscope", description="Look inside GGUF language models")
    commands = parser.add_subparsers(dest="command", required=True)

    pull = commands.add_parser("pull", help="fetch and verify the default model, or a named one")
    pull.add_argument("name", nargs="?", default=None,
                      help="a named model: smollm2 (the default), gemma3-270m (Gemma terms apply) or "
                           "qwen2.5-coder-1.5b-instruct (1.1 GB, refuses harmful requests)")
    pull.add_argument("--force", action="store_true", help="download again even if cached")
    pull.set_defaults(handler=_pull)

    abliterate = commands.add_parser("abliterate", help="a copy of a model with a direction projected out of "
                                                        "its weights (docs/steering.md)")
    abliterate.add_argument("--model", required=True, help="the source GGUF file or a model name")
    abliterate.add_argument("--direction", required=True,
                            help="a RefusalDirection.save .npz (its chosen layer unless --layer) or an .npy vector")
    abliterate.add_argument("--layer", type=int, default=None, help="the layer of the .npz to use")
    abliterate.add_argument("--out", required=True, help="the GGUF file to write")
    abliterate.add_argument("--threads", type=int, default=None, help="quantization threads (default: all cores)")
    abliterate.add_argument("--report", action="store_true", help="print every tensor's edit and error")
    abliterate.add_argument("--check-load", action="store_true",
                            help="load the result with plain llama.cpp (llama_cpp.Llama) and print the time")
    abliterate.set_defaults(handler=_abliterate)

    serve = commands.add_parser("serve", help="serve a GGUF model over gRPC")
    serve.set_defaults(handler=None)
    commands.add_parser("rpc-worker", help="lend this host's CPU and memory to a server started with --rpc")

    info = commands.add_parser("info", help="describe the model a server holds")
    _add_server_options(info)
    info.set_defaults(handler=_info)

    lens = commands.add_parser("lens", help="logit lens: what each layer predicts after the prompt")
    lens.add_argument("prompt")
    _add_server_options(lens)
    lens.add_argument("--top-k", type=int, default=5, help="tokens per layer (default 5)")
    lens.add_argument("--temperature", type=float, default=1.0)
    lens.add_argument("--position", type=int, default=-1, help="prompt position to lens (default -1, the last)")
    lens.add_argument("--target", action="append", default=[],
                      help="also show this token's probability and rank (repeatable; a word counts by its first token)")
    lens.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    lens.add_argument("--html", metavar="PATH", help="also write the interactive view of every position to PATH")
    lens.set_defaults(handler=_lens)

    collect = commands.add_parser("collect", help="activations of many prompts into an activation store")
    collect.add_argument("prompts", help="a text file (one prompt per line) or .jsonl (a string, a list of token "
                                         "ids, or an object with a 'prompt' or 'text' field per line)")
    collect.add_argument("path", help="the store's directory (created; an existing store is resumed)")
    _add_server_options(collect)
    collect.add_argument("--sites", default="blocks.*.resid_post", help="comma-separated sites or globs")
    collect.add_argument("--positions", default="-1",
                         help="comma-separated positions, or 'all' (write --positions=-1,0 for a leading minus)")
    collect.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    collect.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    collect.add_argument("--batch-size", type=int, default=None, help="prompts per request (default 8)")
    collect.add_argument("--no-progress", action="store_true")
    collect.set_defaults(handler=_collect)

    demo = commands.add_parser("demo", help="a short tour on the default model")
    _add_server_options(demo)
    demo.set_defaults(handler=_demo)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        server = _server_extra("server")
        return server.main(argv[1:])
    if argv and argv[0] == "rpc-worker":
        return _server_extra("llama_rpc").main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except MissingServer as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LmscopeError as exc:  # a bad argument (the message says what to fix) or a failed call
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
