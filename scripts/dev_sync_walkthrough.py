"""Keep examples/walkthrough.ipynb in sync with its single source, examples/walkthrough.py.

The walkthrough is written once, as a plain script in "percent" cell format (`# %%` starts a code cell,
`# %% [markdown]` a markdown cell whose lines start with `# `). This tool turns it into a notebook:

    python scripts/dev_sync_walkthrough.py            # rebuild the notebook (no outputs)
    python scripts/dev_sync_walkthrough.py --execute  # rebuild and run it with nbclient, saving outputs
    python scripts/dev_sync_walkthrough.py --check    # exit 1 if the notebook's cells differ from the script

The script itself runs top to bottom with `python examples/walkthrough.py` (CI does that).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "walkthrough.py"
NOTEBOOK = ROOT / "examples" / "walkthrough.ipynb"


def cells_of(source: str) -> list[nbformat.NotebookNode]:
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_of(SCRIPT.read_text(encoding="utf-8"))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="run the notebook and save its outputs")
    parser.add_argument("--check", action="store_true", help="fail if the notebook is out of sync")
    args = parser.parse_args()
    fresh = notebook()
    if args.check:
        current = nbformat.read(NOTEBOOK, as_version=4)
        same = [(c.cell_type, c.source) for c in current.cells] == [(c.cell_type, c.source) for c in fresh.cells]
        if not same:
            print(f"{NOTEBOOK.name} is out of sync with {SCRIPT.name}: "
                  f"run python scripts/dev_sync_walkthrough.py --execute")
        return 0 if same else 1
    if args.execute:
        from nbclient import NotebookClient

        NotebookClient(fresh, timeout=1800, resources={"metadata": {"path": str(SCRIPT.parent)}}).execute()
    nbformat.write(fresh, NOTEBOOK)
    print(f"wrote {NOTEBOOK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
