"""Okapi BM25 over document text: the lexical baseline the influence rankings are compared with.

score(q, d) = Σ_{t ∈ terms(q)} idf(t) · tf(t, d)·(k1 + 1) / (tf(t, d) + k1·(1 − b + b·|d|/avgdl))
with the Lucene idf log(1 + (N − n_t + 0.5)/(n_t + 0.5)), which is never negative, so a term
that occurs in most documents still counts a little instead of pushing scores down.

Query terms are counted once each (a set): a query is a prompt plus its completion, and a word
the prompt repeats should not outweigh the answer. |d| counts the document's terms after
stopword removal, the same token stream that tf counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msif.errors import DataError

_WORD = re.compile(r"\w+")

# Function words only: content words of the fact world ("capital", "born") must stay.
STOPWORDS = frozenset(
    """a an and are as at be been but by did do does for from had has have he her his how i
    in into is it its me my no not of on or our she so than that the their them then there
    these they this those to was we were what when where which who whom why will with you
    your""".split()
)


def tokenize(text: str) -> list[str]:
    """Lowercased `\\w+` words of text, stopwords removed."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


@dataclass(frozen=True)
class _Postings:
    docs: np.ndarray  # int64 document indices, ascending
    tf: np.ndarray  # float64 term frequency in each of those documents


@dataclass
class BM25Index:
    """An in-memory inverted index over a fixed document set."""

    doc_ids: list[str]
    doc_lengths: np.ndarray
    postings: dict[str, _Postings]
    k1: float = 1.5
    b: float = 0.75

    @classmethod
    def build(
        cls, doc_ids: Sequence[str], texts: Sequence[str], k1: float = 1.5, b: float = 0.75
    ) -> BM25Index:
        """Index texts under doc_ids (unique, same length); k1 ≥ 0, 0 ≤ b ≤ 1."""
        if len(doc_ids) != len(texts):
            raise DataError(f"BM25 got {len(doc_ids)} document ids but {len(texts)} texts")
        if not doc_ids:
            raise DataError("BM25 needs at least one document")
        if len(set(doc_ids)) != len(doc_ids):
            dup = next(d for d, c in Counter(doc_ids).items() if c > 1)
            raise DataError(f"BM25: document id {dup!r} occurs more than once")
        if not k1 >= 0 or not 0 <= b <= 1:
            raise DataError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        lengths = np.zeros(len(texts), np.float64)
        docs: dict[str, list[int]] = {}
        freqs: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            counts = Counter(tokenize(text or ""))
            lengths[i] = sum(counts.values())
            for term, c in counts.items():
                docs.setdefault(term, []).append(i)
                freqs.setdefault(term, []).append(c)
        postings = {
            t: _Postings(np.asarray(docs[t], np.int64), np.asarray(freqs[t], np.float64))
            for t in docs
        }
        return cls([str(d) for d in doc_ids], lengths, postings, float(k1), float(b))

    @property
    def num_docs(self) -> int:
        """Number of indexed documents."""
        return len(self.doc_ids)

    def idf(self, term: str) -> float:
        """Lucene-style idf of a (tokenised) term; log(1 + (N + 0.5)/0.5) if unseen."""
        n = len(self.postings[term].docs) if term in self.postings else 0
        return float(np.log1p((self.num_docs - n + 0.5) / (n + 0.5)))

    def score(self, query_text: str) -> np.ndarray:
        """BM25 score of every document for query_text, float64 in index order."""
        out = np.zeros(self.num_docs, np.float64)
        avgdl = float(self.doc_lengths.mean())
        # All documents empty: no term can match, and |d|/avgdl would be 0/0.
        norm = self.doc_lengths / avgdl if avgdl > 0 else np.ones_like(self.doc_lengths)
        for term in sorted(set(tokenize(query_text or ""))):
            post = self.postings.get(term)
            if post is None:
                continue
            tf = post.tf
            denom = tf + self.k1 * (1.0 - self.b + self.b * norm[post.docs])
            out[post.docs] += self.idf(term) * tf * (self.k1 + 1.0) / denom
        return out

    def top_k(self, query_text: str, k: int) -> list[tuple[str, float]]:
        """The k best (doc_id, score), best first; equal scores by ascending doc id."""
        if k < 1:
            raise DataError(f"top_k needs k >= 1, got {k}")
        scores = self.score(query_text)
        order = np.lexsort((np.asarray(self.doc_ids, dtype=str), -scores))[:k]
        return [(self.doc_ids[i], float(scores[i])) for i in order]
