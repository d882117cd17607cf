"""Write a tiny deterministic random-weight GGUF model of one family (see lmscope.service.testing).

Usage: python scripts/dev_make_tiny_model.py OUT.gguf
       [--family llama|qwen2|qwen3|gemma2|gemma3|phi3|mixtral|qwen2moe|qwen3moe] [--n-layer 4] [--n-embd 64]
       [--n-head 4] [--n-head-kv 2] [--n-ff 128] [--seed 0] [--tied | --untied (default: the family's)]
       [--weight-type f32|f16|q8_0] [--n-ctx-train 512] [--no-chat-template] [--massive-activation G]
"""
import argparse
import pathlib
import sys
import time

from lmscope.service.testing import FAMILIES, WEIGHT_TYPES, build_tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="path of the .gguf file to write")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-head-kv", type=int, default=2)
    parser.add_argument("--n-ff", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    tied = parser.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tied", action="store_true", help="no output.weight (use token_embd)")
    tied.add_argument("--untied", dest="tied", action="store_false", help="separate output.weight")
    parser.set_defaults(tied=None)
    parser.add_argument("--weight-type", choices=WEIGHT_TYPES, default="f32")
    parser.add_argument("--n-ctx-train", type=int, default=512)
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    parser.add_argument("--massive-activation", type=float, default=0.0,
                        help="plant a massive FFN activation at the first position (gain G, e.g. 10)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    try:
        path = build_tiny_model(
            args.out,
            family=args.family,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            n_head_kv=args.n_head_kv,
            n_ff=args.n_ff,
            seed=args.seed,
            tied=args.tied,
            weight_type=args.weight_type,
            n_ctx_train=args.n_ctx_train,
            chat_template=args.chat_template,
            massive_activation=args.massive_activation,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {path} ({path.stat().st_size} bytes) in {time.perf_counter() - t0:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
