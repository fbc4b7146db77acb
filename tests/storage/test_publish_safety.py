"""No lost or half-written outputs: versioned gs:// publishing against a real GCS emulator
and fault proxy, refusal of foreign destinations, leftovers of killed processes (real
SIGKILL/SIGTERM of child processes), outputs that overlap their inputs, and full disks
(a real, small tmpfs)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import msif
from msif.storage import gcs as storage
from msif.storage.cache import local_input_dir
from msif.storage.gcs import read_bytes, write_bytes_atomic
from msif.storage.publish import (
    MARKER,
    _build_manifest,
    _encode,
    _owner,
    check_output_replaceable,
    files_uri,
    is_complete,
    read_manifest,
    staged_output_dir,
)
from msif.storage.uri import StorageError, check_output_distinct, join
from msif.testing import Faults, fault_proxy
from tests.storage.test_storage import _publish, _write

OLD = {"a.bin": b"old a" * 100, "sub/b.json": b'{"old": 1}\n'}
NEW = {"a.bin": b"new a" * 100, "c.txt": b"new c\n"}
REFUSED = "exists and is not a complete msif output; refusing to replace it"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def _names(prefix: str) -> list[str]:
    return [o.uri[len(prefix) + 1 :] for o in storage.list_objects(prefix)]


def _read(uri: str, cache: Path) -> dict[str, bytes]:
    """The files of a published output, read through a fresh cache: a real download."""
    return _tree(local_input_dir(uri, cache_dir=cache))


@pytest.fixture
def proxy(gcs_emulator, monkeypatch):
    """A fault proxy in front of the emulator, used by msif.storage.gcs for this test."""
    with fault_proxy(gcs_emulator.endpoint) as p:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.endpoint)
        monkeypatch.setenv("MSIF_STORAGE_RETRIES", "2")
        yield p


# ----------------------------------------------------------------------------- gs:// replace


def test_gs_failure_mid_upload_keeps_the_old_output(proxy, gcs_prefix, tmp_path):
    _publish(gcs_prefix, OLD)
    marker = read_bytes(join(gcs_prefix, MARKER))
    before = _names(gcs_prefix)

    # a.bin goes up (multipart POST), then big.bin's resumable upload fails for good.
    proxy.clear()
    proxy.set_faults(Faults(fail_first=None, pattern=r"^PUT /upload/"))
    with pytest.raises(StorageError) as err:
        _publish(gcs_prefix, {**NEW, "big.bin": os.urandom(9 << 20)})
    assert "big.bin: upload gave up after 2 attempts" in str(err.value)
    assert "\n" not in str(err.value)
    landed = [
        s for s in proxy.seen if s.method == "POST" and not s.injected and "/upload/" in s.path
    ]
    assert any(b"new a" in s.body_head for s in landed)  # it did fail mid-way

    proxy.set_faults(Faults())
    assert read_bytes(join(gcs_prefix, MARKER)) == marker
    assert _read(gcs_prefix, tmp_path / "c1") == OLD  # whole, and verified by sha256
    assert _names(gcs_prefix) == before  # the failed version's objects were removed


def test_gs_failed_pointer_write_keeps_the_old_output_and_the_next_publish_cleans(
    proxy, gcs_prefix, tmp_path
):
    _publish(gcs_prefix, OLD)
    old_version = read_manifest(gcs_prefix)["version"]

    # The marker write fails, and so does every delete: the new version stays behind.
    proxy.set_faults(Faults(fail_first=None, pattern=r"ifGenerationMatch|^DELETE "))
    with pytest.raises(StorageError, match=rf"{MARKER}: upload gave up after 2 attempts"):
        _publish(gcs_prefix, NEW)
    proxy.set_faults(Faults())
    tops = {n.split("/", 1)[0] for n in _names(gcs_prefix)}
    assert len(tops - {MARKER, old_version}) == 1  # the leftover
    assert read_manifest(gcs_prefix)["version"] == old_version
    assert _read(gcs_prefix, tmp_path / "c1") == OLD
    check_output_replaceable(gcs_prefix)

    _publish(gcs_prefix, NEW)
    version = read_manifest(gcs_prefix)["version"]
    assert _names(gcs_prefix) == [MARKER, f"{version}/a.bin", f"{version}/c.txt"]
    assert _read(gcs_prefix, tmp_path / "c2") == NEW


def test_gs_a_concurrent_winner_is_kept(proxy, gcs_prefix, tmp_path):
    _publish(gcs_prefix, OLD)
    before = _names(gcs_prefix)
    # GCS answers 412 when the marker is no longer the one this publish started from.
    proxy.set_faults(Faults(fail_first=None, pattern=r"ifGenerationMatch", status=412))
    with pytest.raises(StorageError) as err:
        _publish(gcs_prefix, NEW)
    assert str(err.value) == (
        f"{gcs_prefix}: another msif process published this output while this one was "
        "uploading; its output stands and this one was discarded"
    )
    proxy.set_faults(Faults())
    assert _names(gcs_prefix) == before and _read(gcs_prefix, tmp_path / "c") == OLD


def test_gs_pointer_write_names_the_marker_it_replaces(proxy, gcs_prefix):
    _publish(gcs_prefix, OLD)
    generation = storage.stat(join(gcs_prefix, MARKER)).generation
    proxy.clear()
    _publish(gcs_prefix, NEW)
    pointer = [s for s in proxy.seen if "ifGenerationMatch" in s.path]
    assert len(pointer) == 1 and f"ifGenerationMatch={generation}" in pointer[0].path
    assert read_manifest(gcs_prefix)["version"].endswith(f"-g{generation}")


# ----------------------------------------------------------------------------- gs:// refuse


def test_gs_prefix_with_user_objects_is_refused_before_work_and_untouched(gcs_prefix):
    user = {"notes.txt": b"mine", "data/x.parquet": b"also mine"}
    nested_only = join(gcs_prefix, "nested")
    for rel, data in user.items():
        write_bytes_atomic(join(gcs_prefix, rel), data)
        write_bytes_atomic(join(nested_only, "deep", rel), data)
    for uri in (gcs_prefix, nested_only):
        before = storage.list_objects(uri)
        with pytest.raises(StorageError) as err:
            with staged_output_dir(uri):
                pytest.fail("the block must not run for a destination that will be refused")
        assert str(err.value) == f"{uri} {REFUSED}"
        with pytest.raises(StorageError, match=REFUSED):
            check_output_replaceable(uri)
        assert storage.list_objects(uri) == before
    assert {r: read_bytes(join(gcs_prefix, r)) for r in user} == user


def test_gs_user_objects_added_during_the_work_are_not_replaced(gcs_prefix):
    with pytest.raises(StorageError, match=REFUSED):
        with staged_output_dir(gcs_prefix) as tmp:
            _write(tmp, NEW)
            write_bytes_atomic(join(gcs_prefix, "arrived.txt"), b"meanwhile")
    assert _names(gcs_prefix) == ["arrived.txt"]


def test_gs_msif_leftovers_alone_are_replaced(proxy, gcs_prefix, tmp_path):
    # A first publish that never got its marker written (and could not clean up).
    proxy.set_faults(Faults(fail_first=None, pattern=r"ifGenerationMatch|^DELETE "))
    with pytest.raises(StorageError):
        _publish(gcs_prefix, OLD)
    proxy.set_faults(Faults())
    assert not is_complete(gcs_prefix) and all(n.startswith("msif-v-") for n in _names(gcs_prefix))
    _publish(gcs_prefix, NEW)
    version = read_manifest(gcs_prefix)["version"]
    assert _names(gcs_prefix) == [MARKER, f"{version}/a.bin", f"{version}/c.txt"]


# ----------------------------------------------------------------------------- old layout


def _publish_old_layout(uri: str, files: dict[str, bytes], root: Path) -> None:
    """What the previous release published: files directly under uri/, marker last."""
    _write(root, files)
    storage.upload_tree(root, uri)
    manifest = _build_manifest(root, uri, {"node": "old"})
    assert "version" not in manifest
    write_bytes_atomic(join(uri, MARKER), _encode(manifest))


def test_gs_old_layout_manifest_reads_and_is_replaced(gcs_prefix, tmp_path):
    _publish_old_layout(gcs_prefix, OLD, tmp_path / "old")
    write_bytes_atomic(join(gcs_prefix, "extra.txt"), b"put there later, not msif's")
    assert is_complete(gcs_prefix) and files_uri(gcs_prefix, read_manifest(gcs_prefix)) == (
        gcs_prefix
    )
    assert _read(gcs_prefix, tmp_path / "c1") == OLD

    _publish(gcs_prefix, NEW)
    version = read_manifest(gcs_prefix)["version"]
    # The old manifest's files go; an object it never listed is not msif's to delete.
    assert _names(gcs_prefix) == [MARKER, "extra.txt", f"{version}/a.bin", f"{version}/c.txt"]
    assert _read(gcs_prefix, tmp_path / "c2") == NEW


def test_gs_output_seen_through_a_mount_reads_its_version(gcs_prefix, tmp_path):
    """A KFP pod sees gs:// outputs as local paths (a gcsfuse mount): the same layout."""
    _publish(gcs_prefix, OLD)
    _publish(gcs_prefix, NEW)
    mount = tmp_path / "gcs" / "out"
    for rel in _names(gcs_prefix):
        storage.download_file(join(gcs_prefix, rel), mount / rel)
    version = read_manifest(str(mount))["version"]
    assert local_input_dir(str(mount)) == mount / version and _tree(mount / version) == NEW


def test_gs_reader_never_sees_a_mix(gcs_prefix, tmp_path):
    rounds = [{f"f{i}.bin": bytes([n]) * (64 << 10) for i in range(3)} for n in range(8)]
    _publish(gcs_prefix, rounds[0])
    done = threading.Event()
    seen: list[dict[str, bytes]] = []
    errors: list[str] = []

    def reader() -> None:
        n = 0
        while not done.is_set():
            n += 1
            try:
                seen.append(_read(gcs_prefix, tmp_path / f"cache-{n}"))
            except StorageError as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for files in rounds[1:]:
            _publish(gcs_prefix, files)
    finally:
        done.set()
        thread.join(timeout=60)
    assert errors == []  # never "incomplete", never a missing file
    assert len(seen) > len(rounds) and all(s in rounds for s in seen)  # each read one whole
    assert len({json.dumps(sorted(s), default=str) for s in seen}) == 1


@pytest.mark.parametrize("at_download", [1, 2])
def test_gs_output_replaced_while_being_read_is_read_again_whole(
    gcs_prefix, tmp_path, monkeypatch, caplog, at_download
):
    """A publish completes after the reader read the marker (before its first download, or
    between its two): the old version is gone, and the reader reads the new one whole."""
    import msif.storage.cache as cache

    caplog.set_level(logging.INFO, "msif")
    _publish(gcs_prefix, OLD)
    real, calls = cache.download_file, []

    def download_after_a_publish(uri: str, path, generation=None) -> None:
        calls.append(uri)
        if len(calls) == at_download:
            _publish(gcs_prefix, NEW)  # a real publish, timed into the reader's window
        real(uri, path, generation)

    monkeypatch.setattr(cache, "download_file", download_after_a_publish)
    assert _read(gcs_prefix, tmp_path / "cache") == NEW
    assert "was replaced while being read; reading it again" in caplog.text
    versions = {u[len(gcs_prefix) + 1 :].split("/", 1)[0] for u in calls}
    assert len(versions) == 2  # files of the old version, then only of the new one


# ----------------------------------------------------------------------------- local leftovers


def _child(script: str, *args: str) -> subprocess.CompletedProcess:
    src = str(Path(msif.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120
    )


_KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from msif.storage.publish import staged_output_dir
target, sig = Path(sys.argv[1]), int(sys.argv[2])
rename = os.rename
def dying_rename(src, dst):
    if Path(dst) == target:  # the old output is aside, the new one not yet in place
        os.kill(os.getpid(), sig)
    rename(src, dst)
os.rename = dying_rename
with staged_output_dir(str(target)) as tmp:
    (tmp / "new.txt").write_bytes(b"new")
"""

_KILL_WHILE_STAGING = """
import os, sys
from msif.storage.publish import staged_output_dir
with staged_output_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"half")
    print(tmp, flush=True)
    os.kill(os.getpid(), int(sys.argv[2]))
"""

SIGNALS = [pytest.param(signal.SIGKILL, id="SIGKILL"), pytest.param(signal.SIGTERM, id="SIGTERM")]


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.mark.parametrize("sig", SIGNALS)
def test_local_output_orphaned_between_renames_is_restored(tmp_path, sig):
    out = tmp_path / "run"
    _publish(str(out), OLD)
    done = _child(_KILL_BETWEEN_RENAMES, str(out), str(int(sig)))
    assert done.returncode == -sig, done.stderr
    assert not out.exists()  # what the kill left: no output, the old one aside
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".run.old-")]
    assert len(aside) == 1 and _tree(aside[0] / "dir") == OLD

    assert local_input_dir(str(out)) == out and _tree(out) == OLD  # a read restores it
    assert _siblings(out) == []  # and tidies the staging dir the kill left

    done = _child(_KILL_BETWEEN_RENAMES, str(out), str(int(sig)))
    assert done.returncode == -sig and not out.exists()
    _publish(str(out), NEW)  # the next publish restores, then replaces
    assert _tree(out) == NEW and _siblings(out) == []


@pytest.mark.parametrize("sig", SIGNALS)
def test_stale_staging_dirs_are_removed_but_live_ones_kept(tmp_path, sig):
    out = tmp_path / "run"
    done = _child(_KILL_WHILE_STAGING, str(out), str(int(sig)))
    assert done.returncode == -sig, done.stderr
    dead = Path(done.stdout.strip())
    assert dead.is_dir() and dead.name.startswith(".run.msif-")

    week = time.time() - 7 * 24 * 3600
    elsewhere = {  # other hosts' dirs (a shared file system) and an earlier release's
        ".run.msif-otherhost_1_123_young": False,
        ".run.msif-otherhost_1_123_old": True,
        ".run.msif-ab12cd34": False,
        ".run.msif-ef56gh78": True,
        ".other.msif-vm_1_1_old": False,  # another output's: never touched
    }
    for name, old in elsewhere.items():
        (tmp_path / name).mkdir()
        if old:
            os.utime(tmp_path / name, (week, week))

    with staged_output_dir(str(out)) as live:  # this process's: alive
        _write(live, OLD)
        assert not dead.exists()
        _publish(str(out), NEW)  # another publish meanwhile keeps the live one
        assert live.is_dir() and (live / "a.bin").is_file()
    assert _tree(out) == OLD
    kept = sorted(n for n, old in elsewhere.items() if not old or n.startswith(".other"))
    assert _siblings(out) == kept


def test_stale_remote_staging_dirs_are_removed(gcs_prefix, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = _child(
        "import tempfile, sys; tempfile.tempdir = sys.argv[3]\n" + _KILL_WHILE_STAGING,
        gcs_prefix,
        str(int(signal.SIGKILL)),
        str(scratch),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    dead = Path(done.stdout.strip())
    assert dead.parent == scratch and dead.is_dir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    _publish(gcs_prefix, NEW)
    assert list(scratch.iterdir()) == [] and storage.exists(join(gcs_prefix, MARKER))


def test_a_moved_aside_output_of_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "run"
    aside = tmp_path / f".run.old-{_owner()}inflight"  # this process: between its renames
    _publish(str(aside / "dir"), OLD)  # a complete output, as the first rename leaves it
    assert not out.exists()
    with pytest.raises(StorageError, match="no such directory"):
        local_input_dir(str(out))
    assert (aside / "dir" / MARKER).is_file()


# ----------------------------------------------------------------------------- overlap


def _refused(out: str, inp: str, relation: str) -> str:
    return f"--out {out} {relation} the input {inp}; choose another output"


def test_check_output_distinct_local(tmp_path):
    a, ab, sub = tmp_path / "a", tmp_path / "ab", tmp_path / "a" / "sub"
    sub.mkdir(parents=True)
    ab.mkdir()
    (tmp_path / "link").symlink_to(a)
    covers, inside = "is (or contains)", "lies inside"
    cases = [
        (a, a, covers),  # equal
        (a, sub, covers),  # parent of the input
        (sub, a, inside),  # child of the input
        (tmp_path / "link", a, covers),  # the same directory through a symlink
        (tmp_path / "link" / "sub", a, inside),
        (a, tmp_path / "link" / "sub" / "file.bin", covers),
        (tmp_path / "x" / ".." / "a", a, covers),
        (a / "data", a / "*.parquet", None),  # a glob matches only what it matches
        (a / "x.parquet" / "d", a / "*.parquet", inside),
        (a, a / "*.parquet", covers),
        (ab, a, None),  # a sibling with a common prefix
        (a, ab, None),
    ]
    for out, inp, relation in cases:
        if relation is None:
            check_output_distinct(str(out), [str(inp)])
            continue
        with pytest.raises(StorageError) as err:
            check_output_distinct(str(out), [None, [str(tmp_path / "other")], str(inp)])
        assert str(err.value) == _refused(str(out), str(inp), relation), (out, inp)
    check_output_distinct(str(a), None)
    check_output_distinct(str(a), [None, [], "gs://bkt" + str(a)])


def test_check_output_distinct_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="is \\(or contains\\) the input"):
        check_output_distinct("out", [str(tmp_path / "out" / "part")])
    with pytest.raises(StorageError, match="lies inside the input"):
        check_output_distinct(str(tmp_path / "out" / "x"), Path("out"))


def test_check_output_distinct_gs():
    covers, inside = "is (or contains)", "lies inside"
    cases = [
        ("gs://bkt/a", "gs://bkt/a/", covers),
        ("gs://bkt/a", "gs://bkt/a/part-0.parquet", covers),
        ("gs://bkt/a/sub/", "gs://bkt/a", inside),
        ("gs://bkt", "gs://bkt/a", covers),  # the whole bucket
        ("gs://bkt/a//x", "gs://bkt/a/x", covers),
        ("gs://bkt/a", "gs://bkt/ab", None),
        ("gs://bkt/ab", "gs://bkt/a", None),
        ("gs://bkt/a", "gs://bkt2/a", None),
        ("gs://bkt/a", "/b/a", None),
        ("gs://bkt/c/out", "gs://bkt/c/*.parquet", None),
        ("gs://bkt/c/x.parquet", "gs://bkt/c/*.parquet", covers),
        ("gs://bkt/c/d/e", "gs://bkt/c/**/x.parquet", inside),
    ]
    for out, inp, relation in cases:
        if relation is None:
            check_output_distinct(out, inp)
            continue
        with pytest.raises(StorageError) as err:
            check_output_distinct(out, ("gs://bkt2/zzz", inp))
        assert str(err.value) == _refused(out, inp, relation), (out, inp)


# ----------------------------------------------------------------------------- full disks


@pytest.fixture
def small_fs(tmp_path) -> Path:
    """A real 1 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'not permitted'}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def _fill(tmp: Path, how: str) -> None:
    data = os.urandom(2 << 20)  # twice the file system
    if how == "bytes":
        (tmp / "big.bin").write_bytes(data)
    elif how == "parquet":
        pq.write_table(
            pa.table({"x": [data[i : i + 64] for i in range(0, len(data), 64)]}), tmp / "t.parquet"
        )
    else:
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, str(tmp / "w.st"))


@pytest.mark.parametrize("how", ["bytes", "parquet", "safetensors"])
def test_a_full_disk_while_staging_is_one_line_and_keeps_the_old_output(small_fs, how):
    out = small_fs / "run"
    _publish(str(out), OLD)
    staged = []
    with pytest.raises(StorageError) as err:
        with staged_output_dir(str(out)) as tmp:
            staged.append(tmp)
            _fill(tmp, how)
    assert str(err.value).startswith(f"{out}: writing the output failed: {small_fs}/.run.msif-")
    assert str(err.value).endswith(": No space left on device; nothing published")
    assert "\n" not in str(err.value)
    assert not staged[0].exists() and _siblings(out) == []
    assert _tree(local_input_dir(str(out))) == OLD


def test_a_full_cache_disk_while_downloading_is_one_line(gcs_prefix, small_fs):
    _publish(gcs_prefix, {"big.bin": os.urandom(2 << 20)})
    with pytest.raises(StorageError) as err:
        local_input_dir(gcs_prefix, cache_dir=small_fs)
    text = str(err.value)
    assert text.startswith(f"{gcs_prefix}/msif-v-") and "/big.bin: download to " in text
    assert text.endswith("big.bin failed: No space left on device") and "\n" not in text
    assert list((small_fs / "artifacts").iterdir()) == []  # the half download is gone
