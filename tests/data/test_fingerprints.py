"""Content fingerprints of corpora and model directories, and the cached local file digests."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif.data.parquet import ParquetSource
from msif.storage import digest
from msif.storage import gcs as storage
from msif.storage.digest import file_digest, file_hashes, model_digest
from msif.storage.uri import join


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private digest cache; files written by the test count as settled at once."""
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "_RACY_NS", 0)
    return tmp_path / "cache" / "digests"


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files digest actually reads (cache misses)."""
    seen: list[str] = []
    real = digest._file_hashes

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(digest, "_file_hashes", counting)
    return seen


def _corpus(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})
    pq.write_table(table, root / "part-0.parquet", compression="none")
    return root


def _same_shape_rewrite(path: Path, texts: list[str]) -> None:
    """Rewrite a file with other content of the very same size, rows and stat times."""
    st = path.stat()
    before = path.read_bytes()
    pq.write_table(
        pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}),
        path,
        compression="none",
    )
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == len(before) and path.read_bytes() != before


def test_a_rewrite_under_the_same_name_size_and_rows_changes_the_fingerprint(cache, tmp_path):
    root = _corpus(tmp_path / "corpus", ["alpha beta", "gamma delta"])
    first = ParquetSource.open(str(root)).fingerprint()
    assert ParquetSource.open(str(root)).fingerprint() == first
    _same_shape_rewrite(root / "part-0.parquet", ["alpha bet4", "gamma delt4"])
    again = ParquetSource.open(str(root))
    assert again.num_rows == 2 and again.fingerprint() != first


def test_a_copy_elsewhere_keeps_the_fingerprint(cache, tmp_path):
    root = _corpus(tmp_path / "corpus", ["alpha beta", "gamma delta"])
    copy = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(root, copy)
    assert (
        ParquetSource.open(str(copy)).fingerprint() == ParquetSource.open(str(root)).fingerprint()
    )


def test_local_and_gs_copies_have_one_fingerprint(cache, tmp_path, gcs_prefix):
    root = _corpus(tmp_path / "corpus", ["alpha beta", "gamma delta"])
    remote = join(gcs_prefix, "corpus")
    storage.upload_tree(root, remote)
    local = ParquetSource.open(str(root)).fingerprint()
    assert ParquetSource.open(remote).fingerprint() == local
    assert ParquetSource.open(join(remote, "part-0.parquet")).fingerprint() == local
    _same_shape_rewrite(root / "part-0.parquet", ["alpha bet4", "gamma delt4"])
    storage.upload_file(root / "part-0.parquet", join(remote, "part-0.parquet"))
    assert ParquetSource.open(remote).fingerprint() != local


def test_local_files_are_hashed_once_per_version(cache, hashed, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 5000)
    want = hashlib.sha256(b"x" * 5000).hexdigest()
    assert file_digest(path) == want and file_digest(path) == want
    assert hashed == ["f.bin"]
    assert file_digest(tmp_path / "." / "f.bin") == want and hashed == ["f.bin"]
    # Same size and mtime, other bytes: ctime (and the inode, through a rename) tell.
    st = path.stat()
    path.write_bytes(b"y" * 5000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_digest(path) == hashlib.sha256(b"y" * 5000).hexdigest()
    assert hashed == ["f.bin", "f.bin"]


def test_a_damaged_cache_entry_is_hashed_again(cache, hashed, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"content")
    file_hashes(path)
    (entry,) = cache.rglob("*.json")
    entry.write_text('{"identity": "garbage"')
    assert file_hashes(path).size == 7 and hashed == ["f.bin", "f.bin"]


def test_files_touched_just_now_are_not_cached(tmp_path, monkeypatch, hashed):
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "f.bin"
    path.write_bytes(b"fresh")  # could still change within the same timestamp tick
    file_digest(path)
    file_digest(path)
    assert hashed == ["f.bin", "f.bin"] and not (tmp_path / "cache" / "digests").exists()


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "gpt2"}')
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    (path / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (path / "checkpoint-1").mkdir()
    (path / "checkpoint-1" / "optimizer.pt").write_bytes(b"not part of the model")
    return path


def test_model_digest_follows_content_not_location(cache, tmp_path, gcs_prefix):
    model = _model_dir(tmp_path / "model")
    first = model_digest(str(model))
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    (copy / ".gitattributes").write_text("other\n")
    (copy / "checkpoint-1" / "optimizer.pt").write_bytes(b"other")
    assert model_digest(str(copy)) == first  # dot-files and subfolders are not loaded
    remote = join(gcs_prefix, "model")
    storage.upload_tree(model, remote)
    assert model_digest(remote) == first
    (model / "model.safetensors").write_bytes(b"\1" * 64)  # new weights, same size
    assert model_digest(str(model)) != first
    storage.upload_file(model / "model.safetensors", join(remote, "model.safetensors"))
    assert model_digest(remote) == model_digest(str(model))
