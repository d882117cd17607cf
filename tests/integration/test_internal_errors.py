"""No request answers UNKNOWN, and INTERNAL only with an error id (issue #22).

An unexpected exception in a worker, in the pool's reader thread or in the front end reaches the client as
INTERNAL with one line naming a random error id and the exception's type; the traceback, with its file
paths and the exception's text, goes to the server's log under the same id (`errors.internal_error`). A
`RequestError` with a code that is not a gRPC status name cannot be made, so a typo cannot become UNKNOWN.
"""
from __future__ import annotations

import logging
import pickle
import re
import time

import grpc
import pytest
from reliability_support import PROMPT, only_worker, stub

from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.service import errors, servicer
from lmscope.service.errors import RequestError, internal_error
from lmscope.service.worker import rpc_name

CRASH_METADATA = "lmscope-test-crash"
ONE_LINE = re.compile(r"^internal error ([0-9a-f]{8}) \((\w+)\) while serving (\w+); "
                      r"the server log has the details under this id$")


def test_status_codes_are_the_grpc_names_an_error_may_carry():
    assert {c.value for c in errors.Code} == {c.name for c in grpc.StatusCode} - {"OK", "UNKNOWN"}


@pytest.mark.parametrize("code", ["INVALID_ARGUMNET", "invalid_argument", "OK", "UNKNOWN", "", "StatusCode.INTERNAL"])
def test_a_request_error_refuses_a_code_that_is_not_a_status_name(code):
    with pytest.raises(ValueError, match="is not a valid Code"):
        RequestError(code, "a message")


def test_a_request_error_pickles_across_the_worker_pipe():
    again = pickle.loads(pickle.dumps(RequestError("OUT_OF_RANGE", "position 9 is outside")))
    assert (again.code, again.message, str(again)) == ("OUT_OF_RANGE", "position 9 is outside",
                                                       "OUT_OF_RANGE: position 9 is outside")


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - a traceback to log
        return caught


def test_internal_error_logs_the_traceback_and_gives_the_client_one_line(caplog):
    caplog.set_level(logging.ERROR, logger="lmscope.service")
    error = internal_error(_raised(ValueError("cannot read /srv/models/secret.gguf\nline two")), "Run")
    assert error.code == "INTERNAL"
    match = ONE_LINE.match(error.message)
    assert match and match.group(2, 3) == ("ValueError", "Run"), error.message
    (record,) = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert record.exc_info[0] is ValueError and "/srv/models" not in error.message
    assert "Traceback" in caplog.text and "secret.gguf" in caplog.text
    assert internal_error(_raised(ValueError()), "Run").message[:23] != error.message[:23]  # a fresh id each time


def test_a_deliberate_internal_error_keeps_its_message_in_one_line(caplog):
    caplog.set_level(logging.ERROR, logger="lmscope.service")
    error = internal_error(_raised(RequestError("INTERNAL", "llama_decode failed\nwith status 1")), "Generate")
    assert re.match(r"^internal error [0-9a-f]{8} while serving Generate: llama_decode failed with status 1; "
                    r"the server log has", error.message), error.message


def test_internal_error_without_logging_configured_writes_to_stderr(capsys, monkeypatch):
    monkeypatch.setattr(errors.log, "hasHandlers", lambda: False)
    error = internal_error(_raised(KeyError("x")), "Tokenize")
    error_id = ONE_LINE.match(error.message).group(1)
    err = capsys.readouterr().err
    assert f"lmscope: internal error {error_id} (KeyError) while serving Tokenize\nTraceback" in err


def test_jobs_name_their_rpc():
    from lmscope.service import contracts

    assert rpc_name(contracts.WeightsJob("t", 0, [], False)) == "GetWeights"
    assert rpc_name(contracts.TokenizeJob("t", False, False, False)) == "Tokenize"
    assert rpc_name(contracts.CrashJob("raise")) == "Run"


class _Aborted(Exception):
    pass


class _Context:
    def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted()


@pytest.mark.parametrize("streaming", [False, True])
def test_the_front_end_turns_its_own_bugs_into_an_error_id(streaming, caplog):
    caplog.set_level(logging.ERROR, logger="lmscope.service")

    def Tokenize(self, request, context):  # noqa: N802 - an Inspector method name
        raise TypeError("bad operand in /usr/lib/python3/site-packages/x.py")

    def Run(self, request, context):  # noqa: N802
        yield pb.RunChunk()
        raise TypeError("bad operand in /usr/lib/python3/site-packages/x.py")

    handler = servicer._statuses(Run if streaming else Tokenize)
    context = _Context()
    with pytest.raises(_Aborted):
        result = handler(None, None, context)
        if streaming:
            list(result)
    assert context.code == grpc.StatusCode.INTERNAL
    match = ONE_LINE.match(context.details)
    assert match and match.group(2, 3) == ("TypeError", "Run" if streaming else "Tokenize"), context.details
    assert match.group(1) in caplog.text and "site-packages/x.py" in caplog.text


def test_the_front_end_passes_request_errors_on_with_their_code():
    def Detokenize(self, request, context):  # noqa: N802
        raise RequestError("OUT_OF_RANGE", "token id 900 is outside the vocabulary")

    context = _Context()
    with pytest.raises(_Aborted):
        servicer._statuses(Detokenize)(None, None, context)
    assert (context.code, context.details) == (grpc.StatusCode.OUT_OF_RANGE, "token id 900 is outside the vocabulary")


def test_a_worker_bug_reaches_the_client_as_an_id_and_the_log_as_a_traceback(tiny_server):
    """The `raise` test hook makes the worker raise a RuntimeError whose text names a file path."""
    worker = only_worker(tiny_server)
    request = pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)])
    with pytest.raises(grpc.RpcError) as caught:
        list(stub(tiny_server.address).Run(request, metadata=((CRASH_METADATA, "raise"),), timeout=60))
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    match = ONE_LINE.match(error.details())
    assert match and match.group(2, 3) == ("RuntimeError", "Run"), error.details()
    assert "/" not in error.details() and "\n" not in error.details()
    error_id = match.group(1)

    deadline = time.monotonic() + 10
    while not any("operations.py" in line for line in tiny_server.log) and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's output reaches the log through a pipe and a thread
    log = list(tiny_server.log)
    (start,) = [i for i, line in enumerate(log) if f"internal error {error_id}" in line]
    assert log[start] == f"lmscope: internal error {error_id} (RuntimeError) while serving Run"
    assert log[start + 1] == "Traceback (most recent call last):"
    tail = log[start + 2:start + 40]
    assert any(re.search(r"RuntimeError: test hook: an unexpected error in /\S+operations\.py", line) for line in tail)

    assert only_worker(tiny_server) == worker  # a bug fails one request, not the worker
    assert list(stub(tiny_server.address).Run(request, timeout=60))
