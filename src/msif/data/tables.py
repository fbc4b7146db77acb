"""Reading the input tables (corpus, fine-tune data, queries) into tokenised examples.

Column types are checked once per source, from its Arrow schema and before any row is read:
a float `text` or `input_ids` would otherwise be stringified or truncated and tokenised.
Nulls are refused batch by batch, naming the file, the column and the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from msif.data.examples import Example, check_ids, document_example, tokenize_prompt_completion
from msif.errors import DataError

KINDS = {"corpus": "`id` + `text` or `input_ids`", "pairs": "`prompt` + `completion`"}
COLUMNS = {
    "corpus": ("id", "text", "input_ids"),
    "pairs": ("id", "prompt", "completion"),
    "queries": ("id", "prompt", "completion", "relevant_ids"),
}
# Columns whose values must all be present; list columns must hold no null element either.
NOT_NULL = ("id", "text", "input_ids", "prompt", "completion")
NO_NULL_ELEMENTS = ("input_ids", "relevant_ids")

Where = Callable[[int], str]


@dataclass(frozen=True)
class TableOptions:
    """How rows become sequences."""

    max_length: int = 512
    batch_rows: int = 256


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _list_of(t: pa.DataType, element: Callable[[pa.DataType], bool]) -> bool:
    lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return any(is_list(t) for is_list in lists) and element(t.value_type)


def _is_id(t: pa.DataType) -> bool:
    return _is_string(t) or pa.types.is_integer(t)


# column -> (accepted Arrow types, what the data contract asks for)
_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "id": (_is_id, "string or integer"),
    "text": (_is_string, "string"),
    "prompt": (_is_string, "string"),
    "completion": (_is_string, "string"),
    "input_ids": (lambda t: _list_of(t, pa.types.is_integer), "list of integers"),
    "relevant_ids": (lambda t: _list_of(t, _is_id), "list of strings"),
}


def _type_name(t: pa.DataType) -> str:
    # Parquet renames list items to `element`; `list<double>` says what matters.
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return str(t)


def check_column_types(schema: pa.Schema, uri: str, columns: Sequence[str]) -> None:
    """DataError naming the first of `columns` present in schema with a type msif cannot use."""
    for name in columns:
        if name not in schema.names:
            continue
        accepts, expected = _TYPES[name]
        found = schema.field(name).type
        if not accepts(found):
            raise DataError(f"{uri}: column `{name}` is {_type_name(found)}; expected {expected}")


def table_kind(schema: pa.Schema, uri: str) -> str:
    """'pairs' for prompt/completion tables, 'corpus' for documents; DataError otherwise.

    The columns the kind reads are type-checked too.
    """
    names = set(schema.names)
    if {"prompt", "completion"} <= names:
        kind = "pairs"
    elif "id" in names and ("text" in names or "input_ids" in names):
        kind = "corpus"
    else:
        raise DataError(
            f"{uri} has columns [{', '.join(schema.names)}]; expected "
            f"{KINDS['corpus']} (corpus) or {KINDS['pairs']} (fine-tune data/queries)"
        )
    check_column_types(schema, uri, COLUMNS[kind])
    return kind


def require_corpus(schema: pa.Schema, uri: str, *, text: bool = False) -> str:
    """Check a corpus schema (columns and types); returns the column documents are read from.

    That is `input_ids` when present, else `text`; with text=True a `text` column is required
    (BM25, report snippets) and `text` is returned.
    """
    names = set(schema.names)
    wanted = ("text",) if text else ("input_ids", "text")
    content = next((c for c in wanted if c in names), None)
    if "id" not in names or content is None:
        expected = "`id` + `text`" if text else KINDS["corpus"]
        found = ", ".join(schema.names)
        raise DataError(f"corpus {uri} has columns [{found}]; expected {expected}")
    check_column_types(schema, f"corpus {uri}", COLUMNS["corpus"])
    return content


def require_queries(table: pa.Table, uri: str) -> None:
    """Queries need id, prompt and completion (optional relevant_ids): types, nulls, unique ids."""
    missing = [c for c in ("id", "prompt", "completion") if c not in table.column_names]
    if missing:
        raise DataError(f"queries {uri} lack column(s) {', '.join(missing)}")
    check_column_types(table.schema, f"queries {uri}", COLUMNS["queries"])
    if table.num_rows == 0:
        raise DataError(f"queries {uri} hold no rows")
    check_nulls(table, 0, lambda row: f"queries {uri} row {row}")
    ids = [str(x) for x in table.column("id").to_pylist()]
    seen: dict[str, int] = {}
    for row, query_id in enumerate(ids):
        if query_id in seen:
            raise DataError(f"queries {uri} repeat id {query_id!r} (rows {seen[query_id]}, {row})")
        seen[query_id] = row


def check_nulls(batch: pa.RecordBatch | pa.Table, first_row: int, where: Where) -> None:
    """DataError for the first null id/text/prompt/completion/input_ids, or null list element.

    `where(global_row)` names the file and row; the row's id is added when it has one.
    """
    for name in batch.schema.names:
        col = batch.column(name)
        row = None
        if name in NOT_NULL and col.null_count:
            row, what = pc.index(col.is_null(), True).as_py(), f"`{name}` is null"
        elif name in NO_NULL_ELEMENTS and pc.list_flatten(col).null_count:
            row = next(i for i, v in enumerate(col.to_pylist()) if v and None in v)
            what = f"`{name}` holds a null element"
        if row is not None:
            raise DataError(f"{where(first_row + row)}{_id_note(batch, row)}: {what}")


def _id_note(batch: pa.RecordBatch | pa.Table, row: int) -> str:
    if "id" not in batch.schema.names:
        return ""
    value = batch.column("id")[row].as_py()
    return "" if value is None else f" (id {str(value)!r})"


def _row_ids(batch: pa.RecordBatch, first_row: int) -> list[str]:
    # Integer ids become strings here, once; nulls were refused by check_nulls.
    if "id" in batch.schema.names:
        return [str(x) for x in batch.column("id").to_pylist()]
    return [f"row-{first_row + i}" for i in range(batch.num_rows)]


def batch_examples(
    batch: pa.RecordBatch,
    first_row: int,
    tokenizer,
    kind: str,
    opts: TableOptions,
    vocab: int,
    where: Where | None = None,
) -> list[Example]:
    """Tokenise one record batch; rows without ids are named by their global row index.

    `where(global_row)` names a row in errors (default `row N`).
    """
    check_nulls(batch, first_row, where or (lambda row: f"row {row}"))
    ids = _row_ids(batch, first_row)
    if kind == "pairs":
        return tokenize_prompt_completion(
            tokenizer,
            ids,
            batch.column("prompt").to_pylist(),
            batch.column("completion").to_pylist(),
            opts.max_length,
        )
    if "input_ids" in batch.schema.names:
        out = []
        for doc_id, seq in zip(ids, batch.column("input_ids").to_pylist(), strict=True):
            out.append(document_example(doc_id, seq, opts.max_length))
        check_ids(out, vocab)
        return out
    from msif.data.examples import tokenize_documents

    return tokenize_documents(tokenizer, ids, batch.column("text").to_pylist(), opts.max_length)


def row_locator(source) -> Where:
    """`where` for a ParquetSource: a global row index as `FILE row N` (N within FILE)."""

    def where(row: int) -> str:
        file, index = source.locate(row)
        return f"{file} row {index}"

    return where


def iter_examples(
    source,
    tokenizer,
    kind: str,
    opts: TableOptions,
    vocab: int,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Example]:
    """Stream examples of rows [start, stop) of a ParquetSource."""
    names = source.schema.names
    check_column_types(source.schema, source.label, COLUMNS[kind])
    wanted = [c for c in COLUMNS[kind] if c in names]
    if kind == "corpus" and "input_ids" in names:
        wanted = [c for c in wanted if c != "text"]
    row, where = start, row_locator(source)
    for batch in source.iter_batches(wanted, start=start, stop=stop, batch_rows=opts.batch_rows):
        yield from batch_examples(batch, row, tokenizer, kind, opts, vocab, where)
        row += batch.num_rows


def iter_texts(source, batch_rows: int = 4096) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) of a corpus ParquetSource, batch by batch: checked types, no nulls."""
    require_corpus(source.schema, source.label, text=True)
    row, where = 0, row_locator(source)
    for batch in source.iter_batches(["id", "text"], batch_rows=batch_rows):
        check_nulls(batch, row, where)
        yield _row_ids(batch, row), batch.column("text").to_pylist()
        row += batch.num_rows
