"""The `lmscope` command.

    lmscope pull                 fetch and verify the default model, print its path
    lmscope serve [--model P]    serve a model (needs the server extra: pip install "lmscope[server]")
    lmscope rpc-worker [--port]  lend this host's CPU to a server that splits a model with --rpc
    lmscope info [--server A]    describe the model a server holds
    lmscope lens "PROMPT"        the logit lens of the prompt's last token, one line per layer
    lmscope collect FILE DIR     activations of many prompts into an activation store (resumable)
    lmscope demo                 start a server on the default model and show what lmscope does

Commands that talk to a server take `--server HOST:PORT` (default `$LMSCOPE_SERVER` or 127.0.0.1:50051).
"""
from __future__ import annotations

import argparse
import os
import sys

from .core import DEFAULT_ADDRESS


def _server_extra(name: str):
    try:
        import importlib

        return importlib.import_module(f"lmscope.service.{name}")
    except ImportError as exc:
        sys.exit(f"error: this command needs the server extra ({exc.name} is missing): "
                 f"pip install 'lmscope[server]'")


def _pull(args) -> int:
    models = _server_extra("models")
    try:
        print(models.pull_default_model(force=args.force, progress=lambda m: print(m, file=sys.stderr)))
    except models.ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _info(args) -> int:
    from .client import Client

    with Client(args.server) as client:
        info = client.model_info()
        print(info)
        print("\n".join(info.memory_lines()))
    return 0


def _lens(args) -> int:
    from .client import Client

    from .core import LmscopeError

    with Client(args.server) as client:
        try:
            lens = client.logit_lens(args.prompt, top_k=args.top_k, temperature=args.temperature,
                                     targets=args.target, positions=[args.position], chat=args.chat)
        except (LmscopeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(lens.table(position=args.position))
    return 0


def _collect(args) -> int:
    from .client import Client
    from .core import LmscopeError
    from .store import read_prompts

    positions = None if args.positions == "all" else [int(p) for p in args.positions.split(",")]
    with Client(args.server) as client:
        try:
            store = client.collect(read_prompts(args.prompts), args.path, sites=args.sites.split(","),
                                   positions=positions, dtype=args.dtype, chat=args.chat,
                                   batch_size=args.batch_size, progress=not args.no_progress)
        except (LmscopeError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    stats = store.stats
    print(f"{store}\n{stats.computed} prompts computed, {stats.skipped} already stored, {stats.seconds:.1f} s, "
          f"{stats.bytes_on_disk / 1e6:.1f} MB on disk")
    return 0


def _demo(args) -> int:
    from .demo import demo

    return demo(args.server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmscope", description="Look inside GGUF language models")
    commands = parser.add_subparsers(dest="command", required=True)
    default_server = os.environ.get("LMSCOPE_SERVER", DEFAULT_ADDRESS)

    pull = commands.add_parser("pull", help="fetch and verify the default model")
    pull.add_argument("--force", action="store_true", help="download again even if cached")
    pull.set_defaults(handler=_pull)

    serve = commands.add_parser("serve", help="serve a GGUF model over gRPC")
    serve.set_defaults(handler=None)
    commands.add_parser("rpc-worker", help="lend this host's CPU and memory to a server started with --rpc")

    info = commands.add_parser("info", help="describe the model a server holds")
    info.add_argument("--server", default=default_server)
    info.set_defaults(handler=_info)

    lens = commands.add_parser("lens", help="logit lens: what each layer predicts after the prompt")
    lens.add_argument("prompt")
    lens.add_argument("--server", default=default_server)
    lens.add_argument("--top-k", type=int, default=5, help="tokens per layer (default 5)")
    lens.add_argument("--temperature", type=float, default=1.0)
    lens.add_argument("--position", type=int, default=-1, help="prompt position to lens (default -1, the last)")
    lens.add_argument("--target", action="append", default=[],
                      help="also show this token's probability and rank (repeatable; a word counts by its first token)")
    lens.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    lens.set_defaults(handler=_lens)

    collect = commands.add_parser("collect", help="activations of many prompts into an activation store")
    collect.add_argument("prompts", help="a text file (one prompt per line) or .jsonl (a string, a list of token "
                                         "ids, or an object with a 'prompt' or 'text' field per line)")
    collect.add_argument("path", help="the store's directory (created; an existing store is resumed)")
    collect.add_argument("--server", default=default_server)
    collect.add_argument("--sites", default="blocks.*.resid_post", help="comma-separated sites or globs")
    collect.add_argument("--positions", default="-1",
                         help="comma-separated positions, or 'all' (write --positions=-1,0 for a leading minus)")
    collect.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    collect.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    collect.add_argument("--batch-size", type=int, default=None, help="prompts per request (default 8)")
    collect.add_argument("--no-progress", action="store_true")
    collect.set_defaults(handler=_collect)

    demo = commands.add_parser("demo", help="a short tour on the default model")
    demo.add_argument("--server", default=os.environ.get("LMSCOPE_SERVER"),
                      help="use this server instead of starting one")
    demo.set_defaults(handler=_demo)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        server = _server_extra("server")
        return server.main(argv[1:])
    if argv and argv[0] == "rpc-worker":
        return _server_extra("rpc").main(argv[1:])
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
