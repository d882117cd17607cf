"""Fault injection against real lmscope servers, recording what the user sees and how the service recovers.

    .venv/bin/python scripts/diag_faults.py                                # print the report
    .venv/bin/python scripts/diag_faults.py --write docs/reliability.md    # and put it into the document

Every fault runs against its own `lmscope serve` on the tiny test model (built here), on localhost:
killed and crashing workers, garbage on the port, clients that vanish mid-stream, deadlines, a full queue,
broken model files, a model file that disappears, SIGTERM with requests in flight. For each, the report
gives what the user sees (status and message, or exit code and error line) and what happened next, and
whether that is the designed behaviour. With --write, the section between the markers
`<!-- faults:begin -->` and `<!-- faults:end -->` of the document is replaced.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmscope.client import Client, LmscopeError
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.proto.wire import lmscope_pb2_grpc as pb_grpc
from lmscope.service import procinfo
from lmscope.service.launch import launch_server
from lmscope.service.testing import build_tiny_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from exercise import endless_request  # noqa: E402  (a test helper: tests/exercise.py)

BASE_ARGS = ("--threads", "1", "--n-ctx", "4096")
PROMPT = "The capital of France is"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


@dataclass
class Outcome:
    fault: str
    user_sees: str
    afterwards: str
    as_designed: bool


def _status(error) -> str:
    code = error.code() if isinstance(error, grpc.RpcError) else error.code
    details = error.details() if isinstance(error, grpc.RpcError) else error.message
    return f"`{code.name}`: {details}"


def _health(address: str) -> str:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def _worker(server) -> int:
    return procinfo.worker_pids(server.process.pid)[0]


def _timed_run(address: str) -> float:
    started = time.monotonic()
    with Client(address, timeout=120) as client:
        client.run(PROMPT, layers=[0])
    return time.monotonic() - started


def _stream_started(address: str, request, timeout: float = 120):
    channel = grpc.insecure_channel(address)
    stream = pb_grpc.InspectorStub(channel).Generate(request, timeout=timeout)
    for _ in range(3):
        next(stream)
    return channel, stream


def _freed(idle: float, seconds: float) -> str:
    return f"the worker was idle {idle:.1f} s later (checked every 0.5 s); the next request took {seconds:.2f} s"


def _drain_error(stream):
    try:
        for _ in stream:
            pass
    except grpc.RpcError as error:
        return error
    return None


# ----- the faults ----------------------------------------------------------------------------------

def worker_killed(model, _folder) -> Outcome:
    with launch_server(model, args=BASE_ARGS) as server, Client(server.address, timeout=60) as client:
        _, stream = _stream_started(server.address, endless_request(client))
        old = _worker(server)
        os.kill(old, signal.SIGKILL)
        error = _drain_error(stream)
        seconds = _timed_run(server.address)
        new = _worker(server)
    return Outcome("a worker is killed (SIGKILL) in the middle of a streaming generation", _status(error),
                   f"next request served {seconds:.1f} s later by a new worker process ({old} -> {new})",
                   error is not None and error.code() == grpc.StatusCode.UNAVAILABLE and new != old)


def native_crash(model, _folder, how: str) -> Outcome:
    with launch_server(model, args=BASE_ARGS + ("--test-hooks",)) as server:
        old = _worker(server)
        request = pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)])
        stub = pb_grpc.InspectorStub(grpc.insecure_channel(server.address))
        try:
            list(stub.Run(request, metadata=(("lmscope-test-crash", how),), timeout=60))
            error = None
        except grpc.RpcError as exc:
            error = exc
        seconds = _timed_run(server.address)
        new = _worker(server)
    what = {"segv": "a segmentation fault", "abort": "an abort()"}[how]
    return Outcome(f"{what} inside the worker during a Run (test hook)", _status(error),
                   f"next request served {seconds:.1f} s later by a new worker ({old} -> {new})",
                   error is not None and error.code() == grpc.StatusCode.UNAVAILABLE and new != old)


def _http2_frames(data: bytes) -> list[str]:
    names = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE"}
    frames, offset = [], 0
    while offset + 9 <= len(data):
        length = struct.unpack(">I", b"\0" + data[offset:offset + 3])[0]
        frames.append(names.get(data[offset + 3], f"type {data[offset + 3]}"))
        offset += 9 + length
    return frames


def garbage_on_the_port(model, _folder) -> Outcome:
    payloads = {"4 KiB of random bytes": os.urandom(4096),
                "an HTTP/1.1 request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                "a valid HTTP/2 preface followed by garbage": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512)}
    seen = []
    with launch_server(model, args=BASE_ARGS) as server:
        host, port = server.address.rsplit(":", 1)
        worker = _worker(server)
        for name, payload in payloads.items():
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(payload)
                reply = b""
                try:
                    while chunk := sock.recv(4096):
                        reply += chunk
                except socket.timeout:
                    pass
            frames = _http2_frames(reply)
            seen.append(f"{name}: {len(reply)} bytes back ({', '.join(frames) or 'nothing'}), then the "
                        f"connection was closed")
        # A connection that sends a preface and then nothing stays open while others are served.
        idle = socket.create_connection((host, int(port)), timeout=5)
        idle.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        seconds = _timed_run(server.address)
        health = _health(server.address)
        same_worker = _worker(server) == worker
        idle.close()
    return Outcome("garbage bytes sent to the gRPC port", "; ".join(seen),
                   f"health {health}; a request during a half-open idle connection took {seconds:.2f} s; "
                   f"same worker: {same_worker}", health == "SERVING" and same_worker)


def client_cancels_stream(model, _folder) -> Outcome:
    with launch_server(model, args=BASE_ARGS) as server, Client(server.address, timeout=60) as client:
        channel, stream = _stream_started(server.address, endless_request(client))
        worker = _worker(server)
        stream.cancel()
        channel.close()
        idle = procinfo.seconds_until_idle(worker)
        seconds = _timed_run(server.address)
    return Outcome("the client cancels a streaming generation (4000 tokens asked) after 3 events",
                   "`CANCELLED` on the client side (its own cancel)",
                   _freed(idle, seconds),
                   idle < 5)


CLIENT_PROCESS = textwrap.dedent("""
    import sys
    from lmscope.client import Client
    from exercise import endless
    client = Client(sys.argv[1], timeout=120)
    for k, _ in enumerate(client.generate_stream("The capital of France is", max_tokens=4000,
                                                 interventions=endless(client))):
        if k == 3:
            print("streaming", flush=True)
""")


def client_process_killed(model, _folder) -> Outcome:
    with launch_server(model, args=BASE_ARGS) as server:
        process = subprocess.Popen([sys.executable, "-c", CLIENT_PROCESS, server.address], stdout=subprocess.PIPE,
                                   text=True)
        assert process.stdout.readline().strip() == "streaming"
        worker = _worker(server)
        process.kill()
        process.wait()
        idle = procinfo.seconds_until_idle(worker)
        seconds = _timed_run(server.address)
    return Outcome("the client process is killed (SIGKILL) mid-stream", "nothing (the client is gone)",
                   _freed(idle, seconds),
                   idle < 5)


def deadline_mid_generation(model, _folder) -> Outcome:
    with launch_server(model, args=BASE_ARGS) as server, Client(server.address, timeout=60) as client:
        request = endless_request(client)
        started = time.monotonic()
        try:
            list(pb_grpc.InspectorStub(grpc.insecure_channel(server.address)).Generate(request, timeout=0.5))
            error = None
        except grpc.RpcError as exc:
            error = exc
        answered = time.monotonic() - started
        idle = procinfo.seconds_until_idle(_worker(server))
        seconds = _timed_run(server.address)
    return Outcome("a 0.5 s client deadline on a 4000-token generation",
                   f"{_status(error)} after {answered:.2f} s",
                   _freed(idle, seconds),
                   error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and idle < 5)


def queue_full(model, _folder) -> Outcome:
    with launch_server(model, args=BASE_ARGS + ("--max-queue", "1")) as server, \
            Client(server.address, timeout=60) as client:
        request = endless_request(client)
        channel, running = _stream_started(server.address, request)
        queued = pb_grpc.InspectorStub(channel).Generate(request, timeout=60)
        time.sleep(1.0)
        started = time.monotonic()
        try:
            next(pb_grpc.InspectorStub(channel).Generate(request, timeout=60))
            error = None
        except grpc.RpcError as exc:
            error = exc
        answered = time.monotonic() - started
        health = _health(server.address)
        channel.close()
        del running, queued
    return Outcome("a third long request while one runs and one waits (--workers 1 --max-queue 1)",
                   f"{_status(error)} after {answered:.2f} s",
                   f"health checks meanwhile: {health}",
                   error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and health == "SERVING")


def _serve_exit(path: pathlib.Path) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lmscope.client.cli", "serve", "--model", str(path),
                             "--port", "0", *BASE_ARGS], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return result.returncode, lines[-1] if lines else result.stderr.strip()[-300:], time.monotonic() - started


def broken_model_files(model, folder) -> list[Outcome]:
    data = model.read_bytes()
    files = {
        "a GGUF truncated to 100 bytes (inside the metadata)": data[:100],
        "a GGUF truncated to half its size (inside the tensor data)": data[:len(data) // 2],
        "a GGUF missing only its last byte": data[:-1],
        "a text file named .gguf": b"this is not a model\n",
        "an empty file": b"",
        "random bytes": os.urandom(4096),
    }
    outcomes = []
    for name, content in files.items():
        path = folder / f"broken-{len(outcomes)}.gguf"
        path.write_bytes(content)
        code, line, seconds = _serve_exit(path)
        outcomes.append(Outcome(f"`lmscope serve` on {name}", f"exit code {code}, `{line}`",
                                f"the server exits after {seconds:.1f} s without serving", code == 2))
    code, line, seconds = _serve_exit(folder / "no-such-model.gguf")
    outcomes.append(Outcome("`lmscope serve` on a path that does not exist", f"exit code {code}, `{line}`",
                            f"exits after {seconds:.1f} s", code == 2))
    return outcomes


def model_file_vanishes(model, folder) -> Outcome:
    copy = folder / "vanishing.gguf"
    copy.write_bytes(model.read_bytes())
    with launch_server(copy, args=BASE_ARGS + ("--test-hooks",)) as server:
        copy.rename(folder / "moved.gguf")
        stub = pb_grpc.InspectorStub(grpc.insecure_channel(server.address))
        try:
            list(stub.Run(pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)]),
                          metadata=(("lmscope-test-crash", "segv"),), timeout=60))
        except grpc.RpcError:
            pass
        deadline = time.monotonic() + 30
        while _health(server.address) == "SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        health_down = _health(server.address)
        started = time.monotonic()
        try:
            _timed_run(server.address)
            error = None
        except LmscopeError as exc:
            error = exc
        answered = time.monotonic() - started
        (folder / "moved.gguf").rename(copy)
        restored = time.monotonic()
        while _health(server.address) != "SERVING" and time.monotonic() - restored < 60:
            time.sleep(0.2)
        back = time.monotonic() - restored
        seconds = _timed_run(server.address)
    return Outcome("the model file is moved away, then the worker crashes (it cannot be restarted)",
                   f"{_status(error)} after {answered:.2f} s; health {health_down}",
                   f"file put back: health SERVING again {back:.1f} s later, next request took {seconds:.2f} s",
                   error is not None and error.code == grpc.StatusCode.UNAVAILABLE and health_down == "NOT_SERVING")


def sigterm(model, _folder, grace: float, tokens: int) -> Outcome:
    server = launch_server(model, args=BASE_ARGS + ("--grace", str(grace)))
    with Client(server.address, timeout=120) as client:
        request = endless_request(client, max_tokens=tokens)
    channel, stream = _stream_started(server.address, request)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    received = 3
    error = None
    try:
        for _ in stream:
            received += 1
    except grpc.RpcError as exc:
        error = exc
    code = server.process.wait(60)
    seconds = time.monotonic() - started
    channel.close()
    seen = _status(error) if error else f"the whole generation ({received} events, start and end included)"
    return Outcome(f"SIGTERM during a {tokens}-token generation, --grace {grace:g}", seen,
                   f"the server exited with code {code} {seconds:.1f} s after the signal",
                   code == 0 and (error is None) == (grace > 5))


def run_all(model: pathlib.Path, folder: pathlib.Path) -> list[Outcome]:
    steps = [
        lambda: [worker_killed(model, folder)],
        lambda: [native_crash(model, folder, "segv"), native_crash(model, folder, "abort")],
        lambda: [garbage_on_the_port(model, folder)],
        lambda: [client_cancels_stream(model, folder), client_process_killed(model, folder)],
        lambda: [deadline_mid_generation(model, folder)],
        lambda: [queue_full(model, folder)],
        lambda: broken_model_files(model, folder),
        lambda: [model_file_vanishes(model, folder)],
        lambda: [sigterm(model, folder, grace=30, tokens=300), sigterm(model, folder, grace=1, tokens=4000)],
    ]
    outcomes = []
    for step in steps:
        for outcome in step():
            print(f"[{'ok' if outcome.as_designed else 'NOT AS DESIGNED'}] {outcome.fault}", flush=True)
            outcomes.append(outcome)
    return outcomes


def markdown(outcomes: list[Outcome], seconds: float) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [f"| {cell(o.fault)} | {cell(o.user_sees)} | {cell(o.afterwards)} | {'yes' if o.as_designed else '**no**'} |"
            for o in outcomes]
    return "\n".join([
        f"Generated by `.venv/bin/python scripts/diag_faults.py --write docs/reliability.md` "
        f"({time.strftime('%Y-%m-%d')}, {seconds:.0f} s, tiny test model, llama-cpp-python "
        f"{_llama_version()}).",
        "",
        "| fault | what the user sees | afterwards | as designed |",
        "| --- | --- | --- | --- |",
        *rows,
    ])


def _llama_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", help="replace the faults section of this markdown file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        model = build_tiny_model(folder / "tiny.gguf", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128)
        outcomes = run_all(model, folder)
        report = markdown(outcomes, time.monotonic() - started).replace(str(folder), "<tmp>")
    print("\n" + report)
    if args.write:
        document = pathlib.Path(args.write)
        text = document.read_text()
        if BEGIN not in text or END not in text:
            sys.exit(f"error: {document} has no {BEGIN} ... {END} section")
        head, rest = text.split(BEGIN, 1)
        document.write_text(head + BEGIN + "\n" + report + "\n" + END + rest.split(END, 1)[1])
    return 0 if all(o.as_designed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
