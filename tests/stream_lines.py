"""Read a subprocess's output with a deadline.

``proc.stderr.readline()`` blocks for as long as the process stays silent, whatever deadline the test
computed around it. A reader thread moves every line into a queue; the test waits on the queue with a
timeout, so a silent or hung process makes the test fail with what it did print, not hang.
"""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time
from typing import IO

_EOF = None


class LineReader:
    """Collects the lines of ``stream`` (a text pipe of ``proc``) in a thread, from now until EOF."""

    def __init__(self, proc: subprocess.Popen[str], stream: IO[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._closed = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line)
        finally:
            self._queue.put(_EOF)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in a line read from now on; fails after ``timeout`` seconds
        or when the process closes the stream (exits) without printing it."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is _EOF:
                self._closed = True
                raise AssertionError(
                    f"the process closed its output (exit code {self.proc.poll()}) without printing"
                    f" {pattern!r}; it printed: {''.join(self.lines)[-2000:]!r}"
                )
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout:.0f} s; the process printed:"
            f" {''.join(self.lines)[-2000:]!r}"
        )

    def rest(self, timeout: float) -> str:
        """Everything printed, once the stream is closed (call after the process ended)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the process's output stayed open {timeout:.0f} s after it ended"
        while not self._closed:
            line = self._queue.get_nowait()
            if line is _EOF:
                self._closed = True
            else:
                self.lines.append(line)
        return "".join(self.lines)
