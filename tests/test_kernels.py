"""The CPU matmul setting the forward coding scheme rests on: a row's bits do not depend on the call's row count."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from lmc_audit.transforms import MKL_CBWR  # importing it pins MKL before this process's first matrix product
from lmc_audit.transforms.scoring.model_handler import load_causal_lm


def _mkl_mode_after_import(env: dict[str, str], multiply_first: bool = False) -> tuple[str, str]:
    """(MKL_CBWR, the mode MKL runs in) in a fresh process that imports lmc_audit.transforms and multiplies;
    ``multiply_first``: a matrix product runs before the import (MKL fixes its mode then)."""
    first = "import torch; torch.ones(4, 4) @ torch.ones(4, 4); " if multiply_first else ""
    code = (f"{first}import os, torch, lmc_audit.transforms; from lmc_audit.transforms.mkl_mode import mkl_mode; "
            "torch.ones(4, 4) @ torch.ones(4, 4); print(repr(os.environ.get('MKL_CBWR')), mkl_mode())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    setting, mode = done.stdout.strip().rsplit(" ", 1)
    return ast.literal_eval(setting), mode


def test_importing_lmc_audit_pins_mkl_to_strict_reproducibility_unless_the_user_chose():
    bare = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    assert _mkl_mode_after_import(bare) == (MKL_CBWR, MKL_CBWR) == ("AUTO,STRICT", "AUTO,STRICT")
    assert _mkl_mode_after_import({**bare, "MKL_CBWR": "COMPATIBLE"}) == ("COMPATIBLE", "COMPATIBLE")
    assert _mkl_mode_after_import({**bare, "MKL_CBWR": "AVX2,STRICT"}) == ("AVX2,STRICT", "AVX2,STRICT")
    assert _mkl_mode_after_import({**bare, "MKL_CBWR": ""}) == ("", "DEFAULT")  # MKL's own default
    # A product before the import fixed MKL's default mode: the variable says strict, MKL does not, and the
    # recipe (which records what MKL does) and the load-time warning say so.
    assert _mkl_mode_after_import(bare, multiply_first=True) == ("AUTO,STRICT", "DEFAULT")


def _projection_shapes(model) -> list[tuple[int, int]]:
    return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_rows_do_not_depend_on_the_calls_row_count(threads):
    """Every projection of the bundled model, called with 1-160, 256 and 512 rows, gives each row the bits the
    same row gets in a call of 1,024 rows (the scoring forward of one chunk; a decoder's window is a few to a few
    hundred rows). Under MKL's default mode on a 2-core Intel Xeon with AMX this failed for 57-144-row calls of
    the 1,152 -> 414 output projection at 2 threads: replay then missed the scoring forward by ~1e-5."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(threads)
    try:
        with torch.inference_mode():
            for k, n in _projection_shapes(load_causal_lm("bundled", "cpu", "float32").model):
                weight = torch.randn(n, k, generator=generator) * k ** -0.5
                x = torch.randn(1024, k, generator=generator)
                full = torch.nn.functional.linear(x, weight)
                differ = [m for m in [*range(1, 161), 256, 512]
                          if not torch.equal(torch.nn.functional.linear(x[:m], weight), full[:m])]
                assert not differ, f"{k} -> {n} at {threads} threads: calls of {differ} rows round differently"
    finally:
        torch.set_num_threads(before)
