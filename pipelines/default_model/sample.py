"""Write the bundled sample corpus from held-out files of the split.

    python -m lmc_audit.pipelines.default_model.sample --out pipelines/assets/sample

About 300 KB of held-out Python documentation sources (PSF licence), in two
formats: plain-text files (one document each) and one gzipped JSONL shard.
None of these files was seen in training.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

from lmc_audit.pipelines.default_model.split import DOCS_ROOT, list_source_files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs-root", type=Path, default=DOCS_ROOT)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--total-bytes", type=int, default=300_000)
    p.add_argument("--max-file-bytes", type=int, default=60_000)
    args = p.parse_args(argv)

    held = [f for f in list_source_files(args.docs_root) if f.held_out]
    held.sort(key=lambda f: hashlib.sha256(f.relpath.encode()).hexdigest())
    chosen, total = [], 0
    for f in held:
        size = f.path.stat().st_size
        if size <= args.max_file_bytes and total + size <= args.total_bytes:
            chosen.append(f)
            total += size
    args.out.mkdir(parents=True, exist_ok=True)
    text_part, jsonl_part = chosen[: len(chosen) // 3], chosen[len(chosen) // 3:]
    for f in text_part:
        name = f.relpath.replace("/", "__").removesuffix(".rst.txt") + ".txt"
        (args.out / name).write_bytes(f.path.read_bytes())
    # mtime=0 keeps the .gz byte-identical from run to run.
    with open(args.out / "docs.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for f in sorted(jsonl_part, key=lambda f: f.relpath):
            line = {"id": f.relpath, "text": f.path.read_text(encoding="utf-8")}
            gz.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
    for f in chosen:
        print(f"{f.sha256()}  {f.relpath}  {'text' if f in text_part else 'jsonl'}")
    print(f"{len(chosen)} files, {total:,} bytes")


if __name__ == "__main__":
    main()
