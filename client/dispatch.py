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

A request of several items (prompts) that the server refuses with RESOURCE_EXHAUSTED (its answer would
exceed `max_capture_bytes`, it has more prompts than `max_batch_prompts`, or its message is too large) is
sent again in parts when the caller says how to split it (`split`): halves, recursively, in the same worker
thread, so the window of requests in flight stays what it was and the answers stay in request order. One
item that is still refused raises the server's error.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import grpc

from .errors import invalid_argument, is_index

Request = TypeVar("Request")
Answer = TypeVar("Answer")

log = logging.getLogger("lmscope.client")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
SPLITTABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
LOOKAHEAD = 4


def check_batch_size(batch_size) -> int:
    """A number of prompts per request: an int >= 1 (`LmscopeError` otherwise)."""
    if not is_index(batch_size) or batch_size < 1:
        raise invalid_argument(f"batch_size must be a positive int (prompts per request), not {batch_size!r}")
    return int(batch_size)


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


def call_splitting(call: Callable[[Request], list], request: Request, *,
                   split: Callable[[Request], Sequence[Request] | None], retries: int,
                   describe: str = "request") -> list:
    """`call(request)` (a list, one answer per item of the request) as `call_with_retries` sends it; when the
    server refuses it with RESOURCE_EXHAUSTED and `split(request)` gives parts (None for a single item), the
    parts' answers concatenated in order, each part split again when it is refused too."""
    try:
        return call_with_retries(call, request, retries=retries, describe=describe)
    except Exception as error:  # noqa: BLE001 - only splittable statuses are handled below
        if getattr(error, "code", None) not in SPLITTABLE:
            raise
        parts = split(request)
        if not parts:
            raise
        log.info("%s was refused (%s); sending it in %d parts", describe, error, len(parts))
    answers = []
    for n, part in enumerate(parts):
        answers += call_splitting(call, part, split=split, retries=retries,
                                  describe=f"{describe}, part {n + 1} of {len(parts)}")
    return answers


def ordered_calls(call: Callable[[Request], Answer], requests: Iterable[Request], *, max_in_flight: int,
                  retries: int, describe: Callable[[int], str] = lambda i: f"request {i}",
                  split: Callable[[Request], Sequence[Request] | None] | None = None) -> Iterator[Answer]:
    """Answers of `call(request)` for every request, in request order, with up to `max_in_flight` running.

    With `split`, `call` answers a list per request, and a request refused with RESOURCE_EXHAUSTED is sent in
    the parts `split` makes (`call_splitting`); its answer is still one list, in the request's order.

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
                if split is None:
                    window.append(pool.submit(call_with_retries, call, request, retries=retries,
                                              describe=describe(index)))
                else:
                    window.append(pool.submit(call_splitting, call, request, split=split, retries=retries,
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
