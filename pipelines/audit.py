"""The audit job: read -> chunk -> score -> write manifests, then the run record.

    lmc-audit run --input CORPUS... --output DIR [--model bundled] [--chunk-bytes 2048]

Flags this parser does not know go to Beam's ``PipelineOptions`` unchanged
(``--runner``, ``--direct_num_workers``, Dataflow flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from importlib import resources
from pathlib import Path

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, SetupOptions, StandardOptions,
                                                  TestOptions)

from lmc_audit.pipelines.run_record import WriteRunRecord, read_record, verification_message, write_record
from lmc_audit.transforms.documents.chunking import DEFAULT_CHUNK_BYTES, ChunkDocuments
from lmc_audit.transforms.reading.listing import FORMATS, is_inside, list_shards, normalize_location
from lmc_audit.transforms.coding import range_coder
from lmc_audit.transforms.coding.decoding import VerifyPayloads, verification_buckets
from lmc_audit.transforms.dedup.sketches import NORMALIZERS, DedupOptions
from lmc_audit.transforms.dedup.find_duplicates import FindDuplicates
from lmc_audit.transforms.manifests.files import shard_parts
from lmc_audit.transforms.manifests.state import MANIFEST_DIRS, LoadCommittedSketches, plan_incremental, shard_key
from lmc_audit.transforms.manifests.staging import STAGING
from lmc_audit.transforms.manifests.write import WriteDuplicates, WriteManifests
from lmc_audit.transforms.options import PART_BYTES, AuditOptions, ModelOptions, OutputOptions, ReadOptions
from lmc_audit.transforms.scoring.model_handler import CodingOptions
from lmc_audit.transforms.scoring.model_loading import (BUNDLED, model_fingerprint, resolve_model_dir,
                                                validate_model_spec)
from lmc_audit.transforms.progress import NAMESPACE, Progress
from lmc_audit.transforms.reading.read_corpus import DEAD_LETTER, FACTS, ReadCorpus
from lmc_audit.transforms.scoring.score_chunks import ScoreChunks
from lmc_audit.transforms.scoring.signals import SignalOptions

VERIFY_ROWS = 64  # chunks per verification decode group


def bundled_sample_dir() -> str:
    return str(resources.files("lmc_audit.pipelines") / "assets" / "sample")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmc-audit run",
        description="Score a corpus with a causal language model and write Parquet manifests "
                    "(bits and bits per byte per chunk, document and shard). Unknown flags go to Beam.")
    src = p.add_argument_group("input")
    src.add_argument("--input", nargs="+", action="extend", default=[],
                     help="files, directories, globs or fsspec URLs (s3://, gs://, memory://, ...); several allowed, "
                          "after one --input or over several")
    src.add_argument("--sample", action="store_true",
                     help="audit the sample corpus bundled with the package (adds it to --input)")
    src.add_argument("--format", default="auto", choices=FORMATS,
                     help="input format; auto tells it from the file name (.jsonl/.ndjson/.json, .parquet, .txt/.md/.rst)")
    src.add_argument("--text-field", default="text", help="JSON field or Parquet column holding the text (default: text)")
    src.add_argument("--id-field", default=None,
                     help="JSON field or Parquet column holding the document id (default: <shard>#<line or row>)")
    src.add_argument("--split-bytes", type=int, default=64 << 20,
                     help="uncompressed JSONL shards larger than this are read in byte ranges in parallel (default 64 MiB)")
    p.add_argument("--output", required=True, help="directory or fsspec URL for the manifests")
    p.add_argument("--part-bytes", type=int, default=PART_BYTES,
                   help="a shard's manifests are written as one part file per this many bytes of its text "
                        "(compressed files and Parquet counted at 4x their size), in parallel; a writer holds "
                        "one part's rows and payloads (default 16 MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace manifests already in --output")
    p.add_argument("--incremental", action="store_true",
                   help="keep the shards in --output already audited with the same model and options (and "
                        "unchanged: same path, size and modification time or checksum); audit only new or "
                        "changed shards, drop the ones no longer in the input, and recompute duplicates, shards "
                        "and the run record. Also resumes a run that was killed.")
    p.add_argument("--max-removed-fraction", type=float, default=0.5,
                   help="--incremental: fail, deleting nothing, when more than this fraction of the shards already "
                        "audited are gone from the input (a renamed input or a glob typo looks like that); "
                        "default 0.5")
    p.add_argument("--allow-removal", action="store_true",
                   help="--incremental: drop the manifests of every audited shard gone from the input, however many")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help=f"bytes per chunk; each chunk is scored on its own (default {DEFAULT_CHUNK_BYTES})")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=BUNDLED,
                   help="'bundled' (default: the byte-level model shipped in the package), a save_pretrained() "
                        "directory, an fsspec URL of one, or a Hugging Face hub id")
    m.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    m.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "bf16-autocast"),
                   help="auto: bfloat16 weights on CUDA devices that support it, float32 on CPU; bf16-autocast: "
                        "float32 weights with matmuls in bfloat16 under torch.autocast")
    m.add_argument("--scoring-accelerator", default=None,
                   help="Dataflow right fitting: a Beam accelerator resource hint for every step that runs a model "
                        "(scoring, reference model, NCD, payload verification), e.g. "
                        "'type:nvidia-l4;count:1;install-nvidia-driver' (reading and writing stay on CPU workers)")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run code shipped with the model (off by default)")
    m.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded positions per forward pass (rows x padded length; default 8192 on CPU, "
                        "16384 on GPU; the manifests and payloads do not depend on it)")
    m.add_argument("--max-batch-rows", type=int, default=64, help="chunks per batch handed to the model")
    m.add_argument("--length-granularity", type=int, default=64,
                   help="chunks are padded to a multiple of this many tokens (the shape depends on the chunk alone)")
    c = p.add_argument_group("arithmetic coding")
    c.add_argument("--no-coding", dest="coding", action="store_false",
                   help="score only: no payloads (bits from one plain forward per batch)")
    c.add_argument("--precision", type=int, default=24,
                   help="bits of the integer frequency total each distribution is quantized to (16-32)")
    c.add_argument("--coding-scheme", default="auto", choices=("auto", "forward", "blocks"),
                   help="forward: code from the scoring forward itself, decode by replaying it in windows; "
                        "blocks: fixed rows x block forwards on both sides (the fallback, several times slower); "
                        "auto (default): forward where a load-time check shows replay reproduces the scoring "
                        "forward bit for bit on the device in use, else blocks")
    c.add_argument("--coding-rows", type=int, default=32,
                   help="blocks scheme: rows of every coding forward (a fixed shape, recorded in each payload)")
    c.add_argument("--coding-block", type=int, default=8,
                   help="blocks scheme: positions per coding forward; smaller decodes faster, larger encodes faster")
    c.add_argument("--verify-fraction", type=float, default=0.01,
                   help="fraction of chunks decoded again in the job to prove the payloads (a fixed sample)")
    g = p.add_argument_group("memorization signals")
    g.add_argument("--min-k", type=float, default=0.2,
                   help="fraction of lowest-scoring tokens Min-K%% and Min-K%%++ average over (default 0.2)")
    g.add_argument("--reference-model", default=None,
                   help="a second model (same forms as --model) that scores the same chunks; "
                        "adds reference_bits / reference_diff_bpb columns")
    defaults = SignalOptions()
    g.add_argument("--flag-bpb-below", type=float, default=defaults.bpb_below,
                   help=f"flag documents under this many bits per byte (default {defaults.bpb_below})")
    g.add_argument("--flag-zlib-ratio-below", type=float, default=defaults.zlib_ratio_below,
                   help=f"flag documents whose model bits / zlib bits is under this (default {defaults.zlib_ratio_below})")
    g.add_argument("--flag-min-k-above", type=float, default=defaults.min_k_above,
                   help=f"flag documents whose Min-K%% (mean log p, nats) is above this (default {defaults.min_k_above})")
    g.add_argument("--flag-min-k-pp-above", type=float, default=defaults.min_k_pp_above,
                   help=f"flag documents whose Min-K%%++ is above this (default {defaults.min_k_pp_above})")
    g.add_argument("--flag-reference-diff-below", type=float, default=defaults.reference_diff_below,
                   help="flag documents whose bpb minus the reference model's bpb is under this "
                        f"(default {defaults.reference_diff_below})")
    g.add_argument("--reference-shards", nargs="+", action="extend", default=None, metavar="GLOB",
                   help="shards the model did not see (fnmatch globs on the shard path, or its name when the glob "
                        "has no /): after the job, the shard-level membership test compares every other shard with "
                        "them, in run.json and the report (lmc-audit membership runs it on any manifests)")
    d = p.add_argument_group("deduplication")
    dd = DedupOptions()
    d.add_argument("--no-dedup", dest="dedup", action="store_false", help="no duplicates manifest")
    d.add_argument("--minhash-ngram", type=int, default=dd.ngram, help=f"words per n-gram (default {dd.ngram})")
    d.add_argument("--minhash-bands", type=int, default=dd.bands, help=f"LSH bands (default {dd.bands})")
    d.add_argument("--minhash-rows", type=int, default=dd.rows, help=f"hashes per band (default {dd.rows})")
    d.add_argument("--minhash-seed", type=int, default=dd.seed, help=f"seed of the permutations (default {dd.seed})")
    d.add_argument("--dedup-jaccard", type=float, default=dd.jaccard_threshold,
                   help=f"a candidate pair with n-gram Jaccard at least this is a duplicate (default {dd.jaccard_threshold})")
    d.add_argument("--dedup-ncd", type=float, default=dd.ncd_threshold,
                   help=f"... or with the model's NCD of the documents' lines samples (--ncd-bytes; drawn from each "
                        f"whole text, never the heads: distinct documents that begin alike have close heads; the "
                        f"manifest records the smaller of both samples' NCD) at most this, for a pair with the guards of "
                        f"the containment rule and n-gram containment at least --dedup-ncd-min-containment "
                        f"(default {dd.ncd_threshold})")
    d.add_argument("--dedup-ncd-min-containment", type=float, default=dd.ncd_min_containment,
                   help="NCD is scored only for candidate pairs that another rule verified or whose n-gram "
                        "containment is at least this (and that the guards allow), and decides only for those: "
                        "pairs that share a line, a band or a licence header and little else cost no forward "
                        f"and are never merged by NCD; 0 scores every guarded candidate (default {dd.ncd_min_containment})")
    d.add_argument("--ncd-bytes", type=int, default=dd.ncd_bytes,
                   help=f"bytes of each of a document's two NCD samples: lines sampled from the whole text by their "
                        f"hashes (or the first bytes of a text with few lines), and the first bytes of its words "
                        f"(default {dd.ncd_bytes})")
    d.add_argument("--dedup-rounds", type=int, default=3,
                   help="clusters are connected components found in this many rounds of shuffles (large-star / "
                        "small-star); what has not settled after them is joined on one worker, so the result is "
                        "the same for any number, and more rounds gather less (default 3)")
    d.add_argument("--dedup-max-bucket", type=int, default=dd.max_bucket,
                   help=f"documents paired per LSH bucket (default {dd.max_bucket})")
    d.add_argument("--dedup-containment", type=float, default=dd.containment_threshold,
                   help="... or with n-gram containment |A∩B|/min(|A|,|B|) at least this, both documents having "
                        f"--dedup-min-shingles n-grams and the shorter --dedup-min-length-ratio of the longer's "
                        f"bytes (default {dd.containment_threshold})")
    d.add_argument("--dedup-line-containment", type=float, default=dd.line_containment,
                   help=f"... or sharing at least {dd.min_shared_lines} lines and this share of the smaller "
                        f"document's lines, under the same guards (default {dd.line_containment})")
    d.add_argument("--dedup-min-shingles", type=int, default=dd.min_shingles,
                   help=f"n-grams each document needs for the containment and line rules (default {dd.min_shingles})")
    d.add_argument("--dedup-min-length-ratio", type=float, default=dd.min_length_ratio,
                   help="the shorter document's bytes over the longer's that the containment and line rules need "
                        f"(default {dd.min_length_ratio})")
    d.add_argument("--dedup-min-line-words", type=int, default=dd.min_line_words,
                   help=f"words a line needs to count for candidates and the line rule (default {dd.min_line_words})")
    d.add_argument("--dedup-normalize", action="extend", nargs="+", choices=NORMALIZERS, default=[],
                   help="also normalize the text n-grams and lines are taken from, as datatrove does: "
                        "'punctuation' (each Unicode punctuation character a space), 'numbers' (each run of "
                        "digits 0); exact dedup is unaffected")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write OUTPUT/report.html")
    p.add_argument("--quiet", action="store_true", help="no summary table at the end")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks (else a late failure is one line)")
    return p


def check_beam_flags(parser: argparse.ArgumentParser, beam_args: list[str]) -> None:
    """Flags neither lmc-audit nor Beam knows fail at once, with the nearest known flag.

    Beam itself only logs "Discarding unparseable args" and runs on, so a typo such as
    ``--no-codng`` would silently run the job with coding on."""
    import difflib

    captured: list[argparse.ArgumentParser] = []
    PipelineOptions(beam_args).get_all_options(add_extra_args_fn=captured.append)
    _, unknown = captured[0].parse_known_args(beam_args)
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
    if not flags:
        return
    ours = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    beams = [o for action in captured[0]._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for flag in flags:
        near = difflib.get_close_matches(flag, ours, n=1, cutoff=0.6) or \
            difflib.get_close_matches(flag, beams, n=1, cutoff=0.75)
        hints.append(f"{flag}" + (f" (did you mean {near[0]}?)" if near else ""))
    raise SystemExit(f"lmc-audit: unknown option {', '.join(hints)}: neither lmc-audit run nor Beam knows it "
                     "(lmc-audit run --help lists the options)")


def signal_options(args: argparse.Namespace) -> SignalOptions:
    return SignalOptions(args.min_k, args.flag_bpb_below, args.flag_zlib_ratio_below, args.flag_min_k_above,
                         args.flag_min_k_pp_above, args.flag_reference_diff_below)


def dedup_options(args: argparse.Namespace) -> DedupOptions | None:
    if not args.dedup:
        return None
    return DedupOptions(ngram=args.minhash_ngram, bands=args.minhash_bands, rows=args.minhash_rows,
                        seed=args.minhash_seed, jaccard_threshold=args.dedup_jaccard, ncd_threshold=args.dedup_ncd,
                        ncd_bytes=args.ncd_bytes, ncd_min_containment=args.dedup_ncd_min_containment,
                        max_bucket=args.dedup_max_bucket,
                        containment_threshold=args.dedup_containment, line_containment=args.dedup_line_containment,
                        min_shingles=args.dedup_min_shingles, min_length_ratio=args.dedup_min_length_ratio,
                        min_line_words=args.dedup_min_line_words,
                        normalize=tuple(sorted(set(args.dedup_normalize))), component_rounds=args.dedup_rounds)


def audit_options(args: argparse.Namespace, model_fingerprint: str) -> AuditOptions:
    """The one options object the job's graph is built from (checked as it is built)."""
    model = ModelOptions(args.model, args.device, args.dtype, args.trust_remote_code, args.max_batch_tokens,
                         args.max_batch_rows, args.length_granularity, args.scoring_accelerator)
    coding = (CodingOptions(model_fingerprint, args.precision, args.coding_rows, args.coding_block,
                            args.coding_scheme) if args.coding else None)
    return AuditOptions(
        read=ReadOptions(args.text_field, args.id_field, args.chunk_bytes, args.split_bytes),
        model=model, output=OutputOptions(args.output, args.part_bytes), signals=signal_options(args),
        coding=coding, dedup=dedup_options(args),
        reference=dataclasses.replace(model, spec=args.reference_model) if args.reference_model else None,
        verify_fraction=args.verify_fraction if args.coding else 0.0)


def validate(args: argparse.Namespace) -> None:
    """Wrong options fail before anything runs, with what to fix."""
    if args.sample:
        args.input = list(args.input) + [bundled_sample_dir()]
    if not args.input:
        raise SystemExit("lmc-audit: no input: pass --input PATH... or --sample")
    if args.chunk_bytes < 1:
        raise SystemExit(f"lmc-audit: --chunk-bytes must be at least 1, got {args.chunk_bytes}")
    if not 0.0 <= args.verify_fraction <= 1.0:
        raise SystemExit(f"lmc-audit: --verify-fraction must be in [0, 1], got {args.verify_fraction}")
    if not 16 <= args.precision <= 32:
        raise SystemExit(f"lmc-audit: --precision must be 16..32 bits, got {args.precision}")
    if args.coding and args.dtype == "bf16-autocast":
        raise SystemExit("lmc-audit: --dtype bf16-autocast scores only: with arithmetic coding use --dtype bfloat16 "
                         "or float32, or pass --no-coding")
    if args.coding and args.length_granularity % args.coding_block:
        raise SystemExit(f"lmc-audit: --length-granularity ({args.length_granularity}) must be a multiple of "
                         f"--coding-block ({args.coding_block})")
    for name in ("max_batch_tokens", "max_batch_rows", "length_granularity", "coding_rows", "coding_block"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"lmc-audit: --{name.replace('_', '-')} must be at least 1")
    try:
        validate_model_spec(args.model)
        if args.reference_model:
            validate_model_spec(args.reference_model)
        audit_options(args, "0" * 64)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"lmc-audit: {exc}") from None
    probe_output(args.output)
    fs, root = fsspec.core.url_to_fs(args.output)
    existing = [d for d in (*MANIFEST_DIRS, "_state", "run.json", "report.html")
                if fs.exists(f"{root.rstrip('/')}/{d}")]
    if args.incremental:
        if args.overwrite:
            raise SystemExit("lmc-audit: --incremental keeps what --output holds; --overwrite replaces it: pick one")
        return
    if existing and not args.overwrite:
        raise SystemExit(f"lmc-audit: {args.output} already holds manifests ({', '.join(existing)}); "
                         "pass --overwrite or choose another --output")
    # With them goes what a failed run left staged (a finished run removes its own).
    staged = [STAGING] if existing and fs.exists(f"{root.rstrip('/')}/{STAGING}") else []
    for d in existing + staged:
        fs.rm(f"{root.rstrip('/')}/{d}", recursive=True)


def probe_output(output: str) -> None:
    """The output must take a file before any work is done: one is written and removed."""
    import os

    try:
        fs, root = fsspec.core.url_to_fs(output)
        existed = fs.exists(root)
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.lmc-audit-probe-{os.getpid()}"
        fs.pipe_file(probe, b"probe")
        fs.rm(probe)
        if not existed and fs.isdir(root) and not fs.ls(root):
            fs.rmdir(root)  # a launcher that only builds the job leaves nothing behind
    except Exception as exc:
        raise SystemExit(f"lmc-audit: cannot write to --output {output}: {type(exc).__name__}: {exc}") from None


def leave_out_output(shards: list, output: str) -> list:
    """Shards inside the output folder (its own manifests) are not input: they are left out, with a word."""
    out = normalize_location(output)
    inside = [s for s in shards if is_inside(normalize_location(s.path), out)]
    if not inside:
        return shards
    print(f"[lmc-audit] {len(inside)} files under --output {output} left out of the input", file=sys.stderr)
    kept = [s for s in shards if s not in inside]
    return [dataclasses.replace(s, index=i) for i, s in enumerate(kept)]


def check_first_records(shards: list, args: argparse.Namespace, sample: int = 50) -> None:
    """Reads the first records of the first shard of each format: options that fit no record fail now,
    saying what the records hold, instead of dead-lettering every record after the whole job ran."""
    from lmc_audit.transforms.reading.readers import READERS
    from lmc_audit.transforms.records import DeadLetter, ReadTask

    seen_formats = set()
    for shard in shards:
        if shard.format in seen_formats or shard.size == 0:
            continue
        seen_formats.add(shard.format)
        reader = READERS[shard.format](args.text_field, args.id_field, args.chunk_bytes)
        records = []
        for record in reader.read(ReadTask(shard)):
            records.append(record)
            if len(records) >= sample:
                break
        documents = [r for r in records if not isinstance(r, DeadLetter)]
        # Only reasons that say the options do not fit the file fail here; empty or null texts are data.
        if records and not documents and all(_misfit(r.reason) for r in records):
            found = _fields_of(shard, args)
            raise SystemExit(
                f"lmc-audit: none of the first {len(records)} records of {shard.path} can be read as --format "
                f"{shard.format} with --text-field {args.text_field!r}: {records[0].reason}"
                + (f"; the records hold {found}" if found else "")
                + ". Pass the --format / --text-field that fit the data.")
        if args.id_field and shard.format != "text" and documents:
            default_prefix = f"{shard.path}#"
            if all(d.doc_id.startswith(default_prefix) for d in documents):
                found = _fields_of(shard, args)
                raise SystemExit(f"lmc-audit: --id-field {args.id_field!r} is in none of the first {len(documents)} "
                                 f"records of {shard.path}" + (f" (they hold {found})" if found else "")
                                 + ": pass the field that holds the ids, or leave --id-field out")


MISFIT_REASONS = ("missing text field", "malformed JSON", "JSON line is a", "no column", "shard unreadable",
                  "invalid UTF-8")


def _misfit(reason: str) -> bool:
    return reason.startswith(MISFIT_REASONS) or reason.endswith("not a string")


def _fields_of(shard, args) -> str:
    """What a shard's first record holds: JSON keys or Parquet columns, for error messages."""
    import json as _json

    try:
        if shard.format == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(shard.path, "rb", compression=shard.compression) as f:
                return "columns " + ", ".join(pq.ParquetFile(f).schema_arrow.names)
        if shard.format == "jsonl":
            with fsspec.open(shard.path, "rb", compression=shard.compression) as f:
                for line in f:
                    if line.strip():
                        obj = _json.loads(line)
                        return ("fields " + ", ".join(map(str, obj))) if isinstance(obj, dict) else \
                            f"a JSON {type(obj).__name__} per line"
    except Exception as exc:
        return f"nothing readable as {shard.format} ({type(exc).__name__})"
    return ""


# Raised when rows or incremental state change meaning for the same bytes and options (2: NCD samples in
# sketches; 3: JSONL positions as byte offsets; 4: NCD samples' lines picked by their smallest bigram hash;
# 5: a second NCD sample, the text's head), so that shards committed before are audited again.
ROWS_FORMAT = 5
RESULT_OPTIONS = ("format", "text_field", "id_field", "split_bytes", "chunk_bytes", "dtype",
                  "length_granularity", "coding", "precision", "coding_scheme", "coding_rows", "coding_block", "min_k",
                  "reference_model", "flag_bpb_below", "flag_zlib_ratio_below", "flag_min_k_above",
                  "flag_min_k_pp_above", "flag_reference_diff_below", "dedup", "minhash_ngram", "minhash_bands",
                  "minhash_rows", "minhash_seed", "ncd_bytes", "dedup_min_line_words", "dedup_normalize")


def options_fingerprint(args: argparse.Namespace, model_fingerprint: str) -> str:
    """What a shard's manifests depend on besides its bytes: the model and the options that change rows."""
    import torch

    from lmc_audit.pipelines.run_record import package_versions

    chosen = {k: getattr(args, k) for k in RESULT_OPTIONS}
    versions = package_versions()
    chosen["versions"] = {k: versions.get(k) for k in ("lmc-audit", "torch", "transformers")}
    chosen["rows_format"] = ROWS_FORMAT
    # Resolved where the job is built: on a CPU launcher for GPU workers, pass --device cuda (README).
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    chosen["resolved_device"] = device
    chosen["resolved_dtype"] = (("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto"
                                else args.dtype)
    if args.reference_model:
        chosen["reference_fingerprint"] = model_fingerprint_of(args.reference_model)
    text = json.dumps({"model": model_fingerprint, **chosen}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint_of(spec: str) -> str:
    return model_fingerprint(resolve_model_dir(spec))


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Runs the audit; returns the run record (OUTPUT/run.json, written by the job's last step).

    Where the runner only builds or submits the job (a Flex Template launch,
    ``--dry_run``), returns ``{"submitted": True, ...}`` at once.
    """
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    check_beam_flags(parser, beam_args)
    validate(args)
    started = time.time()
    Progress.reset()  # DirectRunner's workers count in this process
    # A job that runs here codes on this machine: numba's kernels compile on an idle core meanwhile.
    warmer = range_coder.warm_in_background() if args.coding and runs_here(beam_args) else None
    shards, listing_errors = list_shards(args.input, args.format)
    shards = leave_out_output(shards, args.output)
    check_first_records(shards, args)
    if args.reference_shards:
        from lmc_audit.pipelines.membership import shard_matches

        matched = sum(shard_matches(s.path, args.reference_shards) for s in shards)
        if matched in (0, len(shards)):
            raise SystemExit(f"lmc-audit: --reference-shards {' '.join(args.reference_shards)} matches "
                             f"{'none' if matched == 0 else 'all'} of the {len(shards)} shards: the membership "
                             "test needs reference shards and other (suspect) shards")
    print(f"[lmc-audit] {len(shards)} shards to read from {len(args.input)} input(s)"
          + (f", {len(listing_errors)} unreadable" if listing_errors else ""), file=sys.stderr)
    model_dir = resolve_model_dir(args.model)
    fingerprint = model_fingerprint(model_dir)
    run_fingerprint = options_fingerprint(args, fingerprint)
    commit = {s.path: {"key": shard_key(s.path), "fingerprint": run_fingerprint} for s in shards}
    parts = {s.index: shard_parts(s.size, s.compression is not None or s.format == "parquet", args.part_bytes)
             for s in shards}
    committed = []
    if args.incremental:
        commit, shards, committed = plan_incremental(
            args.output, shards, run_fingerprint, listing_errors,
            1.0 if args.allow_removal else args.max_removed_fraction)
        # The run record marks a complete set of manifests: it goes until this run completes.
        out_fs, out_root = fsspec.core.url_to_fs(args.output)
        # Duplicates are found again over every shard: the old files go with the record.
        for name in ("run.json", "report.html", "duplicates"):
            if out_fs.exists(f"{out_root.rstrip('/')}/{name}"):
                out_fs.rm(f"{out_root.rstrip('/')}/{name}", recursive=True)
        print(f"[lmc-audit] incremental: {len(committed)} shards already audited, {len(shards)} to audit",
              file=sys.stderr)

    pipeline_options = PipelineOptions(beam_args)
    # Workers import lmc_audit (and its bundled model) from the installed package.
    pipeline_options.view_as(SetupOptions).save_main_session = False
    pipeline = test_pipeline or beam.Pipeline(runner=local_runner(pipeline_options), options=pipeline_options)
    o = audit_options(args, fingerprint)  # passed whole; each step takes its part
    read = pipeline | "ReadCorpus" >> ReadCorpus(shards, o.read, o.dedup)
    unlisted = pipeline | "UnreadableInputs" >> beam.Create(listing_errors, reshuffle=False)
    dead_letters = (read[DEAD_LETTER], unlisted) | "AllDeadLetters" >> beam.Flatten()
    chunks = read.main | "ChunkDocuments" >> ChunkDocuments(o.read.chunk_bytes)
    scored = chunks | "ScoreChunks" >> ScoreChunks(o.model, o.coding)
    manifest_inputs = [scored, dead_letters, read[FACTS]]
    if o.reference:
        manifest_inputs.append(chunks | "ScoreReference" >> ScoreChunks(o.reference))
    duplicates = None
    if o.dedup:
        sketches = read[FACTS] | "Sketches" >> beam.Map(lambda f: f.sketch)
        if committed:
            sketches = ((sketches, pipeline | "CommittedSketches" >> LoadCommittedSketches(o.output.path, committed))
                        | "AllSketches" >> beam.Flatten())
        duplicates = (sketches
                      | "FindDuplicates" >> FindDuplicates(o.dedup, ScoreChunks(o.model))
                      | "WriteDuplicates" >> WriteDuplicates(o.output.path, sum(parts.values())))
    written = tuple(manifest_inputs) | "WriteManifests" >> WriteManifests(o.output.path, o.signals, commit, committed,
                                                                          duplicates, parts)
    record_inputs = {"written": written, "documents": read.main, "dead_letters": dead_letters}
    if o.coding:
        record_inputs["scored"] = scored
    if o.coding and o.verify_fraction > 0:
        listed = sum(s.size for s in shards)
        record_inputs["verification"] = scored | "VerifyPayloads" >> VerifyPayloads(
            o.model, o.verify_fraction, VERIFY_ROWS,
            verification_buckets(o.verify_fraction, listed, o.read.chunk_bytes, VERIFY_ROWS), listed)
    # Committed shards were not read: their records count as their documents and dead letters.
    kept_records = sum(row["documents"] + row["dead_letters"] for _, _, row in committed)
    model = {"spec": args.model, "name": Path(model_dir).name if args.model == BUNDLED else args.model,
             "fingerprint": fingerprint}
    job = {"model": model, "options": {k: v for k, v in sorted(vars(args).items())}, "beam_options": beam_args,
           "kept_shards": len(committed)}
    _ = record_inputs | "WriteRunRecord" >> WriteRunRecord(args.output, job, kept_records, started, args.report)

    try:
        result = pipeline.run()
        if builds_job_only(pipeline.options, result):
            # A Flex Template launch or a dry run: the job runs elsewhere and writes run.json when done.
            submitted = "" if pipeline.options.view_as(TestOptions).dry_run else " and submitted"
            print(f"[lmc-audit] job built{submitted}; {args.output.rstrip('/')}/run.json appears when it completes",
                  file=sys.stderr)
            return {"submitted": True, "output": args.output}
        result.wait_until_finish()
    except Exception as exc:
        # The job's last step fails the job when payloads did not decode, after writing run.json
        # (removed when this run started, so one that exists now is this run's).
        record = _record_if_written(args.output)
        if not (record and (record["coding"] or {}).get("verification_failed")):
            fail_in_one_line(exc, args.verbose)
            raise
    else:
        record = read_record(args.output)
        job_metrics = collect_job_metrics(result)
        if job_metrics:
            record["job_metrics"] = job_metrics
            write_record(args.output, record)
    coding = record["coding"]
    if coding and coding["verification_failed"]:
        print(f"[lmc-audit] ERROR: {verification_message(coding)}", file=sys.stderr)
    counts = record["counts"]
    if counts["documents"] == 0:
        print(f"[lmc-audit] ERROR: no document was audited ({counts['dead_letters']} dead letters; their reasons "
              f"are in {args.output.rstrip('/')}/dead_letter/)", file=sys.stderr)
    if not counts["reconciled"]:
        print(f"[lmc-audit] WARNING: {counts['input_records']} input records but {counts['documents']} documents "
              f"+ {counts['dead_letters']} dead letters", file=sys.stderr)
    if warmer is not None:
        if warmer.poll() is None:
            warmer.kill()  # a job shorter than the helper: what it would cache, the job compiled itself
        warmer.wait()
    if not args.quiet:
        from lmc_audit.pipelines.summary import print_summary

        print_summary(args.output)
    return record


def fail_in_one_line(exc: BaseException, verbose: bool) -> None:
    """A manifest that could not be written ends the run with one line naming the path and the cause;
    the traceback goes to a log file (or to stderr with --verbose). Other errors are left to raise."""
    import re
    import tempfile
    import traceback

    from lmc_audit.transforms.manifests.files import WRITE_ERROR

    text = "".join(traceback.format_exception(exc))
    found = re.search(re.escape(WRITE_ERROR) + r" [^\n]*", text)
    if not found:
        return
    if verbose:
        print(text, file=sys.stderr)
        where = ""
    else:
        with tempfile.NamedTemporaryFile("w", prefix="lmc-audit-error-", suffix=".log", delete=False) as log:
            log.write(text)
        where = f" (traceback: {log.name})"
    line = found.group(0).split(" [while running")[0].rstrip("'\". ")
    print(f"lmc-audit: {line}{where}", file=sys.stderr)
    raise SystemExit(1) from None


def _record_if_written(output: str) -> dict | None:
    try:
        return read_record(output)
    except (FileNotFoundError, ValueError):
        return None


def runs_here(beam_args: list[str]) -> bool:
    """True when the job's steps run in this process's machine (a local runner, the default)."""
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    return runner is None or any(name in str(runner) for name in ("Direct", "FnApi", "Prism"))


def local_runner(options: PipelineOptions):
    """Beam's FnApiRunner where no runner or ``DirectRunner`` is asked for; None (Beam picks) otherwise.

    Why: Beam 2.77's ``DirectRunner`` first tries the Prism runner, which downloads a Go binary from
    GitHub when the job starts: offline that fails after about 2.5 s and it falls back to the
    FnApiRunner; online the job runs on Prism, a runner this project does not test (the Kubernetes
    CronJob's multi-process jobs among them). So a local job runs on the FnApiRunner, set up as
    ``DirectRunner`` sets it up (pipeline options provisioned to multi-process workers).
    ``--runner PrismRunner`` still asks for Prism."""
    runner = options.view_as(StandardOptions).runner
    if runner not in (None, "DirectRunner", "SwitchingDirectRunner"):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def builds_job_only(options: PipelineOptions, result) -> bool:
    """True when ``pipeline.run()`` only built (or submitted) a job that will not run in this process."""
    if options.view_as(TestOptions).dry_run or options.view_as(GoogleCloudOptions).template_location:
        return True
    return getattr(result, "has_job", True) is False


def collect_job_metrics(result) -> dict:
    """Beam metrics of the finished job (padding, dedup pairs, time in the model); empty where the runner keeps none."""
    def committed(name: str, kind: str) -> list | None:
        try:
            found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE)
                                           .with_name(name))[kind]
        except Exception:
            return None
        return [m.committed for m in found if m.committed is not None] if found else None

    def counter(name: str) -> int | None:
        values = committed(name, "counters")
        return None if values is None else int(sum(values))

    def seconds(name: str) -> float | None:
        """Sum of a latency distribution in microseconds, in seconds."""
        values = committed(name, "distributions")
        return None if values is None else round(sum(d.sum for d in values) / 1e6, 3)

    padded, real = counter("padded_positions"), counter("scored_positions")
    scoring = seconds("model_micro_secs")  # scoring's and NCD's forwards
    verifying = seconds("verification_batch_latency_micro_secs")
    out = {"padding_fraction": padded / (padded + real) if padded is not None and real else None,
           # Time inside the model's steps; the job's wall time less this is the host path's share.
           "model_seconds": None if scoring is None and verifying is None else round((scoring or 0) + (verifying or 0), 3),
           "model_scoring_seconds": scoring, "model_verification_seconds": verifying,
           "inference_batch_seconds": seconds("inference_batch_latency_micro_secs"),
           "dedup_candidate_pairs": counter("dedup_candidate_pairs"),
           "dedup_verified_pairs": counter("dedup_verified_pairs"),
           "dedup_ncd_pairs_skipped": counter("dedup_ncd_pairs_skipped"),
           "dedup_capped_buckets": counter("dedup_capped_buckets")}
    return {k: v for k, v in out.items() if v is not None}
