"""Regenerate the family x site table of docs/architectures.md from the architecture registry.

Usage: python scripts/dev_gen_architectures_table.py [--check] [PAGE]   (default: docs/architectures.md)

The table sits between two marker comments (`lmscope.service.site_table.BEGIN` / `END`); everything else on
the page is left alone. `--check` writes nothing and exits with status 1 when the page is stale (the test
suite checks the same).
"""
import argparse
import pathlib
import sys

from lmscope.service import site_table

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", type=pathlib.Path, default=ROOT / "docs" / "architectures.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs, write nothing")
    args = parser.parse_args(argv)
    old = args.page.read_text(encoding="utf-8")
    new = site_table.rewrite(old)
    if args.check:
        if new != old:
            print(f"{args.page} is stale: run python scripts/dev_gen_architectures_table.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.page.write_text(new, encoding="utf-8")
        print(f"rewrote the table in {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
