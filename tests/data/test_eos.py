"""--append-eos: documents and completions end with the EOS token (scored) by rule."""

from __future__ import annotations

import pyarrow as pa
import pytest

from msif.core.loss import IGNORE
from msif.data.examples import (
    appends_eos,
    eos_to_append,
    tokenize_documents,
    tokenize_prompt_completion,
)
from msif.data.sources import open_source
from msif.data.tables import TableOptions, iter_examples, read_queries
from msif.errors import DataError
from tests.data.formats import write_parquet
from tests.support.mini_world import tokenizer_for

TEXTS = ["w1 w2 w3", "w4 w5"]


def _plain():
    """Encodes without EOS (GPT-2, GPT-NeoX, the fact world)."""
    return tokenizer_for(TEXTS)


def _appending():
    """Appends EOS itself (Llama's add_eos_token=True, T5-like post-processors)."""
    tok = tokenizer_for(TEXTS)
    tok.add_eos_token = True
    return tok


def _id(tok, word: str) -> int:
    return tok.convert_tokens_to_ids(word)


def test_what_the_tokenizer_says():
    plain, appending = _plain(), _appending()
    eos = plain.eos_token_id
    assert not appends_eos(plain) and appends_eos(appending)
    assert eos_to_append(plain, "auto") is None and eos_to_append(appending, "auto") == eos
    assert eos_to_append(plain, "on") == eos == eos_to_append(appending, "on")
    assert eos_to_append(plain, "off") is None is eos_to_append(appending, "off")
    no_eos = tokenizer_for(TEXTS)
    no_eos.eos_token = None
    assert eos_to_append(no_eos, "auto") is None
    with pytest.raises(DataError) as err:
        eos_to_append(no_eos, "on")
    assert str(err.value) == "--append-eos on: the tokenizer has no EOS token"


@pytest.mark.parametrize(
    ("make", "mode", "ends_with_eos"),
    [
        (_plain, "auto", False),
        (_plain, "on", True),
        (_plain, "off", False),
        (_appending, "auto", True),
        (_appending, "on", True),
        (_appending, "off", False),
    ],
)
def test_documents_and_completions_end_by_rule(make, mode, ends_with_eos):
    tok = make()
    eos = tok.eos_token_id
    words = [_id(tok, x) for x in TEXTS[0].split()]
    end = [eos] if ends_with_eos else []
    (doc,) = tokenize_documents(
        tok, ["d"], [TEXTS[0]], 16, eos_id=eos_to_append(tok, mode), strip_eos=mode == "off"
    )
    assert doc.input_ids == words + end and doc.labels == words + end  # EOS once, and scored
    (pair,) = tokenize_prompt_completion(
        tok, ["p"], ["w1 w2"], [" w3"], 16, eos_id=eos_to_append(tok, mode)
    )
    # The prompt never ends with an EOS: the completion follows it.
    prompt, completion = [_id(tok, "w1"), _id(tok, "w2")], [_id(tok, "w3"), *end]
    assert pair.input_ids == prompt + completion
    assert pair.labels == [IGNORE, IGNORE, *completion]


def test_append_eos_through_tables(tmp_path):
    tok = _plain()
    eos = tok.eos_token_id
    corpus = open_source(
        write_parquet(pa.table({"id": ["a"], "text": ["w1 w2"]}), tmp_path / "c.parquet")
    )
    pre = open_source(
        write_parquet(pa.table({"id": ["b"], "input_ids": [[3, 4]]}), tmp_path / "i.parquet")
    )
    pairs = write_parquet(
        pa.table({"id": ["q"], "prompt": ["w1"], "completion": [" w2"]}), tmp_path / "q.parquet"
    )
    for mode, end in (("auto", []), ("on", [eos]), ("off", [])):
        opts = TableOptions(max_length=16, append_eos=mode)
        (doc,) = iter_examples(corpus, tok, "corpus", opts, 99)
        assert doc.input_ids[-1:] == (end or [_id(tok, "w2")])
        (given,) = iter_examples(pre, tok, "corpus", opts, 99)
        assert given.input_ids == [3, 4]  # pre-tokenised rows are used as given
        (query,) = read_queries(pairs, opts).examples(tok, 16)
        assert query.labels == [IGNORE, _id(tok, "w2"), *end]
    # The completion and its EOS must fit max_length, with one prompt token before them.
    (short,) = read_queries(pairs, TableOptions(append_eos="on")).examples(tok, 3)
    assert short.input_ids == [_id(tok, "w1"), _id(tok, "w2"), eos]
    with pytest.raises(DataError, match="completion has 2 tokens, max length is 2"):
        read_queries(pairs, TableOptions(append_eos="on")).examples(tok, 2)
