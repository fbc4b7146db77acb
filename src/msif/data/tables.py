"""Reading the input tables (corpus, fine-tune data, queries) into tokenised examples."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from msif.data.examples import Example, check_ids, document_example, tokenize_prompt_completion
from msif.errors import DataError

KINDS = {"corpus": "`id` + `text` or `input_ids`", "pairs": "`prompt` + `completion`"}


@dataclass(frozen=True)
class TableOptions:
    """How rows become sequences."""

    max_length: int = 512
    batch_rows: int = 256


def table_kind(schema: pa.Schema, uri: str) -> str:
    """'pairs' for prompt/completion tables, 'corpus' for documents; DataError otherwise."""
    names = set(schema.names)
    if {"prompt", "completion"} <= names:
        return "pairs"
    if "id" in names and ("text" in names or "input_ids" in names):
        return "corpus"
    raise DataError(
        f"{uri} has columns [{', '.join(schema.names)}]; expected "
        f"{KINDS['corpus']} (corpus) or {KINDS['pairs']} (fine-tune data/queries)"
    )


def require_queries(table: pa.Table, uri: str) -> None:
    """Queries need id, prompt and completion."""
    missing = [c for c in ("id", "prompt", "completion") if c not in table.column_names]
    if missing:
        raise DataError(f"queries {uri} lack column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        raise DataError(f"queries {uri} hold no rows")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise DataError(f"queries {uri} repeat an id")


def batch_examples(
    batch: pa.RecordBatch, first_row: int, tokenizer, kind: str, opts: TableOptions, vocab: int
) -> list[Example]:
    """Tokenise one record batch; rows without ids are named by their global row index."""
    cols = batch.schema.names
    ids = (
        [str(x) for x in batch.column("id").to_pylist()]
        if "id" in cols
        else [f"row-{first_row + i}" for i in range(batch.num_rows)]
    )
    if kind == "pairs":
        return tokenize_prompt_completion(
            tokenizer,
            ids,
            batch.column("prompt").to_pylist(),
            batch.column("completion").to_pylist(),
            opts.max_length,
        )
    if "input_ids" in cols:
        out = []
        for doc_id, seq in zip(ids, batch.column("input_ids").to_pylist(), strict=True):
            out.append(document_example(doc_id, seq or [], opts.max_length))
        check_ids(out, vocab)
        return out
    from msif.data.examples import tokenize_documents

    return tokenize_documents(tokenizer, ids, batch.column("text").to_pylist(), opts.max_length)


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
    wanted = [c for c in ("id", "text", "input_ids", "prompt", "completion") if c in names]
    if kind == "corpus" and "input_ids" in names:
        wanted = [c for c in wanted if c != "text"]
    row = start
    for batch in source.iter_batches(wanted, start=start, stop=stop, batch_rows=opts.batch_rows):
        yield from batch_examples(batch, row, tokenizer, kind, opts, vocab)
        row += batch.num_rows
