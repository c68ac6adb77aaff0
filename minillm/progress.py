"""One progress reporter for long work (tokenizer training, data preparation, evaluation).

    progress = Progress(total=len(docs), desc="tokenize", unit="docs")
    for doc in docs:
        ...
        progress.update(1, bytes=len(doc))   # extra counters become rates: "12.3 MB/s"
    progress.close()

Prints at most twice a second to stderr: `\r`-updated in a terminal, one line every few seconds when
redirected to a file or a pipe (so logs stay readable). Shows count/total, percentage, rate, the rate
of every extra counter, elapsed time and the ETA. `enabled=False` makes it silent (tests, rank > 0).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4.2s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_rate(value: float, unit: str) -> str:
    """A per-second rate with a readable prefix: bytes become KB/s, MB/s, GB/s."""
    if unit == "bytes":
        for prefix, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if value >= scale:
                return f"{value / scale:.1f} {prefix}/s"
        return f"{value:.0f} B/s"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M {unit}/s"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k {unit}/s"
    return f"{value:.1f} {unit}/s"


class Progress:
    """Counts work done against an optional total and reports it at a bounded rate."""

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval: float | None = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval if min_interval is not None else (0.5 if self.tty else 5.0)
        self.count = 0
        self.extra: dict[str, float] = {}
        self.start = time.perf_counter()
        self.last_print = self.start
        self.closed = False

    def update(self, n: int = 1, **extra: float) -> None:
        self.count += n
        for key, value in extra.items():
            self.extra[key] = self.extra.get(key, 0.0) + value
        now = time.perf_counter()
        if self.enabled and now - self.last_print >= self.min_interval:
            self.last_print = now
            self._print(now, final=False)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.count:,}/{self.total:,} {self.unit} ({100.0 * self.count / self.total:.0f}%)")
        else:
            parts.append(f"{self.count:,} {self.unit}")
        parts.append(format_rate(self.count / elapsed, self.unit))
        parts += [format_rate(value / elapsed, key) for key, value in self.extra.items()]
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and 0 < self.count < self.total:
            parts.append(f"ETA {format_duration(elapsed * (self.total - self.count) / self.count)}")
        return " | ".join(parts)

    def _print(self, now: float, final: bool) -> None:
        text = self.line(now)
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Print the final line (always, when enabled) and stop."""
        if not self.closed and self.enabled:
            self._print(time.perf_counter(), final=True)
        self.closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
