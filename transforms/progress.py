"""Progress lines on stderr from inside the workers: every stage, every ``interval_s`` seconds.

Beam counters are the metrics of record; these lines let a person see that a
long run is moving and where (on Dataflow they land in the worker logs). Each
stage (reading, scoring, writing, dedup, decoding) counts its items and bytes
in this process; a daemon thread prints one line per interval while anything
moved, with each stage's rate and, where the stage's total is known (the
listed input bytes for reading and scoring, the verified fraction of them
for decoding), an estimate of the time left.

    [lmc-audit] reading 27 docs, 291 KiB (41.2 KiB/s, ~0:00:03 left) | scoring 161 chunks, 291 KiB (8.3 KiB/s, ~0:00:01 left)
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

NAMESPACE = "lmc_audit"  # of every Beam counter the job reports (run.json's job_metrics reads them)

STAGES = ("reading", "scoring", "writing", "dedup", "decoding")
UNITS = {"reading": "docs", "scoring": "chunks", "writing": "rows", "dedup": "pairs", "decoding": "chunks"}


@dataclass
class _Stage:
    items: int = 0
    bytes: int = 0
    first: float = 0.0
    last: float = 0.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    interval_s = 10.0
    _lock = threading.Lock()
    _stages: dict[str, _Stage] = {}
    _expected: dict[str, int] = {}  # stage -> bytes its "time left" is estimated against
    _thread: threading.Thread | None = None
    _printed_at: dict[str, tuple[int, int]] = {}

    @classmethod
    def reset(cls) -> None:
        """Start counting again: a job run in this process after another (tests, benchmarks, a
        scheduler's loop) shows its own counts, rates and time left, not the sum of every job's."""
        with cls._lock:
            cls._stages = {}
            cls._expected = {}
            cls._printed_at = {}

    @classmethod
    def expect(cls, total_bytes: int, stages: tuple[str, ...] = ("reading", "scoring")) -> None:
        """The bytes ``stages`` will count, as far as known (the input's listed size for reading and
        scoring; the verified fraction of it for decoding): the total that 'time left' is estimated against."""
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown progress stage {sorted(unknown)}")
        with cls._lock:
            for stage in stages:
                cls._expected[stage] = max(cls._expected.get(stage, 0), int(total_bytes))

    @classmethod
    def add(cls, stage: str = "scoring", items: int = 0, bytes: int = 0, **legacy: int) -> None:  # noqa: A002
        if stage not in STAGES:
            raise ValueError(f"unknown progress stage {stage!r}")
        items += legacy.get("documents", 0) + legacy.get("chunks", 0)
        now = time.monotonic()
        with cls._lock:
            s = cls._stages.setdefault(stage, _Stage(first=now))
            s.items += items
            s.bytes += bytes
            s.last = now
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._loop, name="lmc-audit-progress", daemon=True)
                cls._thread.start()

    @classmethod
    def counts(cls) -> dict[str, tuple[int, int]]:
        """Each stage's (items, bytes) counted in this process since the job started."""
        with cls._lock:
            return {k: (v.items, v.bytes) for k, v in cls._stages.items()}

    @classmethod
    def line(cls) -> str | None:
        """The current line, or None before any stage has counted."""
        now = time.monotonic()
        with cls._lock:
            stages = {k: _Stage(v.items, v.bytes, v.first, v.last) for k, v in cls._stages.items()}
            expected_by_stage = dict(cls._expected)
        parts = []
        for name in STAGES:
            s = stages.get(name)
            if s is None:
                continue
            # The rate over the time the stage was moving: a stage that finished keeps its rate.
            end = now if now - s.last < cls.interval_s or s.last - s.first < 1.0 else s.last
            elapsed = max(end - s.first, 1e-3)
            text = f"{name} {s.items:,} {UNITS[name]}"
            if s.bytes:
                rate = s.bytes / elapsed
                text += f", {s.bytes / 1024:,.0f} KiB ({rate / 1024:,.1f} KiB/s"
                expected = expected_by_stage.get(name, 0)
                if expected and s.bytes < expected and rate > 0:
                    text += f", ~{_duration((expected - s.bytes) / rate)} left"
                text += ")"
            else:
                text += f" ({s.items / elapsed:,.1f}/s)"
            parts.append(text)
        return "[lmc-audit] " + " | ".join(parts) if parts else None

    @classmethod
    def _loop(cls) -> None:
        while True:
            time.sleep(cls.interval_s)
            seen = cls.counts()
            if seen == cls._printed_at:
                continue  # nothing moved since the last line
            cls._printed_at = seen
            text = cls.line()
            if text:
                print(text, file=sys.stderr, flush=True)
