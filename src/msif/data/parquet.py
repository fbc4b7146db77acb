"""Streaming Parquet input: one file, a directory, a glob or a gs:// prefix (or a list).

Opening reads only the footers; rows are streamed row group by row group, so memory is
bounded by one row group and does not grow with the corpus.

GCS objects are read with ranged reads through google-cloud-storage (the one retry policy
and credential path of msif): the wanted column chunks of one row group are streamed into a
sparse local temporary file at their original offsets, and pyarrow reads that file natively
with the already parsed footer. pyarrow is never handed a Python file object: it reads those
on its own I/O threads, which was seen to abort the interpreter at exit ("terminate called
without an active exception").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from msif.data.listing import Listed as _Listed
from msif.data.listing import list_local, list_remote
from msif.data.rows import checked_request, locate_row, read_all, shard_rows
from msif.errors import DataError
from msif.storage import gcs as storage
from msif.storage.digest import file_hashes
from msif.storage.uri import StorageError, is_remote

_FOOTER_THREADS = 8
_FOOTER_GUESS = 64 << 10  # one ranged read usually holds the whole footer
_PAD = 100  # parquet-mr before PARQUET-816 understated chunk sizes; pyarrow pads alike
_MERGE_GAP = 1 << 20  # fetch nearby column chunks in one request


@dataclass(frozen=True)
class _File:
    """One Parquet file of a source and what its footer says."""

    uri: str
    rel: str  # name relative to the spec that found it; location-independent
    size: int
    generation: int | None
    content: str | None  # gs:// objects: from the listing; local files: hashed on demand
    metadata: pq.FileMetaData = field(repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return self.metadata.num_rows

    def row_group_rows(self) -> list[int]:
        return [self.metadata.row_group(i).num_rows for i in range(self.metadata.num_row_groups)]


def is_parquet_name(name: str) -> bool:
    """A directory's files that are Parquet."""
    return name.endswith(".parquet")


_NO_PARQUET = "holds no Parquet files"


def _list_local(spec: str) -> list[_Listed]:
    """(uri, rel, size, generation, content id) of the files a local spec names."""
    return list_local(spec, is_parquet_name, _NO_PARQUET)


def _list_remote(spec: str) -> list[_Listed]:
    """(uri, rel, size, generation, content id) of the objects a gs:// spec names."""
    return list_remote(spec, is_parquet_name, _NO_PARQUET)


def _read_footer(entry: _Listed) -> _File:
    uri, rel, size, generation, content = entry
    try:
        meta = _remote_footer(uri, size, generation) if is_remote(uri) else (pq.read_metadata(uri))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{uri} is not a readable Parquet file ({_first_line(exc)})") from None
    return _File(uri, rel, size, generation, content, meta)


def _remote_footer(uri: str, size: int, generation: int | None) -> pq.FileMetaData:
    """Parse the footer of a Parquet object from its last bytes (one or two ranged reads)."""
    if size < 12:
        raise DataError(f"{uri} is not a readable Parquet file ({size} bytes)")
    tail = storage.read_range(uri, max(0, size - _FOOTER_GUESS), size, generation)
    if tail[-4:] == b"PARE":
        raise DataError(f"{uri} is an encrypted Parquet file, which msif does not read")
    length = int.from_bytes(tail[-8:-4], "little")
    if tail[-4:] != b"PAR1" or length + 12 > size:
        raise DataError(f"{uri} is not a readable Parquet file (no Parquet footer)")
    if length + 8 > len(tail):
        tail = storage.read_range(uri, size - length - 8, size, generation)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(length + 8) :]))


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _field_types(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


@dataclass
class ParquetSource:
    """A sequence of Parquet files read as one table, streamed row group by row group."""

    label: str
    files: list[str]
    schema: pa.Schema
    num_rows: int
    _entries: list[_File] = field(repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def open(cls, uri_or_uris: str | os.PathLike | Sequence[str]) -> ParquetSource:
        """List the files (sorted within each spec) and read their footers only."""
        specs = (
            [os.fspath(uri_or_uris)]
            if isinstance(uri_or_uris, (str, os.PathLike))
            else [os.fspath(u) for u in uri_or_uris]
        )
        if not specs:
            raise DataError("no Parquet input given")
        label = specs[0] if len(specs) == 1 else f"{specs[0]} (+{len(specs) - 1} more)"
        listed = []
        for spec in specs:
            listed += _list_remote(spec) if is_remote(spec) else _list_local(spec)
        uris = [e[0] for e in listed]
        if len(set(uris)) != len(uris):
            dup = next(u for u in uris if uris.count(u) > 1)
            raise DataError(f"{label} lists {dup} more than once")
        remote = any(is_remote(u) for u in uris)
        with ThreadPoolExecutor(_FOOTER_THREADS if remote else 1) as pool:
            entries = list(pool.map(_read_footer, listed))
        schema = _common_schema(entries, label)
        num_rows = sum(e.num_rows for e in entries)
        if num_rows == 0:
            raise DataError(f"{label} holds no rows")
        return cls(label, uris, schema, num_rows, entries)

    def require_columns(self, any_of: Sequence[Sequence[str]], what: str = "corpus") -> None:
        """DataError unless one of the column groups is present in full."""
        names = set(self.schema.names)
        if any(set(group) <= names for group in any_of):
            return
        expected = " or ".join("+".join(group) for group in any_of)
        raise DataError(
            f"{what} {self.label} has columns [{', '.join(self.schema.names)}]; expected {expected}"
        )

    def shard_range(self, shard: int, num_shards: int) -> tuple[int, int]:
        """The contiguous global row range [start, stop) of one of num_shards shards."""
        return shard_rows(self.num_rows, shard, num_shards)

    def iter_batches(
        self, columns: Sequence[str], start: int = 0, stop: int | None = None, batch_rows: int = 256
    ) -> Iterator[pa.RecordBatch]:
        """Record batches (at most batch_rows rows) of rows [start, stop), in order."""
        columns, stop = checked_request(
            self.label, self.schema.names, self.num_rows, columns, start, stop, batch_rows
        )
        offset = 0
        for entry in self._entries:
            first, offset = offset, offset + entry.num_rows
            if offset > start and first < stop:
                yield from _file_batches(entry, first, columns, start, stop, batch_rows)

    def fingerprint(self) -> str:
        """A hash of the schema and each file's name, size, row count and content id.

        Content ids are crc32c (storage.digest), so a rewrite under the same name, size and
        row count changes the fingerprint, and the same files copied elsewhere, locally or to
        gs://, keep it. Local files are hashed once per version (cached across processes).
        """
        if self._fingerprint is None:
            files = [[e.rel, e.size, e.num_rows, _content(e)] for e in self._entries]
            doc = {"schema": sorted(_field_types(self.schema).items()), "files": files}
            digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
            self._fingerprint = digest[:16]
        return self._fingerprint

    def locate(self, row: int) -> tuple[str, int]:
        """(file, row index within that file) of global row `row`, for messages."""
        return locate_row(self.label, [(e.uri, e.num_rows) for e in self._entries], row)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every row as one table (for small inputs only)."""
        return read_all(self, columns)


def _content(entry: _File) -> str:
    if entry.content is not None:
        return entry.content
    hashes = file_hashes(entry.uri)
    if hashes.size != entry.size:  # the footer read at open may belong to other bytes
        raise DataError(f"{entry.uri} changed while it was being read ({entry.size} bytes before)")
    return hashes.content_id


def _common_schema(entries: list[_File], label: str) -> pa.Schema:
    """The shared schema (names and types) of all files; DataError when they differ."""
    schemas = [e.metadata.schema.to_arrow_schema() for e in entries]
    ref = _field_types(schemas[0])
    for entry, schema in zip(entries[1:], schemas[1:], strict=True):
        if _field_types(schema) != ref:
            raise DataError(
                f"{label}: {entry.uri} has columns [{_describe(schema)}] but "
                f"{entries[0].uri} has [{_describe(schemas[0])}]"
            )
    # Nullable fields: files may disagree on "required", and batches are cast to this schema.
    return pa.schema([pa.field(f.name, f.type) for f in schemas[0]])


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _select(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns])


def _chunk_ranges(entry: _File, index: int, columns: list[str]) -> list[tuple[int, int]]:
    """Byte ranges holding the wanted columns' chunks of one row group, merged when close."""
    rg = entry.metadata.row_group(index)
    spans = []
    for j in range(rg.num_columns):
        col = rg.column(j)
        path = col.path_in_schema
        if not any(path == c or path.startswith(c + ".") for c in columns):
            continue
        begin = col.data_page_offset
        dictionary = col.dictionary_page_offset
        if col.has_dictionary_page and dictionary and 0 < dictionary < begin:
            begin = dictionary
        spans.append((begin, min(entry.size, begin + col.total_compressed_size + _PAD)))
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1] + _MERGE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


@contextmanager
def _row_group_file(entry: _File, index: int, columns: list[str]) -> Iterator[pq.ParquetFile]:
    """A ParquetFile that can read row group `index` of entry (natively, from local disk)."""
    if not is_remote(entry.uri):
        with pq.ParquetFile(entry.uri, metadata=entry.metadata) as pf:
            yield pf
        return
    with tempfile.NamedTemporaryFile(prefix="msif-rowgroup-", suffix=".parquet") as fh:
        fh.truncate(entry.size)  # sparse: only the fetched chunks take disk space
        for begin, end in _chunk_ranges(entry, index, columns):
            storage.download_range(entry.uri, fh, begin, end, entry.generation)
        fh.flush()
        with pq.ParquetFile(fh.name, metadata=entry.metadata) as pf:
            yield pf


def _file_batches(
    entry: _File, first: int, columns: list[str], start: int, stop: int, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """The batches of one file's rows inside [start, stop); only overlapping row groups."""
    schema = _select(
        pa.schema([pa.field(f.name, f.type) for f in entry.metadata.schema.to_arrow_schema()]),
        columns,
    )
    rg_first = first
    for index, n in enumerate(entry.row_group_rows()):
        lo, hi = max(start, rg_first) - rg_first, min(stop, rg_first + n) - rg_first
        rg_first += n
        if lo >= hi:
            continue
        try:
            with _row_group_file(entry, index, columns) as pf:
                pos = 0
                for batch in pf.iter_batches(
                    batch_size=batch_rows, row_groups=[index], columns=columns, use_threads=False
                ):
                    b0, pos = pos, pos + batch.num_rows
                    if pos <= lo:
                        continue
                    if b0 >= hi:
                        break
                    part = batch.select(columns).slice(max(lo - b0, 0), min(hi, pos) - max(lo, b0))
                    yield pa.RecordBatch.from_arrays(part.columns, schema=schema)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{entry.uri} could not be read ({_first_line(exc)})") from None


def read_table(uri: str | Sequence[str]) -> pa.Table:
    """A small Parquet input (queries, fine-tuning data) read whole."""
    return ParquetSource.open(uri).read_all()


def write_parquet_atomic(table: pa.Table, uri: str, **write_options) -> None:
    """Write a Parquet file so that readers never see a partial file."""
    target_name = uri.rstrip("/").rsplit("/", 1)[-1]
    if is_remote(uri):
        with tempfile.TemporaryDirectory(prefix="msif-parquet-") as tmp:
            path = Path(tmp) / target_name
            pq.write_table(table, path, **write_options)
            storage.upload_file(path, uri)
        return
    target = Path(uri)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            pq.write_table(table, tmp_name, **write_options)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StorageError(f"{uri}: writing failed: {exc.strerror or type(exc).__name__}") from None
