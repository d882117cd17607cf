"""Progress bars for long batch jobs (tqdm, which picks a notebook widget or a terminal bar)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True, desc: str = ""):
    if not enabled:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc) as bar:
        yield bar


class _Silent:
    def update(self, n: int = 1) -> None:
        pass
