"""How much of a copy's NCD sample its original's sample holds, whatever the model.

NCD compares two documents' samples (``LineSample``), so a sample that an edit reshuffles caps what
any model can find, however well it copies. This measures the samples alone, with the dedup
benchmark's corpus and kinds of copy (``benchmarks/dedup.py``): NCD under zstd -19 and xz -9e,
which copy again at once after an edit (a model needs a few bytes or tokens to find its place), and
the share of the copy's sample in runs of 16 bytes or more that the original's sample holds. Two
ways to pick a sample's lines: by their smallest word-bigram hash (``line_key``, what the job does)
and by the hash of the whole line (before).

    python benchmarks/ncd_samples.py --json benchmarks/results/ncd_samples.json
"""

from __future__ import annotations

import argparse
import difflib
import json
import lzma
import platform
import random
import sys
import unicodedata
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).parent))
import dedup as bench  # noqa: E402  (the dedup benchmark's corpus)

from lmc_audit.transforms.dedup import sketches as dedup  # noqa: E402

OPTIONS = dedup.DedupOptions()


def by_line_key(text: str) -> bytes:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return dedup.ncd_text(dedup.head_text(" ".join(folded.split()), OPTIONS), folded, OPTIONS)


def by_whole_line(text: str) -> bytes:
    sample = dedup.LineSample(OPTIONS.ncd_bytes)
    for line in unicodedata.normalize("NFKC", text).casefold().split("\n"):
        words = line.split()
        if len(words) >= OPTIONS.min_line_words:
            sample.offer(dedup.line_hash(words), " ".join(words).encode())
    return sample.text(text.encode())


SAMPLES = {"line_key": by_line_key, "whole_line_hash": by_whole_line}
_zstd = zstandard.ZstdCompressor(level=19)
COMPRESSORS = {"zstd_19": lambda b: len(_zstd.compress(b)),
               "xz_9e": lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))}


def shared(x: bytes, y: bytes) -> float:
    blocks = difflib.SequenceMatcher(None, x, y, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= 16) / max(1, len(y))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", type=int, default=60)
    p.add_argument("--copies", type=int, default=60, help="copies per kind")
    p.add_argument("--distinct", type=int, default=200, help="pairs of distinct documents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    docs, origin = bench.build_corpus(args.bases, args.copies, args.seed, licensed=30)
    rng = random.Random(args.seed)
    pairs = [(origin[d["id"]], d["id"], d["kind"]) for d in docs if d["kind"] in bench.KINDS]
    singles = sorted(origin[d["id"]] for d in docs if origin[d["id"]] == d["id"])
    pairs += [(*rng.sample(singles, 2), "distinct") for _ in range(args.distinct)]
    text = {d["id"]: d["text"] for d in docs}
    result = {"machine": f"{platform.machine()}, {platform.python_version()}", "args": vars(args), "samples": {}}
    for name, sample in SAMPLES.items():
        s = {i: sample(text[i]) for i in {x for a, b, _ in pairs for x in (a, b)}}
        kinds: dict[str, dict] = {}
        for a, b, kind in pairs:
            k = kinds.setdefault(kind, {"shared": []} | {c: [] for c in COMPRESSORS})
            k["shared"].append(shared(s[a], s[b]))
            for c, size in COMPRESSORS.items():
                k[c].append(dedup.ncd(size(s[a]), size(s[b]), size(s[a] + s[b])))
        result["samples"][name] = {kind: {"pairs": len(v["shared"]), "median_shared": round(float(np.median(v["shared"])), 3)}
                                   | {f"{c}_median": round(float(np.median(v[c])), 3) for c in COMPRESSORS}
                                   | {f"{c}_share_at_most_0.3": round(float(np.mean(np.array(v[c]) <= 0.3)), 3)
                                      for c in COMPRESSORS}
                                   for kind, v in kinds.items()}
        print(json.dumps({name: result["samples"][name]}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
