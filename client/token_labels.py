"""Readable labels for tokens, one per token, for plot axes and tables.

A byte-level BPE vocabulary often splits one character over several tokens: SmolLM2 cuts "兩" (UTF-8
``e5 85 a9``) into the tokens ``e5 85`` and ``a9``. Decoding each piece on its own then shows replacement
characters. Here every token is labelled with the character(s) its bytes belong to, and a token that
holds only part of a character says which part: ``兩[1/2]``, ``兩[2/2]``. Control characters are escaped
(``\\n``) so that a label stays on one line.

>>> token_labels([b"The", b" cat", "兩".encode()[:2], "兩".encode()[2:], b"\\n"])
['The', ' cat', '兩[1/2]', '兩[2/2]', '\\\\n']
"""
from __future__ import annotations

from typing import Sequence


def token_labels(pieces: Sequence[bytes]) -> list[str]:
    data = b"".join(pieces)
    starts, offset = [], 0
    for piece in pieces:
        starts.append(offset)
        offset += len(piece)
    # Characters as (start byte, end byte, text); undecodable bytes become one "character" each.
    chars: list[tuple[int, int, str]] = []
    i = 0
    while i < len(data):
        for width in (1, 2, 3, 4):
            try:
                text = data[i:i + width].decode("utf-8")
            except UnicodeDecodeError:
                continue
            chars.append((i, i + width, text))
            i += width
            break
        else:
            chars.append((i, i + 1, f"\\x{data[i]:02x}"))
            i += 1
    spans = [(start, start + len(piece)) for piece, start in zip(pieces, starts)]
    labels = []
    for start, end in spans:
        parts = []
        for c_start, c_end, text in chars:
            if c_end <= start or c_start >= end:
                continue
            if c_start >= start and c_end <= end:
                parts.append(_visible(text))
            else:  # the token holds a slice of this character's bytes: say which one
                sharing = [s for s in spans if s[0] < c_end and s[1] > c_start and s[1] > s[0]]
                parts.append(f"{text}[{sharing.index((start, end)) + 1}/{len(sharing)}]")
        labels.append("".join(parts))
    return labels

def _visible(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode() for ch in text)


def snippet(pieces: Sequence[bytes], index: int) -> str:
    """The text of `pieces` with token `index` marked as ``[[...]]``, on one line.

    The mark widens to whole characters when the token holds part of one, and characters cut by the
    window's edges are dropped.

    >>> snippet([b" the", b" cat", b" sat"], 1)
    ' the[[ cat]] sat'
    """
    data = b"".join(pieces)
    start = sum(len(p) for p in pieces[:index])
    end = start + len(pieces[index])
    while 0 < start < len(data) and _is_continuation(data[start]):
        start -= 1
    while end < len(data) and _is_continuation(data[end]):
        end += 1
    first = 0
    while first < start and _is_continuation(data[first]):
        first += 1

    def text(chunk: bytes) -> str:
        return _visible(chunk.decode("utf-8", "ignore"))

    return f"{text(data[first:start])}[[{text(data[start:end])}]]{text(data[end:])}"


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80
