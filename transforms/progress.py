"""Progress lines on stderr from inside the workers, at most one every few seconds.

Beam counters are the metrics of record; these lines only let a person see
that a long local run is moving (on Dataflow they land in the worker logs).
"""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    _lock = threading.Lock()
    _counts: dict[str, int] = {}
    _start = time.monotonic()
    _last = 0.0
    interval_s = 5.0

    @classmethod
    def add(cls, **counts: int) -> None:
        with cls._lock:
            for name, value in counts.items():
                cls._counts[name] = cls._counts.get(name, 0) + value
            now = time.monotonic()
            if now - cls._last < cls.interval_s:
                return
            cls._last = now
            c = dict(cls._counts)
        elapsed = max(now - cls._start, 1e-9)
        print(f"[lmc-audit] documents read {c.get('documents', 0):,} | chunks scored {c.get('chunks', 0):,} "
              f"| {c.get('bytes', 0) / 1024:,.0f} KiB scored, {c.get('bytes', 0) / elapsed / 1024:,.1f} KiB/s",
              file=sys.stderr, flush=True)
