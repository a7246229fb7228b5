"""Give a byte model a copying circuit: an induction head over the last 27 bytes, built into its weights.

    python -m lmc_audit.pipelines.default_model.induction --model-dir pipelines/assets/base_model --out DIR

The bundled model (``pipelines/assets/model``) was made so from the base model kept in the repository
(``pipelines/assets/base_model``, not installed with the package); its card has the whole recipe.

A 3.2M-parameter byte model trained on a CPU for an hour never learns to copy from its context
(bits(x + x) / bits(x) = 2.0; hundreds more steps on windows full of repeats: still 2.0), so its
compression distance between two documents is about 1 for every pair. Induction heads appear in
small transformers only after long training; here the circuit is written into the weights, after
which the model can be fine-tuned with it (``train.py --init-from``). Why our own code: no library
builds attention circuits into a trained Hugging Face model.

The grown model is an ordinary ``LlamaForCausalLM`` (transformers' own code runs it):

- ``head_dim`` doubles (64 -> 128) and ``rope_theta`` is squared (1e4 -> 1e8). Plane i of 64 then
  turns at (theta^2)^(-i/64) = theta^(-i/32): an old head's 32 planes go to new planes 0-31 unchanged
  (q scaled by sqrt 2 for the 1/sqrt(head_dim) scale), and planes 32-63 barely turn over 4,096
  positions: room for a content match that does not fade with distance.
- ``scratch`` residual dimensions that the old weights neither read nor write (the final norm gives
  them weight 0, so they never reach the logits): an accumulator ``A``, a constant ``ONE``, a BOS
  marker, and scale channels. Every position's RMS moves by about 1%: the old predictions hold.
- Two heads are added to every layer (Llama gives every layer the same heads). The embedding writes
  a code of each byte into A. The new heads of layers 0, 1 and 2 attend exactly 1 and 2, 3 and 6,
  9 and 18 positions back (positional: q/k biases solved as a linear program over RoPE's planes) and
  add ``T^d A_{n-d}`` (T turns plane p of A by 2 pi p / planes), so that after layer 2
  ``A_n = sum_k T^k c(x_{n-k})`` over ages k = 0..26: the last 27 bytes, each turned by its age.
- The last layer's new heads compare ``T A_n`` (the bytes ending at n, one age older) with ``A_m``
  in the slow planes: a position m whose previous 26 bytes are the last 26 scores 26; below a
  threshold (scaled by the scale channels, so that RMS never moves it) a head rests on BOS, whose
  value is zero. The value is the byte at m (a least-squares read of its embedding's principal
  coordinates), so the logit of the byte that followed the match rises by about ``alpha``. One head
  with a high threshold and a large alpha, one with a lower threshold and a small alpha.
- A head may veto (a third number W per match head): the embedding also writes a second code of each
  byte into ``Q``, which layer 0's 1-back head copies unturned into ``E`` (``E_m`` is the code of
  x_{m-1}); the head's query adds ``W Q_n`` against ``E_m`` and its threshold rises by W, so a key whose
  previous byte is not the byte just read loses W bytes' worth of score. Without it, a match keeps
  its score for bytes after the copy and its original part ways (one wrong byte out of 27 costs one
  byte of score): after a word edit the model goes on predicting the original's bytes for several
  positions. With it, the match stops at the first wrong byte: measured as built (8 texts with 5% of
  their words edited, the copy's bits given the text over its bits alone), 0.379 -> 0.338 with the
  strong head vetoing (W = 8), and held-out bits per byte fall too, 1.694 -> 1.557 (a look-alike that
  stops matching stops the copy).

After a fine-tune (``train.py --init-from DIR --freeze-circuit``), ``--recalibrate BUILT_DIR`` puts the
match heads back at the strength they were built with (``recalibrate``): the fine-tune grows the old
weights' share of the residual, which the heads read and write through RMS norms. ``--retune`` then
scales each match head's boost and threshold by given factors (``retune``).

Measured on the held-out split (README, The bundled model): the copy ratio falls from 2.0 to about
1.2 while held-out bits per byte stay within 1% of the bundled model's; the limit is the match's
signal to noise, 27 codes superposed in 52 dimensions (noise about K / sqrt(dims)).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from lmc_audit.pipelines.default_model.split import DOCS_ROOT, list_source_files
from lmc_audit.pipelines.default_model.train import BOS_ID, copy_ratio, held_out_bpb, load_stream

OFFSETS = ((1, 2), (3, 6), (9, 18))  # previous-byte heads of layers 0, 1, 2: A covers ages 0..26
MATCHES = ((20.0, 30.0), (12.0, 8.0))  # (tau, alpha[, veto]) of the last layer's match heads
VETO_DIMS = 18  # dimensions of the veto's byte codes (Q and E each), when a match head vetoes


def parse_matches(text: str) -> tuple[tuple[float, ...], ...]:
    """``--matches`` (and training.json's ``grown.matches``): TAU:ALPHA[:VETO] per head, comma-separated."""
    return tuple(tuple(float(v) for v in m.split(":")) for m in str(text).split(","))


def vetoes(matches: Iterable[Sequence[float]]) -> bool:
    """Whether some match head (tau, alpha[, veto]) vetoes, and so the circuit needs the veto's codes."""
    return any(len(m) > 2 and m[2] > 0 for m in matches)


def positional_biases(delta: int, theta: float, half: int, horizon: int = 4096) -> tuple[np.ndarray, float]:
    """Weights w over RoPE's planes so that q = b_q, k = b_k (biases only) score offset ``delta`` above
    every other offset up to ``horizon``: maximize the margin t with sum_i w_i (1 - cos(e f_i)) >= t for
    every e != 0 (scipy's linprog). Returns (w, t): the margin per unit of total weight."""
    from scipy.optimize import linprog

    inv = theta ** (-np.arange(half) * 2.0 / (2 * half))
    es = np.array([e for e in range(-delta, horizon - delta) if e != 0], dtype=np.float64)
    gap = 1 - np.cos(np.outer(es, inv))  # [offsets, planes]
    c = np.zeros(half + 1)
    c[-1] = -1.0
    a_ub = np.hstack([-gap, np.ones((len(es), 1))])
    a_eq = np.zeros((1, half + 1))
    a_eq[0, :half] = 1.0
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(len(es)), A_eq=a_eq, b_eq=[1.0],
                  bounds=[(0, None)] * half + [(None, None)], method="highs")
    assert res.success, res.message
    return res.x[:half], float(res.x[-1])


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    a = x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64) * x.shape[0]
    return torch.linalg.solve(a, x.T @ y).float()  # [in, out]


def _aging_rotation(acc: int) -> np.ndarray:
    """T: turns plane p of the accumulator by 2 pi p / (acc / 2). With codes of equal energy in every
    plane, c . T^d c = 0 for d = 1 .. acc/2 - 1: a byte never matches itself at another age, so the
    match score of low-entropy text (runs of spaces, repeated letters) carries no noise from a byte
    meeting itself; different bytes at different ages still do (about K / sqrt(acc) in all)."""
    planes = acc // 2
    t = np.zeros((acc, acc))
    for p in range(planes):
        a = 2 * np.pi * p / planes
        t[2 * p:2 * p + 2, 2 * p:2 * p + 2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return t


def _phase_codes(n: int, acc: int, rng: np.random.Generator) -> np.ndarray:
    """Unit codes with energy 1 / planes in every plane of the accumulator, at random phases."""
    phase = rng.uniform(0, 2 * np.pi, (n, acc // 2))
    codes = np.stack([np.cos(phase), np.sin(phase)], axis=-1).reshape(n, acc)
    return codes / math.sqrt(acc // 2)


def age_groups(offsets: Sequence[Sequence[int]] = OFFSETS) -> tuple[list[list[int]], list[list[list[tuple[int, int]]]]]:
    """The ages each scale channel carries (channel 0 is ONE), and per layer and previous-byte head the
    (source, destination) channels it copies (see ``grow``: a head above layer 0 scales what it copies by
    its source position's 1 / rms, so each group of ages gets a channel holding that factor)."""
    groups = [[0]]
    heads_of = []
    for layer, deltas in enumerate(offsets):
        made = []
        given = [list(ages) for ages in groups]
        for delta in deltas:
            made.append([])
            if layer == 0:  # layer 0 reads the embedding: its rms varies by 6% only, with the byte
                continue
            for c, ages in enumerate(given):
                groups.append([a + delta for a in ages])
                made[-1].append((c, len(groups) - 1))
        if layer == 0:
            groups = [sorted({a + d for a in ages for d in (0, *deltas)}) for ages in given]
        heads_of.append(made)
    ages_all = sorted(a for ages in groups for a in ages)
    assert ages_all == list(range(len(ages_all))), f"offsets {offsets} must cover ages 0..K-1 once each"
    return groups, heads_of


def _scratch_layout(d0: int, scratch: int, n_groups: int, vd: int) -> tuple[int, int, int, list[int], int, int]:
    """(acc, ONE, BOS marker, scale channels (ONE first), Q, E): where the circuit's scratch dimensions lie."""
    acc = scratch - 1 - n_groups - 2 * vd
    one, bos = d0 + acc, d0 + acc + 1
    chan = [one] + [d0 + acc + 1 + c for c in range(1, n_groups)]
    q_veto = d0 + acc + 1 + n_groups  # Q_n: the veto code of x_n
    e_veto = q_veto + vd  # E_m: the veto code of x_{m-1}
    return acc, one, bos, chan, q_veto, e_veto


def grow(model_dir: Path, stream: np.ndarray, *, scratch: int = 62, offsets: Sequence[Sequence[int]] = OFFSETS,
         matches: Sequence[Sequence[float]] = MATCHES, widen: int = 2, beta: float = 1.5,
         margin_logits: float = 20.0, energy: float = 0.02, seed: int = 0, veto_dims: int = VETO_DIMS):
    """The model in ``model_dir`` with the copying circuit added (see the module's docstring).

    offsets: per layer below the last, the distances its previous-byte heads look back; matches:
    (tau, alpha) or (tau, alpha, veto) per match head of the last layer: it rests on BOS below tau
    matching bytes, and raises the logit of the byte that followed the match in proportion to alpha
    (nominally alpha logits, estimated from mean norms; 30 raises it by a few); veto: bytes of score
    a key loses when the byte before it is not the byte just read (0: none); veto_dims: the veto
    codes' dimensions, taken from ``scratch`` when a head vetoes; beta: attention logits per
    matching byte; widen: head_dim and the exponent of rope_theta grow by this factor (planes beyond the
    old ones barely turn: more of them, more room for the match); energy: the codes' share of the embedding's energy (small, so that the old
    heads' RMS norms barely move)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = np.random.default_rng(seed)
    old = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = LlamaConfig.from_pretrained(model_dir)
    h0, hd, d0 = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    theta = cfg.rope_parameters["rope_theta"]
    extra = max(len(matches), *(len(o) for o in offsets))
    assert len(offsets) == cfg.num_hidden_layers - 1, "one tuple of offsets per layer below the last"
    nd = widen * hd
    # Scale channels: each previous-byte head above layer 0 reads A through x / rms at its source, so
    # the ages it writes carry that position's 1 / rms (layers 1-2 vary by 17% over positions). It also
    # copies ONE (and the channels already there) into a channel of its own, which then holds the
    # same factor; the match heads scale each group of ages' threshold by its channels, so the
    # factors scale a group's score but never move its threshold.
    groups, heads_of = age_groups(offsets)
    vd = veto_dims if vetoes(matches) else 0
    acc, one, bos, chan, q_veto, e_veto = _scratch_layout(d0, scratch, len(groups), vd)
    if acc <= 0 or acc % 2 or vd % 2:
        raise ValueError(f"scratch {scratch} leaves an accumulator of {acc} dims: it must be positive and even "
                         f"(scratch = A + 1 + {len(groups)} channels + 2 x {vd} veto dims)")
    assert acc // 2 + (len(groups) + 2) // 2 <= (nd - hd) // 2, "A, thresholds and sink fit the slow planes"
    assert acc + vd <= nd, "layer 0's 1-back head carries A and the veto code"
    if (d0 + scratch) % (h0 + extra):
        raise ValueError(f"hidden size {d0} + scratch {scratch} must divide into {h0 + extra} heads "
                         "(transformers' LlamaConfig requires it); pick another --scratch")
    cfg.head_dim = nd
    cfg.hidden_size = d0 + scratch
    cfg.num_attention_heads = cfg.num_key_value_heads = h0 + extra
    cfg.attention_bias = True
    cfg.rope_parameters = {"rope_theta": theta ** widen, "rope_type": "default"}
    new = LlamaForCausalLM(cfg).eval()
    sd = old.state_dict()
    half = hd // 2
    row_of = [r if r < half else nd // 2 + (r - half) for r in range(hd)]  # old plane i -> new plane i
    keep = math.sqrt(d0 / (d0 + scratch))  # RMS over more dims: the old dims' scale kept
    with torch.no_grad():
        for name, p in new.named_parameters():
            p.zero_()
            o = sd.get(name)
            if o is None:
                continue
            if name.endswith("norm.weight"):
                p[:d0] = o * keep
            elif "embed_tokens" in name:
                p[:, :d0] = o
            elif ".mlp." in name:
                if "down_proj" in name:
                    p[:d0] = o
                else:
                    p[:, :d0] = o
            elif ".self_attn." in name:
                for h in range(h0):
                    for r in range(hd):
                        if ".o_proj." in name:
                            p[:d0, h * nd + r] = o[:, h * hd + r]
                        elif ".v_proj." in name:
                            p[h * nd + r, :d0] = o[h * hd + r]
                        else:
                            scale = math.sqrt(widen) if ".q_proj." in name else 1.0
                            p[h * nd + row_of[r], :d0] = o[h * hd + r] * scale
            else:
                p.copy_(o)

        # Codes: the embedding writes c(x) into A, a constant into ONE, a marker at BOS.
        emb = new.model.embed_tokens.weight
        emb_norm = emb[:256, :d0].norm(dim=1).mean().item()
        g = emb_norm * math.sqrt(energy)
        codes = _phase_codes(256, acc, rng)
        # centred on the text's mean code, so that frequent bytes (spaces, e) at the same ages of two
        # unrelated windows do not add up to a match
        share = np.bincount(stream, minlength=256) / len(stream)
        codes = codes - share @ codes
        emb[:256, d0:d0 + acc] = torch.tensor(codes * g, dtype=torch.float32)
        if vd:  # the veto's codes: another draw, centred the same way
            vcodes = _phase_codes(256, vd, rng)
            vcodes = vcodes - share @ vcodes
            vcodes = vcodes / np.linalg.norm(vcodes, axis=1, keepdims=True)
            emb[:256, q_veto:q_veto + vd] = torch.tensor(vcodes * g, dtype=torch.float32)
        emb[:, one] = g
        emb[BOS_ID, bos] = g
        for layer in new.model.layers:  # new heads read the scratch at unit norm weight
            layer.input_layernorm.weight[d0:] = 1.0
        rot = _aging_rotation(acc)

        def rms_at(layer: int) -> float:
            x = _residual_at(new, layer, _rows(stream, rng, 8, 1025))[:, 1:]
            return x.pow(2).mean(-1).sqrt().mean().item()

        # Layers below the last: previous-byte heads that add T^d A_{n-d} into A (all heads of a layer
        # read the A the layer was given, so offsets (1, 2) then (3, 6) then (9, 18) cover ages 0..26).
        inv = (theta ** widen) ** (-np.arange(nd // 2) * 2.0 / nd)
        for layer, deltas in enumerate(offsets):
            att = new.model.layers[layer].self_attn
            rho = rms_at(layer)  # x_hat = x / rms: scale the value back to A's own units
            for j, delta in enumerate(deltas):
                base = (h0 + j) * nd
                w, t = positional_biases(delta, theta ** widen, nd // 2)
                a = np.sqrt(w * margin_logits * math.sqrt(nd) / t)
                bq = np.concatenate([a, np.zeros(nd // 2)])
                bk = np.concatenate([a * np.cos(delta * inv), a * np.sin(delta * inv)])
                att.q_proj.bias[base:base + nd] = torch.tensor(bq, dtype=torch.float32)
                att.k_proj.bias[base:base + nd] = torch.tensor(bk, dtype=torch.float32)
                att.v_proj.weight[base:base + acc, d0:d0 + acc] = torch.eye(acc) * rho
                shift = torch.tensor(np.linalg.matrix_power(rot, delta), dtype=torch.float32)
                att.o_proj.weight[d0:d0 + acc, base:base + acc] = shift
                for i, (src, dst) in enumerate(heads_of[layer][j]):
                    att.v_proj.weight[base + acc + i, chan[src]] = rho
                    att.o_proj.weight[chan[dst], base + acc + i] = 1.0
                if vd and layer == 0 and delta == 1:  # E_n = Q_{n-1}, unturned (layer 0 has no channels)
                    att.v_proj.weight[base + acc:base + acc + vd, q_veto:q_veto + vd] = torch.eye(vd) * rho
                    att.o_proj.weight[e_veto:e_veto + vd, base + acc:base + acc + vd] = torch.eye(vd)

        # The last layer: match heads in the slowest planes (acc coordinates of the last acc/2 planes).
        # Score of key m: beta * (matches - tau), both terms read through x / rms at n and at m (the
        # threshold from ONE . ONE), so the rms of either position scales but never moves the
        # threshold; BOS scores 0 (its threshold term cancelled by its marker): below tau
        # matching bytes the head rests on BOS, whose value is zero.
        last = len(new.model.layers) - 1
        att = new.model.layers[last].self_attn
        rho = rms_at(last)
        # the slowest planes hold the thresholds and the sink (both coordinates: they barely turn),
        # the next ones A
        n_thr = (len(groups) + 2) // 2
        thr_coords = [c for p in range(nd // 2 - n_thr, nd // 2) for c in (p, nd // 2 + p)]
        planes = list(range(nd // 2 - n_thr - acc // 2, nd // 2 - n_thr))
        dims = [p for p in planes] + [nd // 2 + p for p in planes]
        # the veto's planes: the next slower ones below A's (with widen 3 and an accumulator of 112, as
        # in the vetoed circuit measured, they turn by at most 1.2 radians over 2,048 positions: the
        # veto weakens with distance, never flips, within a document pair's NCD samples)
        v_planes = list(range(planes[0] - vd // 2, planes[0]))
        v_dims = v_planes + [nd // 2 + p for p in v_planes]
        assert not v_planes or v_planes[0] >= 0
        sink_dim = thr_coords[len(groups)]
        # q.k / sqrt(nd) = beta per matching byte at rms = rho: s^2 (g / rho)^2 / sqrt(nd) = beta
        s = math.sqrt(beta * math.sqrt(nd)) * rho / g
        bos_res = _residual_at(new, last, torch.tensor([[BOS_ID]]))[0, 0]  # BOS sees only itself
        k_ages = sum(len(ages) for ages in groups)
        # The value: the byte at m, as its old embedding's coordinates on the embedding's top `nd`
        # principal directions (the directions that tell bytes apart in the logits), read by least
        # squares from the residual at m, and exactly zero at BOS.
        rows = _rows(stream, rng, 24, 1025)
        x_hat = _normed_input(new, last, rows)
        e_old = emb[:256, :d0]
        freq = torch.bincount(rows[rows != BOS_ID].flatten(), minlength=256).double() + 1.0
        mean = (freq[:, None] * e_old.double()).sum(0) / freq.sum()
        cov = ((e_old.double() - mean) * freq[:, None]).T @ (e_old.double() - mean) / freq.sum()
        _, vecs = torch.linalg.eigh(cov)
        proj = vecs[:, -nd:].float()  # [d0, nd]
        target = torch.zeros(*rows.shape, nd)
        real = rows != BOS_ID
        target[real] = e_old[rows[real]] @ proj
        v = _ridge(x_hat, target)  # [hidden, nd]
        u = x_hat[0, 0] / x_hat[0, 0].norm()  # BOS's normed input: one fixed vector (position 0)
        v = v - torch.outer(u, u @ v)
        # alpha logits for the copied byte through the final norm (x / rms * w) and the tied embedding
        final = _residual_at(new, None, rows)[:, 1:]
        rho_final = final.pow(2).mean(-1).sqrt().mean().item()
        gain = (e_old.pow(2) * new.model.norm.weight[:d0]).sum(-1).mean().item()
        for j, (tau, alpha, *rest) in enumerate(matches):
            veto = rest[0] if rest else 0.0
            base = (h0 + j) * nd
            att.q_proj.weight[[base + d for d in dims], d0:d0 + acc] = torch.tensor(rot, dtype=torch.float32) * s
            att.k_proj.weight[[base + d for d in dims], d0:d0 + acc] = torch.eye(acc) * s
            if veto:  # + veto * (Q_n . E_m): veto bytes of score when x_{m-1} is x_n, nothing otherwise
                att.q_proj.weight[[base + d for d in v_dims], q_veto:q_veto + vd] = torch.eye(vd) * s * veto
                att.k_proj.weight[[base + d for d in v_dims], e_veto:e_veto + vd] = torch.eye(vd) * s
            for c, ages in enumerate(groups):  # group c's threshold: tau * its share of the ages
                tau_c = tau * len(ages) / k_ages + (veto if c == 0 else 0.0)  # ONE carries the veto's
                att.q_proj.weight[base + thr_coords[c], chan[c]] = -tau_c * s
                att.k_proj.weight[base + thr_coords[c], chan[c]] = s
                # BOS's channels are fixed numbers: its sink cancels their threshold terms exactly
                att.q_proj.weight[base + sink_dim, chan[c]] = tau_c * s * bos_res[chan[c]].item() / g
            att.k_proj.weight[base + sink_dim, bos] = s
            att.v_proj.weight[base:base + nd] = v.T
            att.o_proj.weight[:d0, base:base + nd] = proj * (alpha * rho_final / gain)
    return new


def match_heads(grown: dict) -> int:
    """Match heads ``grow`` added to the last layer (``grown``: training.json's ``grown`` record)."""
    return len(str(grown.get("matches", "")).split(","))


def added_heads(grown: dict) -> int:
    """Heads ``grow`` added to every layer (the last ones of each): as many as the widest of the
    previous-byte tuples (two) and the match heads."""
    return max(2, match_heads(grown))


def circuit_entries(model, grown: dict) -> dict[str, torch.Tensor]:
    """Per parameter name, a mask of the entries that are the circuit or keep the old weights off the
    scratch dimensions (``grown``: training.json's ``grown`` record): what ``train.py --freeze-circuit``
    holds at their built values, so that fine-tuning trains the old weights around the circuit."""
    cfg = model.config
    extra = added_heads(grown)
    d0 = cfg.hidden_size - int(grown["scratch"])
    nd = cfg.head_dim
    old = (cfg.num_attention_heads - extra) * nd  # rows of the old heads in q/k/v, columns in o
    masks = {}
    for name, p in model.named_parameters():
        m = torch.zeros_like(p, dtype=torch.bool)
        if name.endswith("norm.weight"):
            m[d0:] = True
        elif "embed_tokens" in name or "lm_head" in name or ".mlp.gate_proj" in name or ".mlp.up_proj" in name:
            m[:, d0:] = True
        elif ".mlp.down_proj" in name:
            m[d0:] = True
        elif ".self_attn." in name and name.endswith(".bias"):
            m[:] = True
        elif ".self_attn.o_proj" in name:
            m[:, old:] = True
            m[d0:, :] = True
        elif ".self_attn." in name:  # q, k, v weights
            m[old:] = True
            m[:, d0:] = True
        masks[name] = m
    return masks


def circuit_scales(model, stream: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The two residual scales the match heads were sized by: the RMS entering the last layer (the
    heads' scores go as 1 / rms^2 of it) and the RMS entering the final norm over the old weights'
    gain on the logits (the copied byte's logit boost goes as its inverse); means over 8 windows of
    1,024 bytes of ``stream``."""
    rows = _rows(stream, np.random.default_rng(seed), 8, 1025)
    cfg = model.config
    last = cfg.num_hidden_layers - 1
    x = _residual_at(model, last, rows)[:, 1:]
    final = _residual_at(model, None, rows)[:, 1:]
    # the old weights' dimensions: those the final norm reads (the scratch ones have weight 0 there)
    old = (model.model.norm.weight != 0).nonzero().flatten()
    with torch.no_grad():
        e = model.model.embed_tokens.weight[:256][:, old]
        gain = (e.pow(2) * model.model.norm.weight[old]).sum(-1).mean().item()
    return {"rms_last": x.pow(2).mean(-1).sqrt().mean().item(),
            "rms_final_over_gain": final.pow(2).mean(-1).sqrt().mean().item() / gain}


def recalibrate(model, built: dict[str, float], grown: dict, stream: np.ndarray, alpha_scale: float = 1.0):
    """Put the match heads back at the strength they were built with, in place, after fine-tuning.

    Fine-tuning (even with ``train.py --freeze-circuit``, which holds the circuit's weights) grows
    the old weights' share of the residual: the match heads read and write it through RMS norms, so
    their attention sharpens less per matching byte (scores go as 1 / rms^2) and the copied byte's
    boost shrinks after the final norm. Measured on the widen-3 frozen fine-tune: the last layer's
    input RMS 2.17 -> 2.70, the final RMS over the logit gain +13%. Scaling the match heads' query
    and key rows by the ratio of RMS restores their scores (thresholds included: both terms of a
    score scale together), and their output columns by the ratio of the final scales restores the
    boost; ``alpha_scale`` raises the boost beyond it. ``built``: ``circuit_scales`` of the model as
    grown, on the same stream."""
    now = circuit_scales(model, stream)
    cfg = model.config
    first = cfg.num_attention_heads - added_heads(grown)
    nd = cfg.head_dim
    f_score = now["rms_last"] / built["rms_last"]
    f_boost = now["rms_final_over_gain"] / built["rms_final_over_gain"] * alpha_scale
    att = model.model.layers[-1].self_attn
    with torch.no_grad():
        for j in range(match_heads(grown)):
            rows = slice((first + j) * nd, (first + j + 1) * nd)
            for proj in (att.q_proj, att.k_proj):
                proj.weight[rows] *= f_score
                if proj.bias is not None:
                    proj.bias[rows] *= f_score
            att.o_proj.weight[:, rows] *= f_boost
    return {"before": now, "built": built, "score_scale": f_score, "boost_scale": f_boost}


def retune(model, grown: dict, boost_scales: Sequence[float], threshold_scales: Sequence[float]) -> dict:
    """Each match head's copy boost and threshold times a factor, in place; no measurement, so the result
    follows exactly from the model it starts from (``grown``: training.json's ``grown`` record).

    A head's threshold (tau plus its veto, in bytes of score) is the part of its query that reads the scale
    channels (ONE and one per group of ages; ``grow``), its BOS sink's cancelling term included: scaling
    those entries scales the threshold, and BOS still scores 0. Why: the fine-tune leaves the weak head's
    threshold where it was built (12 bytes), and after a word edit a copy then pays full price for the 12
    bytes it takes to find its place again; a lower threshold and a larger boost for that head find it
    sooner (measured: README, The bundled model), at a cost on text that does not repeat (0.5.0's x0.8
    and x1.3: 7% more bits per byte held out). The veto's share of the threshold scales with it, so a long
    match then survives one wrong byte at that head."""
    n = match_heads(grown)
    if len(boost_scales) != n or len(threshold_scales) != n:
        raise ValueError(f"one boost and one threshold scale per match head ({n}), got {list(boost_scales)} "
                         f"and {list(threshold_scales)}")
    if min(*boost_scales, *threshold_scales) <= 0:
        raise ValueError("scales must be positive")
    cfg = model.config
    scratch = int(grown["scratch"])
    vd = int(grown.get("veto_dims", VETO_DIMS)) if vetoes(parse_matches(grown["matches"])) else 0
    groups, _ = age_groups()
    _, _, _, chan, _, _ = _scratch_layout(cfg.hidden_size - scratch, scratch, len(groups), vd)
    first = cfg.num_attention_heads - added_heads(grown)
    nd = cfg.head_dim
    att = model.model.layers[-1].self_attn
    with torch.no_grad():
        for j, (boost, threshold) in enumerate(zip(boost_scales, threshold_scales)):
            rows = slice((first + j) * nd, (first + j + 1) * nd)
            att.q_proj.weight[rows, chan] *= threshold
            att.o_proj.weight[:, rows] *= boost
    return {"boost_scales": list(boost_scales), "threshold_scales": list(threshold_scales)}


def _residual_at(model, layer: int | None, rows: torch.Tensor) -> torch.Tensor:
    """The residual stream entering decoder layer ``layer`` (None: entering the final norm)."""
    store = {}
    module = model.model.norm if layer is None else model.model.layers[layer]

    def keep(m, args, kwargs):
        store["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hook = module.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=rows)
    hook.remove()
    return store["x"]


def _normed_input(model, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """What decoder layer ``layer``'s attention reads: its input after ``input_layernorm``."""
    with torch.no_grad():
        return model.model.layers[layer].input_layernorm(_residual_at(model, layer, rows))


def _rows(stream: np.ndarray, rng: np.random.Generator, n: int, length: int) -> torch.Tensor:
    rows = torch.full((n, length), BOS_ID, dtype=torch.long)
    for i in range(n):
        b = int(rng.integers(0, len(stream) - length))
        rows[i, 1:] = torch.from_numpy(stream[b:b + length - 1].astype(np.int64))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True,
                   help="the model to grow; with --recalibrate, the fine-tune of a grown model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--docs-root", type=Path, default=DOCS_ROOT)
    p.add_argument("--scratch", type=int, default=62)
    p.add_argument("--beta", type=float, default=1.5)
    p.add_argument("--widen", type=int, default=2)
    p.add_argument("--matches", default=",".join(f"{t}:{a}" for t, a in MATCHES),
                   help="TAU:ALPHA or TAU:ALPHA:VETO per match head, comma-separated")
    p.add_argument("--veto-dims", type=int, default=VETO_DIMS,
                   help="dimensions of the veto's byte codes (taken twice from --scratch when a head vetoes)")
    p.add_argument("--energy", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recalibrate", type=Path, default=None, metavar="BUILT_DIR",
                   help="instead of growing: --model-dir is a fine-tune of the grown model in BUILT_DIR; "
                        "write it to --out with its match heads put back at their built strength")
    p.add_argument("--alpha-scale", type=float, default=1.0,
                   help="with --recalibrate: the copied byte's boost times this")
    p.add_argument("--retune", action="store_true",
                   help="instead of growing: --model-dir is a grown model (fine-tuned or not); write it to --out "
                        "with each match head's boost and threshold scaled (--boost-scales, --threshold-scales)")
    p.add_argument("--boost-scales", default=None, metavar="F,F",
                   help="with --retune: per match head, its copy boost times this (default 1 each)")
    p.add_argument("--threshold-scales", default=None, metavar="F,F",
                   help="with --retune: per match head, its threshold (tau + veto bytes of score) times this")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="how the weights are stored (the pipeline computes in float32 either way; "
                        "the bundled model is stored in bfloat16)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    files = list_source_files(args.docs_root)
    train, _ = load_stream([f for f in files if not f.held_out])
    held, _ = load_stream([f for f in files if f.held_out])
    if args.recalibrate:
        return recalibrate_dir(args.model_dir, args.recalibrate, args.out, train, held, args.alpha_scale,
                               args.dtype)
    if args.retune:
        return retune_dir(args.model_dir, args.out, args.boost_scales, args.threshold_scales, held, args.dtype)
    matches = parse_matches(args.matches)
    if any(len(m) not in (2, 3) for m in matches):
        raise SystemExit(f"--matches {args.matches!r}: each head is TAU:ALPHA or TAU:ALPHA:VETO")
    model = grow(args.model_dir, train, scratch=args.scratch, matches=matches, widen=args.widen, beta=args.beta,
                 energy=args.energy, seed=args.seed, veto_dims=args.veto_dims)
    print(f"parameters {sum(t.numel() for t in model.parameters()):,}", flush=True)
    print(f"copy ratio {copy_ratio(model, held):.3f}  held-out bpb {held_out_bpb(model, held, 1025):.3f}", flush=True)
    base = json.loads((args.model_dir / "training.json").read_text())
    record = dict(base)
    record["grown"] = {k: getattr(args, k) for k in ("scratch", "widen", "beta", "matches", "energy", "seed")}
    if vetoes(matches):
        record["grown"]["veto_dims"] = args.veto_dims
    save(model, record, args.out, args.dtype)


def save(model, record: dict, out: Path, dtype: str) -> None:
    """The model and its training record, the weights stored in ``dtype`` (recorded when not float32)."""
    out.mkdir(parents=True, exist_ok=True)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
        record = {**record, "stored": f"{dtype} (the pipeline loads it in float32)"}
    model.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def recalibrate_dir(model_dir: Path, built_dir: Path, out: Path, train: np.ndarray, held: np.ndarray,
                    alpha_scale: float, dtype: str = "float32") -> None:
    """``--recalibrate``: scales measured on training text (never the held-out files), the record kept."""
    from transformers import LlamaForCausalLM

    record = json.loads((model_dir / "training.json").read_text())
    grown = record.get("grown") or record.get("continued_from", {}).get("grown")
    if not grown:
        raise SystemExit(f"{model_dir}/training.json has no 'grown' record: recalibrate a fine-tune of a grown model")
    built = LlamaForCausalLM.from_pretrained(built_dir, dtype=torch.float32).eval()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    done = recalibrate(model, circuit_scales(built, train), grown, train, alpha_scale)
    print(f"score scale {done['score_scale']:.3f}  boost scale {done['boost_scale']:.3f}", flush=True)
    print(f"copy ratio {copy_ratio(model, held):.3f}  held-out bpb {held_out_bpb(model, held, 1025):.3f}", flush=True)
    record["recalibrated"] = {"alpha_scale": alpha_scale, **{k: done[k] for k in ("score_scale", "boost_scale")}}
    save(model, record, out, dtype)


def retune_dir(model_dir: Path, out: Path, boosts: str | None, thresholds: str | None, held: np.ndarray,
               dtype: str) -> None:
    """``--retune``: the match heads scaled (``retune``), the record kept with what was done."""
    from transformers import LlamaForCausalLM

    record = json.loads((model_dir / "training.json").read_text())
    grown = record.get("grown") or record.get("continued_from", {}).get("grown")
    if not grown:
        raise SystemExit(f"{model_dir}/training.json has no 'grown' record: retune a grown model")
    n = match_heads(grown)

    def scales(text: str | None) -> list[float]:
        try:
            return [1.0] * n if text is None else [float(v) for v in text.split(",")]
        except ValueError:
            raise SystemExit(f"scales {text!r}: comma-separated numbers, one per match head ({n})") from None

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        done = retune(model, grown, scales(boosts), scales(thresholds))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(f"copy ratio {copy_ratio(model, held):.3f}  held-out bpb {held_out_bpb(model, held, 1025):.3f}", flush=True)
    record["retuned"] = done
    record.pop("stored", None)
    save(model, record, out, dtype)


if __name__ == "__main__":
    main()
