"""``lmc-audit membership``: was the model trained on these shards? A shard-level two-sample test.

    lmc-audit membership --manifests OUT --suspect GLOB... --reference GLOB... [--json]

Single documents say little (MIMIR: per-document attacks near chance on data
seen once); a set of documents says more (Maini et al. 2024, "LLM Dataset
Inference"). The documents of the suspect shards are compared with those of
reference shards that the model surely did not see and that come from the
same distribution (the test is only as fair as this reference: see the blind
baseline below).

Statistics, each on the documents manifest's per-document signals, oriented
so that larger means "more predictable to the model": ``-bpb``,
``-zlib_ratio``, ``min_k``, ``min_k_pp`` and, when the run had a reference
model, ``-reference_diff_bpb``.

- Per signal: the AUC (Mann-Whitney U / n1 n2: the chance that a suspect
  document is more predictable than a reference one), its 95% interval
  (Hanley & McNeil 1982), and the one-sided Mann-Whitney p-value (scipy).
- ``p_value``, the verdict's: a permutation test of the largest per-signal
  AUC (max-T over signals): the share of ``--permutations`` relabellings of
  the same documents whose largest AUC reaches the observed one, (b + 1) /
  (P + 1). It uses every document and every signal, and its false-positive
  rate is alpha whatever the signals' correlation (Bonferroni would be
  conservative). ``auc`` is that largest AUC.
- ``combined``: as Maini et al., a logistic regression on the standardized
  signals fitted on half of each group (halves by a hash of the document id)
  and tested on the other half (AUC, Mann-Whitney p).
- ``blind``: the same fitted test on model-free features (zlib, zstd and xz
  bits per byte, log bytes). Das et al. 2024 found such blind classifiers
  beating published attacks where members and non-members differ in
  distribution: if the blind classifier separates its test half (one-sided
  p < 0.01), the groups differ without the model and the verdict says so.

Suspect and reference are ``fnmatch`` globs matched against the ``shard``
column, or against its last path component when the glob holds no ``/``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
from scipy.optimize import minimize
from scipy.stats import mannwhitneyu, norm, rankdata

# manifest column -> sign that makes larger mean "more predictable to the model"
SIGNALS = {"bpb": -1.0, "zlib_ratio": -1.0, "min_k": 1.0, "min_k_pp": 1.0, "reference_diff_bpb": -1.0}
BLIND = ("zlib_bpb", "zstd_bpb", "xz_bpb", "bytes")
PERMUTATIONS = 10_000
ALPHA = 0.05
MIN_DOCUMENTS = 10
BLIND_ALPHA = 0.01  # a blind classifier this significant on its test half means the groups differ without the model


@dataclass(frozen=True)
class Groups:
    """Per-document columns of the two groups (documents with a missing signal dropped, counted)."""

    suspect: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    suspect_ids: list[str]
    reference_ids: list[str]
    dropped: int


def shard_matches(shard: str, globs: list[str]) -> bool:
    name = shard.rstrip("/").rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(shard if "/" in g else name, g) for g in globs)


def load_groups(manifests: str, suspect: list[str] | None, reference: list[str]) -> Groups:
    """The documents of the matching shards (``suspect`` None: every shard not in the reference), reading
    only the columns the test needs."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(manifests)
    path = f"{root.rstrip('/')}/documents"
    if not fs.exists(path):
        raise SystemExit(f"lmc-audit membership: no documents manifest under {manifests} (run lmc-audit run first)")
    dataset = ds.dataset(path, format="parquet", filesystem=fs)
    present = set(dataset.schema.names)
    columns = ["doc_id", "shard", *[c for c in (*SIGNALS, *BLIND) if c in present]]
    # The shards manifest has one row per shard; the documents' shard column has one per document.
    listing = f"{root.rstrip('/')}/shards"
    source = ds.dataset(listing, format="parquet", filesystem=fs) if fs.exists(listing) else dataset
    shards = sorted(set(source.to_table(columns=["shard"]).column("shard").to_pylist()))
    in_reference = [s for s in shards if shard_matches(s, reference)]
    in_suspect = [s for s in shards if (shard_matches(s, suspect) if suspect is not None else s not in in_reference)]
    both = sorted(set(in_suspect) & set(in_reference))
    if both:
        raise SystemExit(f"lmc-audit membership: shards match both --suspect and --reference: {', '.join(both[:5])}")
    for name, chosen, globs in (("--suspect", in_suspect, suspect or ["(the other shards)"]),
                                ("--reference", in_reference, reference)):
        if not chosen:
            raise SystemExit(f"lmc-audit membership: {name} {' '.join(globs)} matches none of the "
                             f"{len(shards)} shards in {manifests} (for example {shards[0] if shards else 'none'})")
    tables = [dataset.to_table(columns=columns, filter=pc.field("shard").isin(chosen))
              .sort_by([("shard", "ascending"), ("doc_id", "ascending")]) for chosen in (in_suspect, in_reference)]
    # A signal counts when both groups have it (reference_diff_bpb only with a reference model).
    usable = [c for c in SIGNALS if c in present and all(t.column(c).null_count < len(t) for t in tables)]
    dropped = 0
    out = []
    for table in tables:
        keep = np.ones(len(table), bool)
        for c in usable:
            keep &= ~np.asarray(table.column(c).is_null())
        dropped += int((~keep).sum())
        cols = {c: np.asarray(table.column(c).to_numpy(zero_copy_only=False), float)[keep]
                for c in columns[2:] if c in usable or c in BLIND}
        ids = [i for i, k in zip(table.column("doc_id").to_pylist(), keep) if k]
        out.append((cols, ids))
    return Groups(out[0][0], out[1][0], out[0][1], out[1][1], dropped)


def auc_interval(auc: float, n1: int, n2: int) -> list[float]:
    """95% interval of an AUC by Hanley & McNeil's (1982) standard error."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt(max(auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n2 - 1) * (q2 - auc * auc), 0.0) / (n1 * n2))
    z = norm.ppf(0.975)
    return [round(max(0.0, auc - z * se), 4), round(min(1.0, auc + z * se), 4)]


def signal_test(suspect: np.ndarray, reference: np.ndarray) -> dict:
    """AUC, its interval and the one-sided p-value that suspect values are larger."""
    test = mannwhitneyu(suspect, reference, alternative="greater")
    auc = float(test.statistic) / (len(suspect) * len(reference))
    return {"auc": round(auc, 4), "auc_95ci": auc_interval(auc, len(suspect), len(reference)),
            "p_value": float(test.pvalue)}


def max_auc_permutation(matrix: np.ndarray, is_suspect: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
    """Largest per-column AUC and its permutation p-value (max-T over columns).

    ``matrix`` [n, k] oriented signals; ``is_suspect`` [n] bool. A column's AUC follows from the sum of
    the suspect documents' ranks, so P relabellings cost one [P, n] x [n, k] product."""
    n1 = int(is_suspect.sum())
    n2 = len(is_suspect) - n1
    ranks = np.column_stack([rankdata(matrix[:, j]) for j in range(matrix.shape[1])])  # [n, k], ties averaged

    def aucs(labels: np.ndarray) -> np.ndarray:  # labels [..., n] of 0/1
        return (labels @ ranks - n1 * (n1 + 1) / 2) / (n1 * n2)

    observed = float(aucs(is_suspect.astype(float)).max())
    rng = np.random.default_rng(seed)
    exceed = 0
    step = max(1, min(1000, (1 << 22) // len(is_suspect)))  # relabellings at once: [step, n] stays near 32 MiB
    for start in range(0, permutations, step):
        size = min(step, permutations - start)
        labels = np.zeros((size, len(is_suspect)))
        order = rng.random((size, len(is_suspect))).argsort(axis=1)[:, :n1]  # [size, n1] random suspects
        np.put_along_axis(labels, order, 1.0, axis=1)
        exceed += int((aucs(labels).max(axis=1) >= observed - 1e-12).sum())
    return observed, (exceed + 1) / (permutations + 1)


def _standardize(x: np.ndarray, fit: np.ndarray) -> np.ndarray:
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    return (x - mean) / np.where(std > 0, std, 1.0)


def fitted_test(suspect: np.ndarray, reference: np.ndarray, suspect_ids: list[str],
                reference_ids: list[str]) -> dict | None:
    """Logistic regression (L2, scipy's L-BFGS) on one half of each group, AUC and p on the other half."""

    def half(ids: list[str]) -> np.ndarray:
        return np.array([hashlib.sha256(i.encode()).digest()[0] % 2 == 0 for i in ids], bool)

    fit_s, fit_r = half(suspect_ids), half(reference_ids)
    xs, xr = suspect[fit_s], reference[fit_r]
    ts, tr = suspect[~fit_s], reference[~fit_r]
    if min(len(xs), len(xr), len(ts), len(tr)) < 2:
        return None
    train = np.vstack([xs, xr])
    x = np.column_stack([_standardize(train, train), np.ones(len(train))])
    y = np.concatenate([np.ones(len(xs)), np.zeros(len(xr))])

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        p = 1 / (1 + np.exp(-z))
        value = np.logaddexp(0, z).sum() - y @ z + 0.5 * w[:-1] @ w[:-1]
        grad = x.T @ (p - y) + np.concatenate([w[:-1], [0.0]])
        return float(value), grad

    w = minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x
    score = lambda m: np.column_stack([_standardize(m, train), np.ones(len(m))]) @ w  # noqa: E731
    out = signal_test(score(ts), score(tr))
    out.update({"weights": [round(float(v), 4) for v in w[:-1]], "fit_documents": [len(xs), len(xr)],
                "test_documents": [len(ts), len(tr)]})
    return out


def dataset_inference(groups: Groups, permutations: int = PERMUTATIONS, seed: int = 0,
                      alpha: float = ALPHA) -> dict:
    s, r = groups.suspect, groups.reference
    n1, n2 = len(groups.suspect_ids), len(groups.reference_ids)
    if min(n1, n2) < MIN_DOCUMENTS:
        raise SystemExit(f"lmc-audit membership: {n1} suspect and {n2} reference documents with signals; "
                         f"the test needs at least {MIN_DOCUMENTS} in each (about 43 per group detect AUC 0.7)")
    names = [c for c in SIGNALS if c in s]
    oriented_s = np.column_stack([SIGNALS[c] * s[c] for c in names])
    oriented_r = np.column_stack([SIGNALS[c] * r[c] for c in names])
    per_signal = {c: signal_test(oriented_s[:, j], oriented_r[:, j]) for j, c in enumerate(names)}
    matrix = np.vstack([oriented_s, oriented_r])
    labels = np.concatenate([np.ones(n1, bool), np.zeros(n2, bool)])
    best_auc, p_value = max_auc_permutation(matrix, labels, permutations, seed)
    best = max(names, key=lambda c: (per_signal[c]["auc"], c))
    blind_names = [c for c in BLIND if c in s]

    def blind_matrix(g: dict[str, np.ndarray]) -> np.ndarray:
        return np.column_stack([np.log(np.maximum(g[c], 1)) if c == "bytes" else g[c] for c in blind_names])

    blind = fitted_test(blind_matrix(s), blind_matrix(r), groups.suspect_ids, groups.reference_ids)
    combined = fitted_test(oriented_s, oriented_r, groups.suspect_ids, groups.reference_ids)
    shifted = blind is not None and blind["p_value"] < BLIND_ALPHA
    if p_value < alpha:
        verdict = (f"The suspect documents are more predictable to the model than the reference documents "
                   f"(p = {p_value:.2g} < {alpha}; largest AUC {best_auc:.3f}, {best}): consistent with the model "
                   f"having been trained on them.")
    else:
        verdict = (f"No evidence at alpha {alpha} that the model saw the suspect documents more than the reference "
                   f"(p = {p_value:.2g}; largest AUC {best_auc:.3f}, {best}).")
    if shifted:
        verdict += (f" Caution: a model-free classifier separates the groups too (blind AUC {blind['auc']:.3f}): "
                    "the reference differs in distribution, so the test may reflect that rather than training.")
    return {
        "p_value": p_value, "auc": round(best_auc, 4), "best_signal": best, "alpha": alpha,
        "statistic": "permutation test of the largest per-signal AUC (max over signals)",
        "permutations": permutations, "documents": {"suspect": n1, "reference": n2, "dropped_missing": groups.dropped},
        "signals": per_signal, "combined": combined, "blind": blind, "blind_features": blind_names,
        "verdict": verdict,
    }


def run_membership(manifests: str, reference: list[str]) -> dict:
    """The test of a run given ``--reference-shards``: every other shard is suspect. For run.json and the
    report; a test that cannot be made (too few documents) is recorded with the reason, never fails the job."""
    try:
        result = dataset_inference(load_groups(manifests, None, reference))
    except SystemExit as exc:
        return {"error": str(exc), "reference": reference}
    return {**result, "reference": reference}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmc-audit membership", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifests", required=True, help="a run's output folder or URL")
    p.add_argument("--suspect", nargs="+", required=True, action="extend", help="globs of the suspect shards")
    p.add_argument("--reference", nargs="+", required=True, action="extend",
                   help="globs of reference shards the model did not see, from the same distribution")
    p.add_argument("--permutations", type=int, default=PERMUTATIONS, help=f"default {PERMUTATIONS}")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"level of the verdict (default {ALPHA})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.permutations < 100:
        raise SystemExit("lmc-audit membership: --permutations must be at least 100")
    result = dataset_inference(load_groups(args.manifests, args.suspect, args.reference), args.permutations,
                               alpha=args.alpha)
    result.update({"suspect": args.suspect, "reference": args.reference})
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    d = result["documents"]
    print(f"suspect {d['suspect']} documents, reference {d['reference']} ({d['dropped_missing']} without signals)")
    print(f"{'signal':<20}{'AUC':>7}  {'95% CI':<16}{'p (one-sided)':>14}")
    for name, t in result["signals"].items():
        print(f"{name:<20}{t['auc']:>7.3f}  [{t['auc_95ci'][0]:.3f}, {t['auc_95ci'][1]:.3f}]{t['p_value']:>14.3g}")
    for name in ("combined", "blind"):
        t = result[name]
        if t:
            print(f"{name + ' (fitted)':<20}{t['auc']:>7.3f}  [{t['auc_95ci'][0]:.3f}, {t['auc_95ci'][1]:.3f}]"
                  f"{t['p_value']:>14.3g}")
    print(f"p_value {result['p_value']:.3g} ({result['statistic']}, {result['permutations']:,} permutations)")
    print(result["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
