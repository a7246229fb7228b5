"""lmc-audit's Beam transforms, one subpackage per stage: ``reading``, ``documents``, ``scoring``, ``coding``,
``dedup``, ``manifests``; ``records`` holds the elements that flow between them.

Importing this package pins MKL to strict conditional numerical reproducibility (``MKL_CBWR=AUTO,STRICT``)
unless the environment already names a mode. Why: the forward coding scheme needs a matrix product's row to
come out bit for bit the same whether the call has 64 rows (a decoder's window) or 1,024 (the scoring
forward). MKL's default mode splits the inner dimension across threads for some row counts (on a 2-core
Intel Xeon with AMX, a 1,152 -> 414 projection rounds 57-144-row calls differently at 2 threads, 113-144 at 4,
1-128 at 8), so replay missed the scoring forward by ~1e-5 and every job coded in the slower blocks scheme.
Strict mode keeps the reduction order independent of threads and row count (measured: no row count of 1-699
differs at 1, 2 or 8 threads) at no measured cost for large calls, and gives the same bits as the default for
them. MKL reads the variable at its first matrix product, so it must be set before one runs in the process:
every lmc-audit entry point imports this package before it computes anything. Where a process ran one earlier,
the load-time replay check fails and the job codes in blocks, with a warning naming this variable.
"""

import os

MKL_CBWR = "AUTO,STRICT"
os.environ.setdefault("MKL_CBWR", MKL_CBWR)
