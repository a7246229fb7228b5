"""Measure the bundled model on the held-out split and write its model card.

    python -m lmc_audit.pipelines.default_model.card --model-dir pipelines/assets/model [--rewrite]

Held-out files are cut into 2048-byte chunks, each scored on its own from BOS
with the pipeline's own tokenizer and model handler (float32, CPU), and each
compressed on its own by zlib -9, zstd -19 and xz -9. Rates are summed bits
over summed bytes, as in the reference paper. ``--rewrite`` writes the card again from the
measures stored in ``card.json`` (when its wording changes and the model does not).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmc_audit.pipelines.default_model.split import DOCS_ROOT, list_source_files
from lmc_audit.transforms.documents.baselines import BaselineCompressors
from lmc_audit.transforms.scoring.model_handler import CausalLMHandler
from lmc_audit.transforms.records import Chunk, TokenizedChunk
from lmc_audit.transforms.scoring.tokenization import ChunkTokenizer, padded_length


def evaluate(model_dir: str, files, chunk_bytes: int = 2048, batch_rows: int = 16) -> dict:
    tok = ChunkTokenizer.from_model_dir(model_dir)
    handler = CausalLMHandler(model_dir, device="cpu", dtype="float32", max_batch_tokens=batch_rows * chunk_bytes)
    model = handler.load_model()
    baselines = BaselineCompressors()
    items, sizes = [], {"zlib": 0, "zstd": 0, "xz": 0}
    for f in files:
        data = f.path.read_bytes()
        for i in range(0, len(data), chunk_bytes):
            piece = data[i:i + chunk_bytes]
            z, s, x = baselines.sizes(piece)
            sizes["zlib"] += 8 * z
            sizes["zstd"] += 8 * s
            sizes["xz"] += 8 * x
            chunk = Chunk(f.relpath, f.relpath, 0, 0, i // chunk_bytes, i, piece, b"", z, s, x)
            targets, _ = tok.encode(piece)
            items.append(TokenizedChunk(chunk, targets, tok.start_id, padded_length(len(targets), 64, None)))
    t0 = time.time()
    bits = 0.0
    for s in range(0, len(items), batch_rows):
        for scored in handler.run_inference(items[s:s + batch_rows], model):
            bits += scored.bits
    seconds = time.time() - t0
    n_bytes = sum(len(i.chunk.data) for i in items)
    return {
        "chunks": len(items), "bytes": n_bytes, "model_bpb": bits / n_bytes,
        "zlib_bpb": sizes["zlib"] / n_bytes, "zstd_bpb": sizes["zstd"] / n_bytes, "xz_bpb": sizes["xz"] / n_bytes,
        "eval_seconds": round(seconds, 1), "eval_tokens_per_s": round(n_bytes / seconds),
    }


def chunk_bits(model_dir: str, pieces: list[bytes], batch_rows: int = 16) -> list[float]:
    """Bits of each piece under the model, each scored on its own from BOS as one chunk (at most
    2048 bytes), with the pipeline's own tokenizer and model handler."""
    tok = ChunkTokenizer.from_model_dir(model_dir)
    handler = CausalLMHandler(model_dir, device="cpu", dtype="float32", max_batch_tokens=batch_rows * 2048)
    model = handler.load_model()
    items = []
    for i, piece in enumerate(pieces):
        targets, _ = tok.encode(piece)
        chunk = Chunk(str(i), "pieces", i, 0, 0, 0, piece, b"", 0, 0, 0)
        items.append(TokenizedChunk(chunk, targets, tok.start_id, padded_length(len(targets), 64, None)))
    bits: dict[str, float] = {}
    for s in range(0, len(items), batch_rows):
        for scored in handler.run_inference(items[s:s + batch_rows], model):
            bits[scored.chunk.doc_id] = scored.bits
    return [bits[str(i)] for i in range(len(pieces))]


COPY_BYTES = 1000


def _chain(training: dict) -> list[dict]:
    """This run's training record, then the runs it continued from, newest first."""
    out = [training]
    while isinstance(out[-1].get("continued_from"), dict):
        out.append(out[-1]["continued_from"])
    return out


def copy_ratio(model_dir: str, files) -> dict:
    """bits(x + x) / bits(x) over the first ``COPY_BYTES`` bytes x of each file (summed bits): 2.0 for a
    model that cannot copy from its context, near 1.0 for one that predicts the repeat."""
    xs = [f.path.read_bytes()[:COPY_BYTES] for f in files if f.path.stat().st_size >= COPY_BYTES]
    bits = chunk_bits(model_dir, xs + [x + x for x in xs])
    single, double = sum(bits[:len(xs)]), sum(bits[len(xs):])
    return {"texts": len(xs), "bytes_each": COPY_BYTES, "bits_x": round(single, 1), "bits_xx": round(double, 1),
            "ratio": round(double / single, 4)}


def _rope_theta(config: dict) -> float:
    return (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))


def recipe(training: dict) -> list[str]:
    """The commands that rebuild a model from its training record (a grown model's whole chain)."""
    chain = _chain(training)[::-1]  # oldest first
    module = "python -m lmc_audit.pipelines.default_model"
    base = chain[0]
    lines = [f"{module}.train --out BASE --minutes {base['training_seconds'] / 60:.0f}  # the base model, "
             f"{base['steps']:,} steps here"]
    grown = next((b["grown"] for b in chain if "grown" in b), None)
    if grown:
        lines.append(f"{module}.induction --model-dir BASE --out GROWN " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in grown.items()))
    for run in chain[1:]:
        lr = run["optimizer"].split(" lr ")[1].split()[0]
        warmup = run["optimizer"].split("warmup ")[1].split()[0]
        by_steps = run.get("bound", "").startswith("--steps")
        bound = f"--steps {run['steps']}" if by_steps else f"--minutes {run['training_seconds'] / 60:.0f}"
        lines.append(f"{module}.train --init-from GROWN --out TUNED {bound} "
                     f"--lr {lr} --warmup-steps {warmup} --copy-fraction {run.get('copy_fraction', 0)} "
                     f"--random-share {run.get('random_share', 0)}"
                     + (" --freeze-circuit" if run.get("freeze_circuit") else "")
                     + (" --long-fraction 0" if "last 0%" in run.get("schedule", "") else "")
                     + (" --precision fp32" if run.get("precision") == "fp32" else "")
                     + ("" if by_steps else f"  # {run['steps']:,} steps here; --steps {run['steps']} gives "
                                            "that count on any hardware"))
    r = training.get("recalibrated")
    stored = training.get("stored", "float32").split()[0]
    retuned = training.get("retuned")
    if r:
        lines.append(f"{module}.induction --model-dir TUNED --recalibrate GROWN --alpha-scale {r['alpha_scale']} "
                     f"--dtype {stored} --out {'RECALIBRATED' if retuned else 'MODEL'}")
    if retuned:
        scales = {k: ",".join(f"{v:g}" for v in retuned[k]) for k in ("boost_scales", "threshold_scales")}
        lines.append(f"{module}.induction --model-dir {'RECALIBRATED' if r else 'TUNED'} --retune --boost-scales "
                     f"{scales['boost_scales']} --threshold-scales {scales['threshold_scales']} --dtype {stored} "
                     "--out MODEL")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--docs-root", type=Path, default=DOCS_ROOT)
    p.add_argument("--rewrite", action="store_true",
                   help="write README.md from the measures in card.json, without measuring again")
    args = p.parse_args(argv)

    files = list_source_files(args.docs_root)
    held = [f for f in files if f.held_out]
    training = json.loads((args.model_dir / "training.json").read_text())
    if args.rewrite:
        stored = json.loads((args.model_dir / "card.json").read_text())
        result, copying = stored["held_out"], stored["copy"]
    else:
        result = evaluate(str(args.model_dir), held)
        copying = copy_ratio(str(args.model_dir), held)
    card = {"held_out": result, "copy": copying, "training": training}
    (args.model_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    config = json.loads((args.model_dir / "config.json").read_text())
    r, t = result, training
    lines = [
        "---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [byte-level, compression, lmc-audit]", "---", "",
        "# lmc-audit bundled byte-level model", "",
        "A small causal language model over bytes (Llama architecture: RMSNorm, RoPE, SwiGLU) that "
        "lmc-audit uses by default. Ids 0-255 are bytes; id 256 is BOS (also padding). "
        "`config.lmc_byte_level = true` tells lmc-audit to feed it raw bytes.", "",
        "## Shape", "",
        f"- parameters: {t['parameters']:,} (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads of {config.get('head_dim', config['hidden_size'] // config['num_attention_heads'])} "
        f"dimensions, RoPE base {f'{_rope_theta(config):g}'.replace('e+', 'e')}{', attention biases' if config.get('attention_bias') else ''}, "
        f"FFN {config['intermediate_size']}, tied embeddings)",
        f"- weights: {config.get('dtype', config.get('torch_dtype', 'float32'))} safetensors, "
        f"{(args.model_dir / 'model.safetensors').stat().st_size / 1e6:.1f} MB (lmc-audit computes in float32 on CPU)", "",
        "## Training", "",
        "- data: the reStructuredText sources of the Python 3.11 documentation as Debian ships them "
        "(package `python3.11-doc`, `/usr/share/doc/python3.11-doc/html/_sources`, PSF licence)",
        f"- split: a file is held out when sha256(relative path) mod 10 == 0; {len(files) - len(held)} training files "
        f"({t['train_bytes']:,} bytes), {len(held)} held-out files ({r['bytes']:,} bytes); lists below",
        f"- training tokens: {t['training_tokens']:,} bytes in {t['steps']:,} steps ({t['schedule']})",
        f"- optimizer: {t['optimizer']}; {t['precision']}; seed {t['seed']}",
        f"- time and hardware: {t['training_seconds'] / 60:.1f} min on {t['hardware']}, torch {t['torch']}",
        f"- copy windows: {t.get('copy_fraction', 0):.0%} of training windows hold a span and a copy of it "
        f"(exact half the time, else 1-10% of its bytes replaced); {t.get('random_share', 0):.0%} of those spans are "
        "random bytes, which only copying predicts",
        *[f"- continued from an earlier run: {b.get('training_tokens', 0):,} bytes in {b.get('steps', 0):,} steps, "
          f"{b.get('training_seconds', 0) / 60:.1f} min, copy windows {b.get('copy_fraction', 0):.0%}, random-byte "
          f"spans {b.get('random_share', 0):.0%} of them ({b.get('schedule', '')}; {b.get('optimizer', '')})"
          for b in _chain(t)[1:]],
        *[f"- copying circuit written into the weights by `python -m lmc_audit.pipelines.default_model.induction` "
          f"({json.dumps(b['grown'])}): previous-byte heads and match heads added to every layer"
          + ("; the match heads veto: a key whose previous byte is not the byte just read loses the veto's "
             "bytes of score (`--matches TAU:ALPHA:VETO`), so a copy stops at the first byte where it departs "
             "from its original" if b["grown"].get("veto_dims") else "")
          for b in _chain(t) if "grown" in b][:1],
        *["- fine-tuned with the circuit frozen (`train.py --freeze-circuit`): the circuit's weights and the old "
          "weights' entries on its dimensions held at their built values, the old weights trained around it"
          for b in _chain(t) if b.get("freeze_circuit")][:1],
        *[f"- match heads recalibrated after fine-tuning (`induction.py --recalibrate`): scores x{r_['score_scale']:.3f}, "
          f"copy boost x{r_['boost_scale']:.3f} (alpha scale {r_['alpha_scale']})"
          for r_ in [t.get("recalibrated")] if r_],
        *[f"- match heads retuned (`induction.py --retune`): copy boosts x{', x'.join(f'{v:g}' for v in r_['boost_scales'])}, "
          f"thresholds x{', x'.join(f'{v:g}' for v in r_['threshold_scales'])} (one per match head, strong first)"
          for r_ in [t.get("retuned")] if r_],
        f"- in all: {sum(b.get('training_tokens', 0) for b in _chain(t)):,} training bytes in "
        f"{sum(b.get('training_seconds', 0) for b in _chain(t)) / 60:.1f} min",
        "- script: `python -m lmc_audit.pipelines.default_model.train`", "",
        "## Rebuilding it", "",
        "On the training files of the split below (never the held-out ones), from the repository's root. "
        "Training is bounded by wall-clock minutes, so other hardware gives other weights; the base model "
        "this one was built from is kept in the repository (`pipelines/assets/base_model`, not installed "
        "with the package) and may stand for BASE"
        + ("; so is the recalibrated model it was retuned from, 0.4.0's bundled model "
           "(`pipelines/assets/model_0.4.0`), which may stand for RECALIBRATED: the last step, run on it, gives "
           "these weights bit for bit." if t.get("retuned") else "."), "",
        "```", *recipe(t), "```", "",
        "## Held-out compression (2048-byte chunks, each coded on its own)", "",
        "Measured by `python -m lmc_audit.pipelines.default_model.card`:", "",
        "| compressor | bits per byte | % of raw |", "|---|---|---|",
        f"| this model (float32, CPU) | **{r['model_bpb']:.3f}** | {100 * r['model_bpb'] / 8:.1f} |",
        f"| zlib -9 | {r['zlib_bpb']:.3f} | {100 * r['zlib_bpb'] / 8:.1f} |",
        f"| zstd -19 | {r['zstd_bpb']:.3f} | {100 * r['zstd_bpb'] / 8:.1f} |",
        f"| xz -9 | {r['xz_bpb']:.3f} | {100 * r['xz_bpb'] / 8:.1f} |", "",
        f"{r['chunks']:,} chunks, {r['bytes']:,} bytes. Model / xz = {r['model_bpb'] / r['xz_bpb']:.3f}; "
        f"model / zstd = {r['model_bpb'] / r['zstd_bpb']:.3f}.", "",
        "## Copying from its context", "",
        f"bits(x + x) / bits(x) = **{copying['ratio']:.3f}** over the first {copying['bytes_each']:,} bytes x of each of "
        f"{copying['texts']} held-out files ({copying['bits_xx']:,.0f} / {copying['bits_x']:,.0f} bits; x + x scored as one "
        "chunk from BOS). A model that cannot copy gives 2.0; near 1.0, the repeat costs almost nothing, so the "
        "model's normalized compression distance (NCD) tells copies from distinct texts "
        "(lmc-audit's README, Duplicates).", "",
        "## Split (sha256 of each file)", "",
        "| split | sha256 | file |", "|---|---|---|",
    ]
    for f in files:
        lines.append(f"| {'held-out' if f.held_out else 'train'} | `{f.sha256()}` | {f.relpath} |")
    (args.model_dir / "README.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
