"""Every input table format msif reads, behind one interface.

`open_source(spec, split)` opens a table wherever msif reads one (corpus, fine-tuning data,
queries; a local path or gs://) and picks the reader by what the spec names:

- **Parquet** (`ParquetSource`, msif.data.parquet): a `.parquet` file, a folder or gs:// prefix
  of them, a glob. Row group by row group; gs:// objects by ranged reads.
- **A Hugging Face `datasets` folder** (`ArrowSource`), as `Dataset.save_to_disk` writes it
  (`state.json` + `data-*.arrow`), or a `DatasetDict` folder (`dataset_dict.json`, one
  sub-folder per split; `split` picks one: by default its only split, else `train`). The
  data files are Arrow IPC streams: opening memory-maps each one and reads only its message
  headers (where each record batch starts, how many rows it holds); rows are then read record
  batch by record batch from those offsets, so memory is one of the writer's record batches
  (1000 rows by default) and a shard starts reading at its first batch. Loose `.arrow` files
  (stream or file format) are read alike.
- **JSON Lines** (`JsonlSource`): `.jsonl`, `.ndjson` or `.json` files of one JSON object per
  line (blank lines are skipped), gzipped (`.gz`) or not; a file, a folder, a glob. Opening
  counts the rows in one pass (the count and every 4096th row's byte offset are cached under
  $MSIF_CACHE, keyed by the file's identity, like content digests), so a shard seeks to its
  first row; a gzipped file is decompressed from its start. Column types are inferred from
  the first 1000 rows; rows are parsed with `json` a batch at a time.

On gs://, a `datasets` folder (the chosen split only) and JSON Lines files are downloaded
into the cache ($MSIF_CACHE/inputs, keyed by object and generation, checked against GCS's
crc32c) before they are streamed; Parquet keeps its ranged reads.

Every source has `label`, `schema`, `num_rows`, `shard_range`, `iter_batches(columns, start,
stop, batch_rows)`, `locate(row)`, `read_all(columns)` and `fingerprint()`: a hash of the
format and each data file's name, size, row count and content id (crc32c), so the same files
locally or on gs:// fingerprint alike and rewritten content does not.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from msif.data.listing import Listed, has_glob, hidden, list_local, list_remote, listed
from msif.data.rows import checked_request, locate_row, read_all, shard_rows
from msif.errors import DataError
from msif.storage import gcs as storage
from msif.storage.digest import file_hashes
from msif.storage.uri import (
    NotFoundError,
    StorageError,
    _safe_relative,
    is_remote,
    join,
    split_gs,
)

log = logging.getLogger("msif")

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SCHEMA_SAMPLE_ROWS = 1000  # JSON Lines: column types are inferred from this many first rows
CHECKPOINT_ROWS = 4096  # JSON Lines: a byte offset is kept for every this many rows
_INDEX_FORMAT = 1
_RACY_NS = 2_000_000_000  # as msif.storage.digest: a file touched this recently is not cached
_NO_TABLE = "holds no Parquet files, JSON Lines files or `datasets` folder"
DATASET_DICT, DATASET_STATE = "dataset_dict.json", "state.json"


class TableSource(Protocol):
    """What every input format offers the readers of msif.data.tables."""

    label: str
    schema: pa.Schema
    num_rows: int

    def shard_range(self, shard: int, num_shards: int) -> tuple[int, int]: ...

    def iter_batches(
        self, columns: Sequence[str], start: int = 0, stop: int | None = None, batch_rows: int = 256
    ) -> Iterator[pa.RecordBatch]: ...

    def locate(self, row: int) -> tuple[str, int]: ...

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table: ...

    def fingerprint(self) -> str: ...


# ----------------------------------------------------------------------------- formats


def name_format(name: str) -> str:
    """The format a file name says: jsonl, arrow or parquet (anything else is read as Parquet)."""
    lower = name.lower().removesuffix(".gz")
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".arrow"):
        return "arrow"
    return "parquet"


def _is_jsonl_name(name: str) -> bool:
    return name_format(name) == "jsonl" and not name.startswith(".")


def _is_arrow_name(name: str) -> bool:
    return name.lower().endswith(".arrow")


def _names_format(spec: str, names: Sequence[str]) -> str:
    formats = {name_format(n) for n in names}
    if len(formats) > 1:
        raise DataError(f"{spec} matches files of several formats ({', '.join(sorted(formats))})")
    return formats.pop()


def spec_format(spec: str) -> str:
    """parquet, jsonl, datasets (a save_to_disk folder) or arrow (loose .arrow files)."""
    if is_remote(spec):
        return _remote_format(spec)
    if has_glob(spec):
        return _names_format(spec, [e[1] for e in list_local(spec, bool, _NO_TABLE)])
    path = Path(spec)
    if path.is_file():
        return name_format(path.name)
    if not path.is_dir():
        raise NotFoundError(f"{spec}: no such file or directory")
    if (path / DATASET_DICT).is_file() or (path / DATASET_STATE).is_file():
        return "datasets"
    files = [p for p in path.rglob("*") if p.is_file()]
    names = [p.name for p in files if not hidden(p.relative_to(path).as_posix())]
    return _folder_format(spec, names)


def _folder_format(spec: str, names: Sequence[str]) -> str:
    # Parquet first: a Parquet folder with a stray JSON file reads as it always did.
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    for fmt in ("jsonl", "arrow"):
        if any(name_format(n) == fmt for n in names):
            return fmt
    raise DataError(f"{spec} {_NO_TABLE}")


def _remote_format(spec: str) -> str:
    if has_glob(spec):
        return _names_format(spec, [e[1] for e in list_remote(spec, bool, _NO_TABLE)])
    if split_gs(spec)[1]:
        obj = storage.stat(spec)
        if obj is not None:
            return name_format(spec.rsplit("/", 1)[-1])
    objects = storage.list_objects(spec)
    if not objects:
        raise NotFoundError(f"{spec}: no such object or prefix")
    base = len(spec.rstrip("/")) + 1
    rels = [o.uri[base:] for o in objects]
    if DATASET_DICT in rels or DATASET_STATE in rels:
        return "datasets"
    return _folder_format(spec, [r.rsplit("/", 1)[-1] for r in rels if not hidden(r)])


def open_source(uri_or_uris: str | os.PathLike | Sequence[str], split: str = "") -> TableSource:
    """The table a spec (or list of specs of one format) names, in whichever format it is.

    split picks the split of a DatasetDict folder and is ignored by every other input (one
    pipeline passes it to every table it reads).
    """
    from msif.data.parquet import ParquetSource

    specs = (
        [os.fspath(uri_or_uris)]
        if isinstance(uri_or_uris, (str, os.PathLike))
        else [os.fspath(u) for u in uri_or_uris]
    )
    if not specs:
        raise DataError("no input table given")
    formats = {spec_format(s) for s in specs}
    if len(formats) > 1:
        raise DataError(
            f"{specs[0]} (+{len(specs) - 1} more) mix formats ({', '.join(sorted(formats))})"
        )
    fmt = formats.pop()
    if fmt == "parquet":
        return ParquetSource.open(specs if len(specs) > 1 else specs[0])
    if fmt == "jsonl":
        return JsonlSource.open(specs)
    if fmt == "datasets":
        if len(specs) > 1:
            raise DataError(f"{specs[0]}: a `datasets` folder is read alone, not in a list")
        return ArrowSource.open_dataset(specs[0], split)
    return ArrowSource.open_files(specs)


def read_table(uri: str | Sequence[str], split: str = "", columns=None) -> pa.Table:
    """A small input table (queries) read whole, in any format."""
    return open_source(uri, split).read_all(columns)


# ----------------------------------------------------------------------------- shared


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _field_types(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _label(specs: Sequence[str]) -> str:
    return specs[0] if len(specs) == 1 else f"{specs[0]} (+{len(specs) - 1} more)"


@dataclass(frozen=True)
class _Entry:
    """One data file of a source: where it is read from and what identifies its content."""

    uri: str  # as the user named it (gs:// or local): for messages
    path: str  # the local file read
    rel: str  # name relative to the spec; location-independent
    size: int
    content: str | None  # gs://: from the listing; local: hashed on demand
    num_rows: int


def _content_id(entry: _Entry) -> str:
    if entry.content is not None:
        return entry.content
    hashes = file_hashes(entry.path)
    if hashes.size != entry.size:
        raise DataError(f"{entry.uri} changed while it was being read ({entry.size} bytes before)")
    return hashes.content_id


@dataclass
class _RowSource:
    """What the Arrow and JSON Lines sources share: rows over a list of files."""

    label: str
    schema: pa.Schema
    num_rows: int
    _entries: list = field(repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    FORMAT = ""

    @property
    def files(self) -> list[str]:
        """The data files, as named (gs:// or local)."""
        return [e.uri for e in self._entries]

    def shard_range(self, shard: int, num_shards: int) -> tuple[int, int]:
        """The contiguous global row range [start, stop) of one of num_shards shards."""
        return shard_rows(self.num_rows, shard, num_shards)

    def _checked(self, columns, start, stop, batch_rows) -> tuple[list[str], int]:
        names, n = self.schema.names, self.num_rows
        return checked_request(self.label, names, n, columns, start, stop, batch_rows)

    def iter_batches(
        self, columns: Sequence[str], start: int = 0, stop: int | None = None, batch_rows: int = 256
    ) -> Iterator[pa.RecordBatch]:
        """Record batches (at most batch_rows rows) of rows [start, stop), in order."""
        columns, stop = self._checked(columns, start, stop, batch_rows)
        schema = pa.schema([self.schema.field(c) for c in columns])
        offset = 0
        for entry in self._entries:
            first, offset = offset, offset + entry.num_rows
            if offset > start and first < stop:
                lo, hi = max(start, first) - first, min(stop, offset) - first
                parts = self._file_batches(entry, columns, schema, lo, hi, batch_rows)
                yield from _rebatch(parts, batch_rows)

    def _file_batches(
        self, entry, columns, schema, lo: int, hi: int, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def locate(self, row: int) -> tuple[str, int]:
        """(file, row index within that file) of global row `row`, for messages."""
        return locate_row(self.label, [(e.uri, e.num_rows) for e in self._entries], row)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every row as one table (for small inputs only)."""
        return read_all(self, columns)

    def fingerprint(self) -> str:
        """A hash of the format, the schema and each data file's name, size, rows and content."""
        if self._fingerprint is None:
            files = [[e.rel, e.size, e.num_rows, _content_id(e)] for e in self._entries]
            doc = {
                "format": self.FORMAT,
                "schema": sorted(_field_types(self.schema).items()),
                "files": files,
            }
            digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
            self._fingerprint = digest[:16]
        return self._fingerprint


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of at most `rows` rows (larger ones are sliced; small ones pass as they are)."""
    for batch in batches:
        for begin in range(0, batch.num_rows, rows):
            yield batch.slice(begin, rows)


# ----------------------------------------------------------------------------- downloads


def _list_all(specs: Sequence[str], keep, none_message: str) -> list[Listed]:
    out: list[Listed] = []
    for spec in specs:
        lister = list_remote if is_remote(spec) else list_local
        out += lister(spec, keep, none_message)
    return out


def _local_paths(entries: Sequence[Listed]) -> list[str]:
    """The local file of each entry: itself, or its downloaded copy for a gs:// object."""
    remote = [e for e in entries if is_remote(e[0])]
    fetched = dict(zip((e[0] for e in remote), _download(remote), strict=True))
    return [fetched.get(e[0], e[0]) for e in entries]


def _matches(path: Path, size: int, content: str | None) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    if content and content.startswith("crc32c:"):
        return file_hashes(path).content_id == content
    if content and content.startswith("md5:"):
        md5 = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                md5.update(block)
        return base64.b64encode(md5.digest()).decode() == content[4:]
    return True


def _download(entries: Sequence[Listed]) -> list[str]:
    """Local copies of gs:// objects under $MSIF_CACHE/inputs, checked against their hashes.

    A copy is keyed by the object, its generation and content id, so a rewritten object is
    downloaded again and an unchanged one is reused by every node that reads it.
    """
    from msif.storage.cache import cache_root

    root = cache_root() / "inputs"
    paths = []
    for uri, rel, size, generation, content in entries:
        key = hashlib.sha256(json.dumps([uri, generation, content, size]).encode()).hexdigest()
        name = re.sub(r"[^A-Za-z0-9._-]", "_", rel.rsplit("/", 1)[-1])[-100:]
        path = root / key[:2] / key[:24] / name
        if not _matches(path, size, content):
            storage.download_file(uri, path, generation=generation)
            if not _matches(path, size, content):
                raise StorageError(f"{uri}: downloaded copy does not match the object's hash")
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- Arrow


@dataclass(frozen=True)
class _ArrowEntry(_Entry):
    stream: bool = True
    # stream: (byte offset, rows) of each record batch, or () when batches must be read in
    # order (dictionary batches); file format: (index, rows)
    batches: tuple[tuple[int, int], ...] = ()


def _scan_arrow(uri: str, path: str) -> tuple[pa.Schema, bool, tuple[tuple[int, int], ...], int]:
    """(schema, is a stream, record batch index, rows) of one Arrow IPC file.

    The file is memory-mapped and only message headers are read: record batch bodies are
    zero-copy views that are never touched, and the map is closed before any row is read.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        with pa.memory_map(path) as source:
            if magic == b"ARROW1":
                reader = pa.ipc.open_file(source)
                index = tuple(
                    (i, reader.get_batch(i).num_rows) for i in range(reader.num_record_batches)
                )
                return reader.schema, False, index, sum(n for _, n in index)
            messages = pa.ipc.MessageReader.open_stream(source)
            schema, index, rows, seekable = None, [], 0, True
            while True:
                where = source.tell()
                try:
                    message = messages.read_next_message()
                except StopIteration:
                    break
                if message.type == "schema":
                    schema = pa.ipc.read_schema(message)
                elif message.type == "record batch":
                    if schema is None:
                        raise pa.ArrowInvalid("record batch before the schema")
                    n = pa.ipc.read_record_batch(message, schema).num_rows
                    index.append((where, n))
                    rows += n
                elif message.type == "dictionary batch":
                    seekable = False
            if schema is None:
                raise pa.ArrowInvalid("no schema message")
            return schema, True, tuple(index) if seekable else (), rows
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise DataError(f"{uri} is not a readable Arrow file ({_first_line(exc)})") from None


@dataclass
class ArrowSource(_RowSource):
    """Arrow IPC files (a `datasets` save_to_disk folder, or loose .arrow files) as one table."""

    split: str | None = None
    FORMAT = "arrow"

    @classmethod
    def open_dataset(cls, spec: str, split: str = "") -> ArrowSource:
        """A save_to_disk folder: a Dataset, or one split of a DatasetDict."""
        if is_remote(spec):
            label, name, entries = _remote_dataset(spec, split)
            paths = _download(entries)
        else:
            folder, name = _local_split(Path(spec), split)
            entries: list[Listed] = []
            for rel in _state_files((folder / DATASET_STATE).read_bytes(), str(folder)):
                p = folder / rel
                if not p.is_file():
                    raise DataError(
                        f"{folder} lists data file {rel} in {DATASET_STATE}; it is missing"
                    )
                entries.append((str(p), rel, p.stat().st_size, None, None))
            paths = [e[0] for e in entries]
            label = str(folder)
        return cls._from_files(label, entries, paths, name)

    @classmethod
    def open_files(cls, specs: Sequence[str]) -> ArrowSource:
        """Loose .arrow files (stream or file format): a file, a folder, a glob."""
        entries = _list_all(specs, _is_arrow_name, "holds no .arrow files")
        return cls._from_files(_label(specs), entries, _local_paths(entries), None)

    @classmethod
    def _from_files(cls, label, listing, paths, split) -> ArrowSource:
        uris = [e[0] for e in listing]
        if len(set(uris)) != len(uris):
            dup = next(u for u in uris if uris.count(u) > 1)
            raise DataError(f"{label} lists {dup} more than once")
        entries, schemas = [], []
        for (uri, rel, size, _, content), path in zip(listing, paths, strict=True):
            schema, stream, index, rows = _scan_arrow(uri, path)
            schemas.append(schema)
            entries.append(_ArrowEntry(uri, path, rel, size, content, rows, stream, index))
        if not entries:
            raise DataError(f"{label} holds no data files")
        schema = _common_schema(label, entries, schemas)
        num_rows = sum(e.num_rows for e in entries)
        if num_rows == 0:
            raise DataError(f"{label} holds no rows")
        return cls(label, schema, num_rows, entries, split=split)

    def _file_batches(self, entry: _ArrowEntry, columns, schema, lo, hi, batch_rows):
        try:
            yield from _arrow_rows(entry, columns, schema, lo, hi)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            raise DataError(f"{entry.uri} could not be read ({_first_line(exc)})") from None


def _arrow_rows(entry: _ArrowEntry, columns, schema, lo: int, hi: int):
    """Rows [lo, hi) of one Arrow file, one record batch at a time (read, not mapped)."""

    def part(batch: pa.RecordBatch, first: int) -> pa.RecordBatch | None:
        a, b = max(lo, first), min(hi, first + batch.num_rows)
        if a >= b:
            return None
        sliced = batch.slice(a - first, b - a)
        return pa.RecordBatch.from_arrays([sliced.column(c) for c in columns], schema=schema)

    with pa.OSFile(entry.path) as fh:
        if not entry.stream:
            reader = pa.ipc.open_file(fh)
            first = 0
            for i, n in entry.batches:
                if first < hi and first + n > lo:
                    out = part(reader.get_batch(i), first)
                    if out is not None:
                        yield out
                first += n
            return
        if not entry.batches:  # dictionary batches: read in order from the start
            first = 0
            for batch in pa.ipc.open_stream(fh):
                if first >= hi:
                    break
                out = part(batch, first)
                if out is not None:
                    yield out
                first += batch.num_rows
            return
        file_schema = pa.ipc.open_stream(fh).schema
        first = 0
        for offset, n in entry.batches:
            if first >= hi:
                break
            if first + n > lo:
                fh.seek(offset)
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(fh), file_schema)
                out = part(batch, first)
                if out is not None:
                    yield out
            first += n


def _common_schema(label: str, entries, schemas: list[pa.Schema]) -> pa.Schema:
    ref = _field_types(schemas[0])
    for entry, schema in zip(entries[1:], schemas[1:], strict=True):
        if _field_types(schema) != ref:
            raise DataError(
                f"{label}: {entry.uri} has columns [{_describe(schema)}] but "
                f"{entries[0].uri} has [{_describe(schemas[0])}]"
            )
    return pa.schema([pa.field(f.name, f.type) for f in schemas[0]])


def _choose_split(where: str, raw: bytes, split: str) -> str:
    try:
        splits = json.loads(raw)["splits"]
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{where}: {DATASET_DICT} does not list its splits") from None
    if not splits:
        raise DataError(f"{where} is a DatasetDict without splits")
    names = ", ".join(splits)
    if split:
        if split not in splits:
            raise DataError(f"{where} has splits [{names}]; no split {split!r} (--split)")
        return split
    if len(splits) == 1:
        return splits[0]
    if "train" in splits:
        return "train"
    raise DataError(f"{where} has splits [{names}]; choose one with --split")


def _local_split(root: Path, split: str) -> tuple[Path, str | None]:
    """The Dataset folder of a save_to_disk folder (a DatasetDict's chosen split)."""
    if (root / DATASET_DICT).is_file():
        name = _choose_split(str(root), (root / DATASET_DICT).read_bytes(), split)
        folder = root / _safe_relative(name, str(root))
        if not (folder / DATASET_STATE).is_file():
            raise DataError(f"{root}: split {name!r} has no {DATASET_STATE}")
        return folder, name
    if split:
        log.debug("%s is a single Dataset: --split %s does not apply", root, split)
    return root, None


def _state_files(raw: bytes, where: str) -> list[str]:
    """The data files a Dataset's state.json lists, in order."""
    try:
        state = json.loads(raw)
        files = [f["filename"] for f in state["_data_files"]]
        if not files or not all(isinstance(f, str) for f in files):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{where}: {DATASET_STATE} lists no data files") from None
    if isinstance(state, dict) and state.get("_indices_data_files"):
        raise DataError(f"{where} holds an indices mapping: save it with save_to_disk again")
    return [_safe_relative(f, where) for f in files]


def _remote_dataset(spec: str, split: str) -> tuple[str, str | None, list[Listed]]:
    """(split folder URI, split name, its data objects) of a gs:// save_to_disk folder."""
    root, name = spec.rstrip("/"), None
    marker = storage.stat(join(root, DATASET_DICT))
    if marker is not None:
        name = _choose_split(root, storage.read_bytes(join(root, DATASET_DICT)), split)
        root = join(root, _safe_relative(name, root))
    elif split:
        log.debug("%s is a single Dataset: --split %s does not apply", root, split)
    objects = {o.uri[len(root) + 1 :]: o for o in storage.list_objects(root)}
    if DATASET_STATE not in objects:
        raise DataError(f"{root}: no {DATASET_STATE} (not a save_to_disk folder)")
    state = storage.read_bytes(objects[DATASET_STATE].uri, objects[DATASET_STATE].generation)
    entries: list[Listed] = []
    for rel in _state_files(state, root):
        if rel not in objects:
            raise DataError(f"{root} lists data file {rel} in {DATASET_STATE}; it is missing")
        entries.append(listed(objects[rel], rel))
    return root, name, entries


# ----------------------------------------------------------------------------- JSON Lines


@dataclass(frozen=True)
class _JsonEntry(_Entry):
    gz: bool = False
    checkpoints: tuple[tuple[int, int, int], ...] = ()  # (row, byte offset, line number)


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open_lines(path: str, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115


def _index_file(identity: list) -> Path:
    from msif.storage.cache import cache_home

    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return cache_home() / "jsonl-index" / key[:2] / f"{key}.json"


def _line_index(uri: str, path: str, gz: bool) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """(rows, checkpoints) of a JSON Lines file: one pass, cached by the file's identity."""
    real = os.path.realpath(path)
    st = os.stat(real)
    identity = [_INDEX_FORMAT, real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    cached = _index_file(identity)
    try:
        doc = json.loads(cached.read_text())
        if doc["identity"] == identity:
            return int(doc["rows"]), tuple(tuple(c) for c in doc["checkpoints"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rows, offset, line, checkpoints = 0, 0, 0, []
    try:
        with _open_lines(path, gz) as fh:
            for raw in fh:
                line += 1
                if raw.strip():
                    if not gz and rows % CHECKPOINT_ROWS == 0:
                        checkpoints.append((rows, offset, line))
                    rows += 1
                offset += len(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{uri} could not be read ({_first_line(exc)})") from None
    after = os.stat(real)
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) >= _RACY_NS
    if settled and after.st_size == st.st_size and after.st_mtime_ns == st.st_mtime_ns:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".index-", dir=cached.parent)
            with os.fdopen(fd, "w") as out:
                json.dump({"identity": identity, "rows": rows, "checkpoints": checkpoints}, out)
            os.replace(tmp, cached)
        except OSError as exc:  # a read-only cache costs a recount next time
            log.debug("JSON Lines index %s not written: %s", cached, exc)
    return rows, tuple(checkpoints)


def _json_rows(entry: _JsonEntry, lo: int, hi: int) -> Iterator[tuple[int, int, dict]]:
    """(row, line number, object) of rows [lo, hi) of one JSON Lines file."""
    start = max((c for c in entry.checkpoints if c[0] <= lo), default=(0, 0, 0))
    row, offset, line = start
    line = max(line - 1, 0)
    with _open_lines(entry.path, entry.gz) as fh:
        if offset:
            fh.seek(offset)
        try:
            for raw in fh:
                line += 1
                if not raw.strip():
                    continue
                if row >= hi:
                    return
                if row >= lo:
                    yield row, line, _parse_line(entry.uri, raw, row, line)
                row += 1
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{entry.uri} could not be read ({_first_line(exc)})") from None


def _parse_line(uri: str, raw: bytes, row: int, line: int) -> dict:
    try:
        text = raw.decode("utf-8")
        if line == 1:
            text = text.lstrip("\ufeff")
        value = json.loads(text)
    except UnicodeDecodeError:
        raise DataError(f"{uri} line {line} is not UTF-8 text") from None
    except ValueError as exc:
        raise DataError(f"{uri} line {line} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise DataError(
            f"{uri} line {line} (row {row}) is a JSON {type(value).__name__}, not an object"
        )
    return value


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _batch_of(uri: str, rows: list[tuple[int, int, dict]], schema: pa.Schema) -> pa.RecordBatch:
    """A record batch of parsed rows in the source's column types (DataError on a mismatch)."""
    arrays = []
    for f in schema:
        values = [obj.get(f.name) for _, _, obj in rows]
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            for (row, line, _), value in zip(rows, values, strict=True):
                try:
                    pa.array([value], type=f.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
                    raise DataError(
                        f"{uri} line {line} (row {row}): `{f.name}` is {_json_type(value)} but "
                        f"the first rows make it {f.type}"
                    ) from None
            raise
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _infer_schema(label: str, entries: list[_JsonEntry]) -> pa.Schema:
    """Column types of the first SCHEMA_SAMPLE_ROWS rows: keys in order of first appearance."""
    sample: list[dict] = []
    for entry in entries:
        for _, _, obj in _json_rows(entry, 0, min(entry.num_rows, SCHEMA_SAMPLE_ROWS)):
            sample.append(obj)
        if len(sample) >= SCHEMA_SAMPLE_ROWS:
            break
    names = list(dict.fromkeys(k for obj in sample for k in obj))
    fields = []
    for name in names:
        try:
            fields.append(pa.field(name, pa.array([obj.get(name) for obj in sample]).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise DataError(
                f"{label}: column `{name}` mixes value types in its first rows ({_first_line(exc)})"
            ) from None
    return pa.schema(fields)


@dataclass
class JsonlSource(_RowSource):
    """JSON Lines files (plain or gzipped) read as one table."""

    FORMAT = "jsonl"

    @classmethod
    def open(cls, uri_or_uris: str | os.PathLike | Sequence[str]) -> JsonlSource:
        """List the files, count their rows (cached) and infer the columns from the first rows."""
        specs = (
            [os.fspath(uri_or_uris)]
            if isinstance(uri_or_uris, (str, os.PathLike))
            else [os.fspath(u) for u in uri_or_uris]
        )
        label = _label(specs)
        listing = _list_all(specs, _is_jsonl_name, "holds no JSON Lines files")
        uris = [e[0] for e in listing]
        if len(set(uris)) != len(uris):
            dup = next(u for u in uris if uris.count(u) > 1)
            raise DataError(f"{label} lists {dup} more than once")
        entries = []
        for (uri, rel, size, _, content), path in zip(listing, _local_paths(listing), strict=True):
            gz = _is_gzip(path)
            _refuse_json_array(uri, path, gz)
            rows, checkpoints = _line_index(uri, path, gz)
            entries.append(_JsonEntry(uri, path, rel, size, content, rows, gz, checkpoints))
        num_rows = sum(e.num_rows for e in entries)
        if num_rows == 0:
            raise DataError(f"{label} holds no rows")
        return cls(label, _infer_schema(label, entries), num_rows, entries)

    def _file_batches(self, entry: _JsonEntry, columns, schema, lo, hi, batch_rows):
        rows: list[tuple[int, int, dict]] = []
        for item in _json_rows(entry, lo, hi):
            rows.append(item)
            if len(rows) == batch_rows:
                yield _batch_of(entry.uri, rows, schema)
                rows = []
        if rows:
            yield _batch_of(entry.uri, rows, schema)


def _refuse_json_array(uri: str, path: str, gz: bool) -> None:
    try:
        with _open_lines(path, gz) as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{uri} could not be read ({_first_line(exc)})") from None
    if head.startswith(b"["):
        raise DataError(
            f"{uri} holds a JSON array; msif reads JSON Lines, one object per line "
            "(convert it with `jq -c '.[]'`)"
        )
