"""Where Arrow's buffers come from in an lmc-audit process.

Set by every ``lmc-audit`` command as it starts and again by ``write_rows`` and the readers' ``setup``,
since a Beam worker on Dataflow is a process the command line never ran in."""

from __future__ import annotations

import os

import pyarrow as pa


def arrow_memory_to_os() -> None:
    """Arrow's buffers from the C library's allocator in this process, unless ``ARROW_DEFAULT_MEMORY_POOL``
    chooses a pool.

    pyarrow's own pool (mimalloc or jemalloc, per build) keeps freed pages for reuse instead of handing them
    back, so a worker that wrote a part kept its tables' pages resident for the stages after it. Measured
    with ``benchmarks/scale.py``'s large job on DirectRunner: writing a 25 MiB group of parts grew RSS by
    140 MiB and kept it, 35 MiB with the system pool; back to back, the job's peak 1,116 MiB with pyarrow's
    pool and 994 MiB with this one, at the same speed within noise (README, Scale). Once per process in
    effect: later calls find the system pool set."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ and pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
