"""deploy/: the Flex Template metadata is current and its parameters map back to the command's options."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lmc_audit.pipelines.audit import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _flex():
    spec = importlib.util.spec_from_file_location("flex_template", DEPLOY / "flex_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metadata_lists_every_option_and_is_current():
    flex = _flex()
    committed = json.loads((DEPLOY / "metadata.json").read_text())
    assert committed == flex.metadata(), "run: python deploy/flex_template.py metadata > deploy/metadata.json"
    names = {p["name"] for p in committed["parameters"]}
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in flex.SKIP:
            assert flex.param_name(action) in names
    assert all(p["helpText"] for p in committed["parameters"])


def test_parameters_become_run_options():
    argv = _flex().to_run_argv(["--input=gs://b/a/*.jsonl,gs://b/c/*.parquet", "--output=gs://b/out",
                                "--no_coding=true", "--incremental=false", "--chunk_bytes=4096",
                                "--runner=DataflowRunner", "--scoring_accelerator=type:nvidia-l4;count:1"])
    assert argv == ["--input", "gs://b/a/*.jsonl", "gs://b/c/*.parquet", "--output=gs://b/out", "--no-coding",
                    "--chunk-bytes=4096", "--runner=DataflowRunner", "--scoring-accelerator=type:nvidia-l4;count:1"]
    args, beam_args = build_parser().parse_known_args(argv)
    assert args.coding is False and args.chunk_bytes == 4096 and beam_args == ["--runner=DataflowRunner"]
