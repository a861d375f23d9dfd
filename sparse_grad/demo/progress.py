"""A dependency-free progress bar on stderr (stdout stays clean for the results table)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """``[#####-----]  50/100 label  12.3 s  loss 2.345`` redrawn in place.

    On a terminal the line is redrawn at most every ``min_interval`` seconds; elsewhere (CI logs,
    pipes) only the final line of each bar is written, so logs do not fill with carriage returns.
    ``enabled=False`` writes nothing.
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, width: int = 24,
                 enabled: bool = True, min_interval: float = 0.1):
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive int, got {total!r}")
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.min_interval = min_interval
        self.done = 0
        self.note = ""
        self._start = time.perf_counter()
        self._drawn = 0.0

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done = min(self.total, self.done + n)
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.live and (now - self._drawn >= self.min_interval or self.done == self.total):
            self._draw("\r")
            self._drawn = now

    def close(self, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        if self.enabled:
            self._draw("\r" if self.live else "")
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, prefix: str) -> None:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        line = f"[{bar}] {self.done:>{len(str(self.total))}}/{self.total} {self.label}  {elapsed:5.1f} s"
        if self.note:
            line += f"  {self.note}"
        self.stream.write(f"{prefix}{line}\x1b[K" if self.live else line)
        self.stream.flush()

    def __enter__(self) -> ProgressBar:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
