"""What every table source shares: shard row ranges, checked batch requests, row lookup."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from msif.errors import DataError


def shard_rows(num_rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The contiguous global row range [start, stop) of one of num_shards shards."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} of {num_shards} is not a valid shard index")
    return shard * num_rows // num_shards, (shard + 1) * num_rows // num_shards


def checked_request(
    label: str,
    names: Sequence[str],
    num_rows: int,
    columns: Sequence[str],
    start: int,
    stop: int | None,
    batch_rows: int,
) -> tuple[list[str], int]:
    """(columns, stop) of a request for rows [start, stop) in batches; DataError if it is bad."""
    stop = num_rows if stop is None else stop
    columns = list(columns)
    if not columns:
        raise DataError(f"no columns asked for from {label}")
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{label} has no column(s) {', '.join(missing)}")
    if not 0 <= start <= stop <= num_rows:
        raise DataError(
            f"row range [{start}, {stop}) is outside {label}, which has {num_rows} rows"
        )
    if batch_rows < 1:
        raise DataError("batch_rows must be at least 1")
    return columns, stop


def locate_row(label: str, files: Sequence[tuple[str, int]], row: int) -> tuple[str, int]:
    """(file, row index within that file) of global row `row` of files [(uri, rows), …]."""
    offset = 0
    for uri, num_rows in files:
        if row < offset + num_rows:
            return uri, row - offset
        offset += num_rows
    raise DataError(f"row {row} is outside {label}, which has {offset} rows")


def read_all(source, columns: Sequence[str] | None = None) -> pa.Table:
    """Every row of a table source as one table (for small inputs only)."""
    cols = list(source.schema.names if columns is None else columns)
    batches = list(source.iter_batches(cols, batch_rows=1 << 16))
    return pa.Table.from_batches(batches, schema=pa.schema([source.schema.field(c) for c in cols]))
