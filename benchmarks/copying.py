"""The bundled model with the copying circuit built in, on the model card's measures.

    python benchmarks/copying.py [--matches 20:30,12:8] [--json benchmarks/results/copying.json]

Grows the bundled model (``lmc_audit.pipelines.default_model.induction``), then measures both models
the way the model card does: held-out bits per byte over 2048-byte chunks each scored on its own
(float32, CPU, the pipeline's handler), bits(x + x) / bits(x) over the first 1,000 bytes of each
held-out file, and scoring speed. Needs the training text (``apt-get install python3.11-doc``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lmc_audit.pipelines.default_model.card import copy_ratio, evaluate
from lmc_audit.pipelines.default_model.induction import MATCHES, grow
from lmc_audit.pipelines.default_model.split import DOCS_ROOT, list_source_files
from lmc_audit.pipelines.default_model.train import load_stream
from lmc_audit.transforms.scoring.model_loading import bundled_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matches", default=",".join(f"{t}:{a}" for t, a in MATCHES))
    p.add_argument("--beta", type=float, default=1.5)
    p.add_argument("--widen", type=int, default=2)
    p.add_argument("--scratch", type=int, default=62)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="measure this (grown, perhaps fine-tuned) model instead of growing one")
    p.add_argument("--skip-bundled", action="store_true", help="do not measure the bundled model again")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    files = list_source_files(DOCS_ROOT)
    held = [f for f in files if f.held_out]
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            matches = tuple(tuple(float(v) for v in m.split(":")) for m in args.matches.split(","))
            train, _ = load_stream([f for f in files if not f.held_out])
            t0 = time.time()
            model = grow(Path(bundled_model_dir()), train, matches=matches, beta=args.beta, widen=args.widen,
                         scratch=args.scratch)
            model.save_pretrained(tmp)
            out["grown"] = {"matches": matches, "beta": args.beta, "widen": args.widen, "scratch": args.scratch,
                            "seconds_to_build": round(time.time() - t0, 1)}
            grown_dir = tmp
        else:
            grown_dir = str(args.model_dir)
            out["grown"] = {"model_dir": grown_dir}
            record = args.model_dir / "training.json"
            if record.exists():
                out["grown"]["training"] = json.loads(record.read_text())
        models = {"grown": grown_dir} if args.skip_bundled else {"bundled": str(bundled_model_dir()), "grown": grown_dir}
        for name, path in models.items():
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path)
            r = evaluate(path, held)
            c = copy_ratio(path, held)
            size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            out.setdefault(name, {}).update({
                "parameters_mb_float32": round(size / 1e6, 1), "heads": cfg.num_attention_heads,
                "head_dim": cfg.head_dim, "hidden": cfg.hidden_size,
                "held_out_bpb": round(r["model_bpb"], 4), "over_xz": round(r["model_bpb"] / r["xz_bpb"], 4),
                "xz_bpb": round(r["xz_bpb"], 4), "chunks": r["chunks"], "tokens_per_s": r["eval_tokens_per_s"],
                "copy": c,
            })
            print(name, json.dumps(out[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
