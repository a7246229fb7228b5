"""Exact and near-duplicate detection: the pieces, and the whole pipeline on planted duplicates."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from lmc_audit.pipelines.audit import bundled_sample_dir, run
from lmc_audit.transforms.dedup import sketches as dedup
from lmc_audit.transforms.dedup.sketches import DedupOptions, Edge


def test_normalized_hash_ignores_case_width_and_whitespace():
    a = dedup.normalized_hash("Hello,\tWorld!\n\n  Second line ".encode())
    assert a == dedup.normalized_hash("hello, world! second line".encode())
    assert a == dedup.normalized_hash("ＨＥＬＬＯ, world!\r\nsecond   line".encode())  # NFKC full-width
    assert a != dedup.normalized_hash(b"hello, world! second lines")


def test_minhash_signature_equals_datasketch():
    import datasketch

    text = dedup.normalize_text(b"the cat sat on the mat while the dog slept by the warm fire all night long")
    shingles = dedup.shingle_hashes(text, 5)
    ours = dedup.MinHasher(112, seed=1).signature(shingles)
    theirs = datasketch.MinHash(num_perm=112, seed=1, scheme="legacy")
    words = text.split()
    for i in range(len(words) - 4):
        theirs.update(" ".join(words[i:i + 5]).encode())
    assert np.array_equal(ours, theirs.hashvalues.astype(np.uint32))


def test_jaccard_and_ncd():
    opts = DedupOptions()
    hasher = dedup.MinHasher(opts.num_perm)
    words = [f"w{i}" for i in range(40)]
    a = dedup.make_sketch((0, 0, "a"), "s", " ".join(words).encode(), opts, hasher)
    b = dedup.make_sketch((0, 1, "b"), "s", " ".join(words[:30] + ["x"] * 10).encode(), opts, hasher)
    # a: 36 distinct 5-grams; b: 26 shared + 4 that run into the x's + one "x x x x x".
    assert dedup.jaccard(a, b) == pytest.approx(26 / (36 + 31 - 26))
    assert dedup.jaccard(a, a) == 1.0
    assert dedup.ncd(100.0, 100.0, 105.0) == pytest.approx(0.05)
    assert dedup.ncd(100.0, 50.0, 150.0) == pytest.approx(1.0)
    assert dedup.ncd(None, 1.0, 1.0) is None


def test_clusters_keep_the_first_document_in_input_order():
    info = ("s", "h")
    edges = [Edge((1, 0, "c"), (0, 5, "b"), 0.8, 0.1, ("t", "h2"), ("s", "h1")),
             Edge((0, 5, "b"), (0, 2, "a"), 0.9, None, ("s", "h1"), ("s", "h1")),
             Edge((2, 0, "x"), (2, 1, "y"), 0.75, 0.2, info, ("s", "hy"))]
    rows = {r["doc_id"]: r for r in dedup.duplicate_rows(edges)}
    assert {k: (r["keep"], r["kept_doc_id"]) for k, r in rows.items()} == {
        "a": (True, "a"), "b": (False, "a"), "c": (False, "a"), "x": (True, "x"), "y": (False, "x")}
    ids = {k: r["cluster_id"] for k, r in rows.items()}
    assert ids["a"] == ids["b"] == ids["c"] == dedup.cluster_id_of((0, 2, "a")) != ids["x"] == ids["y"]
    assert all(0 <= i < 2 ** 63 for i in ids.values())
    assert rows["b"]["reason"] == "exact" and rows["c"]["reason"] == "near"
    assert rows["c"]["matched_doc_id"] == "b" and rows["c"]["jaccard"] == 0.8 and rows["c"]["ncd"] == 0.1
    assert rows["b"]["cluster_size"] == 3
    assert dedup.duplicate_rows(list(reversed(edges))) == dedup.duplicate_rows(edges)
    assert dedup.duplicate_rows([]) == []


def test_star_pairs_are_linear_and_capped():
    members = [(0, i, f"d{i}") for i in reversed(range(5))]
    d = [(0, i, f"d{i}") for i in range(5)]
    assert list(dedup.star_pairs(iter(members), 100)) == [(d[0], d[i]) for i in range(1, 5)]
    assert list(dedup.star_pairs(iter(members), 3)) == [(d[0], d[1]), (d[0], d[2])]
    # With two centers every member also meets the second member: pairs stay under 2 per member.
    assert list(dedup.star_pairs(iter(members), 100, centers=2)) == [
        (d[0], d[1]), (d[0], d[2]), (d[1], d[2]), (d[0], d[3]), (d[1], d[3]), (d[0], d[4]), (d[1], d[4])]


LICENCE = ("Copyright (c) 2001-2023 Example Foundation; all rights reserved.\n\n"
           "Permission is granted to use, copy, modify and distribute this text for any purpose, provided that "
           "the above notice and this permission notice appear in all copies of the text.\n\n"
           "This text is provided as is without warranty of any kind, express or implied, including but not "
           "limited to the warranties of merchantability and fitness for a particular purpose.\n\n")


def _sketch(doc_id: str, text: str, opts: DedupOptions = DedupOptions()) -> dedup.DocSketch:
    return dedup.make_sketch((0, int(doc_id.encode().hex(), 16) % 10**9, doc_id), "s", text.encode(), opts,
                             dedup.MinHasher(opts.num_perm, opts.seed))


def _shuffled(text: str, seed: int = 0) -> str:
    paragraphs = text.split("\n\n")
    random.Random(seed).shuffle(paragraphs)
    return "\n\n".join(paragraphs)


def test_verification_rules_find_partial_and_shuffled_copies_but_not_shared_boilerplate():
    opts = DedupOptions()
    texts = _texts()
    base = _sketch("base", texts[0])
    cut = texts[0][:int(len(texts[0]) * 0.6)]
    prefix = dedup.verify(base, _sketch("prefix", cut), opts)
    assert prefix.rule is not None and prefix.containment > 0.95 and prefix.jaccard < 0.7
    assert prefix.length_ratio == pytest.approx(0.6, abs=0.02)
    # Where Jaccard does not reach its threshold, containment decides.
    strict = DedupOptions(jaccard_threshold=0.9)
    assert dedup.verify(base, _sketch("prefix", cut), strict).rule == "containment"
    shuffled = dedup.verify(base, _sketch("shuffled", _shuffled(texts[0])), opts)
    assert shuffled.rule is not None and shuffled.line_containment == 1.0
    # Distinct documents under one licence header share a few lines and n-grams: never a duplicate.
    licensed = [_sketch(f"lic{i}", LICENCE + t) for i, t in enumerate(texts[1:4])]
    for a, b in [(licensed[0], licensed[1]), (licensed[1], licensed[2]), (licensed[0], licensed[2])]:
        v = dedup.verify(a, b, opts)
        assert v.rule is None and v.containment < 0.3, v
        # Their heads are the same header, so NCD on the heads can be small: NCD alone never merges them.
        assert a.ncd_head[:200] == b.ncd_head[:200]
        assert dedup.verify(a, b, opts, distance=0.05).rule is None
        assert dedup.verify(a, b, dataclasses.replace(opts, ncd_min_containment=0.0), distance=0.05).rule == "ncd"
    # A document that is little more than the header is contained in each of them, but too short
    # beside them to count: it cannot chain them into one cluster.
    header_only = _sketch("header", LICENCE + "See the documentation for more.")
    for other in licensed:
        v = dedup.verify(header_only, other, opts)
        assert v.containment > 0.9 and v.length_ratio < opts.min_length_ratio and v.rule is None
        assert dedup.verify(header_only, other, opts, distance=0.05).rule is None  # guarded for NCD too
    # The same prefix with the guard turned off is a duplicate: the guard, not chance, decided.
    assert dedup.verify(header_only, licensed[0], DedupOptions(min_length_ratio=0.0)).rule == "containment"


def test_the_ncd_join_carries_a_checked_pair_not_the_sketches():
    """What waits for a pair's NCD bits is a few numbers, whatever the documents' lengths; the verdict is
    the one the two sketches give, and NCD decides only where no other rule did."""
    import pickle

    from lmc_audit.transforms.dedup.find_duplicates import (
        NCD_PIECES, NCD_USES, CheckPair, VerifyPair, _concatenation)

    opts = DedupOptions()
    long_text = "\n".join(" ".join(f"w{i} v{i % 97} u{i % 13}" for i in range(j, j + 4)) for j in range(0, 30_000, 4))
    a, b = _sketch("a", long_text), _sketch("b", long_text[:len(long_text) * 6 // 10])
    assert len(a.shingles) > 100_000  # the sketch holds tens of thousands of n-gram hashes
    (pid, checked), = list(CheckPair(opts).process((a, b)))
    assert checked.verdict == dedup.verify(a, b, opts) and checked.verdict.rule
    # a piece per sample to score, the pair's own x + y; C(x) and C(y) are scored once per document
    lines_piece, head_piece, *uses = list(_concatenation(((a.key, a.ncd_samples), (b.key, b.ncd_samples))))
    assert lines_piece.tag == head_piece.tag == NCD_PIECES
    assert lines_piece.value.doc_id == f"{pid}:xy0" and lines_piece.value.data == a.ncd_text + b.ncd_text
    assert head_piece.value.doc_id == f"{pid}:xy1" and head_piece.value.data == a.ncd_head + b.ncd_head
    assert sorted(t.value[1] for t in uses if t.tag == NCD_USES) == [(pid, "x"), (pid, "y")]
    only_head = list(_concatenation(((a.key, (a.ncd_text, a.ncd_head)), (b.key, (b"", b.ncd_head)))))
    assert [t.value.doc_id for t in only_head if t.tag == NCD_PIECES] == [f"{pid}:xy1"]
    assert list(_concatenation(((a.key, a.ncd_samples), (b.key, (b"", b""))))) == []  # no sample, no NCD
    assert len(pickle.dumps(checked)) < 1_000 < len(pickle.dumps((a, b))) // 100
    count = itertools.count()
    edited = _sketch("c", "\n".join(" ".join(f"e{i}" if (i := next(count)) % 8 == 0 else w for w in line.split())
                                     for line in long_text.split("\n")))  # 3 of 8 n-grams kept, lines kept
    (pid2, loose), *_ = list(CheckPair(opts, ncd=True).process((a, edited)))
    assert loose.verdict.rule is None and loose.verdict.containment >= opts.ncd_min_containment
    assert loose.ncd_decides and not checked.ncd_decides  # without NCD scored, nothing for NCD to decide
    verify = VerifyPair(opts)
    close = [("x0", 100.0), ("y0", 100.0), ("xy0", 110.0)]  # NCD 0.1
    far = [("x0", 100.0), ("y0", 100.0), ("xy0", 195.0)]  # NCD 0.95
    assert [e.rule for e in verify.process((pid2, {"pair": [loose], "scored": close}))] == ["ncd"]
    assert list(verify.process((pid2, {"pair": [loose], "scored": far}))) == []
    (edge,) = verify.process((pid, {"pair": [checked], "scored": far}))
    assert edge.rule == checked.verdict.rule and edge.ncd == pytest.approx(0.95)
    assert (edge.a, edge.b, edge.a_info) == (a.key, b.key, (a.shard, a.normalized_hash))
    # Two samples: the manifest's NCD is the smaller of theirs, whichever sample gives it; the rule reads
    # the lines samples' alone, so heads that are close (a shared header) verify nothing.
    head_close = far + [("x1", 80.0), ("y1", 90.0), ("xy1", 98.0)]  # (98 - 80) / 90 = 0.2
    assert dedup.pair_ncd(dict(head_close)) == pytest.approx(0.2) and dedup.rule_ncd(dict(head_close)) == 0.95
    assert list(verify.process((pid2, {"pair": [loose], "scored": head_close}))) == []
    (edge,) = verify.process((pid2, {"pair": [loose], "scored": close + [("x1", 80.0), ("y1", 90.0), ("xy1", 85.0)]}))
    assert edge.rule == "ncd" and edge.ncd == pytest.approx(5 / 90)  # verified by the lines, the heads' recorded
    (edge,) = verify.process((pid, {"pair": [checked], "scored": head_close}))  # another rule: NCD recorded
    assert edge.rule == checked.verdict.rule and edge.ncd == pytest.approx(0.2)
    assert dedup.pair_ncd(dict(far + [("x1", 80.0), ("y1", 90.0)])) == pytest.approx(0.95)  # no xy1: lines only
    assert dedup.pair_ncd({"x1": 80.0}) is None


def test_ncd_is_scored_for_verified_or_overlapping_pairs_and_skipped_for_chance_ones():
    """With NCD on, a checked pair also sends its x + y of each sample (and where C(x), C(y) go) when a rule verified it
    or its n-gram containment reaches ``ncd_min_containment``; a pair that shares little (a chance line)
    sends nothing to score and is counted; 0 scores every pair; without NCD nothing is sent."""
    from lmc_audit.transforms.dedup.find_duplicates import NCD_PIECES, NCD_USES, CheckPair

    texts = _texts()
    base = _sketch("base", texts[0])
    edited_words = texts[0].split(" ")
    for i in range(0, len(edited_words), 8):  # every eighth word: 3 of 8 n-grams kept, too few for a rule
        edited_words[i] = f"edit{i}"
    edited = _sketch("edited", " ".join(edited_words))
    chance = _sketch("chance", texts[1])
    opts = DedupOptions()

    def outputs(x, y, options, ncd=True):
        out = list(CheckPair(options, ncd).process((x, y)))
        return out[0][1].verdict, [o.tag for o in out[1:]]

    verdict, tags = outputs(base, edited, opts)
    assert verdict.rule is None and opts.ncd_min_containment <= verdict.containment < opts.containment_threshold
    assert tags == [NCD_PIECES, NCD_PIECES, NCD_USES, NCD_USES]
    verdict, tags = outputs(base, chance, opts)
    assert verdict.rule is None and verdict.containment < opts.ncd_min_containment and tags == []
    assert outputs(base, chance, DedupOptions(ncd_min_containment=0.0))[1] == [NCD_PIECES, NCD_PIECES, NCD_USES, NCD_USES]
    assert outputs(base, _sketch("copy", texts[0]), opts)[1] == [NCD_PIECES, NCD_PIECES, NCD_USES, NCD_USES]  # verified
    assert outputs(base, edited, opts, ncd=False)[1] == []
    # A document whose lines are few takes its head for its lines sample: NCD could only compare heads,
    # so it cannot verify the pair and scores nothing unless another rule verified it.
    prose = _sketch("prose", " ".join(texts[0].split()))
    assert not dedup.lines_drawn(prose) and dedup.lines_drawn(base)
    verdict, tags = outputs(prose, edited, opts)
    assert verdict.rule is None and verdict.guarded and verdict.containment >= opts.ncd_min_containment
    assert tags == []
    assert dedup.verify(prose, edited, opts, distance=0.0).rule is None
    assert outputs(prose, base, opts)[0].rule is not None  # verified by a rule: its NCD is still scored
    assert outputs(prose, base, opts)[1] == [NCD_PIECES, NCD_PIECES, NCD_USES, NCD_USES]
    with pytest.raises(ValueError, match="ncd_min_containment"):
        DedupOptions(ncd_min_containment=1.5)


def test_a_pair_moves_its_smaller_sketch_once_and_a_document_its_own_once():
    """The pair join: of each pair, the smaller sketch's hashes travel, packed, with its NCD sample when the
    job scores NCD (no signature); a receiving document sends its own once, whatever its number of pairs;
    a document's sample is sent to be scored once, and never for a document in no pair."""
    from lmc_audit.transforms.dedup.find_duplicates import (
        NCD_CHUNKS, _from_verification_part, _keyed_for_verification, _orient, _pairs_at_receiver,
        _route_sketch, _verification_part)

    texts = _texts()
    big, small = _sketch("big", texts[0] + texts[2]), _sketch("small", texts[1][:1_000])
    assert dedup.verification_bytes(small) < dedup.verification_bytes(big)
    sized = lambda s: (s.key, dedup.verification_bytes(s))  # noqa: E731
    assert _orient((sized(big), sized(small))) == (small.key, big.key, False)
    assert _orient((sized(small), sized(big))) == (small.key, big.key, True)
    other = (9, 9, "z")
    keyed = _keyed_for_verification(small, True)
    assert keyed[0] == small.key and keyed[1] == _verification_part(small, True)
    assert _keyed_for_verification(small)[1][-1] == (b"", b"")  # no NCD: no sample travels
    out = list(_route_sketch((small.key, {"sketch": [keyed[1]], "as_sender": [(big.key, False), (other, True)],
                                          "as_receiver": [(7, 7, "y")]}), True))
    routed = [x for x in out if not hasattr(x, "tag")]
    sent = _verification_part(small, True)
    assert routed == [(big.key, (1, sent, False)), (other, (1, sent, True)), (small.key, (0, sent, None))]
    # the bytes that travel are the n-gram and line hashes and the NCD samples, packed: nothing else
    assert all(b"".join(x for x in part[:-1] if isinstance(x, bytes)) + b"".join(part[-1])
               == dedup.pack_hashes(small.shingles) + dedup.pack_hashes(small.lines)
               + dedup.pack_text(small.ncd_text) + dedup.pack_text(small.ncd_head) for _, (_, part, _) in routed)
    assert len(dedup.pack_text(small.ncd_text)) < 0.8 * len(small.ncd_text)
    back = _from_verification_part(sent)
    assert (back.shingles, back.lines, back.bytes, back.normalized_hash, back.ncd_samples) == (
        small.shingles, small.lines, small.bytes, small.normalized_hash, small.ncd_samples)
    chunks = [x.value for x in out if getattr(x, "tag", None) == NCD_CHUNKS]
    assert [c.data for c in chunks] == [small.ncd_text, small.ncd_head] and small.ncd_head
    assert [c.doc_id.split(":")[1] for c in chunks] == ["x0", "x1"]
    assert list(_route_sketch((small.key, {"sketch": [keyed[1]], "as_sender": [], "as_receiver": []}), True)) == []
    # At the receiver the pair is put back in its own order: (first, second).
    meeting = (big.key, [(1, _verification_part(small), False), (0, _verification_part(big), None)])
    assert list(_pairs_at_receiver(meeting)) == [(_from_verification_part(_verification_part(big)),
                                                  _from_verification_part(_verification_part(small)))]
    with pytest.raises(ValueError, match="sent nothing of its own"):
        list(_pairs_at_receiver((big.key, [(1, _verification_part(small), True)])))


def test_ncd_compares_lines_drawn_from_the_whole_text_so_a_shuffled_copy_gives_the_same_sample():
    """NCD's sample is content-defined: a copy with its paragraphs shuffled samples the same lines in the
    same order, though its first kilobyte is another paragraph; a distinct document samples others."""
    opts = DedupOptions()
    texts = _texts()
    base, shuffled = _sketch("base", texts[0]), _sketch("shuffled", _shuffled(texts[0], seed=3))
    assert texts[0][:opts.ncd_bytes] != _shuffled(texts[0], seed=3)[:opts.ncd_bytes]
    assert base.ncd_text == shuffled.ncd_text and len(base.ncd_text) > opts.ncd_bytes // 2
    assert not set(base.ncd_text.split(b"\n")) & set(_sketch("other", texts[1]).ncd_text.split(b"\n"))
    # A 60% prefix keeps the sampled lines that fall in its part, in the same order.
    cut = _sketch("prefix", texts[0][:int(len(texts[0]) * 0.6)]).ncd_text.split(b"\n")
    whole = base.ncd_text.split(b"\n")
    shared = [line for line in cut if line in whole]
    assert len(shared) >= len(cut) // 2 and shared == [line for line in whole if line in shared]


def test_the_head_sample_is_what_a_cut_or_rewrapped_copy_keeps_and_the_lines_sample_what_a_shuffled_one_keeps():
    """The two NCD samples cover each other's misses: a 60% prefix and a re-wrapped copy (line breaks and
    spaces moved) have their original's head but other lines; a copy with shuffled paragraphs has its
    original's lines but another head. ``pair_ncd`` keeps the smaller of the two samples' NCDs."""
    opts = DedupOptions()
    text = _texts()[0]
    base = _sketch("base", text)
    rng = random.Random(5)
    rewrapped = "".join(w + ("\n" if rng.random() < 0.1 else "  " if rng.random() < 0.2 else " ")
                        for w in text.split())
    cut, wrapped = _sketch("cut", text[:int(len(text) * 0.6)]), _sketch("wrapped", rewrapped)
    shuffled = _sketch("shuffled", _shuffled(text, seed=3))
    assert len(base.ncd_head) == opts.ncd_bytes and base.ncd_head == " ".join(text.casefold().split()).encode()[:1024]
    assert cut.ncd_head == wrapped.ncd_head == base.ncd_head
    assert cut.ncd_text != base.ncd_text and wrapped.ncd_text != base.ncd_text
    assert shuffled.ncd_text == base.ncd_text and shuffled.ncd_head != base.ncd_head
    normalized = _sketch("n", "Version 3.11, (c) 2001!", DedupOptions(normalize=("numbers", "punctuation")))
    assert normalized.ncd_head == b"version 0 c 0"  # the words n-grams see
    assert _sketch("empty", "  \n ").ncd_head == b""
    # Prose without line breaks: the lines sample is the head sample, and NCD scores it once.
    from lmc_audit.transforms.dedup.find_duplicates import (NCD_CHUNKS, NCD_PIECES, _concatenation,
                                                            _route_sketch, _verification_part)

    prose = [_sketch(f"p{i}", " ".join(text.split()[i * 50:])) for i in range(2)]
    assert all(p.ncd_text == p.ncd_head and len(p.ncd_head) == opts.ncd_bytes for p in prose)
    pieces = [t.value.doc_id.split(":")[1] for t in _concatenation(((prose[0].key, prose[0].ncd_samples),
                                                                     (prose[1].key, prose[1].ncd_samples)))
              if t.tag == NCD_PIECES]
    assert pieces == ["xy0"]
    routed = _route_sketch((prose[0].key, {"sketch": [_verification_part(prose[0], True)], "as_sender": [],
                                           "as_receiver": [(7, 7, "y")]}), True)
    assert [x.value.doc_id.split(":")[1] for x in routed if getattr(x, "tag", None) == NCD_CHUNKS] == ["x0"]
    # one side few lines, the other many: both samples scored
    pieces = [t.value.doc_id.split(":")[1] for t in _concatenation(((prose[0].key, prose[0].ncd_samples),
                                                                     (base.key, base.ncd_samples)))
              if t.tag == NCD_PIECES]
    assert pieces == ["xy0", "xy1"]


def test_an_edited_copy_samples_mostly_the_lines_its_original_samples():
    """NCD's lines are picked by their smallest word-bigram hash (``line_key``), which most word edits
    leave alone: a copy with 5% of its words edited keeps most of its original's sample. Picked by the
    hash of the whole line, as before, a line drops out of the sample at its first edit."""
    import difflib
    import unicodedata

    opts = DedupOptions()

    def picked_by_whole_line(text: str) -> bytes:
        sample = dedup.LineSample(opts.ncd_bytes)
        for words in (line.split() for line in unicodedata.normalize("NFKC", text).casefold().split("\n")):
            if len(words) >= opts.min_line_words:
                sample.offer(dedup.line_hash(words), " ".join(words).encode())
        return sample.text(text.encode())

    def shared(x: bytes, y: bytes) -> float:  # y's bytes in runs of 16 or more that x also has
        blocks = difflib.SequenceMatcher(None, x, y, autojunk=False).get_matching_blocks()
        return sum(b.size for b in blocks if b.size >= 16) / len(y)

    rng = random.Random(1)
    ours, whole_line = [], []
    for f in sorted(Path(bundled_sample_dir()).glob("*.txt"))[:8]:
        text = f.read_text()[:6000]
        copy = _edit_words(text, len(text.split(" ")) // 20, rng)
        ours.append(shared(_sketch("a", text).ncd_text, _sketch("b", copy).ncd_text))
        whole_line.append(shared(picked_by_whole_line(text), picked_by_whole_line(copy)))
    assert all(o >= w for o, w in zip(ours, whole_line))
    assert np.mean(ours) > 0.65 and np.mean(ours) > np.mean(whole_line) + 0.15


def test_datatrove_normalization_ignores_punctuation_and_numbers():
    plain, simple = DedupOptions(), DedupOptions(normalize=("numbers", "punctuation"))
    a = "Version 3.11, released 2022-10-24: faster (much faster!) than 3.10; see the notes. " * 8
    b = "version 3.12 released 2023-10-02 faster much faster than 3.11 see the notes " * 8
    assert dedup.verify(_sketch("a", a, simple), _sketch("b", b, simple), simple).jaccard == 1.0
    assert dedup.verify(_sketch("a", a, plain), _sketch("b", b, plain), plain).jaccard < 0.5
    assert dedup.simplify("a,b 1.5 x2y 10,000", ("numbers", "punctuation")) == "a b 0 x0y 0"
    with pytest.raises(ValueError, match="unknown normalization"):
        DedupOptions(normalize=("stemming",))


def test_an_exact_cluster_larger_than_the_bucket_cap_is_whole(tmp_path, tiny_byte_model):
    """Copies of the most repeated text are never capped, need no NCD forward, and stay out of the
    near-duplicate buckets (which are capped at --dedup-max-bucket)."""
    text = " ".join(f"word{i}" for i in range(60))
    docs = [{"id": f"copy{i}", "text": text if i % 2 else text.upper()} for i in range(9)]
    docs.append({"id": "other", "text": " ".join(f"term{i}" for i in range(60))})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    record = run(["--input", str(tmp_path / "c.jsonl"), "--output", str(out), "--id-field", "id", "--quiet",
                  "--no-coding", "--model", tiny_byte_model, "--chunk-bytes", "256", "--dedup-max-bucket", "3"])
    rows = ds.dataset(out / "duplicates", format="parquet").to_table().to_pylist()
    copies = {r["doc_id"]: r for r in rows}
    assert set(copies) == {f"copy{i}" for i in range(9)}
    assert {r["cluster_size"] for r in rows} == {9} and {r["kept_doc_id"] for r in rows} == {"copy0"}
    assert all(r["reason"] == "exact" and r["ncd"] is None for r in rows if not r["keep"])
    metrics = record["job_metrics"]
    assert "padding_fraction" in metrics  # the counters were collected
    # No candidate pair was scored for NCD: the copies never met in a near-duplicate bucket.
    assert metrics.get("dedup_candidate_pairs", 0) == 0 and metrics.get("dedup_capped_buckets", 0) == 0


def _texts() -> list[str]:
    files = sorted(Path(bundled_sample_dir()).glob("*.txt"))
    return [f.read_text()[:3000] for f in files[:6]]


def _edit_words(text: str, n: int, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "EDITED"
    return " ".join(words)


@functools.cache
def _bundled_model():
    import torch
    from transformers import AutoModelForCausalLM

    from lmc_audit.transforms.scoring.model_loading import resolve_model_dir

    # stored in bfloat16, computed in float32 as the pipeline does
    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("bundled"), dtype=torch.float32).eval()


def _bundled_bits(data: bytes) -> float:
    import math

    import torch

    model = _bundled_model()
    ids = torch.tensor([[256, *data]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)
    return -logp.gather(-1, ids[:, 1:, None]).double().sum().item() / math.log(2)


def planted_docs() -> list[dict]:
    """Six unrelated documents; copies of five of them: whitespace-changed, word-edited, reflowed, cut to
    60%, paragraphs shuffled; three other documents under one licence header, and the header alone."""
    rng = random.Random(0)
    texts = _texts()
    docs = [{"id": f"orig{i}", "text": t} for i, t in enumerate(texts)]
    docs.append({"id": "ws0", "text": "  ".join(texts[0].split()).upper()})  # exact after normalization
    docs.append({"id": "edit1", "text": _edit_words(texts[1], 4, rng)})
    docs.append({"id": "reflow2", "text": texts[2].replace("\n", " ").replace(". ", ".\n")})
    docs.append({"id": "prefix3", "text": texts[3][:int(len(texts[3]) * 0.6)]})
    docs.append({"id": "shuffled4", "text": _shuffled(texts[4])})
    files = sorted(Path(bundled_sample_dir()).glob("*.txt"))
    docs += [{"id": f"licensed{i}", "text": LICENCE + f.read_text()[:3000]} for i, f in enumerate(files[6:9])]
    docs.append({"id": "header", "text": LICENCE + "See the documentation for more."})
    return docs


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    docs = planted_docs()
    corpus = tmp_path_factory.mktemp("planted")
    # Copies in a second shard, listed after the first: the originals are kept.
    (corpus / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:6]))
    (corpus / "b.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[6:11]))
    (corpus / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[11:]))
    out = tmp_path_factory.mktemp("planted_out")
    record = run(["--input", str(corpus), "--output", str(out), "--id-field", "id", "--quiet", "--no-coding"])
    rows = ds.dataset(out / "duplicates", format="parquet").to_table().to_pylist()
    return out, record, {r["doc_id"]: r for r in rows}


def test_pipeline_finds_planted_duplicates_and_keeps_unrelated_apart(planted):
    out, record, rows = planted
    # The licensed documents and the header alone are in no cluster.
    assert set(rows) == {"orig0", "ws0", "orig1", "edit1", "orig2", "reflow2", "orig3", "prefix3", "orig4",
                         "shuffled4"}
    for orig, copy in (("orig0", "ws0"), ("orig1", "edit1"), ("orig2", "reflow2"), ("orig3", "prefix3"),
                       ("orig4", "shuffled4")):
        assert rows[orig]["keep"] and not rows[copy]["keep"]
        assert rows[copy]["kept_doc_id"] == orig and rows[copy]["matched_doc_id"] == orig
        assert rows[orig]["cluster_id"] == rows[copy]["cluster_id"] and rows[copy]["cluster_size"] == 2
    # Reflowed lines are the same text once whitespace is normalized.
    assert rows["ws0"]["reason"] == rows["reflow2"]["reason"] == "exact" and rows["edit1"]["reason"] == "near"
    assert rows["edit1"]["jaccard"] > 0.7 and rows["edit1"]["rule"] == "jaccard"
    assert rows["prefix3"]["rule"] in ("jaccard", "containment") and rows["prefix3"]["containment"] > 0.95
    assert rows["prefix3"]["length_ratio"] == pytest.approx(0.6, abs=0.02)
    assert rows["shuffled4"]["line_containment"] == 1.0 and rows["orig4"]["rule"] == "kept"
    # NCD is the definition applied to the model's bits of the documents' NCD samples, each scored from BOS,
    # the smaller of the two samples' (lines drawn from the whole text; the text's head).
    opts, docs = DedupOptions(), {d["id"]: d["text"] for d in planted_docs()}
    assert rows["ws0"]["ncd"] is None and rows["reflow2"]["ncd"] is None  # exact: no NCD forwards
    for orig, copy in (("orig1", "edit1"),):
        x, y = _sketch(orig, docs[orig], opts), _sketch(copy, docs[copy], opts)
        assert x.ncd_text != docs[orig].encode()[:opts.ncd_bytes]  # lines drawn from the whole text, not its start
        assert x.ncd_head == " ".join(docs[orig].casefold().split()).encode()[:opts.ncd_bytes]
        each = []
        for xs, ys in zip(x.ncd_samples, y.ncd_samples):
            cx, cy, cxy = _bundled_bits(xs), _bundled_bits(ys), _bundled_bits(xs + ys)
            each.append((cxy - min(cx, cy)) / max(cx, cy))
        assert rows[copy]["ncd"] == pytest.approx(min(each), rel=1e-4)
    # The bundled model copies from its context: a copy's NCD is far below 1 (about 1 for a model that
    # cannot copy, as the bundled model up to 0.2.0), edited, cut and shuffled copies alike.
    assert all(rows[copy]["ncd"] < 0.3 for copy in ("edit1", "prefix3", "shuffled4")), rows
    shards = {Path(s["shard"]).name: s for s in ds.dataset(out / "shards", format="parquet").to_table().to_pylist()}
    assert (shards["b.jsonl"]["exact_duplicates"], shards["b.jsonl"]["near_duplicates"]) == (2, 3)
    assert shards["b.jsonl"]["near_duplicate_rate"] == pytest.approx(3 / 5)
    assert shards["a.jsonl"]["exact_duplicates"] == shards["a.jsonl"]["near_duplicates"] == 0
    assert shards["c.jsonl"]["exact_duplicates"] == shards["c.jsonl"]["near_duplicates"] == 0
    docs = ds.dataset(out / "documents", format="parquet").to_table().to_pylist()
    hashes = {d["doc_id"]: d["normalized_hash"] for d in docs}
    assert hashes["orig0"] == hashes["ws0"] and hashes["orig2"] == hashes["reflow2"] and len(set(hashes.values())) == 13


def test_dedup_options_are_checked_when_the_job_is_built(tmp_path):
    with pytest.raises(SystemExit, match="jaccard_threshold"):
        run(["--sample", "--output", str(tmp_path / "o"), "--dedup-jaccard", "1.5"])
    with pytest.raises(ValueError, match="at least 1"):
        DedupOptions(bands=0)



def _run_to_file(tmp_path: Path, build, name: str) -> tuple[list, object]:
    """Runs ``build(pipeline)`` on the DirectRunner; its one list of elements, and the result (metrics)."""
    import pickle

    import apache_beam as beam

    target = tmp_path / f"{name}.pickle"
    pipeline = beam.Pipeline(runner="DirectRunner")
    _ = (build(pipeline) | beam.combiners.ToList()
         | beam.Map(lambda items, path=str(target): Path(path).write_bytes(pickle.dumps(sorted(items)))))
    result = pipeline.run()
    result.wait_until_finish()
    return pickle.loads(target.read_bytes()), result


def _unsettled(result) -> int:
    from apache_beam.metrics import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_name("components_unsettled_nodes"))["counters"]
    return sum(c.committed or 0 for c in found)


def test_connected_components_match_union_find_whatever_the_rounds(tmp_path):
    """Large-star / small-star rounds, then what has not settled joined on one worker: the labels are the
    components' smallest nodes for any number of rounds; enough rounds leave nothing to gather."""
    import apache_beam as beam

    from lmc_audit.transforms.dedup.components import ConnectedComponents, UnionFind

    rng = random.Random(5)
    path = list(range(300))
    rng.shuffle(path)
    graphs = {
        "path": [(path[i], path[i + 1]) for i in range(len(path) - 1)],  # the slowest to settle
        "random": [(rng.randrange(250), rng.randrange(250)) for _ in range(300)] + [(3, 4), (4, 3), (3, 4)],
        "stars": [((c, rng.randrange(10 ** 6), f"d{i}"), (c, 0, "root")) for c in range(5) for i in range(40)]
                 + [((1, 0, "root"), (2, 5, "x")), ((2, 5, "x"), (4, 0, "root"))],  # tuples, as DocKeys are
    }
    for name, edges in graphs.items():
        uf = UnionFind()
        for a, b in edges:
            if a != b:
                uf.union(a, b)
        want = sorted((node, uf.find(node)) for node in uf.parent)
        for rounds in (0, 2, 8):
            got, result = _run_to_file(tmp_path, lambda p, e=edges, r=rounds: p | beam.Create(e)
                                       | ConnectedComponents(r), f"{name}{rounds}")
            assert got == want, (name, rounds)
            if rounds == 0 and name == "path":
                assert _unsettled(result) > 50  # the fallback did the work here
            if rounds == 8:
                assert _unsettled(result) == 0, name
    with pytest.raises(ValueError, match="rounds"):
        ConnectedComponents(-1)


def test_find_duplicates_clusters_equal_union_find_over_its_edges(tmp_path):
    """The job's transform, whatever its rounds, gives the rows ``duplicate_rows`` makes in memory from the
    same verified edges: exact copies, near copies and distinct documents."""
    import apache_beam as beam

    from lmc_audit.transforms.dedup.find_duplicates import FindDuplicates

    opts = DedupOptions()
    hasher = dedup.MinHasher(opts.num_perm)
    rng = random.Random(11)
    words = [f"w{i}" for i in range(2000)]
    sketches = []
    for i in range(12):
        base = [rng.choice(words) for _ in range(300)]
        texts = [base, base, base[:-3] + ["edit"] * 3, [rng.choice(words) for _ in range(300)]]
        for j, t in enumerate(texts):
            key = (i % 3, 100 * i + j, f"doc{i}-{j}")
            sketches.append(dedup.make_sketch(key, f"s{i % 3}", " ".join(t).encode(), opts, hasher))
    rows = {}
    for rounds in (0, 3):
        found, _ = _run_to_file(tmp_path, lambda p, r=rounds: p | beam.Create(sketches)
                                | FindDuplicates(dataclasses.replace(opts, component_rounds=r)), f"find{rounds}")
        rows[rounds] = [row for _, _, row in found]
    assert rows[0] == rows[3]
    by_doc = {r["doc_id"]: r for r in rows[3]}
    for i in range(12):
        kept = by_doc[f"doc{i}-0"]
        assert kept["keep"] and kept["cluster_size"] == 3 and f"doc{i}-3" not in by_doc
        assert by_doc[f"doc{i}-1"]["reason"] == "exact" and by_doc[f"doc{i}-2"]["reason"] == "near"
        assert len({by_doc[f"doc{i}-{j}"]["cluster_id"] for j in range(3)}) == 1


def test_packed_hashes_come_back_exactly_in_fewer_bytes():
    """What the pair join moves: sorted uint32 hashes packed as zstd-coded gaps. Exact round trip
    (empty, one hash, the extremes of the range, a real sketch), and smaller than the raw bytes for a
    real document's n-gram hashes (gaps of uniform hashes need about 24 of 32 bits at 500 hashes)."""
    cases = [np.zeros(0, np.uint32), np.array([7], np.uint32), np.array([0, 1, 2**32 - 1], np.uint32),
             np.unique(np.random.default_rng(0).integers(0, 2**32, 5_000, dtype=np.uint64)).astype(np.uint32)]
    sketch = _sketch("doc", " ".join(_texts()))
    cases.append(np.frombuffer(sketch.shingles, np.uint32))
    for hashes in cases:
        raw = hashes.astype("<u4").tobytes()
        assert dedup.unpack_hashes(dedup.pack_hashes(raw)) == raw
        assert len(dedup.pack_hashes(raw)) <= len(raw) + 1  # a small set goes as it is, after its tag
    assert len(sketch.shingles) > 4_000
    assert len(dedup.pack_hashes(sketch.shingles)) < 0.85 * len(sketch.shingles)


def test_packed_ncd_samples_come_back_exactly():
    """The NCD sample as the pair join moves it: exact round trip for an empty sample, one byte,
    random bytes (which zstd cannot shrink: they go as they are, after their tag) and a real sample,
    which shrinks."""
    sample = _sketch("doc", " ".join(_texts())).ncd_text
    noise = np.random.default_rng(0).integers(0, 256, 1_024, dtype=np.uint8).tobytes()
    for text in (b"", b"x", noise, sample):
        assert dedup.unpack_text(dedup.pack_text(text)) == text
        assert len(dedup.pack_text(text)) <= len(text) + 1
    assert len(sample) > 500 and len(dedup.pack_text(sample)) < 0.8 * len(sample)
