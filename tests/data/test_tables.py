"""Column types and nulls of real Parquet inputs: one-line DataErrors naming file, column, row."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif.data.parquet import ParquetSource, read_table
from msif.data.tables import (
    TableOptions,
    iter_examples,
    iter_texts,
    require_corpus,
    require_queries,
    table_kind,
)
from msif.errors import DataError
from tests.support.mini_world import tokenizer_for

WORDS = ["alpha beta gamma", "beta gamma delta", "gamma delta alpha", "delta alpha beta"]
TOKENIZER = tokenizer_for(WORDS)
VOCAB = len(TOKENIZER)
OPTS = TableOptions(max_length=16, batch_rows=2)


def _write(path: Path, columns: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


def _examples(uri: str) -> list:
    source = ParquetSource.open(uri)
    kind = table_kind(source.schema, uri)
    return list(iter_examples(source, TOKENIZER, kind, OPTS, VOCAB))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and type(err.value) is DataError
    return text


GOOD_IDS = pa.array(["a", "b"], pa.string())
BAD_SCHEMAS = {
    "text as list<string>": (
        {"id": GOOD_IDS, "text": pa.array([["alpha"], ["beta"]], pa.list_(pa.string()))},
        "column `text` is list<string>; expected string",
    ),
    "text as float": (
        {"id": GOOD_IDS, "text": pa.array([1.5, 2.5])},
        "column `text` is double; expected string",
    ),
    "input_ids as floats": (
        {"id": GOOD_IDS, "input_ids": pa.array([[1.0, 2.7], [3.0, 4.2]])},
        "column `input_ids` is list<double>; expected list of integers",
    ),
    "input_ids as a string": (
        {"id": GOOD_IDS, "input_ids": pa.array(["1 2", "3 4"])},
        "column `input_ids` is string; expected list of integers",
    ),
    "id as float": (
        {"id": pa.array([1.0, 2.0]), "text": pa.array(WORDS[:2])},
        "column `id` is double; expected string or integer",
    ),
    "id as bool": (
        {"id": pa.array([True, False]), "text": pa.array(WORDS[:2])},
        "column `id` is bool; expected string or integer",
    ),
    "prompt as int": (
        {"prompt": pa.array([1, 2]), "completion": pa.array(["x", "y"])},
        "column `prompt` is int64; expected string",
    ),
    "completion as list<string>": (
        {"prompt": pa.array(["x", "y"]), "completion": pa.array([["a"], ["b"]])},
        "column `completion` is list<string>; expected string",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEMAS))
def test_column_types_are_refused_from_the_schema(case, tmp_path):
    columns, message = BAD_SCHEMAS[case]
    uri = _write(tmp_path / "t.parquet", columns)
    source = ParquetSource.open(uri)
    with pytest.raises(DataError) as err:
        table_kind(source.schema, uri)
    assert _one_line(err) == f"{uri}: {message}"
    with pytest.raises(DataError, match="expected"):  # iter_examples checks on its own too
        kind = "pairs" if "prompt" in columns else "corpus"
        next(iter_examples(source, TOKENIZER, kind, OPTS, VOCAB))


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"id": pa.array([1.0]), "text": pa.array(["a b"])}, "`id` is double"),
        ({"id": pa.array(["d"]), "text": pa.array([3.0])}, "`text` is double"),
        ({"id": pa.array(["d"]), "input_ids": pa.array([[1]])}, "expected `text` (--text-column)"),
    ],
)
def test_require_corpus(columns, message, tmp_path):
    uri = _write(tmp_path / "c.parquet", columns)
    source = ParquetSource.open(uri)
    with pytest.raises(DataError) as err:
        require_corpus(source.schema, uri, text=True)
    assert message in _one_line(err) and uri in str(err.value)
    with pytest.raises(DataError, match=re.escape(message)):
        next(iter_texts(source))


def test_require_corpus_returns_the_column_documents_come_from(tmp_path):
    both = ParquetSource.open(
        _write(
            tmp_path / "c.parquet",
            {
                "id": ["a"],
                "text": ["alpha beta"],
                "input_ids": pa.array([[1, 2]], pa.list_(pa.int32())),
            },
        )
    )
    assert require_corpus(both.schema, "c") == "input_ids"
    assert require_corpus(both.schema, "c", text=True) == "text"


def _two_files(tmp_path: Path, second: dict) -> tuple[str, str]:
    """A corpus directory whose second file holds the given (bad) columns."""
    root = tmp_path / "corpus"
    _write(root / "part-0.parquet", _fill(second))
    bad = _write(root / "part-1.parquet", second)
    return str(root), bad


def _fill(columns: dict) -> dict:
    # The first file: same types as the second, with every null replaced by a good value.
    good = {"id": ["x0", "x1"], "text": WORDS[:2], "input_ids": [[1, 2], [2, 3]]}
    good |= {"prompt": ["alpha", "beta"], "completion": [" gamma", " delta"]}
    if pa.types.is_integer(columns["id"].type if "id" in columns else pa.string()):
        good["id"] = [100, 101]
    return {k: pa.array(good[k], v.type) for k, v in columns.items()}


NULLS = {
    "null text": (
        {"id": pa.array(["a", "b", "c"]), "text": pa.array(["alpha", None, "beta"])},
        "row 1 (id 'b'): `text` is null",
    ),
    "null string id": (
        {"id": pa.array(["a", None]), "text": pa.array(WORDS[:2])},
        "row 1: `id` is null",
    ),
    "null integer id": (
        {"id": pa.array([None, 7], pa.int64()), "text": pa.array(WORDS[:2])},
        "row 0: `id` is null",
    ),
    "null input_ids": (
        {"id": pa.array(["a", "b"]), "input_ids": pa.array([[1, 2], None], pa.list_(pa.int32()))},
        "row 1 (id 'b'): `input_ids` is null",
    ),
    "null element in input_ids": (
        {"id": pa.array(["a", "b"]), "input_ids": pa.array([[1, 2], [3, None, 4]])},
        "row 1 (id 'b'): `input_ids` holds a null element",
    ),
    "null prompt": (
        {"prompt": pa.array(["alpha", None]), "completion": pa.array([" beta", " gamma"])},
        "row 1: `prompt` is null",
    ),
    "null completion": (
        {
            "id": pa.array(["p", "q"]),
            "prompt": pa.array(["alpha", "beta"]),
            "completion": pa.array([None, " gamma"]),
        },
        "row 0 (id 'p'): `completion` is null",
    ),
}


@pytest.mark.parametrize("case", sorted(NULLS))
def test_nulls_name_the_file_column_and_row(case, tmp_path):
    columns, message = NULLS[case]
    root, bad_file = _two_files(tmp_path, columns)
    with pytest.raises(DataError) as err:
        _examples(root)
    assert _one_line(err) == f"{bad_file} {message}"


def test_null_text_is_refused_for_bm25_texts(tmp_path):
    root, bad_file = _two_files(tmp_path, NULLS["null text"][0])
    with pytest.raises(DataError) as err:
        [ids for ids, _ in iter_texts(ParquetSource.open(root))]
    assert _one_line(err) == f"{bad_file} row 1 (id 'b'): `text` is null"


def test_good_tables_stream_with_integer_ids_and_int_lists(tmp_path):
    texts = _write(tmp_path / "t.parquet", {"id": pa.array([7, 8], pa.int64()), "text": WORDS[:2]})
    assert [e.id for e in _examples(texts)] == ["7", "8"]
    ids = pa.array([[1, 2, 3], [4, 5]], pa.large_list(pa.uint16()))
    tokens = _write(tmp_path / "i.parquet", {"id": ["a", "b"], "input_ids": ids})
    assert [e.input_ids for e in _examples(tokens)] == [[1, 2, 3], [4, 5]]
    pairs = _write(tmp_path / "p.parquet", {"prompt": ["alpha beta"], "completion": [" gamma"]})
    (example,) = _examples(pairs)
    assert example.id == "row-0" and example.labels[-1] == TOKENIZER.convert_tokens_to_ids("gamma")
    rows = list(iter_texts(ParquetSource.open(texts)))
    assert rows == [(["7", "8"], WORDS[:2])]


def _queries(tmp_path: Path, **columns) -> tuple[pa.Table, str]:
    base = {"id": ["q0", "q1"], "prompt": ["alpha", "beta"], "completion": [" gamma", " delta"]}
    uri = _write(tmp_path / "q.parquet", base | columns)
    return read_table(uri), uri


BAD_QUERIES = {
    "relevant_ids as a string": (
        {"relevant_ids": ["doc-1", "doc-2"]},
        "column `relevant_ids` is string; expected list of strings",
    ),
    "relevant_ids as floats": (
        {"relevant_ids": [[1.0], [2.0]]},
        "column `relevant_ids` is list<double>; expected list of strings",
    ),
    "id as float": ({"id": [0.5, 1.5]}, "column `id` is double; expected string or integer"),
    "prompt as list": ({"prompt": [["a"], ["b"]]}, "column `prompt` is list<string>"),
    "null id": ({"id": ["q0", None]}, "row 1: `id` is null"),
    "null prompt": ({"prompt": [None, "beta"]}, "row 0 (id 'q0'): `prompt` is null"),
    "null completion": ({"completion": [" gamma", None]}, "row 1 (id 'q1'): `completion` is null"),
    "null in relevant_ids": (
        {"relevant_ids": [["doc-1"], ["doc-2", None]]},
        "row 1 (id 'q1'): `relevant_ids` holds a null element",
    ),
    "repeated id": ({"id": ["q0", "q0"]}, "repeat id 'q0' (rows 0, 1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
def test_require_queries_refuses(case, tmp_path):
    columns, message = BAD_QUERIES[case]
    table, uri = _queries(tmp_path, **columns)
    with pytest.raises(DataError) as err:
        require_queries(table, uri)
    assert _one_line(err).startswith(f"queries {uri}") and message in str(err.value)


def test_require_queries_accepts_good_tables(tmp_path):
    table, uri = _queries(tmp_path, relevant_ids=[["doc-1"], None])
    require_queries(table, uri)  # a query without relevant ids is skipped in the metrics
    table, uri = _queries(tmp_path, id=pa.array([3, 4], pa.int32()), relevant_ids=[[1], [2, 3]])
    require_queries(table, uri)
