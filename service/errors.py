"""The one exception type for a request the server refuses or cannot complete, and what a bug becomes.

`code` is the name of a `grpc.StatusCode` (a string, so the exception pickles across the worker pipe and
this module needs no grpc import); `message` says what to fix. A code that is not a status name is refused
when the error is made, so a typo fails loudly (as a bug, see below) instead of reaching a client as UNKNOWN.

An unexpected exception (a bug) never reaches a client as text: `internal_error` logs it on the server with
its traceback under a short random id, and the client gets INTERNAL with one line naming that id, so that
a user can quote it and the operator can find the traceback in the server's log (stderr).
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

# grpc.StatusCode's names (tests/test_internal_errors.py checks them against grpc), less OK and UNKNOWN: an
# error is never OK, and UNKNOWN says nothing a client could act on.
STATUS_CODES = ("CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")

log = logging.getLogger("lmscope.service")


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        if code not in STATUS_CODES:
            raise ValueError(f"RequestError code {code!r} is not one of {', '.join(STATUS_CODES)}")
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
    if isinstance(exc, RequestError) and exc.code == "INTERNAL":
        what = f"while serving {rpc}: {' '.join(exc.message.split())}"
    else:
        what = f"({type(exc).__name__}) while serving {rpc}"
    return RequestError("INTERNAL", f"internal error {error_id} {what}; the server log has the details under this id")


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
