"""Start `lmscope serve` as a child process and wait until it is ready.

Used by the test suite, the demo, the examples and the benchmarks, so that all of them exercise the real
server over a real gRPC channel:

    with launch_server(model="tiny.gguf") as server:
        client = Client(server.address)

`port=0` lets the operating system pick a free port; the server prints the address it bound in its ready
line, which is parsed here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

_READY = re.compile(r"^lmscope serving .* on (\S+) \[")


class LaunchError(RuntimeError):
    pass


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    log: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch_server(model: str | os.PathLike | None = None, *, port: int = 0, host: str | None = "127.0.0.1",
                  args: tuple[str, ...] = (), env: dict | None = None, timeout: float = 300.0) -> ServerProcess:
    """`host=None` leaves --host out, so the server binds its default address."""
    command = [sys.executable, "-m", "lmscope.client.cli", "serve", "--port", str(port), *args]
    if host is not None:
        command += ["--host", host]
    if model is not None:
        command += ["--model", str(model)]
    environment = {**os.environ, "LMSCOPE_EXIT_WITH_PARENT": str(os.getpid()), **(env or {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, bufsize=1)
    log: list[str] = []
    address: list[str] = []
    ready = threading.Event()

    def pump():
        for line in process.stdout:
            log.append(line.rstrip("\n"))
            match = _READY.match(line)
            if match and not address:
                address.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, name="lmscope-server-log", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            process.kill()
            raise LaunchError(f"the server did not become ready within {timeout:.0f} s:\n" + "\n".join(log[-20:]))
    if not address:
        process.wait(timeout=10)
        raise LaunchError(f"the server exited with code {process.returncode}:\n" + "\n".join(log[-20:]))
    return ServerProcess(process=process, address=address[0], log=log)
