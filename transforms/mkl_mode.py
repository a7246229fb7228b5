"""The MKL conditional numerical reproducibility (CNR) mode in effect in this process, by name.

A payload decodes only where every matrix product rounds as it did when it was coded, and MKL's mode is
part of that: the default mode splits some products' inner dimension across threads by the call's row
count, strict mode does not (see ``lmc_audit.transforms``). MKL reads ``MKL_CBWR`` once, at its first
matrix product, so the variable may say one thing and MKL do another (a product ran before
``lmc_audit.transforms`` was imported); MKL's own query, ``mkl_cbwr_get`` (exported by torch's CPU library
as ``mkl_serv_cbwr_get``), says what it does. Why ctypes and our own code: torch has no API for it.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mkl_cbwr.h: the branch in the low 16 bits, MKL_CBWR_STRICT as a flag; 1 (MKL_CBWR_BRANCH_OFF) is MKL's
# default, which MKL_CBWR set to an empty string (or unset, outside lmc-audit) gives.
_BRANCHES = {1: "DEFAULT", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
             9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_STRICT = 0x10000
_ALL = -1  # MKL_CBWR_ALL: the whole mode, branch and flags


@functools.lru_cache(maxsize=1)
def mkl_mode() -> str:
    """``AUTO,STRICT``, ``AVX2``, ``DEFAULT`` ...; "" where torch's CPU kernels are not MKL's (no such
    symbol: aarch64, macOS builds). MKL fixes its mode at its first use, so the answer never changes in a
    process (the query itself initialises the mode from ``MKL_CBWR`` when nothing has yet)."""
    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return ""
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    value = get(_ALL) & 0xFFFFFFFF
    branch = _BRANCHES.get(value & 0xFFFF, f"0x{value & 0xFFFF:x}")
    return f"{branch},STRICT" if value & _STRICT else branch


def mkl_cbwr_setting(mode: str) -> str:
    """The ``MKL_CBWR`` setting that starts a process in ``mode`` (``DEFAULT``: the variable set empty)."""
    return "MKL_CBWR= (empty)" if mode == "DEFAULT" else f"MKL_CBWR={mode}"
