"""``WriteRunRecord``: the audit job's last step writes ``report.html`` and then ``run.json``.

The record is written by the pipeline itself, not by the program that built
it: on Dataflow a Flex Template launcher only builds and submits the job and
exits, so anything written after ``wait_until_finish`` would never appear (or,
worse, would describe an output the job has not written yet). Everything in the
record therefore comes from the job's own data: the shards manifest it wrote
and counts taken as PCollections (records read, payloads verified), never from
Beam metrics, which a running pipeline cannot read.

``run.json`` is written last and is the completeness marker of an output. When a
verified payload did not decode to its chunk, the step raises after writing it,
so that the job (a scheduled Dataflow job, say) ends as failed.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from importlib import metadata

import apache_beam as beam
import fsspec

from lmc_audit.transforms.manifests.files import write_bytes
from lmc_audit.transforms.scoring.signals import SIGNALS

PACKAGES = ("lmc-audit", "apache-beam", "torch", "transformers", "tokenizers", "safetensors",
            "pyarrow", "fsspec", "numpy", "zstandard")
MAX_FAILED_NAMES = 1000


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class SummarizeVerification(beam.CombineFn):
    """(chunk name, decoded exactly) -> verified and failed counts and the first failed names."""

    def create_accumulator(self) -> tuple[int, int, list[str]]:
        return 0, 0, []

    def add_input(self, acc, item: tuple[str, bool]):
        ok, failed, names = acc
        name, good = item
        if good:
            return ok + 1, failed, names
        return ok, failed + 1, sorted([*names, name])[:MAX_FAILED_NAMES]

    def merge_accumulators(self, accs):
        ok = failed = 0
        names: list[str] = []
        for a_ok, a_failed, a_names in accs:
            ok, failed, names = ok + a_ok, failed + a_failed, names + a_names
        return ok, failed, sorted(names)[:MAX_FAILED_NAMES]

    def extract_output(self, acc) -> dict:
        ok, failed, names = acc
        return {"verified": ok, "verification_failed": failed, "failed_chunks": names}


def payload_scheme(payload: bytes | None) -> str:
    """'forward', 'blocks' or 'stored': how a payload was coded (for the run record)."""
    from lmc_audit.transforms.coding.payloads import METHOD_STORED, unpack

    header, _ = unpack(payload)
    return "stored" if header.method == METHOD_STORED else header.scheme


def build_record(job: dict, shards: list[dict], records_in: int, verification: dict | None,
                 wall_s: float, schemes: dict | None = None) -> dict:
    """The run record from the shards manifest rows and the job's counts.

    ``job``: what the program that built the pipeline knew (options, model, Beam flags).
    """
    args = job["options"]
    documents = sum(r["documents"] for r in shards)
    dead = sum(r["dead_letters"] for r in shards)
    total_bytes = sum(r["bytes"] for r in shards)
    scored_bytes = sum(r["scored_bytes"] for r in shards)
    bits = sum(r["bits"] for r in shards)
    coded_bits = sum(r["coded_bits"] or 0 for r in shards)

    def weighted(col: str) -> float | None:
        return sum((r[col] or 0) * r["bytes"] for r in shards) / total_bytes if total_bytes else None

    verification = verification or {"verified": 0, "verification_failed": 0, "failed_chunks": []}
    return {
        "model": job["model"],
        "options": args,
        "beam_options": job["beam_options"],
        "versions": package_versions(),
        "counts": {
            # Every row of shards/: each input file, and each input that could not be listed or read.
            "shards": len(shards),
            "shards_with_documents": sum(1 for r in shards if r["documents"]),
            "shards_kept_from_earlier_runs": job["kept_shards"],
            "input_records": records_in,
            "documents": documents,
            "dead_letters": dead,
            "reconciled": records_in == documents + dead,
            "chunks": sum(r["chunks"] for r in shards),
            "flagged_chunks": sum(r["flagged_chunks"] for r in shards),
            "bytes": total_bytes,
            "scored_bytes": scored_bytes,
            "bits": bits,
        },
        "bpb": {"model": bits / scored_bytes if scored_bytes else None,
                "zlib": weighted("zlib_bpb"), "zstd": weighted("zstd_bpb"), "xz": weighted("xz_bpb")},
        "signals": {"min_k": args["min_k"], "flagged_documents": sum(r["flagged_documents"] for r in shards),
                    **{f"flagged_{name}": sum(r[f"flagged_{name}"] for r in shards) for name in SIGNALS}},
        "duplicates": None if not args["dedup"] else {
            "dropped_exact": sum(r["exact_duplicates"] for r in shards),
            "dropped_near": sum(r["near_duplicates"] for r in shards),
        },
        "coding": None if not args["coding"] else {
            "precision": args["precision"],
            # payloads per scheme: forward (coded in the scoring forward), blocks (the fallback), stored
            "schemes": dict(sorted((schemes or {}).items())),
            "rows": args["coding_rows"], "block": args["coding_block"],
            "coded_bits": coded_bits,
            "coded_bpb": coded_bits / total_bytes if total_bytes else None,
            "overhead_vs_ideal": (coded_bits - bits) / bits if bits else None,
            "verify_fraction": args["verify_fraction"],
            **verification,
        },
        "wall_seconds": round(wall_s, 2),
    }


def read_shard_rows(output: str) -> list[dict]:
    import pyarrow.dataset as ds

    fs, root = fsspec.core.url_to_fs(output)
    return ds.dataset(f"{root.rstrip('/')}/shards", filesystem=fs, format="parquet").to_table().to_pylist()


def read_record(output: str) -> dict:
    fs, root = fsspec.core.url_to_fs(output)
    return json.loads(fs.cat_file(f"{root.rstrip('/')}/run.json"))


def write_record(output: str, record: dict) -> None:
    write_bytes(output, "", "run.json", (json.dumps(record, indent=2, default=str) + "\n").encode())


class VerificationFailed(RuntimeError):
    """Raised by the job's last step, after run.json and the report are written, so that the job fails."""


def verification_message(coding: dict) -> str:
    return (f"{coding['verification_failed']} payloads did not decode to their chunk: "
            f"{', '.join(coding['failed_chunks'][:10])}")


class WriteRunRecordFn(beam.DoFn):
    def __init__(self, output: str, job: dict, extra_records: int, started: float, report: bool):
        self._output, self._job, self._extra = output, job, extra_records
        self._started, self._report = started, report

    def process(self, _written, documents_read: int, dead_letters_read: int,
                verification: list[dict], schemes: list[tuple[str, int]]) -> Iterator[dict]:
        shards = read_shard_rows(self._output)
        record = build_record(self._job, shards, documents_read + dead_letters_read + self._extra,
                              verification[0] if verification else None, time.time() - self._started,
                              dict(schemes))
        reference = self._job["options"].get("reference_shards")
        if reference:
            from lmc_audit.pipelines.membership import run_membership

            record["membership"] = run_membership(self._output, reference)
        if self._report:
            from lmc_audit.pipelines.report import write_report

            write_report(self._output, f"{self._output.rstrip('/')}/report.html", run=record)
        write_record(self._output, record)
        coding = record["coding"]
        if coding and coding["verification_failed"]:
            # A scheduled job must show as failed, as `lmc-audit run` exits 1; the record is written first.
            raise VerificationFailed(f"{verification_message(coding)} (see {self._output.rstrip('/')}/run.json)")
        yield record


class WriteRunRecord(beam.PTransform):
    """The job's last step: waits for the manifests, then writes the report and ``run.json``.

    Input: a dict with ``written`` (what ``WriteManifests`` returns), ``documents``
    (the documents read), ``dead_letters`` (bad records read or listed) and,
    when payloads are verified, ``verification`` ((chunk name, ok) pairs).
    ``extra_records``: input records this job did not read (shards kept from an
    earlier incremental run).
    """

    def __init__(self, output: str, job: dict, extra_records: int = 0, started: float | None = None,
                 report: bool = True):
        super().__init__()
        if not output:
            raise ValueError("output must be the directory or URL the manifests were written to")
        missing = {"model", "options", "beam_options", "kept_shards"} - set(job)
        if missing:
            raise ValueError(f"job lacks {sorted(missing)}")
        self._fn = WriteRunRecordFn(output, job, extra_records, time.time() if started is None else started,
                                    report)

    def expand(self, inputs: dict):
        count = beam.combiners.Count.Globally
        first_segments = inputs["documents"] | "FirstSegments" >> beam.Filter(lambda d: d.offset == 0)
        documents = first_segments | "CountDocuments" >> count()
        dead = inputs["dead_letters"] | "CountDeadLetters" >> count()
        if "verification" in inputs:
            verification = inputs["verification"] | "SummarizeVerification" >> beam.CombineGlobally(
                SummarizeVerification())
        else:
            verification = inputs["written"].pipeline | "NoVerification" >> beam.Create([])
        if "scored" in inputs:
            schemes = (inputs["scored"]
                       | "PayloadScheme" >> beam.FlatMap(lambda s: [payload_scheme(s.payload)] if s.payload else [])
                       | "CountSchemes" >> beam.combiners.Count.PerElement())
        else:
            schemes = inputs["written"].pipeline | "NoPayloads" >> beam.Create([])
        return inputs["written"] | "WriteRecord" >> beam.ParDo(
            self._fn, beam.pvalue.AsSingleton(documents), beam.pvalue.AsSingleton(dead),
            beam.pvalue.AsList(verification), beam.pvalue.AsList(schemes))
