"""The shard-level membership test: its statistics against scipy, its calibration, the command's JSON."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import mannwhitneyu

from lmc_audit.pipelines import cli
from lmc_audit.pipelines.membership import (Groups, auc_interval, dataset_inference, max_auc_permutation,
                                            shard_matches, signal_test)


def test_signal_auc_and_p_value_are_mann_whitney():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, 12), rng.normal(0, 1, 15)
    t = signal_test(a, b)
    pairs = (a[:, None] > b[None, :]).mean()
    assert t["auc"] == pytest.approx(pairs, abs=1e-4)
    assert t["p_value"] == pytest.approx(mannwhitneyu(a, b, alternative="greater").pvalue)
    low, high = t["auc_95ci"]
    assert low < t["auc"] < high
    # Hanley & McNeil: the interval narrows as the groups grow.
    assert np.diff(auc_interval(0.7, 400, 400))[0] < np.diff(auc_interval(0.7, 40, 40))[0] / 3


def test_permutation_p_of_one_signal_matches_the_exact_rank_test():
    """With one signal the max-T test is the rank-sum test: its permutation p approaches scipy's exact p."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.8, 1, 8), rng.normal(0, 1, 9)
    auc, p = max_auc_permutation(np.concatenate([a, b])[:, None], np.arange(17) < 8, 20_000, seed=0)
    exact = mannwhitneyu(a, b, alternative="greater", method="exact")
    assert auc == pytest.approx(exact.statistic / (8 * 9))
    assert p == pytest.approx(exact.pvalue, abs=0.01)


def _groups(rng: np.random.Generator, n1: int, n2: int, shift: float) -> Groups:
    def cols(n: int, d: float) -> dict[str, np.ndarray]:
        base = rng.normal(0, 1, n)
        return {"bpb": 1.5 - d + 0.3 * base + 0.1 * rng.normal(0, 1, n), "zlib_ratio": 0.4 + 0.05 * base,
                "min_k": -3 + d + rng.normal(0, 0.5, n), "min_k_pp": -1 + rng.normal(0, 0.5, n),
                "zlib_bpb": 3.5 + rng.normal(0, 0.2, n), "zstd_bpb": 3.5 + rng.normal(0, 0.2, n),
                "xz_bpb": 3.9 + rng.normal(0, 0.2, n), "bytes": rng.integers(1000, 5000, n).astype(float)}
    return Groups(cols(n1, shift), cols(n2, 0.0), [f"s{i}" for i in range(n1)], [f"r{i}" for i in range(n2)], 0)


def test_false_positive_rate_under_the_null_is_alpha():
    """200 null comparisons of exchangeable groups: the max-T test rejects at about alpha (not far below,
    as Bonferroni over correlated signals would; not above)."""
    rng = np.random.default_rng(2)
    rejections = sum(dataset_inference(_groups(rng, 25, 25, 0.0), 500, seed=i)["p_value"] < 0.05
                     for i in range(200))
    assert 4 <= rejections <= 18  # 0.02-0.09: a 95% binomial range around 10 of 200


def test_a_shifted_suspect_group_is_found_and_a_blind_shift_is_called_out():
    rng = np.random.default_rng(3)
    found = dataset_inference(_groups(rng, 60, 60, 0.3), 2000)
    assert found["p_value"] < 0.01 and found["auc"] > 0.7 and found["best_signal"] in ("bpb", "min_k")
    assert "consistent with the model having been trained" in found["verdict"]
    assert found["blind"]["p_value"] > 0.01 and "Caution" not in found["verdict"]
    shifted = _groups(rng, 60, 60, 0.0)
    shifted.suspect["xz_bpb"] += 1.0  # the groups differ without the model
    assert "Caution" in dataset_inference(shifted, 500)["verdict"]


def test_shard_globs_match_the_path_or_its_name():
    assert shard_matches("s3://bucket/corpus/train_0.jsonl", ["train_*"])
    assert shard_matches("s3://bucket/corpus/train_0.jsonl", ["s3://bucket/*/train_*"])
    assert not shard_matches("s3://bucket/train/x.jsonl", ["train*"])


def test_membership_command_prints_one_json_object(tmp_path, capsys):
    rng = np.random.default_rng(4)
    g = _groups(rng, 30, 30, 0.4)
    rows = []
    for shard_prefix, cols, ids in (("suspect", g.suspect, g.suspect_ids), ("ref", g.reference, g.reference_ids)):
        for i, doc_id in enumerate(ids):
            rows.append({"doc_id": doc_id, "shard": f"/data/{shard_prefix}_{i % 3}.jsonl",
                         **{c: float(v[i]) for c, v in cols.items()}})
            if shard_prefix == "suspect":  # a signal only one group has is left out, not a reason to drop
                rows[-1]["reference_diff_bpb"] = -0.1
    rows.append({**rows[0], "doc_id": "empty", "bpb": None, "min_k": None})  # no signals: dropped, counted
    (tmp_path / "documents").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "documents" / "part-0.parquet")
    argv = ["membership", "--manifests", str(tmp_path), "--suspect", "suspect_*", "--reference", "ref_*",
            "--permutations", "1000", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == {"suspect": 30, "reference": 30, "dropped_missing": 1}
    assert 0 < result["p_value"] < 0.01 and result["auc"] == max(s["auc"] for s in result["signals"].values())
    assert set(result["signals"]) == {"bpb", "zlib_ratio", "min_k", "min_k_pp"}
    assert result["combined"]["test_documents"][0] + result["combined"]["fit_documents"][0] == 30
    assert cli.main(argv) == 0 and json.loads(capsys.readouterr().out) == result  # deterministic
    with pytest.raises(SystemExit, match="matches none"):
        cli.main(["membership", "--manifests", str(tmp_path), "--suspect", "nope*", "--reference", "ref_*"])
    with pytest.raises(SystemExit, match="both"):
        cli.main(["membership", "--manifests", str(tmp_path), "--suspect", "*", "--reference", "ref_*"])


def test_a_run_with_reference_shards_records_and_reports_the_test(tmp_path, memorizing_model):
    """Suspect: pieces of the text the model memorized; reference: pieces of text it never saw."""
    from conftest import MEMORIZED, UNSEEN
    from lmc_audit.pipelines.audit import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in (("suspect", MEMORIZED), ("ref", UNSEEN)):
        pieces = [text[i:i + 256].decode("utf-8", "replace") for i in range(0, len(text) - 128, 256)]
        docs = [{"id": f"{name}{j}", "text": pieces[j % len(pieces)]} for j in range(12)]
        (corpus / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    record = run(["--input", str(corpus), "--output", str(out), "--model", memorizing_model, "--quiet",
                  "--no-coding", "--no-dedup", "--chunk-bytes", "256", "--id-field", "id",
                  "--reference-shards", "ref.jsonl"])
    m = json.loads((out / "run.json").read_text())["membership"]
    assert m == record["membership"]
    assert m["documents"]["suspect"] == m["documents"]["reference"] == 12
    assert m["p_value"] < 0.01 and m["auc"] > 0.9 and m["reference"] == ["ref.jsonl"]
    report = (out / "report.html").read_text()
    assert "<h2>Membership test</h2>" in report and "consistent with the model having been trained" in report
    with pytest.raises(SystemExit, match="matches none"):
        run(["--input", str(corpus), "--output", str(tmp_path / "o2"), "--model", memorizing_model,
             "--reference-shards", "nothing*"])
