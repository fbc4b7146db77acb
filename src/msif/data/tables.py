"""Reading the input tables (corpus, fine-tune data, queries) into tokenised examples.

A table is read from any format msif.data.sources opens. Its columns play roles: `id`,
`text`, `prompt`, `completion`, `messages` (each named by an option, `--text-column` and so
on, defaulting to the role's name), `input_ids` and `relevant_ids`. Kinds of table:

- corpus: `text` (or pre-tokenised `input_ids`), every token scored;
- pairs: `prompt` + `completion`, the completion's tokens scored;
- chat: `messages`, conversations rendered with the tokenizer's chat template, assistant turns
  scored (msif.data.chat).

Rows without an id column are named `row-<N>`, N their 0-based index in the whole table (its
files in listed order): unique by construction, the same in every shard and rerun and for a
copy of the table elsewhere, and it says where the row is. A hash of the row's content would
survive reordering but gives duplicate documents, which real corpora hold, the same id. That
applies to a corpus or queries without the default `id` column (an `--id-column` they lack is
an error) and to fine-tune data without the id column (one `--id-column` serves every table,
and fine-tune rows need no ids).

Column types are checked once per source, from its Arrow schema and before any row is read:
a float `text` or `input_ids` would otherwise be stringified or truncated and tokenised.
Nulls are refused batch by batch, naming the file, the column and the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from msif.data.chat import chat_examples, conversation, query_text, require_chat_template
from msif.data.examples import (
    Example,
    check_ids,
    document_example,
    eos_to_append,
    tokenize_documents,
    tokenize_prompt_completion,
)
from msif.errors import DataError

KINDS = {
    "corpus": "`text` or `input_ids`",
    "pairs": "`prompt` + `completion`",
    "chat": "`messages`",
}
COLUMNS = {
    "corpus": ("id", "text", "input_ids"),
    "pairs": ("id", "prompt", "completion"),
    "chat": ("id", "messages"),
    "queries": ("id", "prompt", "completion", "messages", "relevant_ids"),
}
# Columns whose values must all be present; list columns must hold no null element either.
NOT_NULL = ("id", "text", "input_ids", "prompt", "completion", "messages")
NO_NULL_ELEMENTS = ("input_ids", "relevant_ids")
# The roles whose column an option names, and its flag.
NAMED = {
    "id": "--id-column",
    "text": "--text-column",
    "prompt": "--prompt-column",
    "completion": "--completion-column",
    "messages": "--messages-column",
}

Where = Callable[[int], str]


@dataclass(frozen=True)
class TableOptions:
    """How rows become sequences: lengths, the columns each role is read from, EOS."""

    max_length: int = 512
    batch_rows: int = 256
    id_column: str = "id"
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    append_eos: str = "auto"

    def column(self, role: str) -> str:
        """The column a role is read from."""
        return getattr(self, f"{role}_column", role) if role in NAMED else role

    def roles(self, names: Sequence[str]) -> dict[str, str]:
        """column name -> role, for the columns of `names` that play one."""
        by_name = {self.column(r): r for r in (*NAMED, "input_ids", "relevant_ids")}
        return {n: by_name[n] for n in names if n in by_name}

    def explicit_id(self) -> bool:
        """Whether --id-column names a column other than the default (which may be absent)."""
        return self.id_column != "id"


DEFAULT = TableOptions()


def _named(opts: TableOptions, role: str) -> str:
    """`name` (--flag) for messages."""
    return f"`{opts.column(role)}` ({NAMED[role]})" if role in NAMED else f"`{role}`"


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return any(is_list(t) for is_list in lists)


def _list_of(t: pa.DataType, element: Callable[[pa.DataType], bool]) -> bool:
    return _is_list(t) and element(t.value_type)


def _is_id(t: pa.DataType) -> bool:
    return _is_string(t) or pa.types.is_integer(t)


def _is_message(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return all(k in names and _is_string(names[k]) for k in ("role", "content"))


# role -> (accepted Arrow types, what the data contract asks for)
_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "id": (_is_id, "string or integer"),
    "text": (_is_string, "string"),
    "prompt": (_is_string, "string"),
    "completion": (_is_string, "string"),
    "messages": (lambda t: _list_of(t, _is_message), "list of {role, content} strings"),
    "input_ids": (lambda t: _list_of(t, pa.types.is_integer), "list of integers"),
    "relevant_ids": (lambda t: _list_of(t, _is_id), "list of strings"),
}


def _type_name(t: pa.DataType) -> str:
    # Parquet renames list items to `element`; `list<double>` says what matters.
    if _is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_struct(t):
        parts = (t.field(i) for i in range(t.num_fields))
        inner = ", ".join(f"{f.name}: {_type_name(f.type)}" for f in parts)
        return f"struct<{inner}>"
    return str(t)


def check_column_types(
    schema: pa.Schema, uri: str, columns: Sequence[str], opts: TableOptions = DEFAULT
) -> None:
    """DataError naming the first column of the roles `columns` present in schema with a type
    msif cannot use."""
    for role in columns:
        name = opts.column(role)
        if name not in schema.names:
            continue
        accepts, expected = _TYPES[role]
        found = schema.field(name).type
        if not accepts(found):
            raise DataError(f"{uri}: column `{name}` is {_type_name(found)}; expected {expected}")


def _require_id(names: Sequence[str], uri: str, opts: TableOptions, what: str = "") -> None:
    if opts.explicit_id() and opts.id_column not in names:
        raise DataError(
            f"{what}{uri} has no id column {_named(opts, 'id')}; its columns are "
            f"[{', '.join(names)}]"
        )


def _pairs_or_chat(names: set[str], opts: TableOptions) -> str | None:
    if {opts.prompt_column, opts.completion_column} <= names:
        return "pairs"
    if opts.messages_column in names:
        return "chat"
    return None


def _half_pair(names: set[str], uri: str, opts: TableOptions, what: str) -> None:
    """DataError when exactly one of prompt and completion is there (and no messages)."""
    have = [r for r in ("prompt", "completion") if opts.column(r) in names]
    if len(have) == 1:
        missing = "completion" if have == ["prompt"] else "prompt"
        raise DataError(
            f"{what}{uri} lack column(s) {opts.column(missing)} ({NAMED[missing]}): "
            f"`{opts.column(have[0])}` needs it"
        )


def table_kind(schema: pa.Schema, uri: str, opts: TableOptions = DEFAULT) -> str:
    """'pairs' (prompt/completion), 'chat' (messages) or 'corpus' (documents); DataError
    otherwise. The columns the kind reads are type-checked too."""
    names = set(schema.names)
    kind = _pairs_or_chat(names, opts)
    if kind is None and (opts.text_column in names or "input_ids" in names):
        kind = "corpus"
    if kind is None:
        _half_pair(names, uri, opts, "")
        raise DataError(
            f"{uri} has columns [{', '.join(schema.names)}]; expected {_named(opts, 'text')} or "
            f"`input_ids` (corpus), {_named(opts, 'prompt')} + {_named(opts, 'completion')} or "
            f"{_named(opts, 'messages')} (fine-tune data, queries)"
        )
    if kind == "corpus":  # fine-tune rows need no ids: one --id-column serves every table
        _require_id(schema.names, uri, opts)
    check_column_types(schema, uri, COLUMNS[kind], opts)
    return kind


def require_corpus(
    schema: pa.Schema, uri: str, *, text: bool = False, opts: TableOptions = DEFAULT
) -> str:
    """Check a corpus schema (columns and types); returns the column documents are read from.

    That is `input_ids` when present, else the text column; with text=True a text column is
    required (BM25, report snippets) and its name is returned.
    """
    names = set(schema.names)
    wanted = (opts.text_column,) if text else ("input_ids", opts.text_column)
    content = next((c for c in wanted if c in names), None)
    if content is None:
        expected = _named(opts, "text") + ("" if text else " or `input_ids`")
        found = ", ".join(schema.names)
        raise DataError(f"corpus {uri} has columns [{found}]; expected {expected}")
    _require_id(schema.names, uri, opts, "corpus ")
    check_column_types(schema, f"corpus {uri}", COLUMNS["corpus"], opts)
    return content


def query_kind(schema: pa.Schema, uri: str, opts: TableOptions = DEFAULT) -> str:
    """'pairs' or 'chat' for a queries table; DataError naming the flags otherwise."""
    names = set(schema.names)
    kind = _pairs_or_chat(names, opts)
    if kind is None:
        _half_pair(names, uri, opts, "queries ")
        raise DataError(
            f"queries {uri} have columns [{', '.join(schema.names)}]; expected "
            f"{_named(opts, 'prompt')} + {_named(opts, 'completion')} or {_named(opts, 'messages')}"
        )
    _require_id(schema.names, uri, opts, "queries ")
    return kind


def require_queries(table: pa.Table, uri: str, opts: TableOptions = DEFAULT) -> str:
    """Queries need prompt + completion or messages (optional id and relevant_ids): types,
    nulls, unique ids. Returns the kind (pairs or chat)."""
    kind = query_kind(table.schema, uri, opts)
    check_column_types(table.schema, f"queries {uri}", COLUMNS["queries"], opts)
    if table.num_rows == 0:
        raise DataError(f"queries {uri} hold no rows")
    check_nulls(table, 0, lambda row: f"queries {uri} row {row}", opts)
    seen: dict[str, int] = {}
    for row, query_id in enumerate(_row_ids(table, 0, opts)):
        if query_id in seen:
            raise DataError(f"queries {uri} repeat id {query_id!r} (rows {seen[query_id]}, {row})")
        seen[query_id] = row
    return kind


def check_nulls(
    batch: pa.RecordBatch | pa.Table, first_row: int, where: Where, opts: TableOptions = DEFAULT
) -> None:
    """DataError for the first null id/text/prompt/completion/messages/input_ids, or null list
    element. `where(global_row)` names the file and row; the row's id is added when it has one.
    """
    for name, role in opts.roles(batch.schema.names).items():
        col = batch.column(name)
        row = None
        if role in NOT_NULL and col.null_count:
            row, what = pc.index(col.is_null(), True).as_py(), f"`{name}` is null"
        elif role in NO_NULL_ELEMENTS and pc.list_flatten(col).null_count:
            row = next(i for i, v in enumerate(col.to_pylist()) if v and None in v)
            what = f"`{name}` holds a null element"
        if row is not None:
            raise DataError(f"{where(first_row + row)}{_id_note(batch, row, opts)}: {what}")


def _id_note(batch: pa.RecordBatch | pa.Table, row: int, opts: TableOptions) -> str:
    if opts.id_column not in batch.schema.names:
        return ""
    value = batch.column(opts.id_column)[row].as_py()
    return "" if value is None else f" (id {str(value)!r})"


def _row_ids(batch: pa.RecordBatch | pa.Table, first_row: int, opts: TableOptions) -> list[str]:
    # Integer ids become strings here, once; nulls were refused by check_nulls.
    if opts.id_column in batch.schema.names:
        return [str(x) for x in batch.column(opts.id_column).to_pylist()]
    return [f"row-{first_row + i}" for i in range(batch.num_rows)]


def batch_examples(
    batch: pa.RecordBatch,
    first_row: int,
    tokenizer,
    kind: str,
    opts: TableOptions,
    vocab: int,
    where: Where | None = None,
    *,
    last_only: bool = False,
) -> list[Example]:
    """Tokenise one record batch; rows without ids are named by their global row index.

    `where(global_row)` names a row in errors (default `row N`). last_only: chat rows score
    only their last assistant turn (queries).
    """
    check_nulls(batch, first_row, where or (lambda row: f"row {row}"), opts)
    ids = _row_ids(batch, first_row, opts)
    if kind == "chat":
        require_chat_template(tokenizer, "this table")
        column = opts.messages_column
        values = batch.column(column).to_pylist()
        return chat_examples(
            tokenizer, ids, values, opts.max_length, last_only=last_only, column=column
        )
    if kind == "pairs":
        return tokenize_prompt_completion(
            tokenizer,
            ids,
            batch.column(opts.prompt_column).to_pylist(),
            batch.column(opts.completion_column).to_pylist(),
            opts.max_length,
            eos_id=eos_to_append(tokenizer, opts.append_eos),
            columns=(opts.prompt_column, opts.completion_column),
        )
    if "input_ids" in batch.schema.names:  # pre-tokenised: used as given
        out = []
        for doc_id, seq in zip(ids, batch.column("input_ids").to_pylist(), strict=True):
            out.append(document_example(doc_id, seq, opts.max_length))
        check_ids(out, vocab)
        return out
    return tokenize_documents(
        tokenizer,
        ids,
        batch.column(opts.text_column).to_pylist(),
        opts.max_length,
        eos_id=eos_to_append(tokenizer, opts.append_eos),
        strip_eos=opts.append_eos == "off",
        column=opts.text_column,
    )


def row_locator(source) -> Where:
    """`where` for a source: a global row index as `FILE row N` (N within FILE)."""

    def where(row: int) -> str:
        file, index = source.locate(row)
        return f"{file} row {index}"

    return where


def _wanted(source, kind: str, opts: TableOptions) -> list[str]:
    names = source.schema.names
    pretokenised = kind == "corpus" and "input_ids" in names
    roles = [r for r in COLUMNS[kind] if not (pretokenised and r == "text")]
    return [opts.column(r) for r in roles if opts.column(r) in names]


def iter_examples(
    source,
    tokenizer,
    kind: str,
    opts: TableOptions,
    vocab: int,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Example]:
    """Stream examples of rows [start, stop) of a source (any msif.data.sources format)."""
    check_column_types(source.schema, source.label, COLUMNS[kind], opts)
    if kind == "chat":
        require_chat_template(tokenizer, source.label)
    eos_to_append(tokenizer, opts.append_eos)  # an impossible --append-eos fails before any row
    wanted = _wanted(source, kind, opts)
    row, where = start, row_locator(source)
    for batch in source.iter_batches(wanted, start=start, stop=stop, batch_rows=opts.batch_rows):
        yield from batch_examples(batch, row, tokenizer, kind, opts, vocab, where)
        row += batch.num_rows


def iter_texts(
    source, batch_rows: int = 4096, opts: TableOptions = DEFAULT
) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) of a corpus source, batch by batch: checked types, no nulls."""
    text = require_corpus(source.schema, source.label, text=True, opts=opts)
    columns = [c for c in (opts.id_column, text) if c in source.schema.names]
    row, where = 0, row_locator(source)
    for batch in source.iter_batches(columns, batch_rows=batch_rows):
        check_nulls(batch, row, where, opts)
        yield _row_ids(batch, row, opts), batch.column(text).to_pylist()
        row += batch.num_rows


# ----------------------------------------------------------------------------- queries


@dataclass
class Queries:
    """A checked queries table: ids, its kind, and its columns as read."""

    uri: str
    kind: str  # pairs | chat
    ids: list[str]
    table: pa.Table  # the columns msif reads, under the table's own names
    opts: TableOptions

    def conversations(self) -> list[list[dict]]:
        """The checked messages of each chat query."""
        values = self.table.column(self.opts.messages_column).to_pylist()
        column = self.opts.messages_column
        return [conversation(q, v, column) for q, v in zip(self.ids, values, strict=True)]

    def texts(self) -> tuple[list[str], list[str]]:
        """(prompts, completions) as text: for chat, the conversation before the last
        assistant turn (`role: content` lines) and that turn."""
        if self.kind == "pairs":
            return (
                self.table.column(self.opts.prompt_column).to_pylist(),
                self.table.column(self.opts.completion_column).to_pylist(),
            )
        pairs = [query_text(m) for m in self.conversations()]
        return [p for p, _ in pairs], [c for _, c in pairs]

    def _relevant(self) -> dict[str, pa.Array]:
        if "relevant_ids" not in self.table.column_names:
            return {}
        return {"relevant_ids": self.table.column("relevant_ids")}

    def view(self) -> pa.Table:
        """id, prompt, completion (text) and relevant_ids when given: for reports and BM25."""
        prompts, completions = self.texts()
        return pa.table(
            {
                "id": pa.array(self.ids, pa.string()),
                "prompt": pa.array(prompts, pa.string()),
                "completion": pa.array(completions, pa.string()),
                **self._relevant(),
            }
        )

    def canonical(self) -> pa.Table:
        """What the queries' fingerprint hashes: ids and the content scored, by role name."""
        if self.kind == "pairs":
            content = {
                "prompt": self.table.column(self.opts.prompt_column),
                "completion": self.table.column(self.opts.completion_column),
            }
        else:
            content = {"messages": self.table.column(self.opts.messages_column)}
        return pa.table({"id": pa.array(self.ids, pa.string()), **content, **self._relevant()})

    def examples(self, tokenizer, max_length: int) -> list[Example]:
        """Tokenised queries: the completion, or the last assistant turn, scored."""
        opts = self.opts
        if self.kind == "chat":
            require_chat_template(tokenizer, f"queries {self.uri}")
            return chat_examples(
                tokenizer,
                self.ids,
                self.table.column(opts.messages_column).to_pylist(),
                max_length,
                last_only=True,
                column=opts.messages_column,
            )
        prompts, completions = self.texts()
        return tokenize_prompt_completion(
            tokenizer,
            self.ids,
            prompts,
            completions,
            max_length,
            eos_id=eos_to_append(tokenizer, opts.append_eos),
            columns=(opts.prompt_column, opts.completion_column),
        )


def read_queries(uri: str, opts: TableOptions = DEFAULT, split: str = "") -> Queries:
    """Read and check a queries table (any format): columns, types, nulls, unique ids and,
    for chat queries, every conversation."""
    from msif.data.sources import open_source

    source = open_source(uri, split)
    kind = query_kind(source.schema, uri, opts)
    unused = ("messages",) if kind == "pairs" else ("prompt", "completion")
    roles = [r for r in COLUMNS["queries"] if r not in unused]
    columns = [opts.column(r) for r in roles if opts.column(r) in source.schema.names]
    check_column_types(source.schema, f"queries {uri}", COLUMNS["queries"], opts)
    table = source.read_all(columns)
    require_queries(table, uri, opts)
    queries = Queries(uri, kind, _row_ids(table, 0, opts), table, opts)
    if kind == "chat":
        queries.conversations()
    return queries
