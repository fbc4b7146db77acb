"""Writing one table in every input format msif reads: Parquet, a `datasets` save_to_disk
folder (written here as the `datasets` library writes it: Arrow IPC stream files listed by
state.json; tests/data/test_sources.py checks that against the library itself when it is
installed), a DatasetDict folder and JSON Lines, plain or gzipped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def save_dataset(table: pa.Table, folder: Path, *, files: int = 1, batch_rows: int = 1000) -> str:
    """A Dataset.save_to_disk folder: `files` data-*.arrow streams of batch_rows-row batches."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // files)
    names = []
    for k in range(files):
        part = table.slice(k * per, per)
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                for batch in part.to_batches(max_chunksize=batch_rows):
                    writer.write_batch(batch)
        names.append(name)
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": ""}))
    return str(folder)


def save_dataset_dict(tables: dict[str, pa.Table], folder: Path, **kwargs) -> str:
    """A DatasetDict.save_to_disk folder: one Dataset folder per split."""
    for name, table in tables.items():
        save_dataset(table, folder / name, **kwargs)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(tables)}))
    return str(folder)


def write_jsonl(rows: list[dict], path: Path, *, blank_lines: bool = False) -> str:
    """JSON Lines (gzipped when the name ends with .gz); blank_lines puts empty lines between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sep = "\n\n" if blank_lines else "\n"
    data = (sep.join(json.dumps(r) for r in rows) + "\n").encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return str(path)


def write_parquet(table: pa.Table, path: Path, **kwargs) -> str:
    """One Parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return str(path)


def every_format(table: pa.Table, root: Path) -> dict[str, str]:
    """The same rows as Parquet, a datasets folder (3 files), a DatasetDict's `train` split,
    JSON Lines (2 files, blank lines) and gzipped JSON Lines."""
    rows = table.to_pylist()
    half = len(rows) // 2
    jsonl = root / "jsonl"
    write_jsonl(rows[:half], jsonl / "part-0.jsonl", blank_lines=True)
    write_jsonl(rows[half:], jsonl / "part-1.jsonl")
    other = table.slice(0, 1)
    return {
        "parquet": write_parquet(table, root / "t.parquet", row_group_size=7),
        "datasets": save_dataset(table, root / "ds", files=3, batch_rows=5),
        "datasetdict": save_dataset_dict(
            {"train": table, "test": other}, root / "dd", batch_rows=4
        ),
        "jsonl": str(jsonl),
        "jsonl.gz": write_jsonl(rows, root / "t.jsonl.gz"),
    }
