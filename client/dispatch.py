"""Batch work spread over servers: a bounded window of requests in flight, results in order, retries.

A server decodes one request per worker at a time, so a client that waits for each answer before sending
the next keeps exactly one worker of one server busy, however many servers the channel balances over.
`ordered_calls` keeps up to `max_in_flight` requests outstanding (threads of a small pool, each blocked in
one gRPC call; gRPC's round_robin hands consecutive calls to consecutive servers) and yields the answers in
the order of the requests, as soon as the next one in order is ready, so memory stays bounded by the
window rather than by the whole batch.

A request that fails because its server went away (UNAVAILABLE: connection refused or reset, worker
crashed, server shutting down) is sent again, after a short backoff, a bounded number of times. The pick
for the new attempt is the balancer's, so with several servers it lands on one that is still up. Only
idempotent reads go through here: a forward pass has no side effect, so sending it twice is harmless.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import grpc

from .errors import invalid_argument

Request = TypeVar("Request")
Answer = TypeVar("Answer")

log = logging.getLogger("lmscope.client")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
LOOKAHEAD = 4


def call_with_retries(call: Callable[[Request], Answer], request: Request, *, retries: int,
                      backoff_s: float = 0.1, describe: str = "request") -> Answer:
    """`call(request)`, sent again up to `retries` times when it fails with a retryable status.

    `call` raises an exception with a `code` attribute (LmscopeError) on failure. Backoff doubles from
    `backoff_s`, capped at 2 s: long enough for the balancer to notice a dead server, short enough not to
    stall a batch.
    """
    attempt = 0
    while True:
        try:
            return call(request)
        except Exception as error:  # noqa: BLE001 - only retryable statuses are caught below
            if getattr(error, "code", None) not in RETRYABLE or attempt >= retries:
                raise
            attempt += 1
            log.warning("%s failed (%s); retrying (attempt %d of %d)", describe, error, attempt + 1, retries + 1)
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 2.0))


def ordered_calls(call: Callable[[Request], Answer], requests: Iterable[Request], *, max_in_flight: int,
                  retries: int, describe: Callable[[int], str] = lambda i: f"request {i}") -> Iterator[Answer]:
    """Answers of `call(request)` for every request, in request order, with up to `max_in_flight` running.

    The pool runs `max_in_flight` calls at once; up to `LOOKAHEAD` times as many are queued behind them, so
    one slow request (or one waiting to be retried) does not idle the others while its successors wait to
    be yielded. Closing the iterator early (break, exception) cancels what has not started and waits for
    the calls already running.
    """
    if max_in_flight < 1:
        raise invalid_argument(f"max_in_flight must be >= 1, not {max_in_flight}")
    pending = enumerate(requests)
    window: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="lmscope-batch") as pool:
        def submit(count: int) -> None:
            for index, request in itertools.islice(pending, count):
                window.append(pool.submit(call_with_retries, call, request, retries=retries,
                                          describe=describe(index)))

        try:
            submit(max_in_flight * LOOKAHEAD)
            while window:
                answer = window.popleft().result()
                submit(1)
                yield answer
        finally:
            for future in window:
                future.cancel()
