"""BM25 against a hand computation, and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from msif.errors import DataError
from msif.evaluation.bm25 import BM25Index, tokenize

DOCS = {
    "d1": "The cat sat on the mat.",  # terms: cat sat mat            (|d| = 3)
    "d2": "A dog chased the cat and the cat ran.",  # dog chased cat cat ran (|d| = 5)
    "d3": "Paris is the capital of France.",  # paris capital france   (|d| = 3)
}


def _index(**kw) -> BM25Index:
    return BM25Index.build(list(DOCS), list(DOCS.values()), **kw)


def test_tokenizer_lowercases_and_drops_stopwords():
    assert tokenize("The Cat, the DOG's bowl: 42!") == ["cat", "dog", "s", "bowl", "42"]
    assert tokenize("") == []


def test_scores_match_hand_computation():
    index = _index()
    n, k1, b = 3, 1.5, 0.75
    avgdl = (3 + 5 + 3) / 3

    def idf(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def term(tf, dl):
        return tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))

    # Query "cat capital": cat occurs in d1 (tf 1) and d2 (tf 2), capital in d3 (tf 1).
    want = np.array(
        [idf(2) * term(1, 3), idf(2) * term(2, 5), idf(1) * term(1, 3)], dtype=np.float64
    )
    np.testing.assert_allclose(index.score("The cat and the capital"), want, rtol=1e-12)
    assert index.idf("cat") == pytest.approx(math.log(1 + 1.5 / 2.5))
    assert index.idf("unseen") == pytest.approx(math.log(1 + 3.5 / 0.5))


def test_repeated_query_terms_count_once():
    index = _index()
    np.testing.assert_array_equal(index.score("cat cat cat"), index.score("cat"))


def test_exact_term_document_ranks_first_with_doc_id_tie_break():
    index = _index()
    assert index.top_k("What is the capital of France? Paris", 1)[0][0] == "d3"
    # d1 and d3 both lack "dog"; their equal zero scores are ordered by doc id.
    assert [d for d, _ in index.top_k("dog", 3)] == ["d2", "d1", "d3"]
    assert index.top_k("dog", 3)[1][1] == 0.0


def test_empty_or_stopword_query_scores_zero():
    index = _index()
    np.testing.assert_array_equal(index.score(""), np.zeros(3))
    np.testing.assert_array_equal(index.score("the of and"), np.zeros(3))


def test_b_zero_ignores_document_length():
    index = _index(b=0.0)
    s = index.score("cat")
    tf_term = [1 * 2.5 / (1 + 1.5), 2 * 2.5 / (2 + 1.5)]
    np.testing.assert_allclose(s[:2], np.array(tf_term) * index.idf("cat"), rtol=1e-12)


def test_all_empty_documents_score_zero():
    index = BM25Index.build(["a", "b"], ["", "the"])
    np.testing.assert_array_equal(index.score("anything"), np.zeros(2))


def test_bad_input_is_refused():
    with pytest.raises(DataError, match="2 document ids but 1 texts"):
        BM25Index.build(["a", "b"], ["x"])
    with pytest.raises(DataError, match="at least one document"):
        BM25Index.build([], [])
    with pytest.raises(DataError, match="document id 'a' occurs more than once"):
        BM25Index.build(["a", "a"], ["x", "y"])
    with pytest.raises(DataError, match="k1 >= 0 and 0 <= b <= 1"):
        BM25Index.build(["a"], ["x"], b=1.5)
    with pytest.raises(DataError, match="k >= 1"):
        _index().top_k("cat", 0)
