"""Object storage and Parquet streaming, locally and against a real GCS emulator process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif.data.parquet import ParquetSource, read_table, write_parquet_atomic
from msif.errors import DataError
from msif.storage import gcs as storage
from msif.storage.cache import fetch_model_dir, local_input_dir
from msif.storage.gcs import read_bytes, write_bytes_atomic
from msif.storage.publish import MARKER, is_complete, read_manifest, staged_output_dir
from msif.storage.uri import StorageError, is_remote, join, split_gs
from msif.testing import Faults, fault_proxy

FILES = {"a.bin": bytes(range(256)) * 4, "sub/b.json": b'{"x": 1}\n'}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _publish(uri: str, files: dict[str, bytes] = FILES, metadata: dict | None = None) -> None:
    with staged_output_dir(uri, metadata) as tmp:
        _write(tmp, files)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _names(prefix: str) -> list[str]:
    return [o.uri[len(prefix) + 1 :] for o in storage.list_objects(prefix)]


@pytest.fixture
def proxy(gcs_emulator, monkeypatch):
    """A fault proxy in front of the emulator, used by msif.storage.gcs for this test."""
    with fault_proxy(gcs_emulator.endpoint) as p:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.endpoint)
        yield p


# ----------------------------------------------------------------------------- URIs


def test_uris():
    assert is_remote("gs://b/x") and not is_remote("/tmp/x") and not is_remote("rel/x")
    assert join("gs://bkt/p/", "a", "/b/") == "gs://bkt/p/a/b"
    assert join("gs://bkt", "x") == "gs://bkt/x"
    assert join("/tmp/a", "b", "c") == "/tmp/a/b/c"
    assert split_gs("gs://bkt/p/q/") == ("bkt", "p/q")
    with pytest.raises(StorageError, match=r"^s3://b/x: unsupported URI scheme 's3'"):
        is_remote("s3://b/x")
    with pytest.raises(StorageError, match="'Bad_Bucket' is not a valid bucket name"):
        split_gs("gs://Bad_Bucket/x")


# ----------------------------------------------------------------------------- local outputs


def test_local_round_trip_and_whole_replacement(tmp_path):
    out = tmp_path / "outs" / "run"
    with staged_output_dir(str(out), {"node": "test"}) as tmp:
        _write(tmp, FILES)
        assert not out.exists()  # nothing visible before the block ends
    manifest = read_manifest(str(out))
    assert manifest["metadata"] == {"node": "test"}
    assert {k: (v["size"], v["sha256"]) for k, v in manifest["files"].items()} == {
        k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in FILES.items()
    }
    assert is_complete(str(out))
    assert local_input_dir(str(out)) == out
    assert _tree(out) == {**FILES, MARKER: (out / MARKER).read_bytes()}

    _publish(str(out), {"c.txt": b"new"})
    assert sorted(_tree(out)) == [MARKER, "c.txt"]  # replaced as a whole: no stale a.bin
    assert [p.name for p in out.parent.iterdir()] == ["run"]  # no temporary leftovers


def test_local_refuses_to_replace_foreign_data(tmp_path):
    out = tmp_path / "mine"
    _write(out, {"precious.txt": b"user data"})
    with pytest.raises(StorageError, match="exists and is not a complete msif output"):
        _publish(str(out))
    assert _tree(out) == {"precious.txt": b"user data"}
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_local_exception_publishes_nothing_and_keeps_old_output(tmp_path):
    out = tmp_path / "run"
    staged = []
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(str(out)) as tmp:
            staged.append(tmp)
            _write(tmp, FILES)
            raise RuntimeError("boom")
    assert not out.exists() and not staged[0].exists() and not is_complete(str(out))
    assert list(tmp_path.iterdir()) == []

    _publish(str(out), {"old.txt": b"old"})
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(str(out)) as tmp:
            _write(tmp, {"new.txt": b"new"})
            raise RuntimeError("boom")
    assert is_complete(str(out)) and (out / "old.txt").read_bytes() == b"old"
    assert not (out / "new.txt").exists()


def test_local_missing_marker_and_tampering(tmp_path):
    out = tmp_path / "half"
    _write(out, FILES)
    expected = f"{out} is incomplete or missing: no {MARKER}"
    with pytest.raises(StorageError) as err:
        local_input_dir(str(out))
    assert str(err.value) == expected
    assert not is_complete(str(out))

    done = tmp_path / "done"
    _publish(str(done))
    (done / "a.bin").write_bytes(b"\xff" + FILES["a.bin"][1:])
    with pytest.raises(StorageError, match=r"a\.bin does not match its manifest \(sha256"):
        local_input_dir(str(done))


def test_write_bytes_atomic_and_read_bytes_local(tmp_path):
    target = tmp_path / "d" / "blob.bin"
    write_bytes_atomic(str(target), b"one")
    write_bytes_atomic(str(target), b"two")
    assert read_bytes(str(target)) == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]
    with pytest.raises(StorageError, match="no such file or directory"):
        read_bytes(str(tmp_path / "absent"))


# ----------------------------------------------------------------------------- gs:// outputs


def test_gs_round_trip_marker_last_and_cache_reuse(proxy, gcs_prefix, tmp_path):
    _publish(gcs_prefix, FILES, {"node": "test"})
    uploads = [s for s in proxy.seen if s.method == "POST" and "/upload/" in s.path]
    assert len(uploads) == 3 and MARKER.encode() in uploads[-1].body_head  # the marker last
    assert "ifGenerationMatch=0" in uploads[-1].path  # only if there was none
    manifest = read_manifest(gcs_prefix)
    version = manifest["version"]
    assert re.fullmatch(r"msif-v-\d{8}T\d{6}-[0-9a-f]{8}-g0", version)
    assert _names(gcs_prefix) == [MARKER, f"{version}/a.bin", f"{version}/sub/b.json"]
    assert manifest["metadata"] == {"node": "test"}

    cache = tmp_path / "cache"
    local = local_input_dir(gcs_prefix, cache_dir=cache)
    assert {k: v for k, v in _tree(local).items() if k != MARKER} == FILES
    assert is_complete(str(local))  # the cached copy is itself a verified msif output

    proxy.clear()
    assert local_input_dir(gcs_prefix, cache_dir=cache) == local
    media = [s.path for s in proxy.seen if "alt=media" in s.path]
    assert len(media) == 1 and MARKER in media[0]  # only the marker was fetched again

    proxy.clear()
    _publish(gcs_prefix, {"c.txt": b"new"})
    writes = [s for s in proxy.seen if s.method in ("POST", "PUT", "DELETE")]
    assert [w.method for w in writes] == ["POST", "POST", "DELETE", "DELETE"]
    assert MARKER.encode() in writes[1].body_head  # the pointer moves before anything goes
    assert all(version in w.path for w in writes[2:])  # then the old version goes
    new = read_manifest(gcs_prefix)["version"]
    assert new != version and _names(gcs_prefix) == [MARKER, f"{new}/c.txt"]


def test_gs_exception_publishes_nothing(gcs_prefix):
    staged = []
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(gcs_prefix) as tmp:
            staged.append(tmp)
            _write(tmp, FILES)
            raise RuntimeError("boom")
    assert storage.list_objects(gcs_prefix) == [] and not staged[0].exists()
    assert not is_complete(gcs_prefix)


def test_gs_missing_marker(gcs_prefix, tmp_path):
    storage.upload_tree(_make(tmp_path / "src", FILES), gcs_prefix)
    with pytest.raises(StorageError) as err:
        local_input_dir(gcs_prefix, cache_dir=tmp_path / "cache")
    assert str(err.value) == f"{gcs_prefix} is incomplete or missing: no {MARKER}"
    assert not is_complete(gcs_prefix)


def _make(root: Path, files: dict[str, bytes]) -> Path:
    _write(root, files)
    return root


def test_gs_tampered_object_and_damaged_cache(gcs_prefix, tmp_path):
    _publish(gcs_prefix)
    cache = tmp_path / "cache"
    local = local_input_dir(gcs_prefix, cache_dir=cache)
    (local / "a.bin").write_bytes(b"garbage")
    assert local_input_dir(gcs_prefix, cache_dir=cache) == local  # damaged copy replaced
    assert (local / "a.bin").read_bytes() == FILES["a.bin"]

    tampered = join(gcs_prefix, read_manifest(gcs_prefix)["version"], "a.bin")
    write_bytes_atomic(tampered, b"\xff" + FILES["a.bin"][1:])
    fresh = tmp_path / "fresh"
    with pytest.raises(StorageError, match=r"a\.bin does not match its manifest \(sha256"):
        local_input_dir(gcs_prefix, cache_dir=fresh)
    assert list((fresh / "artifacts").iterdir()) == []  # the refused download is gone


def test_manifest_names_cannot_escape_the_cache(gcs_prefix, tmp_path):
    entry = {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    write_bytes_atomic(join(gcs_prefix, MARKER), json.dumps({"files": {"../x": entry}}).encode())
    with pytest.raises(StorageError, match=r"refusing the unsafe file name '\.\./x'"):
        local_input_dir(gcs_prefix, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "x").exists()


def test_fetch_model_dir_round_trip(gcs_prefix, tmp_path):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = GPTNeoXForCausalLM(cfg)
    model.save_pretrained(tmp_path / "model")
    storage.upload_tree(tmp_path / "model", gcs_prefix)
    write_bytes_atomic(join(gcs_prefix, "checkpoint-1", "optimizer.pt"), b"not the model")

    cache = tmp_path / "cache"
    local = fetch_model_dir(gcs_prefix, cache_dir=cache)
    assert sorted(p.name for p in local.iterdir()) == sorted(
        p.name for p in (tmp_path / "model").iterdir()
    )  # nested checkpoint-1/ is left out
    expected = model.state_dict()

    def same_weights(path: Path) -> bool:
        got = GPTNeoXForCausalLM.from_pretrained(path).state_dict()
        return got.keys() == expected.keys() and all(
            torch.equal(got[k], expected[k]) for k in expected
        )

    assert same_weights(local)
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # silent corruption
    assert fetch_model_dir(gcs_prefix, cache_dir=cache) == local
    assert same_weights(local)  # the mismatching file was downloaded again

    assert fetch_model_dir(str(tmp_path / "model")) == tmp_path / "model"
    with pytest.raises(StorageError, match="is not a model directory: no config.json"):
        fetch_model_dir(str(tmp_path))
    storage.write_bytes_atomic(join(gcs_prefix + "-nocfg", "x.bin"), b"x")
    with pytest.raises(StorageError, match="is not a model directory: no config.json"):
        fetch_model_dir(gcs_prefix + "-nocfg", cache_dir=cache)


# ----------------------------------------------------------------------------- errors


def test_missing_bucket_and_object_are_one_line(gcs_emulator, tmp_path):
    with pytest.raises(StorageError) as err:
        read_bytes("gs://no-such-bucket-x/obj")
    assert str(err.value) == (
        "gs://no-such-bucket-x/obj: download failed: no such bucket 'no-such-bucket-x'"
    )
    with pytest.raises(StorageError) as err:
        read_bytes("gs://msif-test/no/such/object")
    assert str(err.value) == "gs://msif-test/no/such/object: download failed: no such object"
    with pytest.raises(StorageError, match=r"no such bucket 'no-such-bucket-x'$"):
        with staged_output_dir("gs://no-such-bucket-x/out"):
            pytest.fail("the block must not run when the destination cannot exist")
    with pytest.raises(StorageError, match=r"no such bucket 'no-such-bucket-x'$"):
        ParquetSource.open("gs://no-such-bucket-x/corpus")
    with pytest.raises(StorageError, match="no such object or prefix"):
        ParquetSource.open("gs://msif-test/no-such-corpus")


def test_missing_credentials_are_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(StorageError) as err:
        read_bytes("gs://some-bucket/obj")
    assert str(err.value) == (
        "gs://some-bucket/obj: no Google Cloud credentials in the environment (configure ADC "
        "or Workload Identity; STORAGE_EMULATOR_HOST for an emulator)"
    )


def test_transient_errors_are_retried_on_every_path(proxy, gcs_prefix, tmp_path):
    big = os.urandom(9 << 20)  # above the multipart limit: a resumable upload
    proxy.set_faults(Faults(fail_first=2, pattern=r"^POST /upload/"))
    _publish(gcs_prefix, {**FILES, "big.bin": big})
    proxy.set_faults(Faults(fail_first=1, pattern=r"^PUT /upload/"))
    write_bytes_atomic(join(gcs_prefix, "x", "big2.bin"), big)
    assert proxy.injected == 3

    proxy.set_faults(Faults(fail_first=3, pattern=r"alt=media"))
    local = local_input_dir(gcs_prefix, cache_dir=tmp_path / "cache")
    assert (local / "big.bin").read_bytes() == big and proxy.injected == 6

    corpus = _corpus_dir(tmp_path / "corpus")
    storage.upload_tree(corpus, join(gcs_prefix, "corpus"))
    proxy.set_faults(Faults(fail_first=2, pattern=r"^GET /storage/v1/b/msif-test/o\?"))
    source = ParquetSource.open(join(gcs_prefix, "corpus"))
    proxy.set_faults(Faults(fail_first=2, pattern=r"alt=media", mode="reset"))
    assert _ids(source, 0, source.num_rows) == EXPECTED_IDS
    assert proxy.injected == 10


def test_gives_up_after_bounded_retries(proxy, gcs_prefix, monkeypatch):
    write_bytes_atomic(join(gcs_prefix, "obj"), b"data")
    monkeypatch.setenv("MSIF_STORAGE_RETRIES", "4")
    proxy.set_faults(Faults(fail_first=None, pattern=r"alt=media"))
    uri = join(gcs_prefix, "obj")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        read_bytes(uri)
    assert time.monotonic() - started < 5
    assert str(err.value) == (
        f"{uri}: download gave up after 4 attempts (last error: HTTP 503 Service Unavailable)"
    )
    assert sum(1 for s in proxy.seen if "alt=media" in s.path) == 4


def test_permission_denied_is_not_retried(proxy, gcs_prefix):
    write_bytes_atomic(join(gcs_prefix, "obj"), b"data")
    proxy.clear()
    proxy.set_faults(Faults(fail_first=None, pattern=r"alt=media", status=403))
    with pytest.raises(StorageError, match=r"permission denied \(HTTP 403\)"):
        read_bytes(join(gcs_prefix, "obj"))
    assert [s.status for s in proxy.seen if "alt=media" in s.path] == [403]


class _TokenServer(BaseHTTPRequestHandler):
    """A stand-in OAuth token endpoint (there is no network here) issuing a fixed token."""

    token = "ya29.msif-test-SECRET-token-0123456789"

    def do_POST(self):  # noqa: N802 - stdlib hook name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps(
            {"access_token": self.token, "token_type": "Bearer", "expires_in": 3600}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _service_account(path: Path, token_uri: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "msif@test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
    return pem


def test_credentials_come_from_environment_and_never_leak(
    gcs_emulator, gcs_prefix, monkeypatch, caplog, tmp_path
):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pem = _service_account(
        tmp_path / "sa.json", f"http://127.0.0.1:{server.server_address[1]}/token"
    )
    caplog.set_level(logging.DEBUG)
    try:
        with fault_proxy(gcs_emulator.endpoint) as proxy:
            # Real credentials (ADC from the environment) against a custom endpoint.
            monkeypatch.delenv("STORAGE_EMULATOR_HOST")
            monkeypatch.setenv("API_ENDPOINT_OVERRIDE", proxy.endpoint)
            monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
            monkeypatch.setenv("MSIF_STORAGE_RETRIES", "2")
            _publish(gcs_prefix)
            errors = []
            for faults, uri in [
                (Faults(), join(gcs_prefix, "missing")),
                (Faults(fail_first=None, pattern="alt=media"), gcs_prefix),
                (Faults(fail_first=None, status=401), gcs_prefix),
            ]:
                proxy.set_faults(faults)
                with pytest.raises(StorageError) as err:
                    local_input_dir(uri, cache_dir=tmp_path / "cache")
                errors.append(str(err.value))
            sent = {s.authorization for s in proxy.seen if s.authorization}
    finally:
        server.shutdown()
        server.server_close()
    assert sent == {f"Bearer {_TokenServer.token}"}  # the environment's credentials were used
    assert "gave up after 2 attempts" in errors[1] and "permission denied" in errors[2]
    text = "\n".join(errors) + caplog.text
    for secret in (_TokenServer.token, pem.splitlines()[1]):
        assert secret not in text


# ----------------------------------------------------------------------------- Parquet

SIZES = [(37, 10), (0, 5), (53, 7)]  # (rows, row group size) per file; one file is empty
EXPECTED_IDS = [f"doc-{i:03d}" for i in range(90)]


def _corpus_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    first = 0
    for n, (rows, group) in enumerate(SIZES):
        ids = EXPECTED_IDS[first : first + rows]
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "text": pa.array(
                    [f"text of {i} " * (int(i[-1]) % 4 + 1) for i in ids], pa.string()
                ),
            }
        )
        pq.write_table(table, root / f"part-{n}.parquet", row_group_size=group)
        first += rows
    (root / "_SUCCESS").write_bytes(b"")  # writers' side files are not data
    return root


def _ids(source: ParquetSource, start: int, stop: int, batch_rows: int = 8) -> list[str]:
    out = []
    for batch in source.iter_batches(["id"], start, stop, batch_rows=batch_rows):
        assert 0 < batch.num_rows <= batch_rows
        out += batch.column("id").to_pylist()
    return out


@pytest.fixture
def corpora(gcs_prefix, tmp_path) -> dict[str, str]:
    local = _corpus_dir(tmp_path / "corpus")
    remote = join(gcs_prefix, "corpus")
    storage.upload_tree(local, remote)
    return {"local": str(local), "gs": remote}


def test_parquet_local_and_gs_give_identical_rows(corpora):
    sources = {k: ParquetSource.open(v) for k, v in corpora.items()}
    for kind, source in sources.items():
        assert source.num_rows == 90
        assert [f.rsplit("/", 1)[-1] for f in source.files] == [
            "part-0.parquet",
            "part-1.parquet",
            "part-2.parquet",
        ]
        assert source.schema.names == ["id", "text"]
        assert _ids(source, 0, 90) == EXPECTED_IDS
        assert _ids(source, 13, 71, batch_rows=4) == EXPECTED_IDS[13:71]
        assert _ids(source, 36, 38) == EXPECTED_IDS[36:38]  # across the empty file
        assert _ids(source, 40, 40) == []
        assert source.fingerprint() == ParquetSource.open(corpora[kind]).fingerprint()
    rows = {
        k: pa.Table.from_batches(list(s.iter_batches(["text", "id"]))) for k, s in sources.items()
    }
    assert rows["local"].equals(rows["gs"]) and rows["local"].column_names == ["text", "id"]
    assert read_table(corpora["gs"]).equals(read_table(corpora["local"]))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 90, 100])
def test_shard_ranges_partition_rows_exactly(num_shards, tmp_path):
    source = ParquetSource.open(str(_corpus_dir(tmp_path / "c")))
    ranges = [source.shard_range(s, num_shards) for s in range(num_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 90
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    assert [i for a, b in ranges for i in _ids(source, a, b)] == EXPECTED_IDS
    with pytest.raises(
        DataError, match=f"shard {num_shards} of {num_shards} is not a valid shard index"
    ):
        source.shard_range(num_shards, num_shards)


def test_gs_shards_and_globs(corpora):
    source = ParquetSource.open(corpora["gs"])
    assert [i for s in range(7) for i in _ids(source, *source.shard_range(s, 7))] == EXPECTED_IDS
    for root in corpora.values():
        globbed = ParquetSource.open(join(root, "part-[02].parquet"))
        assert len(globbed.files) == 2 and _ids(globbed, 0, 90) == EXPECTED_IDS
        listed = ParquetSource.open([join(root, "part-2.parquet"), join(root, "part-0.parquet")])
        assert _ids(listed, 0, 90) == EXPECTED_IDS[37:] + EXPECTED_IDS[:37]
        assert listed.fingerprint() != globbed.fingerprint()


def test_only_overlapping_row_groups_and_wanted_columns_are_fetched(proxy, gcs_prefix):
    ids = [f"doc-{i:05d}" for i in range(4000)]
    table = pa.table({"id": ids, "text": [os.urandom(40).hex() for _ in ids]})
    uri = join(gcs_prefix, "big.parquet")
    write_parquet_atomic(table, uri, row_group_size=400)
    source = ParquetSource.open(uri)
    size = storage.stat(uri).size

    def fetched(columns: list[str]) -> int:
        proxy.clear()
        rows = [b.to_pylist() for b in source.iter_batches(columns, 1210, 1230)]
        assert [r["id"] for batch in rows for r in batch] == ids[1210:1230]
        return sum(s.response_bytes for s in proxy.seen if "alt=media" in s.path)

    both, only_id = fetched(["id", "text"]), fetched(["id"])
    assert size / 12 < both < size / 8  # one row group of ten, not the file
    assert 0 < only_id < both / 4  # and only the chunks of the wanted columns


def test_parquet_errors(tmp_path):
    corpus = str(_corpus_dir(tmp_path / "c"))
    source = ParquetSource.open(corpus)
    source.require_columns([("id", "text"), ("id", "input_ids")])
    with pytest.raises(DataError) as err:
        source.require_columns([("id", "input_ids"), ("prompt", "completion")])
    assert str(err.value) == (
        f"corpus {corpus} has columns [id, text]; expected id+input_ids or prompt+completion"
    )
    with pytest.raises(DataError, match=r"row range \[5, 91\) is outside"):
        list(source.iter_batches(["id"], 5, 91))
    with pytest.raises(DataError, match="has no column"):
        list(source.iter_batches(["input_ids"]))

    with pytest.raises(StorageError, match="no such file or directory"):
        ParquetSource.open(str(tmp_path / "absent.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no Parquet files"):
        ParquetSource.open(str(tmp_path / "empty"))
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), tmp_path / "empty" / "e.parquet")
    with pytest.raises(DataError, match="holds no rows"):
        ParquetSource.open(str(tmp_path / "empty"))
    pq.write_table(pa.table({"id": [1]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match="has columns \\[id: int64\\] but"):
        ParquetSource.open([join(corpus, "part-0.parquet"), str(tmp_path / "other.parquet")])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        ParquetSource.open(str(tmp_path / "junk.parquet"))


def test_write_parquet_atomic_round_trip(gcs_prefix, tmp_path):
    table = pa.table({"query_id": ["q1", "q2"], "score": pa.array([0.5, -1.0], pa.float32())})
    for uri in (str(tmp_path / "out" / "s.parquet"), join(gcs_prefix, "s.parquet")):
        write_parquet_atomic(table, uri)
        assert read_table(uri).equals(table)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s.parquet"]
