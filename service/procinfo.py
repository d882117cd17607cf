"""Facts about a running server's processes, read from Linux's /proc: its worker processes, their resident
memory and CPU time, the files they have mapped.

The reliability tests and the load and fault scripts use these to check what a client cannot see: that a
crashed worker was replaced by a new process, that a cancelled request left its worker idle, and that
memory stays flat over many requests. Linux only (elsewhere /proc does not exist and these raise OSError).
"""
from __future__ import annotations

import os
import pathlib
import time

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct child processes of `pid`."""
    out: list[int] = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread ended while we looked
    return out


def worker_pids(server_pid: int) -> list[int]:
    """The model worker processes of an `lmscope serve` process (`python -m lmscope.service.worker`)."""
    pids = []
    for child in children(server_pid):
        try:
            command = pathlib.Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"lmscope.service.worker" in command:
            pids.append(child)
    return sorted(pids)


def rss_bytes(pid: int) -> int:
    """Resident memory of one process."""
    return int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES


def mapped_files(pid: int) -> set[str]:
    """Paths of the files a process has mapped: its shared libraries among them."""
    paths = set()
    for line in pathlib.Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.add(fields[5])
    return paths


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def server_rss_bytes(server_pid: int) -> dict[str, int]:
    """Resident memory of the front end and of all its workers together."""
    return {"front_end": rss_bytes(server_pid), "workers": sum(rss_bytes(p) for p in worker_pids(server_pid))}


def seconds_until_idle(pid: int, timeout: float = 10.0, window: float = 0.5) -> float:
    """Seconds until process `pid` used under 10 % of a core over `window` (a worker waiting for work uses
    none); raises TimeoutError if it keeps computing for `timeout` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pid)
        time.sleep(window)
        if cpu_seconds(pid) - before < 0.1 * window:
            return time.monotonic() - start
    raise TimeoutError(f"process {pid} kept computing for {timeout} s")
