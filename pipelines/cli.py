"""``lmc-audit``: the command line.

    lmc-audit run --input ... --output ...          audit a corpus (see ``lmc-audit run --help``)
    lmc-audit decode --payloads ... --output ...    payloads back to documents
    lmc-audit report --manifests ... --output ...   one self-contained HTML report
    lmc-audit membership --manifests ... --suspect GLOB... --reference GLOB...   was the model trained on them?
"""

from __future__ import annotations

import logging
import sys

COMMANDS = {
    "run": "audit a corpus: read, chunk, score, code, write Parquet manifests",
    "decode": "rebuild documents bit-exactly from the payloads of a run",
    "report": "render a run's manifests as one self-contained HTML file",
    "membership": "test whether the model saw suspect shards, against reference shards",
}


class _QuietOptionalClients(logging.Filter):
    """Drops Beam's import-time notice that the BigQuery client (apitools) is missing: RunInference's
    model manager imports Beam's BigQuery tools, lmc-audit never uses BigQuery, and the user cannot act on it
    (``pip install 'lmc-audit[dataflow]'`` brings the client for those who run on Dataflow)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().addFilter(_QuietOptionalClients())
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmc-audit COMMAND [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<11} {text}")
        print("\n'lmc-audit COMMAND --help' lists a command's options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        from lmc_audit.transforms.arrow_memory import arrow_memory_to_os

        arrow_memory_to_os()  # every command reads or writes Parquet: freed Arrow buffers go back to the OS
    if command == "run":
        from lmc_audit.pipelines.audit import run

        record = run(rest)
        coding = record.get("coding") or {}
        if record.get("counts", {}).get("documents", 1) == 0:
            return 1  # nothing audited: a scheduled run must show it (run() said why)
        return 1 if coding.get("verification_failed") else 0
    if command == "decode":
        from lmc_audit.pipelines.decode import run as decode

        return decode(rest)
    if command == "report":
        from lmc_audit.pipelines.report import main as report

        return report(rest)
    if command == "membership":
        from lmc_audit.pipelines.membership import main as membership

        return membership(rest)
    print(f"lmc-audit: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
