"""Where Arrow's buffers come from in an lmc-audit process."""

from __future__ import annotations

import os

import pyarrow as pa


def arrow_memory_to_os() -> None:
    """Arrow's buffers from the C library's allocator in this process, unless ``ARROW_DEFAULT_MEMORY_POOL``
    chooses a pool.

    pyarrow's own pool (mimalloc or jemalloc, per build) keeps freed pages for later use, and Beam runs
    bundles on many threads: a worker that wrote a part kept its tables' pages resident for the stages
    after it. Measured with ``benchmarks/scale.py``'s large job on DirectRunner: writing a 25 MiB group of
    parts grew RSS by 140 MiB and kept it, 35 MiB with the system pool, and the job's peak fell from
    1,009-1,092 MiB to 945 MiB (README, Scale)."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ and pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
