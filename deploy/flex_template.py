"""Flex Template glue: parameters <-> ``lmc-audit run`` options.

- ``python deploy/flex_template.py metadata > deploy/metadata.json`` writes the
  template metadata: every option of ``lmc-audit run`` as a parameter with its
  help text (a test checks the committed file is current).
- The launcher runs this file as ``FLEX_TEMPLATE_PYTHON_PY_FILE`` with the
  parameters as ``--name=value`` flags; ``to_run_argv`` turns them back into
  the command's own flags (``--no_coding=true`` -> ``--no-coding``, lists
  comma-separated), and Beam/Dataflow flags pass through unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmc_audit.pipelines.audit import build_parser

SKIP = {"help", "sample", "quiet"}


def _options() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if a.option_strings and a.dest not in SKIP]


def param_name(action: argparse.Action) -> str:
    return action.option_strings[-1].lstrip("-").replace("-", "_")


def is_switch(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def metadata() -> dict:
    params = []
    for a in _options():
        p = {"name": param_name(a), "label": param_name(a).replace("_", " ").capitalize(),
             "helpText": (a.help or "").replace("%%", "%"), "isOptional": not a.required}
        if is_switch(a):
            p["helpText"] += " (true or false)"
            p["regexes"] = ["^(true|false)$"]
        elif a.nargs == "+":
            p["helpText"] += " (comma-separated)"
        elif a.choices:
            p["regexes"] = ["^(" + "|".join(map(str, a.choices)) + ")$"]
        params.append(p)
    return {"name": "lmc-audit", "description": "Audit a training corpus by compressing it with a causal "
            "language model: Parquet manifests of bits per byte, memorization signals and duplicates.",
            "streaming": False, "supportsAtLeastOnce": False, "supportsExactlyOnce": True,
            "defaultStreamingMode": "UNSPECIFIED", "parameters": params}


def to_run_argv(argv: list[str]) -> list[str]:
    by_name = {param_name(a): a for a in _options()}
    out: list[str] = []
    for arg in argv:
        name, eq, value = arg.lstrip("-").partition("=")
        action = by_name.get(name)
        if action is None or not arg.startswith("--"):
            out.append(arg)  # a Beam / Dataflow option
        elif is_switch(action):
            if value.lower() in ("true", "1", "yes", ""):
                out.append(action.option_strings[-1])
        elif action.nargs == "+":
            out += [action.option_strings[-1], *[v for v in value.split(",") if v]]
        else:
            out.append(f"{action.option_strings[-1]}={value}")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["metadata"]:
        print(json.dumps(metadata(), indent=2))
        return 0
    from lmc_audit.pipelines.audit import run

    record = run(to_run_argv(argv))
    return 1 if (record.get("coding") or {}).get("verification_failed") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
