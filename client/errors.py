"""The client's one error type, `LmscopeError`, and the checks that raise it before a request is sent.

Every bad argument gives the same exception whether the client notices it (a layer index outside the model,
a dtype name) or the server does (a prompt too long for its context): `LmscopeError`, carrying the gRPC
status code the server would have used and a message that says what to fix. It is also a `ValueError`, so
code written against plain Python conventions catches it. Network and server failures (UNAVAILABLE,
DEADLINE_EXCEEDED, ...) arrive as `LmscopeError` too, with their own codes.

Codes, as on the server: OUT_OF_RANGE for an index or size outside what the model or server allows,
INVALID_ARGUMENT for anything malformed, NOT_FOUND for a name the model lacks.
"""
from __future__ import annotations

import grpc
import numpy as np


class LmscopeError(ValueError):
    """A call refused or not completed. `code` is the grpc.StatusCode, `message` says what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def invalid_argument(message: str) -> LmscopeError:
    return LmscopeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def out_of_range(message: str) -> LmscopeError:
    return LmscopeError(grpc.StatusCode.OUT_OF_RANGE, message)


def is_index(value) -> bool:
    """An int (numpy ints too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_layer(layer, n_layer: int, what: str = "layer") -> int:
    """A block index 0..n_layer-1; the same message for every argument that names a layer."""
    if not is_index(layer):
        raise invalid_argument(f"{what} {layer!r} is not a block index (an int)")
    if not 0 <= layer < n_layer:
        raise out_of_range(f"{what} {layer} is out of range: the model has {n_layer} blocks (0..{n_layer - 1})")
    return int(layer)


def check_index(value, size: int, what: str, of: str) -> int:
    """An index 0..size-1 of something the model has `size` of (heads, neurons, ...)."""
    if not is_index(value):
        raise invalid_argument(f"{what} {value!r} is not an index (an int)")
    if not 0 <= value < size:
        raise out_of_range(f"{what} {value} is out of range: the model has {size} {of} (0..{size - 1})")
    return int(value)
