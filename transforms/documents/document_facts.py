"""What a document's manifest row and dedup sketch need of its whole text, computed while it is read.

``DocumentDescriber`` takes a document's bytes in order, in as many pieces as
the reader yields (a whole JSONL line or Parquet value, or the 64 MiB segments
of a large text file), and keeps only bounded state: hash objects, the last few
words, a MinHash signature and at most ``SHINGLE_CAP`` n-gram hashes. So no
later stage joins a document's bytes back together, whatever its size.

- ``content_hash``: sha256 over the sha256 of each ``chunk_bytes`` chunk, in order
  (the chunks' own digests, so it equals the definition in the README).
- ``normalized_hash``: sha256 of the normalized text (``dedup.normalize_text``:
  NFKC, case-folded, whitespace runs as one space). The text is decoded with an
  incremental UTF-8 decoder and normalized up to the last whitespace of each
  piece, so the result equals normalizing the whole text, except inside a run of
  more than ``MAX_CARRY`` characters without whitespace, which is cut there.
- the sketch: word n-gram hashes across piece boundaries (the last n-1 words
  carry over), the MinHash signature as the running minimum (exact), and the
  ``SHINGLE_CAP`` smallest distinct n-gram hashes (all of them for documents
  below the cap; above it, a bottom-k sketch from which ``dedup.overlap``
  estimates the similarity); line hashes likewise, a line's hash built word
  by word so that a line may span pieces (``LINE_CAP`` smallest kept); the two
  NCD samples: the lines with the smallest keys (``dedup.LineSample``) and the
  first ``ncd_bytes`` of the words (``dedup.head_text``).

A piece is processed up to the start of its last whitespace run: the run and
the word after it wait for the next piece, so a word or a line break is never
split between pieces (a run of whitespace alone is shortened to one space or
one line break, which changes neither words nor lines).
"""

from __future__ import annotations

import codecs
import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np

from lmc_audit.transforms.dedup import sketches as dedup
from lmc_audit.transforms.dedup.sketches import DedupOptions, DocKey, DocSketch

SNIPPET_CHARS = 200
MAX_CARRY = 1 << 20  # characters held back waiting for whitespace
TEXT_SLICE = 1 << 18  # bytes normalized and shingled at once
SHINGLE_CAP = dedup.SHINGLE_CAP


@dataclass(frozen=True)
class DocumentFacts:
    key: DocKey  # (shard index, position, doc_id)
    shard: str
    bytes: int
    content_hash: str
    normalized_hash: str
    snippet: str
    sketch: DocSketch | None = None


def snippet(data: bytes, chars: int = SNIPPET_CHARS) -> str:
    """The document's first characters, whitespace collapsed, for reports."""
    return " ".join(data[:4 * chars].decode("utf-8", errors="replace").split())[:chars]


class DocumentDescriber:
    """Facts of one document from its bytes, fed in order with ``update``; ``finish`` once."""

    def __init__(self, key: DocKey, shard: str, chunk_bytes: int, dedup_options: DedupOptions | None = None,
                 hasher: dedup.MinHasher | None = None):
        self._key, self._shard, self._chunk_bytes = key, shard, chunk_bytes
        self._content = hashlib.sha256()
        self._pending = b""  # bytes of the chunk not yet complete
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._carry = ""
        self._normalized = hashlib.sha256()
        self._words_seen = 0
        self._gram_words = 0  # words n-grams are taken from (after the options' normalization)
        self._head = b""
        self._bytes = 0
        self._options = dedup_options
        self._hasher = hasher
        self._tail: list[str] = []  # the last n-1 words
        self._shingles = np.zeros(0, np.uint32)
        self._signature = None
        self._line = hashlib.sha1()
        self._line_words = 0
        self._line_text = b""  # the current line's first SAMPLE_LINE_BYTES, for the NCD sample
        self._line_key: int | None = None  # the smallest bigram hash of the current line so far
        self._line_last: str | None = None  # its last word, for the bigram across the next piece
        self._line_hashes: list[int] = []
        self._lines = np.zeros(0, np.uint32)
        self._sample = dedup.LineSample(dedup_options.ncd_bytes) if dedup_options else None
        self._words_head = b""  # dedup.head_text, streamed
        self._done = False

    def update(self, data: bytes) -> None:
        assert not self._done, "update after finish"
        want = 4 * SNIPPET_CHARS  # the snippet's bytes (the NCD samples take the words, not these)
        if len(self._head) < want:
            self._head += data[:want - len(self._head)]
        self._bytes += len(data)
        self._hash_chunks(data)
        # Text work in slices: its temporaries (words, n-grams) stay near one slice, whatever the piece.
        for start in range(0, len(data), TEXT_SLICE):
            self._text(data[start:start + TEXT_SLICE])

    def _text(self, data: bytes) -> None:
        text = self._carry + self._decoder.decode(data)
        # Up to the start of the last whitespace run; the run and the word after it wait for the next piece.
        word = len(text) - len(text.rsplit(None, 1)[-1]) if text and not text[-1].isspace() else len(text)
        cut = len(text[:word].rstrip())
        if cut == 0 and text.isspace():
            self._carry = "\n" if "\n" in text else " "
            return
        if cut == 0 and len(text) <= MAX_CARRY:
            self._carry = text
            return
        if cut == 0:
            cut = len(text)
        self._carry = text[cut:]
        self._words(text[:cut])

    def finish(self) -> DocumentFacts:
        assert not self._done, "finish twice"
        self._done = True
        if self._pending:
            self._content.update(hashlib.sha256(self._pending).digest())
        self._words(self._carry + self._decoder.decode(b"", final=True))
        sketch = None
        if self._options is not None:
            self._end_line()
            self._merge_lines()
            if self._gram_words and self._gram_words < self._options.ngram:
                self._add_grams([" ".join(self._tail)])  # one n-gram of all words, as dedup.shingle_hashes
            signature = self._signature if self._signature is not None else self._hasher.signature(
                np.zeros(0, np.uint32))
            sketch = DocSketch(self._key, self._shard, self._bytes, self._normalized.hexdigest(),
                               self._shingles.tobytes(), signature.tobytes(), self._sample.text(self._words_head),
                               self._lines.tobytes(), self._words_head)
        return DocumentFacts(self._key, self._shard, self._bytes, self._content.hexdigest(),
                             self._normalized.hexdigest(), snippet(self._head), sketch)

    def _hash_chunks(self, data: bytes) -> None:
        size = self._chunk_bytes
        if self._pending:
            need = size - len(self._pending)
            self._pending += data[:need]
            data = data[need:]
            if len(self._pending) < size:
                return
            self._content.update(hashlib.sha256(self._pending).digest())
            self._pending = b""
        full = len(data) // size * size
        for start in range(0, full, size):
            self._content.update(hashlib.sha256(data[start:start + size]).digest())
        self._pending = data[full:]

    def _words(self, text: str) -> None:
        folded = unicodedata.normalize("NFKC", text).casefold()
        words = folded.split()
        joined = " ".join(words).encode()
        if words:
            self._normalized.update((b" " if self._words_seen else b"") + joined)
            self._words_seen += len(words)
        if self._options is None:
            return
        normalize = self._options.normalize
        gram_words = dedup.simplify(" ".join(words), normalize).split() if normalize and words else words
        if "\n" not in folded:  # one line (the common case for long pieces): its words are already split
            self._add_line_words(gram_words, None if normalize else joined)
        else:
            for i, line in enumerate(folded.split("\n")):
                if i:
                    self._end_line()
                self._add_line_words(dedup.simplify(line, normalize).split() if normalize else line.split())
        if not gram_words:
            return
        cap = self._options.ncd_bytes
        if len(self._words_head) < cap:  # words are at least a byte each: no more than cap of them needed
            sep = b" " if self._words_head else b""
            self._words_head = (self._words_head + sep + " ".join(gram_words[:cap]).encode())[:cap]
        self._gram_words += len(gram_words)
        n = self._options.ngram
        full = self._tail + gram_words
        self._add_grams([" ".join(full[i:i + n]) for i in range(len(full) - n + 1)])
        self._tail = full[-(n - 1):] if n > 1 else []

    def _add_line_words(self, words: list[str], joined: bytes | None = None) -> None:
        if words:
            joined = " ".join(words).encode() if joined is None else joined
            sep = b" " if self._line_words else b""
            self._line.update(sep + joined)
            cap = dedup.SAMPLE_LINE_BYTES
            if len(self._line_text) < cap:
                self._line_text = (self._line_text + sep + joined[:cap])[:cap]
            self._line_words += len(words)
            key = dedup.bigram_key(words if self._line_last is None else [self._line_last, *words])
            if key is not None and (self._line_key is None or key < self._line_key):
                self._line_key = key
            self._line_last = words[-1]

    def _end_line(self) -> None:
        if self._line_words >= self._options.min_line_words:
            line_hash = int.from_bytes(self._line.digest()[:4], "little")
            self._line_hashes.append(line_hash)
            # dedup.line_key, streamed (a one-word line has no bigram: its word's key)
            key = self._line_key if self._line_key is not None else dedup.line_key([self._line_last])
            self._sample.offer(key, self._line_text)
            if len(self._line_hashes) >= dedup.LINE_CAP:
                self._merge_lines()
        self._line, self._line_words, self._line_text = hashlib.sha1(), 0, b""
        self._line_key = self._line_last = None

    def _merge_lines(self) -> None:
        if self._line_hashes:
            new = np.array(self._line_hashes, np.uint32)
            self._lines = np.union1d(self._lines, new)[:dedup.LINE_CAP].astype(np.uint32)
            self._line_hashes = []

    def _add_grams(self, grams: list[str]) -> None:
        if not grams:
            return
        hashes = dedup.gram_hashes(grams)
        signature = self._hasher.signature(hashes)
        self._signature = signature if self._signature is None else np.minimum(self._signature, signature)
        self._shingles = np.union1d(self._shingles, hashes)[:SHINGLE_CAP].astype(np.uint32)
