"""The copying circuit (pipelines/default_model/induction.py), grown from the base model the bundled one
was built from, and the bundled model's own copying."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc_audit.pipelines.default_model.induction import (_aging_rotation, _phase_codes, grow,
                                                          positional_biases)
from lmc_audit.pipelines.default_model.train import BOS_ID
ASSETS = Path(__file__).resolve().parents[1] / "pipelines" / "assets"
SAMPLE = ASSETS / "sample"
BASE_MODEL = ASSETS / "base_model"  # in the repository only: the package installs the bundled model


def base_model_dir() -> str:
    return str(BASE_MODEL)


def _sample_stream() -> np.ndarray:
    data = b"".join(p.read_bytes() for p in sorted(SAMPLE.glob("*.txt")))
    return np.frombuffer(data, dtype=np.uint8)


def _bits(model, rows: torch.Tensor) -> torch.Tensor:
    """Bits of each row's bytes after BOS, summed per row."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=rows).logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, rows[:, 1:, None])[..., 0].sum(-1) / math.log(2)


def _copy_with_a_word_put_in(name: str = "library__code.txt") -> tuple[bytes, int, int, torch.Tensor]:
    """(x, cut, start, rows): x's first 700 bytes, then a copy of them with "Zebra " put in at a word's first
    byte ``cut``; ``start`` is the copy's first byte in the row (after BOS and the blank line)."""
    x = (SAMPLE / name).read_bytes()[:700]
    cut = x.index(b" ", 500) + 1
    y = x[:cut] + b"Zebra " + x[cut:]
    return x, cut, len(x) + 2, torch.tensor([[BOS_ID, *(x + b"\n\n" + y)]])


@pytest.fixture(scope="module")
def grown():
    return grow(BASE_MODEL, _sample_stream())


def test_positional_biases_single_out_one_offset():
    theta, half = 1e8, 64
    for delta in (1, 3, 9):
        w, margin = positional_biases(delta, theta, half, horizon=2048)
        assert margin > 0 and abs(w.sum() - 1) < 1e-9
        inv = theta ** (-np.arange(half) * 2.0 / (2 * half))
        # q.k at distance e: the key's bias is the query's turned by delta, RoPE turns it back by e
        scores = {e: float((w * np.cos((e - delta) * inv)).sum()) for e in range(2048)}
        best = max(scores, key=scores.get)
        assert best == delta
        assert scores[delta] - max(v for e, v in scores.items() if e != delta) >= margin * 0.999


def test_codes_never_match_themselves_at_another_age():
    rng = np.random.default_rng(0)
    codes = _phase_codes(256, 52, rng)
    t = _aging_rotation(52)
    for d in (1, 2, 9, 25):
        td = np.linalg.matrix_power(t, d)
        assert np.abs(np.einsum("ia,ab,ib->i", codes, td, codes)).max() < 1e-9
    assert np.allclose(np.linalg.norm(codes, axis=1), 1.0)


def test_grown_model_keeps_the_old_predictions_when_its_new_heads_are_silent(grown):
    from transformers import LlamaForCausalLM

    old = LlamaForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32).eval()
    silent = copy.deepcopy(grown)
    h0, nd = old.config.num_attention_heads, silent.config.head_dim
    with torch.no_grad():
        for layer in silent.model.layers:
            layer.self_attn.o_proj.weight[:, h0 * nd:] = 0
    data = (SAMPLE / "howto__sorting.txt").read_bytes()[:1500]
    rows = torch.tensor([[BOS_ID, *data]])
    a, b = _bits(old, rows).item(), _bits(silent, rows).item()
    # The added scratch dimensions (codes, a constant) change each position's RMS by about 1%.
    assert abs(a - b) / a < 0.01, (a, b)


def test_grown_model_copies_a_repeated_text_that_the_base_model_does_not(grown):
    from transformers import LlamaForCausalLM

    old = LlamaForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32).eval()
    x = (SAMPLE / "library__code.txt").read_bytes()[:800]
    once = torch.tensor([[BOS_ID, *x]])
    twice = torch.tensor([[BOS_ID, *(x + x)]])
    old_ratio = (_bits(old, twice) / _bits(old, once)).item()
    new_ratio = (_bits(grown, twice) / _bits(grown, once)).item()
    assert old_ratio > 1.9
    assert new_ratio < 1.5, new_ratio
    # and the copy costs little on text that does not repeat
    y = (SAMPLE / "howto__unicode.txt").read_bytes()[:1500]
    rows = torch.tensor([[BOS_ID, *y]])
    assert _bits(grown, rows).item() < 1.1 * _bits(old, rows).item()


def test_the_cards_recipe_is_what_the_scripts_accept():
    """Every command of a model card's recipe parses with its script's own parser, and says what the
    record holds: here a vetoing circuit fine-tuned in fp32."""
    import shlex

    from lmc_audit.pipelines.default_model import induction, train
    from lmc_audit.pipelines.default_model.card import recipe

    record = json.loads((ASSETS / "model" / "training.json").read_text())
    record["precision"] = "fp32"
    record["continued_from"]["grown"].update(scratch=158, matches="20:50:8,12:30:8", veto_dims=18)
    record["retuned"] = {"boost_scales": [1.0, 1.3], "threshold_scales": [1.0, 0.8]}
    parsers = {"train": train.build_parser(), "induction": induction.build_parser()}
    parsed = []
    for line in recipe(record):
        words = shlex.split(line.split("#")[0])
        parsed.append(parsers[words[2].rsplit(".", 1)[1]].parse_args(words[3:]))
    grown = next(a for a in parsed if getattr(a, "matches", None) and a.recalibrate is None)
    assert (grown.scratch, grown.matches, grown.veto_dims) == (158, "20:50:8,12:30:8", 18)
    tuned = next(a for a in parsed if getattr(a, "init_from", None))
    assert tuned.precision == "fp32" and tuned.freeze_circuit
    assert parsed[0].precision == "bf16"  # the base model's own run
    recalibrated = next(a for a in parsed if getattr(a, "recalibrate", None))
    retuned = parsed[-1]
    assert retuned.retune and retuned.model_dir == recalibrated.out and str(retuned.out) == "MODEL"
    assert (retuned.boost_scales, retuned.threshold_scales) == ("1,1.3", "1,0.8")


def test_a_vetoing_match_head_stops_copying_at_the_first_wrong_byte():
    """A copy with a word put in: the byte just read is not the one the original had there. A plain match
    head still scores the original's next key (25 of 26 ages match) and predicts the byte after it; a
    vetoing head (the byte before the key must be the byte just read) rests on BOS instead. Where the
    copy agrees with the original the veto adds nothing: both heads copy alike."""
    stream = _sample_stream()
    plain = grow(BASE_MODEL, stream, scratch=122, widen=3, matches=((20.0, 50.0),))
    vetoing = grow(BASE_MODEL, stream, scratch=158, widen=3, matches=((20.0, 50.0, 8.0),))
    x, cut, start, rows = _copy_with_a_word_put_in()

    def log2p(model) -> torch.Tensor:  # [position, byte]: log2 p(next byte = byte | bytes up to position)
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=rows).logits[0].float(), dim=-1) / math.log(2)

    lp_plain, lp_veto = log2p(plain), log2p(vetoing)
    z = start + cut  # row index of 'Z' (BOS is index 0, so the copy's byte i sits at start + 1 + i)
    assert rows[0, z + 1] == ord("Z")
    # having read 'Z' where the original has x[cut]: the plain head predicts x[cut + 1], the veto does not
    after = x[cut + 1]
    assert lp_plain[z + 1, after] - lp_veto[z + 1, after] > 4.0, (lp_plain[z + 1, after], lp_veto[z + 1, after])
    # in the copy's agreeing stretch before the edit both predict the original's bytes alike
    idx = torch.arange(start + 100, start + cut)
    targets = rows[0, idx + 1]
    agree_plain, agree_veto = lp_plain[idx, targets].mean().item(), lp_veto[idx, targets].mean().item()
    assert agree_plain > -1.0 and abs(agree_plain - agree_veto) < 0.25, (agree_plain, agree_veto)


def test_freezing_the_circuit_holds_exactly_what_was_built(grown):
    """``circuit_entries`` masks the circuit and the old weights' scratch entries, and nothing of the old
    model: with every masked entry zeroed the grown model predicts as the base model does. Held
    through an optimizer step (``train.py --freeze-circuit``), masked entries keep their built values
    while the others train."""
    from transformers import LlamaForCausalLM

    from lmc_audit.pipelines.default_model.induction import circuit_entries
    from lmc_audit.pipelines.default_model.train import hold_entries, restore_entries

    masks = circuit_entries(grown, {"scratch": 62, "matches": "20:30,12:8"})
    rows = torch.tensor(np.concatenate([[BOS_ID], _sample_stream()[5000:5511]]), dtype=torch.int64)[None]
    plain = copy.deepcopy(grown)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p[masks[name]] = 0.0
    old = LlamaForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=rows).logits, old(input_ids=rows).logits, atol=1e-3)
        assert not torch.allclose(grown(input_ids=rows).logits, old(input_ids=rows).logits, atol=1e-3)

    model = copy.deepcopy(grown).train()
    built = {n: p.detach().clone() for n, p in model.named_parameters()}
    held = hold_entries(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(input_ids=rows, labels=rows).loss.backward()
    opt.step()
    restore_entries(held)
    moved = 0
    for name, p in model.named_parameters():
        assert torch.equal(p[masks[name]], built[name][masks[name]]), name
        moved += int((p[~masks[name]] != built[name][~masks[name]]).sum())
    assert moved > 0.5 * sum(int((~m).sum()) for m in masks.values())


def test_recalibrating_puts_the_match_heads_back_after_the_residual_grows(grown):
    """Fine-tuning grows the old weights' share of the residual, which the match heads read and write
    through RMS norms; ``recalibrate`` scales them back. A grown residual simulated: the old MLPs of the
    last two layers write 3x and 2x as much into the old dimensions."""
    from lmc_audit.pipelines.default_model.induction import circuit_scales, recalibrate

    stream = _sample_stream()
    record = {"scratch": 62, "matches": "20:30,12:8"}
    built = circuit_scales(grown, stream)

    same = copy.deepcopy(grown)
    done = recalibrate(same, built, record, stream)
    assert done["score_scale"] == pytest.approx(1.0, abs=1e-6) and done["boost_scale"] == pytest.approx(1.0, abs=1e-6)
    for (name, p), q in zip(same.named_parameters(), grown.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=0), name

    d0 = grown.config.hidden_size - record["scratch"]
    louder = copy.deepcopy(grown)
    with torch.no_grad():
        louder.model.layers[-2].mlp.down_proj.weight[:d0] *= 3
        louder.model.layers[-1].mlp.down_proj.weight[:d0] *= 2
    x = (SAMPLE / "library__code.txt").read_bytes()[:600]
    once, twice = torch.tensor([[BOS_ID, *x]]), torch.tensor([[BOS_ID, *(x + x)]])

    def ratio(model) -> float:
        return (_bits(model, twice) / _bits(model, once)).item()

    r_built, r_louder = ratio(grown), ratio(louder)
    assert r_louder > r_built + 0.1, (r_built, r_louder)
    done = recalibrate(louder, built, record, stream)
    assert done["score_scale"] > 1.2 and done["boost_scale"] > 1.2, done
    r_back = ratio(louder)
    # about half the copying lost comes back (the rest: the earlier layers' accumulator, not rescaled)
    assert r_back < r_louder - 0.08 and r_back - r_built < 0.7 * (r_louder - r_built), (r_built, r_louder, r_back)


def test_the_bundled_model_copies_a_sample_document_as_its_card_says():
    """The shipped model (the base grown, fine-tuned with its circuit frozen, recalibrated; stored in
    bfloat16) through the pipeline's own tokenizer and handler, in float32: a repeat of a sample document
    costs a small fraction of its first reading, where the base model pays for it again."""
    from lmc_audit.pipelines.default_model.card import chunk_bits
    from lmc_audit.transforms.scoring.model_loading import bundled_model_dir

    assert "recalibrated" in json.loads((Path(bundled_model_dir()) / "training.json").read_text())
    xs = [(SAMPLE / name).read_bytes()[:1000] for name in ("library__code.txt", "howto__sorting.txt")]
    for model_dir, low, high in ((str(bundled_model_dir()), 1.0, 1.15), (base_model_dir(), 1.9, 2.2)):
        bits = chunk_bits(model_dir, xs + [x + x for x in xs])
        ratios = [double / single for single, double in zip(bits[:2], bits[2:])]
        assert all(low < r < high for r in ratios), (model_dir, ratios)


def test_the_bundled_model_stops_copying_at_an_edit_where_0_3_0s_went_on():
    """Since 0.4.0 the shipped model's match heads veto: in a copy with a word put in, having read the
    word's first byte where the original has another, 0.4.0's model no longer predicts the original's next
    byte, where 0.3.0's model (no veto) still does. 0.5.0's retune lowered the weak head's threshold with
    its veto (x0.8 of 12 + 8 bytes), so a long match survives one wrong byte there at reduced confidence:
    the original's next byte falls from near certain (0.3.0) to less than one chance in two. All three
    copy the agreeing stretch before the edit at a fraction of a bit per byte (0.3.0's and 0.4.0's models
    are kept in the repository for decoding their payloads)."""
    from transformers import LlamaForCausalLM

    from lmc_audit.transforms.scoring.model_loading import bundled_model_dir

    record = json.loads((Path(bundled_model_dir()) / "training.json").read_text())
    assert record["continued_from"]["grown"]["veto_dims"] > 0
    models = {name: LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("bundled", bundled_model_dir()), ("0.4.0", ASSETS / "model_0.4.0"),
                                 ("0.3.0", ASSETS / "model_0.3.0"))}
    for name in ("library__code.txt", "howto__sorting.txt"):
        x, cut, start, rows = _copy_with_a_word_put_in(name)
        z, after = start + cut, x[cut + 1]  # row index of 'Z'; the original's byte after the replaced one
        agreeing = torch.arange(start + 100, start + cut)
        lp = {}
        for label, model in models.items():
            with torch.no_grad():
                lp[label] = torch.log_softmax(model(input_ids=rows).logits[0].float(), dim=-1) / math.log(2)
            assert lp[label][agreeing, rows[0, agreeing + 1]].mean() > -0.2, (name, label)
        got = {label: lp[label][z + 1, after].item() for label in models}
        assert got["0.4.0"] < -3.0 and got["bundled"] < -1.0 and got["0.3.0"] > -0.5, (name, got)


def test_a_steps_bound_trains_that_many_steps_and_the_card_says_so(tmp_path):
    """``train.py --steps N`` stops at N steps whatever the hardware (a --minutes budget bought 257 steps on
    one CPU and 707 on another), records the bound, and a card's recipe repeats it."""
    from lmc_audit.pipelines.default_model import train
    from lmc_audit.pipelines.default_model.card import recipe
    from lmc_audit.pipelines.default_model.split import list_source_files

    docs = tmp_path / "docs"
    docs.mkdir()
    words = "the model copies what it read before and pays for what it could not predict".split()
    rng = np.random.default_rng(0)
    for i in range(30):
        (docs / f"page{i:02d}.txt").write_text(" ".join(rng.choice(words, 400)))
    assert any(f.held_out for f in list_source_files(docs)) and not all(f.held_out for f in list_source_files(docs))
    out = tmp_path / "model"
    threads = torch.get_num_threads()
    try:  # train.main sets the process's thread count: the tests after this one keep theirs
        train.main(["--docs-root", str(docs), "--out", str(out), "--steps", "3", "--minutes", "0.001",
                    "--hidden", "32", "--layers", "1", "--heads", "1", "--ffn", "64", "--tokens-per-step", "2048",
                    "--warmup-steps", "1", "--precision", "fp32", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["bound"] == "--steps 3" and "cosine over 3 steps" in record["optimizer"]
    tuned = {**record, "continued_from": {**record, "bound": "--minutes 45"}}
    lines = recipe(tuned)
    assert "--steps 3 " in lines[-1] and "--minutes" not in lines[-1]
    with pytest.raises(SystemExit):
        train.main(["--docs-root", str(docs), "--out", str(out), "--steps", "0"])


def test_retuning_scales_each_match_heads_boost_and_threshold_and_nothing_else():
    """``induction.py --retune``: a match head's copy boost and threshold times given factors. Ones change
    nothing; a lower threshold for the weak head makes a copy find its place again sooner after a word put
    in (the bytes after it cost less), and only that head's threshold entries and output columns move.
    The shipped model is 0.4.0's (kept in the repository) retuned as its card says, to the bit."""
    from transformers import LlamaForCausalLM

    from lmc_audit.pipelines.default_model.induction import retune
    from lmc_audit.transforms.scoring.model_loading import bundled_model_dir

    shipped = json.loads((Path(bundled_model_dir()) / "training.json").read_text())
    grown_record = shipped["continued_from"]["grown"]
    base = LlamaForCausalLM.from_pretrained(ASSETS / "model_0.4.0", dtype=torch.float32).eval()
    made = copy.deepcopy(base)
    retune(made, grown_record, shipped["retuned"]["boost_scales"], shipped["retuned"]["threshold_scales"])
    bundled = LlamaForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
    assert all(torch.equal(a.to(torch.bfloat16).float(), b)
               for a, b in zip(made.state_dict().values(), bundled.state_dict().values()))
    same = copy.deepcopy(base)
    retune(same, grown_record, [1.0, 1.0], [1.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), same.state_dict().values()))
    weak = copy.deepcopy(base)
    retune(weak, grown_record, [1.0, 1.5], [1.0, 0.6])
    changed = {k for k, v in weak.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {"model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.o_proj.weight"}
    nd, first = base.config.head_dim, base.config.num_attention_heads - 2
    q_moved = (weak.model.layers[3].self_attn.q_proj.weight != base.model.layers[3].self_attn.q_proj.weight)
    assert q_moved.any(1).nonzero().min() >= (first + 1) * nd  # the weak head's rows only
    assert 0 < q_moved.any(0).sum() <= 10  # a handful of columns: ONE and the scale channels
    o_moved = (weak.model.layers[3].self_attn.o_proj.weight != base.model.layers[3].self_attn.o_proj.weight)
    assert o_moved.any(0).nonzero().min() >= (first + 1) * nd
    x, cut, start, rows = _copy_with_a_word_put_in()
    after = torch.arange(start + cut + 6 + 4, start + cut + 6 + 14)  # bytes 4-13 after "Zebra "
    lp = {}
    for label, model in (("as shipped", base), ("retuned", weak)):
        with torch.no_grad():
            lp[label] = (torch.log_softmax(model(input_ids=rows).logits[0].float(), dim=-1)[after, rows[0, after + 1]]
                         / math.log(2)).mean().item()
    assert lp["retuned"] > lp["as shipped"] + 0.25, lp  # a quarter of a bit a byte cheaper (0.35 measured)
    with pytest.raises(ValueError, match="one boost and one threshold scale per match head"):
        retune(weak, grown_record, [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        retune(weak, grown_record, [1.0, 1.0], [1.0, 0.0])
