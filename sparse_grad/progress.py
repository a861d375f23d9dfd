"""The progress display of the demo and the benchmarks (stderr, so stdout stays clean for results).

On a terminal, a bar redrawn in place: tqdm's where tqdm is installed (the ecosystem's habit),
else a plain ``[#####-----]`` one. Anywhere else (a pipe, CI, a log file) no carriage returns:
a full line at most every ``log_interval`` seconds and one when the bar closes, so a log shows
that a long run is alive without filling with redraws.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """``[#####-----]  50/100 label  12.3 s  loss 2.345``.

    Args:
        total: the number of units of work (positive int).
        label: what is being done.
        stream: where to write (default ``sys.stderr``); a stream whose ``isatty()`` is true is
            a terminal.
        enabled: ``False`` writes nothing.
        min_interval: seconds between redraws on a terminal.
        log_interval: seconds between lines elsewhere (the closing line is always written).
        use_tqdm: ``None`` (tqdm on a terminal where it is installed), ``True`` or ``False``.
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True,
                 min_interval: float = 0.1, log_interval: float = 30.0, use_tqdm: bool | None = None,
                 width: int = 24):
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive int, got {total!r}")
        if not isinstance(label, str):
            raise TypeError(f"label must be a str, got {type(label).__name__}")
        for name, value in (("min_interval", min_interval), ("log_interval", log_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if use_tqdm not in (None, True, False):
            raise TypeError(f"use_tqdm must be None or a bool, got {use_tqdm!r}")
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.live = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval, self.log_interval = float(min_interval), float(log_interval)
        self.done = 0
        self.note = ""
        self._start = time.perf_counter()
        self._drawn = self._start
        self._closed = False
        self._tqdm = None
        tqdm = _tqdm() if self.live and use_tqdm is not False else None
        if use_tqdm and tqdm is None and self.live:
            raise ImportError("use_tqdm=True needs tqdm: pip install tqdm")
        if tqdm is not None:
            self._tqdm = tqdm(total=total, desc=label, file=self.stream, mininterval=self.min_interval,
                              dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more units done (0: only a new note)."""
        self.advance_to(self.done + n, note)

    def advance_to(self, done: int, note: str | None = None) -> None:
        """``done`` units done in all (for callers that count themselves)."""
        done = max(0, min(self.total, done))
        step, self.done = done - self.done, done
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        if self._tqdm is not None:
            if note is not None:
                self._tqdm.set_postfix_str(note, refresh=False)
            self._tqdm.update(step)
            return
        now = time.perf_counter()
        if self.live and (now - self._drawn >= self.min_interval or self.done == self.total):
            self._write("\r" + self._line() + "\x1b[K")
            self._drawn = now
        elif not self.live and now - self._drawn >= self.log_interval and self.done < self.total:
            self._write(self._line() + "\n")
            self._drawn = now

    def close(self, note: str | None = None) -> None:
        """Write the final line (once)."""
        if note is not None:
            self.note = note
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(self.note, refresh=False)
            self._tqdm.close()
            return
        self._write(("\r" + self._line() + "\x1b[K" if self.live else self._line()) + "\n")

    def _line(self) -> str:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        line = f"[{bar}] {self.done:>{len(str(self.total))}}/{self.total} {self.label}  {elapsed:5.1f} s"
        return f"{line}  {self.note}" if self.note else line

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def __enter__(self) -> Progress:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
