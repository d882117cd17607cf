"""Shared by the figure and benchmark scripts: a client for --server, or a server started on the default model."""
from __future__ import annotations

import contextlib

from lmscope.client import Client


@contextlib.contextmanager
def connect(address: str | None, threads: int = 2, n_ctx: int = 2048):
    """Yield a Client: to `address` if given, else to a fresh `lmscope serve` of the default model."""
    if address:
        with Client(address) as client:
            yield client
        return
    from lmscope.service.launch import launch_server

    with launch_server(args=("--threads", str(threads), "--n-ctx", str(n_ctx))) as server:
        with Client(server.address) as client:
            yield client
