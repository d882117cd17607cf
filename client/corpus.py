"""A text corpus every Python installation already holds: the Python Language Reference (`pydoc_data`).

SAEs and other dataset-scale analyses need tens of thousands of tokens of real text, and lmscope runs where
nothing can be downloaded at run time. CPython ships the reference documentation's topics as plain text in
its standard library (``pydoc_data/topics.py``, what ``help("assert")`` prints): about 465,000 characters
(~120,000 SmolLM2 tokens) of English technical prose with grammar rules and code examples, in every Python
from python.org, every distribution's package (Debian: libpython3.X-stdlib) and every virtual environment.

Licence: the Python documentation is distributed under the PSF License Agreement (version 2), which allows
use, copying and derived works with the copyright notice kept; its code examples are also under the Zero-Clause
BSD licence (docs.python.org/3/license.html). lmscope reads the text where Python installed it and commits no
copy. The text follows the running interpreter's version (3.11 here), so `corpus_digest` names the exact
text a store was collected from.
"""
from __future__ import annotations

import hashlib
import re

NAME = "Python Language Reference topics (pydoc_data.topics, PSF License v2)"


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def python_reference(max_chars: int = 600) -> list[str]:
    """The topics cut into passages of at most `max_chars` characters (about max_chars / 4 tokens), in topic
    order: paragraphs (blank-line separated) packed greedily; a longer paragraph is cut at line breaks, and a
    longer line at spaces. Passages keep their line breaks and the indentation of code."""
    if max_chars < 40:
        raise ValueError(f"max_chars must be at least 40, not {max_chars}")
    passages: list[str] = []
    for name in sorted(_topics()):
        current = ""
        for piece in _pieces(_topics()[name], max_chars):
            if current and len(current) + 2 + len(piece) > max_chars:
                passages.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
        if current:
            passages.append(current)
    return passages


def _pieces(text: str, max_chars: int):
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.rstrip()
        if not paragraph.strip():
            continue
        if len(paragraph) <= max_chars:
            yield paragraph
            continue
        line_block = ""
        for line in paragraph.split("\n"):
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                yield from ([line_block] if line_block else [])
                line_block = ""
                yield line[:cut]
                line = line[cut:].lstrip()
            if line_block and len(line_block) + 1 + len(line) > max_chars:
                yield line_block
                line_block = ""
            line_block = f"{line_block}\n{line}" if line_block else line
        if line_block:
            yield line_block


def corpus_digest() -> str:
    """sha256 of the topics' text (names and bodies in order): which Python's reference a store holds."""
    digest = hashlib.sha256()
    for name in sorted(_topics()):
        digest.update(name.encode() + b"\0" + _topics()[name].encode() + b"\0")
    return digest.hexdigest()
