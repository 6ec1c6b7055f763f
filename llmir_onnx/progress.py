"""A small progress printer on stderr for long work (loading, planning, writing ranks).

On by default only when stderr is a terminal (logs and CI captures stay clean); `--quiet` turns it
off, `--progress` on. A bar redraws in place with a carriage return, at most every `interval_s`,
and is safe to update from several writer threads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

BAR_WIDTH = 30


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


class Progress:
    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None, interval_s: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(self.stream.isatty()) if enabled is None else enabled
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._label = ""
        self._total = 0
        self._done = 0
        self._started = 0.0
        self._last_draw = 0.0
        self._phase_started = time.perf_counter()
        self._phase = ""

    def phase(self, text: str) -> None:
        """Start a step with no measurable amount (loading the graph, planning)."""
        if not self.enabled:
            return
        self._end_phase()
        self._phase = text
        self._phase_started = time.perf_counter()
        self.stream.write(f"llmir-onnx: {text} ...")
        self.stream.flush()

    def _end_phase(self) -> None:
        if self._phase:
            self.stream.write(f" {time.perf_counter() - self._phase_started:.1f} s\n")
            self._phase = ""

    def start_bytes(self, label: str, total: int) -> None:
        """Start a bar over `total` bytes."""
        if not self.enabled:
            return
        self._end_phase()
        with self._lock:
            self._label, self._total, self._done = label, total, 0
            self._started = time.perf_counter()
            self._last_draw = 0.0
        self._draw(force=True)

    def advance(self, count: int, note: str = "") -> None:
        if not self.enabled:
            return
        with self._lock:
            self._done += count
        self._draw(note=note)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._end_phase()
        if self._total:
            with self._lock:
                self._done = self._total
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._total = 0

    def _draw(self, force: bool = False, note: str = "") -> None:
        now = time.perf_counter()
        with self._lock:
            if not force and now - self._last_draw < self.interval_s:
                return
            self._last_draw = now
            fraction = self._done / self._total if self._total else 1.0
            filled = int(BAR_WIDTH * min(fraction, 1.0))
            elapsed = max(now - self._started, 1e-9)
            rate = self._done / elapsed / 2**20
            line = (
                f"\rllmir-onnx: {self._label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} "
                f"{_gib(self._done)} / {_gib(self._total)} {rate:.0f} MiB/s {note}"
            )
            self.stream.write(line[:160].ljust(100))
            self.stream.flush()


QUIET = Progress(enabled=False)
