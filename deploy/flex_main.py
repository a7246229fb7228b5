"""Flex Template entry point: the launcher runs this file with the template's parameters as flags."""

from __future__ import annotations

import sys

from lmc_audit.pipelines.audit import run

if __name__ == "__main__":
    record = run(sys.argv[1:])
    sys.exit(1 if (record.get("coding") or {}).get("verification_failed") else 0)
