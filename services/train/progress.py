"""A progress bar for long runs: tqdm where it is installed, else a line every few seconds."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any


class _Lines:
    """The part of tqdm's interface the trainers use, printing a status line at most every 10 s."""

    def __init__(self, iterable: Iterable[int], total: int | None = None, desc: str = "", initial: int = 0,
                 disable: bool = False, **_: Any) -> None:
        if total is None:  # as tqdm does: the iterable's length, where it has one
            total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.n, self.postfix, self.last = initial, "", 0.0

    def __iter__(self) -> Iterator[int]:
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.time()
            if not self.disable and (now - self.last > 10 or self.n == self.total):
                print(f"{self.desc}: {self.n}/{self.total or '?'} {self.postfix}", file=sys.stderr, flush=True)
                self.last = now

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())


def progress_bar(iterable: Iterable[int], **kwargs: Any) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the GPU image has no tqdm
        return _Lines(iterable, **kwargs)
    return tqdm(iterable, **kwargs)
