"""Model worker processes and their supervisor.

llama.cpp is native code: an abort or a segfault inside it kills the process it runs in. So the gRPC front
end never loads a model itself. Each worker process owns one `Engine` (model + contexts) and serves one
request at a time over a pipe; the `WorkerPool` in the front end hands requests to idle workers, queues
the rest up to a limit, and watches the worker while it works:

- the client went away or its deadline passed: the worker's cancel flag is set, and the engine stops
  between ubatches / generated tokens and answers CANCELLED;
- the worker died (signal, abort): the request fails with UNAVAILABLE and a message that says so, and a
  fresh worker is started in the background, so the next request succeeds. A worker that cannot be
  restarted (the model file changed or vanished) is retried with growing pauses; while no worker is alive
  requests fail at once with UNAVAILABLE instead of waiting, and `on_health(False)` is reported.
- a worker that ignores a cancel for `_CANCEL_GRACE_S` (stuck inside one long native call) is killed and
  replaced, so a runaway request cannot hold a worker for ever.

Queue accounting: a request is admitted when a worker is idle or fewer than `max_queue` requests are
already waiting; past that it is refused with RESOURCE_EXHAUSTED at once.

What travels, and how: `service/pipe.py` (one job in; items, then "done" or "error", out).

Big answers cost their size once. Tensors leave the worker as `TensorPiece`s of at most `PIECE_BYTES` (views
of its memory; logits straight from llama.cpp's output buffer as each ubatch is decoded, see
`Operations.emit`), and the front end turns each piece into gRPC chunks as it arrives. A reader thread per
request (`WorkerPool.messages`) takes the worker's messages off the pipe into a queue (`_Inbox`) that it
keeps to a few pieces while the client reads: the front end never holds a whole big answer. A stalled
client stops holding the reader back after a moment: it then holds memory in the front end (at most the
answer), never a worker.

Workers are plain subprocesses (`python -c ... lmscope.service.worker ...`) on a socket pair: multiprocessing's
spawn would also start its resource-tracker process (13 MB resident, for nothing here). The cancel flag is one
byte of a small file both processes map: the front end clears it before it sends a job and sets it to cancel
that job, so a cancel can neither arrive before its job nor outlive it (a signal could do both).
"""
from __future__ import annotations

import collections
import itertools
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Callable, Iterator

from . import heap
from .contracts import PIECE_BYTES, Job, RunResult, TensorPiece, Tensors, WorkerInfo, tensor_pieces
from .errors import Code, RequestError, internal_error
from .pipe import Kind, receive_message, send_message

# llama.cpp's CPU back end runs on OpenMP, and a worker leaves a parallel region at every graph node (~900 per
# decode of SmolLM2). libgomp's idle threads then spin before they sleep: 300,000 times by default, which steals
# the cores from everything else whenever more threads want them than there are (2 cores at load 10-15,
# SmolLM2: 128-token all-layer capture 7.3-10.6 s spinning vs 1.7-2.3 s passive; generation 0.7-4.5 vs 30-53
# tok/s). Not spinning at all costs a futex sleep and wake-up per node instead, which on an idle machine was
# most of a generated token's time: SmolLM2 through the server, 2 threads on 2 cores, 35 tok/s passive
# against 136 with a spin of 1,000, and every hidden state of 128 tokens 154 vs 144 ms. At load 10 the short
# spin costs generation 8 against 10-12 tok/s and leaves the capture as it is (1.07-1.16 vs 1.10-1.26 s); two
# workers of 2 threads on 2 cores, 20 requests at once, took 2.64 s with it against 2.43 passive, so workers
# that outnumber the cores between them wait passively. A setting the user made is kept.
OPENMP_SPIN_COUNT = "1000"


def openmp_wait_settings(environ: dict[str, str], n_threads: int, n_workers: int) -> dict[str, str]:
    """The libgomp variables a worker is started with, read when it loads llama.cpp."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    if n_threads * n_workers > (os.cpu_count() or 1):
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}


def wait_as_one_worker() -> None:
    """This process's OpenMP waits as one worker's on every core (benchmarks and diagnostics, for llama.cpp and
    torch alike); before either loads OpenMP, which reads the variables once."""
    os.environ.update(openmp_wait_settings(os.environ, n_threads=os.cpu_count() or 1, n_workers=1))


_CANCEL_GRACE_S = 10.0
_RESTART_PAUSES_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # before each restart attempt; the last one repeats


def rpc_name(job) -> str:
    """The Inspector method a job serves, for error reports (`CrashJob` is a Run's test hook)."""
    name = type(job).__name__
    return {"WeightsJob": "GetWeights", "CrashJob": "Run"}.get(name, name.removesuffix("Job"))


def _send_answer(conn, result) -> None:
    """(Kind.DONE, result), its tensors sent ahead as pieces so that the front end can stream them on."""
    if isinstance(result, (RunResult, Tensors)):
        for tensor in result.tensors:
            for piece in tensor_pieces(tensor.name, tensor.sequence, tensor.array.shape, tensor.array):
                send_message(conn, (Kind.ITEM, piece))
        result.tensors = []
    send_message(conn, (Kind.DONE, result))


# Not `python -m lmscope.service.worker`: run as __main__, this module's functions would pickle under that name.
_WORKER_COMMAND = ("import sys; from lmscope.service.worker import _worker_main; "
                   "_worker_main(int(sys.argv[1]), int(sys.argv[2]))")


def _worker_main(fd: int, cancel_fd: int) -> None:
    """A worker process: load the model named by the first message, then answer jobs until the pipe closes.
    `cancel_fd`: the file whose first byte the front end sets to cancel the running job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when workers stop
    conn = Connection(fd)
    cancel_flag = mmap.mmap(cancel_fd, 1)
    try:
        config, test_hooks = receive_message(conn)
        from .engine import Engine
        from .operations import Operations

        engine = Engine(config)
        ops = Operations(engine, test_hooks=test_hooks, emit=lambda item: send_message(conn, (Kind.ITEM, item)))
        engine.set_cancel(lambda: cancel_flag[0] != 0)
        send_message(conn, (Kind.READY, ops.info()))
    except RequestError as exc:
        send_message(conn, (Kind.ERROR, exc.code, exc.message))
        return
    except BaseException as exc:  # noqa: BLE001 - report any start-up failure to the supervisor
        send_message(conn, (Kind.ERROR, Code.FAILED_PRECONDITION, f"the model could not be loaded: {exc}"))
        return
    from .engine import Cancelled

    while True:
        try:
            job = receive_message(conn)
        except EOFError:
            return
        try:
            result = ops.execute(job)
            if isinstance(result, Iterator):
                for item in result:
                    send_message(conn, (Kind.ITEM, item))
                send_message(conn, (Kind.DONE, None))
            else:
                _send_answer(conn, result)
            result = item = None  # not alive next to the next job's answer while it waits and runs
        except Cancelled:
            send_message(conn, (Kind.ERROR, Code.CANCELLED, "the request was cancelled"))
        except Exception as exc:  # noqa: BLE001 - a bug must fail one request, not the worker
            if not isinstance(exc, RequestError) or exc.code is Code.INTERNAL:
                exc = internal_error(exc, rpc_name(job))  # logged here with its traceback, one line to the client
            send_message(conn, (Kind.ERROR, exc.code, exc.message))
        heap.return_free_memory()


class _Worker:
    def __init__(self, config, test_hooks: bool, index: int, n_workers: int):
        self.config = config
        self.test_hooks = test_hooks
        self.index = index
        self.n_workers = n_workers
        self.info: WorkerInfo | None = None
        self._start()

    def _start(self) -> None:
        env = dict(os.environ)
        n_threads = self.config.n_threads or os.cpu_count() or 1
        env.update(openmp_wait_settings(env, n_threads, self.n_workers))
        # numpy's BLAS (the lens's products) takes every core unless told: with several workers, their BLAS
        # threads outnumber the cores and wait on each other (docs/gotchas.md: two SmolLM2 lenses at once on
        # 2 cores, 18.4 s each oversubscribed, 4.5 s with the cores shared).
        env.setdefault("OPENBLAS_NUM_THREADS", str(n_threads))
        ours, theirs = socket.socketpair()
        flag_file = tempfile.TemporaryFile()
        try:
            flag_file.write(b"\0")
            flag_file.flush()
            self._cancel_flag = mmap.mmap(flag_file.fileno(), 1)
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_COMMAND, str(theirs.fileno()), str(flag_file.fileno())],
                pass_fds=[theirs.fileno(), flag_file.fileno()], env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            flag_file.close()  # the mapping (and the worker's) keeps it
        self.conn = Connection(ours.detach())
        send_message(self.conn, (self.config, self.test_hooks))

    def alive(self) -> bool:
        return self.process.poll() is None

    def start_job(self, job) -> None:
        """Send a job, its cancel flag cleared first."""
        self._cancel_flag[0] = 0
        send_message(self.conn, job)

    def cancel(self) -> None:
        """Ask the worker to stop its job at the next ubatch or generated token."""
        try:
            self._cancel_flag[0] = 1
        except ValueError:  # stopped meanwhile (the server is shutting down): nothing left to cancel
            pass

    def wait_ready(self, timeout: float) -> WorkerInfo:
        if not self.conn.poll(timeout):
            raise RequestError(Code.UNAVAILABLE, f"the model worker did not start within {timeout:.0f} s")
        try:
            message = receive_message(self.conn)
        except EOFError:
            raise RequestError(Code.FAILED_PRECONDITION, f"the model worker died while loading the model "
                                                      f"(exit code {self._exit_code()})") from None
        if message[0] is Kind.ERROR:
            raise RequestError(message[1], message[2])
        self.info = message[1]
        return self.info

    def _exit_code(self):
        try:
            return self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def restart(self) -> None:
        self.stop()
        self._start()
        self.wait_ready(timeout=600)

    def stop(self) -> None:
        if self.alive():
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()
        self._cancel_flag.close()

    def crash_message(self) -> str:
        code = self._exit_code()
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return (f"the model worker crashed ({how}) while running this request; "
                f"a new worker is starting, retry the request")


class _Inbox:
    """One answer's messages between the thread reading the worker and the thread sending to the client.

    The reader waits while more than QUEUED_BYTES of tensor pieces are waiting here, so that a client that
    keeps reading holds the front end's share of a big answer near that (the worker then waits on its pipe,
    which costs it nothing: the answer is computed). A client that takes nothing for `STALLED_CLIENT_S` stops
    holding the reader back: the rest of the answer queues here and the worker is free for others.
    """

    QUEUED_BYTES = 2 * PIECE_BYTES
    STALLED_CLIENT_S = 2.0

    def __init__(self) -> None:
        self._messages: collections.deque = collections.deque()
        self._bytes = 0
        self._taken_at = time.monotonic()
        self._stalled = False
        self._changed = threading.Condition()

    def put(self, message) -> None:
        with self._changed:
            self._messages.append(message)
            self._bytes += _piece_bytes(message)
            self._changed.notify_all()

    def get(self):
        with self._changed:
            while not self._messages:
                self._changed.wait()
            message = self._messages.popleft()
            self._bytes -= _piece_bytes(message)
            self._taken_at = time.monotonic()
            self._changed.notify_all()
            return message

    def wait_for_room(self, give_up: Callable[[], bool]) -> None:
        with self._changed:
            waiting_since = time.monotonic()  # a client is stalled when it takes nothing while the queue is full
            while self._bytes > self.QUEUED_BYTES and not self._stalled and not give_up():
                if time.monotonic() - max(self._taken_at, waiting_since) > self.STALLED_CLIENT_S:
                    self._stalled = True
                    return
                self._changed.wait(0.05)


def _piece_bytes(message) -> int:
    return message[1].array.nbytes if message[0] is Kind.ITEM and isinstance(message[1], TensorPiece) else 0


class WorkerPool:
    """A fixed set of workers, a bounded queue, and supervision of each request."""

    def __init__(self, config, n_workers: int = 1, max_queue: int = 64, test_hooks: bool = False,
                 start_timeout: float = 600.0, on_health: Callable[[bool], None] = lambda serving: None):
        self.config = config
        self.max_queue = max_queue
        self._on_health = on_health
        self._workers = [_Worker(config, test_hooks, i, n_workers) for i in range(n_workers)]
        try:
            infos = [w.wait_ready(start_timeout) for w in self._workers]
        except BaseException:
            self.close()
            raise
        self.info = infos[0]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for worker in self._workers:
            self._idle.put(worker)
        self._waiting = 0
        self._failed = 0  # dead workers whose restart failed (and is being retried)
        self._restart_error = ""
        self._lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        return len(self._workers)

    def _check_available(self) -> None:
        if self._closed:
            raise RequestError(Code.UNAVAILABLE, "the server is shutting down")
        if self._failed == self.size:
            raise RequestError(Code.UNAVAILABLE, f"no model worker is running: restarting it failed "
                                              f"({self._restart_error}); the server keeps retrying")

    def _acquire(self, is_active: Callable[[], bool]) -> _Worker:
        with self._lock:
            self._check_available()
            queued = self._waiting - self._idle.qsize()
            if queued >= self.max_queue:
                raise RequestError(Code.RESOURCE_EXHAUSTED,
                                   f"the server is busy: {self.size} worker(s) working and {max(queued, 0)} "
                                   f"requests queued (limit {self.max_queue}); retry later")
            self._waiting += 1
        try:
            while True:
                try:
                    return self._idle.get(timeout=0.1)
                except queue.Empty:
                    if not is_active():
                        raise RequestError(Code.CANCELLED, "the request was cancelled while queued") from None
                    self._check_available()
        finally:
            with self._lock:
                self._waiting -= 1

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if healthy:
            self._idle.put(worker)
            return

        def replace():
            failed = False
            for attempt in itertools.count():
                time.sleep(_RESTART_PAUSES_S[min(attempt, len(_RESTART_PAUSES_S) - 1)])
                if self._closed:
                    return
                try:
                    worker.restart()
                    break
                except RequestError as exc:
                    with self._lock:
                        self._restart_error = exc.message
                        if not failed:
                            failed = True
                            self._failed += 1
                            if self._failed == self.size:
                                self._on_health(False)
            if self._closed:  # closed while the new worker was starting
                worker.stop()
                return
            if failed:
                with self._lock:
                    if self._failed == self.size:
                        self._on_health(True)
                    self._failed -= 1
            self._idle.put(worker)
        threading.Thread(target=replace, name="lmscope-worker-restart", daemon=True).start()

    def call(self, job: Job, is_active: Callable[[], bool] = lambda: True):
        """Run a job whose whole answer is one small message (Tokenize, Detokenize) and return it."""
        return next(value for kind, value in self.messages(job, is_active) if kind is Kind.DONE)

    def stream(self, job: Job, is_active: Callable[[], bool] = lambda: True) -> Iterator:
        """Run a job whose answer is a stream (Generate), yielding its items."""
        for kind, value in self.messages(job, is_active):
            if kind is Kind.ITEM:
                yield value

    def messages(self, job: Job, is_active: Callable[[], bool] = lambda: True) -> Iterator[tuple[str, object]]:
        """The job's (Kind.ITEM, value) messages, then (Kind.DONE, answer); a refusal or failure raises RequestError.

        The worker's messages are read by a thread of their own and queued (`_Inbox`); this generator yields
        them at its consumer's (the client's) pace. Closing it early (the client went away) cancels the job; the
        reader then discards the rest of the answer and hands the worker back.
        """
        worker = self._acquire(is_active)
        inbox = _Inbox()
        abandoned = threading.Event()
        threading.Thread(target=self._read_answer, args=(worker, job, is_active, abandoned, inbox),
                         name="lmscope-answer-reader", daemon=True).start()
        try:
            while True:
                kind, value = inbox.get()
                if kind is Kind.RAISE:
                    raise value
                yield kind, value
                if kind is Kind.DONE:
                    return
        finally:
            abandoned.set()

    def _read_answer(self, worker: _Worker, job: Job, is_active: Callable[[], bool], abandoned: threading.Event,
                     inbox: _Inbox) -> None:
        healthy = False
        try:
            try:
                worker.start_job(job)
            except (BrokenPipeError, OSError):
                raise RequestError(Code.UNAVAILABLE, worker.crash_message()) from None
            cancelled_at = None
            gone = lambda: abandoned.is_set() or not is_active()  # noqa: E731
            while True:
                if cancelled_at is None:
                    inbox.wait_for_room(give_up=gone)
                    if gone():
                        worker.cancel()
                        cancelled_at = time.monotonic()
                if not worker.conn.poll(0.05):
                    if not worker.alive():
                        raise RequestError(Code.UNAVAILABLE, worker.crash_message())
                    if cancelled_at is not None and time.monotonic() - cancelled_at > _CANCEL_GRACE_S:
                        raise RequestError(Code.CANCELLED, "the request was cancelled; the worker was restarted")
                    continue
                try:
                    message = receive_message(worker.conn)
                except (EOFError, OSError):
                    raise RequestError(Code.UNAVAILABLE, worker.crash_message()) from None
                if message[0] is Kind.ERROR:
                    healthy = True
                    raise RequestError(message[1], message[2])
                if not abandoned.is_set():
                    inbox.put(message)
                if message[0] is Kind.DONE:
                    healthy = True
                    return
        except RequestError as exc:
            inbox.put((Kind.RAISE, exc))
        except BaseException as exc:  # noqa: BLE001 - the consumer must hear of any failure, never wait for ever
            inbox.put((Kind.RAISE, internal_error(exc, rpc_name(job))))
        finally:
            self._release(worker, healthy)

    def close(self) -> None:
        self._closed = True
        for worker in self._workers:
            worker.stop()

