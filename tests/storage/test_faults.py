"""Faults on gs:// against a real GCS emulator: a scoring process killed mid-shard, a lost
shard output, transient 503s and permanent errors. Every node either publishes a complete
output or nothing, and a rerun gives the uninterrupted result."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif.cli import main
from msif.storage import gcs as storage
from msif.storage.publish import MARKER, is_complete
from msif.storage.uri import join, split_gs
from msif.testing import Faults, fault_proxy
from tests.storage.test_gcs_end_to_end import (
    COMMON,
    assert_same_ranking,
    child_env,
    cli,
    fresh_prefix,
    one_torch_thread,
    ranking_rows,
    time_limit,
    upload_world,
)
from tests.support.mini_world import WORDS, build

pytestmark = pytest.mark.e2e

NO_BUCKET = "gs://msif-no-such-bucket"
BIG_DOCS = 2000  # ~1 s of scoring per shard of 2 here: long enough to be killed mid-way


# ----------------------------------------------------------------------------- helpers


def score(w: dict[str, str], pre: str, corpus: str, shard: int, num_shards: int, out: str) -> int:
    """`msif score` in-process; its exit code."""
    argv = ["score-corpus", "--model", w["pt_model"], "--corpus", corpus, "--preconditioned", pre]
    argv += ["--shard", str(shard), "--num-shards", str(num_shards), "--top-k", "10"]
    return main([*argv, "--out", out, *COMMON])


def rank(w: dict[str, str], shards: list[str], corpus: str, out: str) -> int:
    """`msif rank` in-process; its exit code."""
    argv = ["rank", "--scores", *shards, "--corpus", corpus, "--queries", w["queries"]]
    return main([*argv, "--top-k", "10", "--out", out])


def one_line_error(capsys) -> str:
    """The single `msif: error: ...` line a failed node printed."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msif: error: "), err
    return err[0]


def nothing_under(uri: str) -> bool:
    """No object at all under a gs:// prefix."""
    return storage.list_objects(uri) == []


def delete(uri: str) -> None:
    """Delete one object, as an operator or a lifecycle rule would."""
    from google.cloud.storage import Client

    bucket, key = split_gs(uri)
    Client().bucket(bucket).blob(key).delete()


def big_corpus(path: Path, num_docs: int) -> None:
    """A corpus of num_docs mini-world-like documents (the mini world's words)."""
    rng = random.Random(7)
    texts = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(num_docs)
    ]
    ids = [f"big-{i:05d}" for i in range(num_docs)]
    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=50)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def w(gcs_emulator, tmp_path_factory) -> dict[str, str]:
    """The mini world on gs://, a 2000-document corpus beside it, and gradient-dot queries
    (no factors needed: these tests are about storage, not curvature)."""
    root = tmp_path_factory.mktemp("faults")
    world = build(root / "world")
    prefix = fresh_prefix("faults-world")
    uris = upload_world(world, prefix)
    big_corpus(root / "big.parquet", BIG_DOCS)
    uris["big"] = join(prefix, "big", "big.parquet")
    storage.upload_file(root / "big.parquet", uris["big"])
    uris["pre"] = join(prefix, "pre")
    with time_limit(120, "precondition-queries"):
        cli(
            "precondition-queries",
            *("--model", uris["ft_model"], "--queries", uris["queries"]),
            *("--method", "gradient-dot", "--out", uris["pre"]),
            *COMMON,
        )
    return uris


@pytest.fixture(scope="module")
def reference(w) -> dict[str, str]:
    """The mini corpus scored in 2 shards and ranked, with no fault anywhere."""
    out = fresh_prefix("faults-reference")
    shards = [join(out, f"scores-{i}") for i in range(2)]
    with time_limit(120, "the reference run"):
        for i, s in enumerate(shards):
            assert score(w, w["pre"], w["corpus"], i, 2, s) == 0
        assert rank(w, shards, w["corpus"], join(out, "ranking")) == 0
    return {"shards": shards, "ranking": join(out, "ranking")}


@pytest.fixture(autouse=True)
def _bounded():
    with time_limit(300, "the test"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


# ----------------------------------------------------------------------------- (a) kill


def _start_killable_score(w: dict[str, str], out: str, tmp: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m msif.cli score` (shard 0 of 2 of the big corpus) with its progress bar on."""
    argv = [
        "score-corpus",
        "--model",
        w["pt_model"],
        "--corpus",
        w["big"],
        "--preconditioned",
        w["pre"],
    ]
    argv += ["--shard", "0", "--num-shards", "2", "--top-k", "10", "--out", out]
    argv += ["--max-length", "32", "--batch-size", "4", "--device", "cpu"]
    (tmp / "scratch").mkdir()
    log = tmp / "stderr.txt"
    with log.open("wb") as fh:
        process = subprocess.Popen(
            [sys.executable, "-m", "msif.cli", *argv],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            env=child_env(TMPDIR=str(tmp / "scratch")),  # where its staging dir goes
        )
    return process, log


def _wait_until_scoring(process: subprocess.Popen, log: Path, timeout: float = 120) -> int:
    """Batches done when the progress bar first shows some; the process is still scoring."""
    bar = re.compile(r"score \(gradient-dot\):\s*([1-9]\d*)it")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = bar.findall(log.read_text(errors="replace"))
        if found:
            return int(found[-1])
        if process.poll() is not None:
            pytest.fail(f"score exited ({process.returncode}) before scoring: {log.read_text()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("score showed no progress in time")


def test_killed_scoring_publishes_nothing_and_a_rerun_completes(w, tmp_path):
    out = fresh_prefix("killed")
    shards = [join(out, "scores-0"), join(out, "scores-1")]
    assert score(w, w["pre"], w["big"], 1, 2, shards[1]) == 0

    process, log = _start_killable_score(w, shards[0], tmp_path)
    try:
        done = _wait_until_scoring(process, log)
        process.send_signal(signal.SIGKILL)  # a lost pod: no cleanup code runs
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert 0 < done < BIG_DOCS // 2 // 4, "the process was not killed mid-shard"
    assert not is_complete(shards[0])
    assert nothing_under(shards[0])  # killed before publishing: not even partial files
    assert storage.exists(join(shards[1], MARKER))

    assert score(w, w["pre"], w["big"], 0, 2, shards[0]) == 0  # the retry of the lost task
    assert is_complete(shards[0])
    assert rank(w, shards, w["big"], join(out, "ranking")) == 0

    whole = join(out, "uninterrupted")
    assert score(w, w["pre"], w["big"], 0, 1, whole) == 0
    assert rank(w, [whole], w["big"], join(out, "uninterrupted-ranking")) == 0
    got = ranking_rows(join(out, "ranking"))
    assert len(got) == 3 * 10
    assert_same_ranking(got, ranking_rows(join(out, "uninterrupted-ranking")))


# ----------------------------------------------------------------------------- (b) lost output


def test_rank_refuses_a_lost_shard_output(w, reference, capsys):
    out = fresh_prefix("lost")
    shards = [join(out, f"scores-{i}") for i in range(2)]
    for i, s in enumerate(shards):
        assert score(w, w["pre"], w["corpus"], i, 2, s) == 0
    capsys.readouterr()
    ranking = join(out, "ranking")

    delete(join(shards[1], MARKER))  # the data files stay, unvouched for
    assert rank(w, shards, w["corpus"], ranking) == 1
    assert one_line_error(capsys) == (
        f"msif: error: {shards[1]} is incomplete or missing: no {MARKER}"
    )
    assert nothing_under(ranking)

    for obj in storage.list_objects(shards[0]):  # the whole output is gone
        delete(obj.uri)
    assert rank(w, shards, w["corpus"], ranking) == 1
    assert one_line_error(capsys) == (
        f"msif: error: {shards[0]} is incomplete or missing: no {MARKER}"
    )
    left = [o.uri for o in storage.list_objects(shards[1])]
    assert left and all("/msif-v-" in u for u in left)  # its version, now unvouched for
    assert nothing_under(ranking)

    # A version without a marker is what a process killed while uploading leaves: the
    # rerun publishes over it (and removes it).
    for i, s in enumerate(shards):
        assert score(w, w["pre"], w["corpus"], i, 2, s) == 0
    assert rank(w, shards, w["corpus"], ranking) == 0
    assert_same_ranking(ranking_rows(ranking), ranking_rows(reference["ranking"]))


def test_rank_names_a_shard_left_out(w, reference, capsys):
    out = fresh_prefix("left-out")
    assert rank(w, reference["shards"][:1], w["corpus"], out) == 1
    assert one_line_error(capsys) == (
        "msif: error: gradient-dot shard scores: shard 1 of 2 is missing"
    )
    assert nothing_under(out)


# ----------------------------------------------------------------------------- (c) transient


@pytest.fixture
def proxy(gcs_emulator, monkeypatch):
    """A fault proxy in front of the emulator, used by msif.storage.gcs for this test."""
    with fault_proxy(gcs_emulator.endpoint) as p:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.endpoint)
        yield p


def test_transient_503s_are_retried_through_every_node(w, reference, proxy):
    out = fresh_prefix("flaky")
    shards = [join(out, f"scores-{i}") for i in range(2)]
    # Reads (the corpus' ranged reads, markers, downloads), uploads, listings: each fails a
    # few times, with 503s or with dropped connections.
    plan = [
        (
            Faults(fail_first=3, pattern=r"alt=media"),
            lambda: score(w, w["pre"], w["corpus"], 0, 2, shards[0]),
        ),
        (
            Faults(fail_first=2, pattern=r"^POST /upload/"),
            lambda: score(w, w["pre"], w["corpus"], 1, 2, shards[1]),
        ),
        (
            Faults(fail_first=2, pattern=r"^GET /storage/v1/b/[^/]+/o\?", mode="reset"),
            lambda: rank(w, shards, w["corpus"], join(out, "ranking")),
        ),
    ]
    for faults, node in plan:
        proxy.set_faults(faults)
        before = proxy.injected
        assert node() == 0
        assert proxy.injected - before == faults.fail_first
    assert_same_ranking(ranking_rows(join(out, "ranking")), ranking_rows(reference["ranking"]))

    proxy.clear()  # the retried task's rerun finds its output complete and writes nothing
    assert score(w, w["pre"], w["corpus"], 0, 2, shards[0]) == 0
    assert proxy.seen and all(s.method == "GET" for s in proxy.seen)


def test_endless_503s_give_up_in_bounded_time(w, proxy, capsys, monkeypatch):
    monkeypatch.setenv("MSIF_STORAGE_RETRIES", "3")
    out = fresh_prefix("down")
    proxy.set_faults(Faults(fail_first=None, pattern=r"^POST /upload/"))
    started = time.monotonic()
    assert score(w, w["pre"], w["corpus"], 0, 2, out) == 1
    assert time.monotonic() - started < 60
    line = one_line_error(capsys)
    assert "upload gave up after 3 attempts (last error: HTTP 503 Service Unavailable)" in line
    proxy.set_faults(Faults())
    assert nothing_under(out)


# ----------------------------------------------------------------------------- (d) permanent


def test_a_missing_bucket_is_one_line_and_publishes_nothing(
    w, reference, capsys, monkeypatch, tmp_path
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where staging dirs would be left
    missing = f"no such bucket '{NO_BUCKET[5:]}'"

    # As --out: refused before any work (score), or before publishing anything (rank).
    out = f"{NO_BUCKET}/scores"
    assert score(w, w["pre"], w["corpus"], 0, 2, out) == 1
    assert (
        one_line_error(capsys) == f"msif: error: {out}: checking the destination failed: {missing}"
    )
    out = f"{NO_BUCKET}/ranking"
    assert rank(w, reference["shards"], w["corpus"], out) == 1
    assert (
        one_line_error(capsys) == f"msif: error: {out}: checking the destination failed: {missing}"
    )

    out = fresh_prefix("no-corpus")
    corpus = f"{NO_BUCKET}/corpus"
    assert score(w, w["pre"], corpus, 0, 2, join(out, "scores")) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"msif: error: {corpus}: ") and line.endswith(missing)
    assert rank(w, reference["shards"], corpus, join(out, "ranking")) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"msif: error: {corpus}: ") and line.endswith(missing)
    assert nothing_under(out)
    assert list(scratch.iterdir()) == []
