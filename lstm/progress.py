"""Progress lines for long loops, readable in Ray's forwarded worker logs.

A carriage-return progress bar turns into noise once Ray prefixes and forwards each worker's
output, so this prints a complete line -- a bar, the fraction done, throughput and ETA -- at
most every ``interval_s`` seconds. Short loops print nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """``update(n_items)`` after each step; prints ``[#####.....] 52% 1716/3300 | 5,210 words/sec | eta 58s``."""

    def __init__(
        self,
        total: Optional[int],
        label: str,
        unit: str,
        *,
        enabled: bool = True,
        interval_s: float = 15.0,
        width: int = 20,
        stream: TextIO = sys.stdout,
    ):
        self.total, self.label, self.unit = total, label, unit
        self.enabled, self.interval_s, self.width, self.stream = enabled, interval_s, width, stream
        self.start = self.last = time.perf_counter()
        self.steps = 0
        self.items = 0

    def update(self, items: int) -> None:
        self.steps += 1
        self.items += items
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < self.interval_s:
            return
        self.last = now
        self.stream.write(self.render(now) + "\n")
        self.stream.flush()

    def render(self, now: Optional[float] = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.items / elapsed
        if self.total:
            frac = min(self.steps / self.total, 1.0)
            filled = int(round(frac * self.width))
            bar = "#" * filled + "." * (self.width - filled)
            eta = elapsed * (1 - frac) / max(frac, 1e-9)
            return (
                f"{self.label} [{bar}] {frac:4.0%} {self.steps}/{self.total} | "
                f"{rate:,.0f} {self.unit}/sec | eta {format_duration(eta)}"
            )
        return f"{self.label} {self.steps} steps | {rate:,.0f} {self.unit}/sec | {format_duration(elapsed)}"
