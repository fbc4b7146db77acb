"""Every input format (Parquet, datasets folders, JSON Lines): the same rows for every shard
and batch size, content fingerprints, streaming memory, gs:// copies, one-line refusals."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from msif.data import sources
from msif.data.sources import ArrowSource, JsonlSource, open_source, spec_format
from msif.data.tables import TableOptions, iter_examples, iter_texts, read_queries, table_kind
from msif.errors import DataError
from msif.storage import digest
from msif.storage import gcs as storage
from msif.storage.uri import join
from tests.data.formats import (
    every_format,
    save_dataset,
    save_dataset_dict,
    write_jsonl,
    write_parquet,
)
from tests.support.mini_world import tokenizer_for

N = 53
IDS = [f"doc-{i:03d}" for i in range(N)]
TEXTS = [" ".join(f"w{(i * 7 + k) % 13}" for k in range(2 + i % 5)) for i in range(N)]
TABLE = pa.table({"id": IDS, "text": TEXTS, "n": list(range(N))})
TOKENIZER = tokenizer_for(TEXTS)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "_RACY_NS", 0)
    monkeypatch.setattr(sources, "_RACY_NS", 0)


@pytest.fixture
def formats(tmp_path) -> dict[str, str]:
    return every_format(TABLE, tmp_path / "formats")


def _rows(source, start=0, stop=None, batch_rows=8, columns=("id", "text")) -> list[dict]:
    out = []
    for batch in source.iter_batches(list(columns), start, stop, batch_rows=batch_rows):
        assert 0 < batch.num_rows <= batch_rows
        assert batch.schema.names == list(columns)
        out += batch.to_pylist()
    return out


def _one_line(err: pytest.ExceptionInfo, cls=DataError) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, cls), text
    return text


def test_formats_are_told_apart(formats):
    assert {k: spec_format(v) for k, v in formats.items()} == {
        "parquet": "parquet",
        "datasets": "datasets",
        "datasetdict": "datasets",
        "jsonl": "jsonl",
        "jsonl.gz": "jsonl",
    }
    assert type(open_source(formats["datasets"])) is ArrowSource
    assert type(open_source(formats["jsonl"])) is JsonlSource
    arrow = open_source(str(Path(formats["datasets"]) / "data-00001-of-00003.arrow"))
    assert type(arrow) is ArrowSource and arrow.num_rows == 18


@pytest.mark.parametrize("fmt", ["parquet", "datasets", "datasetdict", "jsonl", "jsonl.gz"])
def test_every_format_gives_the_same_rows_for_every_shard_and_batch(fmt, formats):
    source = open_source(formats[fmt])
    assert source.num_rows == N and source.schema.names == ["id", "text", "n"]
    want = TABLE.select(["id", "text"]).to_pylist()
    assert _rows(source) == want
    for num_shards in (1, 2, 3, 7, N, N + 4):
        ranges = [source.shard_range(s, num_shards) for s in range(num_shards)]
        got = [r for a, b in ranges for r in _rows(source, a, b, batch_rows=3)]
        assert got == want, num_shards
    assert _rows(source, 17, 41, batch_rows=100, columns=("n",)) == [
        {"n": i} for i in range(17, 41)
    ]
    assert _rows(source, 20, 20) == []
    assert source.read_all(["text"]).column("text").to_pylist() == TEXTS
    assert source.locate(52)[1] in (52, 52 - 26, 52 - 36)  # the row within its file
    with pytest.raises(DataError, match="has no column"):
        next(source.iter_batches(["body"]))


def test_every_format_gives_the_same_examples_and_texts(formats):
    opts = TableOptions(max_length=16, batch_rows=4)
    want = None
    for fmt, uri in formats.items():
        source = open_source(uri)
        kind = table_kind(source.schema, uri, opts)
        start, stop = source.shard_range(1, 3)
        got = [(e.id, e.input_ids, e.labels) for e in iter_examples(
            source, TOKENIZER, kind, opts, len(TOKENIZER), start, stop
        )]  # fmt: skip
        want = want or got
        assert got == want and [g[0] for g in got] == IDS[start:stop], fmt
        assert [i for ids, _ in iter_texts(source, batch_rows=5) for i in ids] == IDS


def test_datasetdict_splits(tmp_path):
    three = {"train": TABLE.slice(0, 5), "test": TABLE.slice(5, 2), "extra": TABLE.slice(7, 1)}
    dd = save_dataset_dict(three, tmp_path / "dd")
    assert open_source(dd).num_rows == 5  # train by default
    assert open_source(dd, "test").num_rows == 2
    assert _rows(open_source(dd, "extra")) == TABLE.select(["id", "text"]).slice(7, 1).to_pylist()
    assert (
        open_source(dd).fingerprint() == open_source(str(tmp_path / "dd" / "train")).fingerprint()
    )
    assert open_source(dd).fingerprint() != open_source(dd, "test").fingerprint()
    with pytest.raises(DataError) as err:
        open_source(dd, "valid")
    assert _one_line(err) == f"{dd} has splits [train, test, extra]; no split 'valid' (--split)"
    two = save_dataset_dict({"a": TABLE.slice(0, 2), "b": TABLE.slice(2, 2)}, tmp_path / "ab")
    with pytest.raises(DataError) as err:
        open_source(two)
    assert _one_line(err) == f"{two} has splits [a, b]; choose one with --split"
    only = save_dataset_dict({"validation": TABLE.slice(0, 3)}, tmp_path / "one")
    assert open_source(only).num_rows == 3  # the only split
    # A plain Dataset folder (or Parquet) ignores --split: one pipeline passes it to every table.
    assert open_source(save_dataset(TABLE, tmp_path / "ds"), "test").num_rows == N


def test_the_datasets_library_reads_and_writes_what_msif_reads(tmp_path):
    datasets = pytest.importorskip("datasets")
    messages = [[{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]] * N
    data = datasets.Dataset.from_dict({"id": IDS, "text": TEXTS, "messages": messages})
    data.save_to_disk(str(tmp_path / "real"), max_shard_size=2000)
    real = open_source(str(tmp_path / "real"))
    assert real.num_rows == N and len(real.files) > 1
    assert real.read_all().to_pylist() == data.to_list()
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert open_source(str(tmp_path / "dict"), "test").read_all(["id"]).to_pylist() == [
        {"id": IDS[0]}
    ]
    ours = save_dataset(pa.table({"id": IDS, "text": TEXTS}), tmp_path / "ours", files=2)
    assert datasets.load_from_disk(ours)["text"] == TEXTS


def test_fingerprints_follow_content_not_place(formats, tmp_path):
    for fmt in ("datasets", "jsonl", "jsonl.gz"):
        first = open_source(formats[fmt]).fingerprint()
        assert open_source(formats[fmt]).fingerprint() == first
        copy = tmp_path / "copy" / fmt
        if Path(formats[fmt]).is_dir():
            copy.mkdir(parents=True)
            for p in Path(formats[fmt]).iterdir():
                (copy / p.name).write_bytes(p.read_bytes())
        else:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy = copy.with_name("t.jsonl.gz")
            copy.write_bytes(Path(formats[fmt]).read_bytes())
        assert open_source(str(copy)).fingerprint() == first, fmt
    # Same name, size and rows, other bytes: another fingerprint.
    path = Path(formats["jsonl"]) / "part-1.jsonl"
    before, stat = open_source(formats["jsonl"]).fingerprint(), path.stat()
    path.write_bytes(path.read_bytes().replace(b"w1", b"w2", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert open_source(formats["jsonl"]).fingerprint() != before
    data = Path(formats["datasets"]) / "data-00000-of-00003.arrow"
    before = open_source(formats["datasets"]).fingerprint()
    data.write_bytes(data.read_bytes().replace(b"w1 ", b"w3 ", 1))
    assert open_source(formats["datasets"]).fingerprint() != before
    assert (
        open_source(formats["parquet"]).fingerprint() != open_source(formats["jsonl"]).fingerprint()
    )


def test_jsonl_seeks_to_a_shard_and_counts_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHECKPOINT_ROWS", 4)
    rows = TABLE.to_pylist()
    plain = write_jsonl(rows, tmp_path / "t.jsonl", blank_lines=True)
    zipped = write_jsonl(rows, tmp_path / "t.jsonl.gz")
    counted = []
    real = sources._open_lines
    monkeypatch.setattr(sources, "_open_lines", lambda p, gz: counted.append(p) or real(p, gz))
    source = open_source(plain)
    (entry,) = source._entries
    assert entry.checkpoints[:3] == (
        (0, 0, 1),
        (4, sum(len(json.dumps(r)) + 2 for r in rows[:4]), 9),
        entry.checkpoints[2],
    )
    assert _rows(source, 41, 47) == TABLE.select(["id", "text"]).slice(41, 6).to_pylist()
    counted.clear()
    assert open_source(plain).num_rows == N  # the row count comes from the cache
    assert counted.count(plain) == 2  # the JSON-array check and the schema sample only
    gz = open_source(zipped)
    assert gz._entries[0].checkpoints == ()  # gzip: read from the start
    assert _rows(gz, 41, 47) == _rows(source, 41, 47)


def test_jsonl_schema_and_refusals(tmp_path):
    uri = write_jsonl(
        [{"id": 1, "text": "w1 w2"}, {"id": 2, "text": "w3", "extra": [1]}], tmp_path / "a.jsonl"
    )
    source = open_source(uri)
    assert source.schema.names == ["id", "text", "extra"]
    assert source.read_all().to_pylist()[0] == {"id": 1, "text": "w1 w2", "extra": None}
    bad = {
        "array.json": (b'[{"id": 1, "text": "w1"}]\n', "holds a JSON array; msif reads JSON Lines"),
        "broken.jsonl": (
            b'{"id": 1, "text": "w1"}\n{"id": 2, "text": \n',
            "line 2 is not valid JSON",
        ),
        "number.jsonl": (
            b'{"id": 1, "text": "w1"}\n\n7\n',
            "line 3 (row 1) is a JSON int, not an object",
        ),
        "latin1.jsonl": (b'{"id": 1, "text": "\xe9"}\n', "line 1 is not UTF-8 text"),
        "empty.jsonl": (b"\n\n", "holds no rows"),
        "mixed.jsonl": (
            b'{"id": 1, "text": "w1"}\n{"id": 2, "text": ["w2"]}\n',
            "column `text` mixes value types in its first rows",
        ),
    }
    for name, (data, message) in bad.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as err:
            open_source(str(path)).read_all()
        assert message in _one_line(err), name
    late = [{"id": i, "text": "w1"} for i in range(sources.SCHEMA_SAMPLE_ROWS)]
    late.append({"id": 5000, "text": 17})
    path = write_jsonl(late, tmp_path / "late.jsonl")
    with pytest.raises(DataError) as err:
        list(open_source(path).iter_batches(["text"]))
    line = sources.SCHEMA_SAMPLE_ROWS + 1
    assert _one_line(err) == (
        f"{path} line {line} (row {line - 1}): `text` is an integer but the first rows make "
        "it string"
    )
    gzipped = tmp_path / "cut.jsonl.gz"
    gzipped.write_bytes(gzip.compress(b'{"id": 1, "text": "w1"}\n' * 100)[:-20])
    with pytest.raises(DataError) as err:
        open_source(str(gzipped))
    assert "could not be read" in _one_line(err)


def test_arrow_refusals(tmp_path, formats):
    data = Path(formats["datasets"]) / "data-00001-of-00003.arrow"
    cut = tmp_path / "cut" / "data.arrow"
    cut.parent.mkdir()
    cut.write_bytes(data.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        open_source(str(cut))
    assert "is not a readable Arrow file" in _one_line(err)
    folder = save_dataset(TABLE, tmp_path / "missing", files=2)
    (Path(folder) / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DataError) as err:
        open_source(folder)
    assert _one_line(err).endswith(
        "lists data file data-00001-of-00002.arrow in state.json; it is missing"
    )
    other = save_dataset(TABLE.select(["id"]), tmp_path / "other")
    state = json.loads((Path(other) / "state.json").read_text())
    state["_data_files"] = [{"filename": "../ds/x.arrow"}]
    (Path(other) / "state.json").write_text(json.dumps(state))
    with pytest.raises(Exception) as err:
        open_source(other)
    assert "\n" not in str(err.value)
    two = tmp_path / "two"
    save_dataset(TABLE.select(["id", "text"]), two / "a")
    save_dataset(TABLE.select(["id", "n"]), two / "b")
    with pytest.raises(DataError, match="has columns"):
        open_source(str(two / "*" / "*.arrow"))


def test_mixed_and_missing_inputs_are_one_line(tmp_path, formats):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_bytes(b'{"id": 1}\n')
    (mixed / "b.arrow").write_bytes(b"")
    with pytest.raises(DataError) as err:
        open_source(str(mixed / "*"))
    assert _one_line(err) == f"{mixed / '*'} matches files of several formats (arrow, jsonl)"
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as err:
        open_source(str(tmp_path / "nothing"))
    assert "holds no Parquet files" in _one_line(err)
    with pytest.raises(Exception) as err:
        open_source(str(tmp_path / "absent.jsonl"))
    assert str(err.value).endswith("no such file or directory")
    with pytest.raises(DataError, match="mix formats"):
        open_source([formats["parquet"], formats["jsonl"]])


def test_rows_without_ids_are_named_by_their_global_index(tmp_path):
    table = TABLE.select(["text"])
    for uri in every_format(table, tmp_path).values():
        source = open_source(uri)
        opts = TableOptions(max_length=16, batch_rows=3)
        for shard in range(3):
            a, b = source.shard_range(shard, 3)
            got = [e.id for e in iter_examples(source, TOKENIZER, "corpus", opts, 99, a, b)]
            assert got == [f"row-{i}" for i in range(a, b)]


def test_queries_in_every_format(tmp_path):
    table = pa.table(
        {
            "qid": ["a", "b"],
            "question": ["w1 w2", "w3"],
            "answer": [" w4", " w5"],
            "relevant_ids": [["doc-001"], []],
        }
    )
    opts = TableOptions(id_column="qid", prompt_column="question", completion_column="answer")
    seen = set()
    for uri in every_format(table, tmp_path).values():
        queries = read_queries(uri, opts)
        assert queries.ids == ["a", "b"] and queries.kind == "pairs"
        assert queries.view().to_pylist() == [
            {"id": "a", "prompt": "w1 w2", "completion": " w4", "relevant_ids": ["doc-001"]},
            {"id": "b", "prompt": "w3", "completion": " w5", "relevant_ids": []},
        ]
        seen.add(queries.canonical().to_pylist().__repr__())
    assert len(seen) == 1  # the same content fingerprints alike whatever the format
    with pytest.raises(DataError) as err:
        read_queries(write_parquet(table, tmp_path / "q.parquet"))
    assert _one_line(err) == (
        f"queries {tmp_path / 'q.parquet'} have columns [qid, question, answer, relevant_ids]; "
        "expected `prompt` (--prompt-column) + `completion` (--completion-column) or "
        "`messages` (--messages-column)"
    )


def test_gs_datasets_and_jsonl_are_downloaded_once_and_fingerprint_as_local(
    gcs_prefix, formats, tmp_path
):
    for fmt in ("datasets", "datasetdict", "jsonl", "jsonl.gz"):
        local = formats[fmt]
        remote = join(gcs_prefix, fmt)
        if Path(local).is_dir():
            storage.upload_tree(local, remote)
        else:
            remote = join(remote, Path(local).name)
            storage.upload_file(local, remote)
        for split in ("", "test") if fmt == "datasetdict" else ("",):
            source, copy = open_source(remote, split), open_source(local, split)
            assert source.fingerprint() == copy.fingerprint(), fmt
            assert source.num_rows == copy.num_rows
            stop = min(30, copy.num_rows)
            assert _rows(source, stop // 4, stop) == _rows(copy, stop // 4, stop)
            assert all(f.startswith("gs://") for f in source.files)
    inputs = tmp_path / "cache" / "inputs"
    before = sorted(p for p in inputs.rglob("*") if p.is_file())
    open_source(join(gcs_prefix, "datasets"))  # reused from the cache
    assert sorted(p for p in inputs.rglob("*") if p.is_file()) == before
    # Only the chosen split of a DatasetDict is downloaded.
    assert not any("test" in p.name for p in before)


def test_streaming_memory_does_not_grow_with_the_table(tmp_path):
    """Peak RSS growth while opening and streaming a 4× larger table stays flat."""
    script = textwrap.dedent(
        """
        import json, sys
        from msif.testing.memcheck import reset_peak, status_kib
        from msif.data.sources import open_source
        exact = reset_peak()
        before = status_kib("VmRSS")
        source = open_source(sys.argv[1])
        chars = 0
        for batch in source.iter_batches(["id", "text"], batch_rows=64):
            chars += sum(len(t) for t in batch.column("text").to_pylist())
        print(json.dumps({"exact": exact, "growth": status_kib("VmHWM") - before, "chars": chars}))
        """
    )
    growth = {}
    for fmt in ("datasets", "jsonl"):
        for factor in (1, 4):
            rows = 4000 * factor
            table = pa.table(
                {
                    "id": [f"d{i}" for i in range(rows)],
                    "text": [os.urandom(500).hex() for _ in range(rows)],
                }
            )
            root = tmp_path / f"{fmt}-{factor}"
            uri = (
                save_dataset(table, root, files=2)
                if fmt == "datasets"
                else write_jsonl(table.to_pylist(), root / "t.jsonl")
            )
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            out = subprocess.run(
                [sys.executable, "-c", script, uri],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            result = json.loads(out.stdout)
            if not result["exact"]:
                pytest.skip("no /proc/self/clear_refs: peak RSS cannot be reset here")
            assert result["chars"] == rows * 1000
            growth[fmt, factor] = result["growth"] / 1024
    for fmt in ("datasets", "jsonl"):
        # 4 MB vs 16 MB of text: the larger table may not cost more than a few MiB more.
        assert growth[fmt, 4] < growth[fmt, 1] + 6, growth
