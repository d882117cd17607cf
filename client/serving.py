"""Where the command-line tools find a server: the one given, the one already running, or one started for
the command (as `lmscope demo` does), and what they say when none answers.

`connected(server, model)` decides:

* ``server`` given (``--server`` or ``$LMSCOPE_SERVER``): that server; if it does not answer, the error says
  how to start one or where to point instead (`MissingServer`).
* ``model`` given (``--model PATH``): a server started on that model for the command, stopped after it.
* neither: the server at the default address if one is listening there (``lmscope serve`` with no
  options), else one started on the default model (fetched and verified on first use).

Starting a server needs the server extra (``pip install "lmscope[server]"``); without it, the message says so.
"""
from __future__ import annotations

import contextlib
import socket
import sys
from typing import Iterator

import grpc

from .client import Client
from .core import DEFAULT_ADDRESS
from .errors import LmscopeError
from .servers import split_host_port

HOW_TO_START = ("start one with `lmscope serve [--model PATH]` (it listens on 127.0.0.1:50051), pass "
                "`--server HOST:PORT` of a running one, or leave out --server to let this command start "
                "one on --model (default: the default model)")


class MissingServer(Exception):
    """No server answers where the command was pointed, or none could be started; the message says why."""


def _listening(address: str) -> bool:
    host, port = split_host_port(address)
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def explain_unavailable(error: LmscopeError, address: str) -> MissingServer:
    return MissingServer(f"no lmscope server answers at {address} ({error.code.name}: {error.message}); "
                         f"{HOW_TO_START}")


@contextlib.contextmanager
def connected(server: str | None = None, model: str | None = None, *, n_ctx: int = 2048,
              use_running: bool = True) -> Iterator[Client]:
    """A Client on the server the options point at (see the module docstring); progress goes to stderr.
    use_running=False starts a server even when one listens at the default address (`lmscope demo`, whose
    tour is written for the default model)."""
    if server is None and model is None and use_running and _listening(DEFAULT_ADDRESS):
        server = DEFAULT_ADDRESS
    if server is not None:
        with Client(server) as client:
            try:
                client.model_info()
            except LmscopeError as exc:
                if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise explain_unavailable(exc, server) from None
                raise
            yield client
        return
    try:
        from lmscope.service.launch import LaunchError, launch_server
    except ImportError as exc:
        raise MissingServer(f"no lmscope server at {DEFAULT_ADDRESS}, and this installation cannot start one "
                            f"({exc.name} is missing: pip install 'lmscope[server]'); {HOW_TO_START}") from None
    what = model or "the default model (first run: fetching and verifying it)"
    print(f"starting a server on {what} ...", file=sys.stderr, flush=True)
    try:
        launched = launch_server(model, args=("--n-ctx", str(n_ctx)))
    except LaunchError as exc:
        raise MissingServer(f"could not start a server: {exc}") from None
    with launched as process, Client(process.address) as client:
        # The "lmscope serving ..." line; the server may have logged more (refused sites) since.
        print(next(line for line in process.log if line.startswith("lmscope serving")), file=sys.stderr, flush=True)
        yield client
