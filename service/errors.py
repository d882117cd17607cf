"""The one exception type for a request the server refuses or cannot complete, and what a bug becomes.

`code` is a `Code`, one of `grpc.StatusCode`'s names (this module needs no grpc import); `message` says what to
fix. Code raises with `Code.INVALID_ARGUMENT` and the like, so a misspelt code fails where it is written
instead of reaching a client as UNKNOWN.

An unexpected exception (a bug) never reaches a client as text: `internal_error` logs it on the server with
its traceback under a short random id, and the client gets INTERNAL with one line naming that id, so that
a user can quote it and the operator can find the traceback in the server's log (stderr).
"""
from __future__ import annotations

import enum
import logging
import os
import sys
import traceback


class Code(str, enum.Enum):
    """grpc.StatusCode's names (tests/integration/test_internal_errors.py checks them against grpc), less OK
    and UNKNOWN: an error is never OK, and UNKNOWN says nothing a client could act on. A `str` so that it
    pickles across the worker pipe as itself and compares equal to its name."""
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"

    __str__ = str.__str__  # "INVALID_ARGUMENT" in messages, not "Code.INVALID_ARGUMENT"
    __format__ = str.__format__


log = logging.getLogger("lmscope.service")


class RequestError(Exception):
    def __init__(self, code: Code | str, message: str):
        code = Code(code)  # a name that is no status raises ValueError here: a bug, reported as one
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def internal_error(exc: BaseException, rpc: str) -> RequestError:
    """What the client gets for an unexpected exception `exc` while serving `rpc` (a method name of the
    Inspector service): INTERNAL with one line that names a fresh error id and the exception's type, never
    its text or traceback (they may hold file paths); the server's log gets both under the same id.

    A `RequestError` whose code is INTERNAL was raised on purpose for a state that should not happen: its
    message was written for the client, so it stays in the line (made one line); its traceback is logged too.
    """
    error_id = os.urandom(4).hex()  # not `secrets`: it loads OpenSSL, which workers keep out (test_wire_contract)
    _log_error(f"lmscope: internal error {error_id} ({type(exc).__name__}) while serving {rpc}", exc)
    if isinstance(exc, RequestError) and exc.code is Code.INTERNAL:
        what = f"while serving {rpc}: {' '.join(exc.message.split())}"
    else:
        what = f"({type(exc).__name__}) while serving {rpc}"
    return RequestError(Code.INTERNAL,
                        f"internal error {error_id} {what}; the server log has the details under this id")


def _log_error(line: str, exc: BaseException) -> None:
    if log.hasHandlers():  # the embedding program configured logging: its handlers decide where it goes
        log.error(line, exc_info=exc)
        return
    # No logging configured (the `lmscope serve` process, a worker): straight to stderr, which the server's
    # log is (a worker inherits its server's), traceback included. logging's own last resort would do the
    # same only while nobody has set `logging.lastResort` to None.
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{line}\n{text}")
    sys.stderr.flush()
