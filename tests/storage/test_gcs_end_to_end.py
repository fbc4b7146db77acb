"""gs:// end to end against a real GCS emulator: every CLI node, and the KFP pipeline through
kfp.local, give the ranking of the same run on local paths."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif.storage import gcs as storage
from msif.storage.cache import local_input_dir
from msif.storage.publish import is_complete
from msif.storage.uri import join
from msif.testing import DEFAULT_BUCKET
from msif.testing.memcheck import reset_peak
from tests.support.cli_helpers import COMMON, cli, dag_settings, run_nodes
from tests.support.limits import time_limit
from tests.support.mini_world import WORDS, build

TRIM = os.environ.get("MSIF_TRIM") == "1"
KEY = ["method", "query_id", "rank", "doc_id"]

pytestmark = pytest.mark.e2e


# ----------------------------------------------------------------------------- helpers


def one_torch_thread() -> Iterator[None]:
    """Generator body of a fixture running its scope with torch on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, one torch thread, and extra."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def fresh_prefix(name: str) -> str:
    """A new, empty gs:// prefix in the emulator's test bucket."""
    return f"gs://{DEFAULT_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def upload_world(world: dict[str, str], prefix: str) -> dict[str, str]:
    """Upload the mini world under prefix; the gs:// URIs the nodes are given.

    The corpus is given as a prefix holding its Parquet file, the other tables as single
    objects, the models as save_pretrained prefixes: each way a user names gs:// inputs.
    """
    uris = {"corpus": join(prefix, "corpus")}
    storage.upload_file(world["corpus"], join(uris["corpus"], Path(world["corpus"]).name))
    for key in ("finetune", "queries"):
        uris[key] = join(prefix, Path(world[key]).name)
        storage.upload_file(world[key], uris[key])
    for key in ("pt_model", "ft_model"):
        uris[key] = join(prefix, key)
        storage.upload_tree(world[key], uris[key])
    return uris


def ranking_rows(ranking_uri: str, methods: Sequence[str] | None = None) -> list[dict]:
    """The rows of a published ranking (local or gs://), in (method, query, rank) order."""
    rows = pq.read_table(local_input_dir(ranking_uri) / "ranking.parquet").to_pylist()
    rows = [r for r in rows if methods is None or r["method"] in methods]
    return sorted(rows, key=lambda r: [r[k] for k in KEY[:3]])


def assert_same_ranking(got: list[dict], want: list[dict]) -> None:
    """Same documents at the same ranks, scores equal to float32 precision."""
    assert got, "empty ranking"
    assert [[r[k] for k in KEY] for r in got] == [[r[k] for k in KEY] for r in want]
    scale = max(abs(r["score"]) for r in want)
    assert [r["score"] for r in got] == pytest.approx(
        [r["score"] for r in want], rel=1e-5, abs=1e-6 * scale
    )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return build(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def gs_world(gcs_emulator, world) -> dict[str, str]:
    return upload_world(world, fresh_prefix("world"))


@pytest.fixture(scope="module")
def local_run(world, tmp_path_factory) -> dict[str, str]:
    with time_limit(300, "the local CLI run"):
        return run_nodes(world, str(tmp_path_factory.mktemp("local-run")))


@pytest.fixture(scope="module")
def gs_run(gs_world) -> dict[str, str]:
    with time_limit(300, "the gs:// CLI run"):
        return run_nodes(gs_world, fresh_prefix("run"))


@pytest.fixture(autouse=True)
def _bounded():
    with time_limit(600, "the test"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on shared cores a second one spins and slows scoring manyfold."""
    yield from one_torch_thread()


# ----------------------------------------------------------------------------- CLI


def test_cli_on_gs_gives_the_local_ranking(gs_world, gs_run, local_run):
    assert_same_ranking(ranking_rows(gs_run["ranking"]), ranking_rows(local_run["ranking"]))
    methods = {r["method"] for r in ranking_rows(gs_run["ranking"])}
    assert methods == {"multi-stage", "single-stage", "gradient-dot", "bm25"}
    assert len(ranking_rows(gs_run["ranking"], ["multi-stage"])) == 3 * 12

    got = local_input_dir(gs_run["ranking"])
    want = local_input_dir(local_run["ranking"])
    assert json.loads((got / "metrics.json").read_text()) == json.loads(
        (want / "metrics.json").read_text()
    )
    # Every output went to the bucket, published with its marker.
    tasks = ("fit-covariance-pt/0", "fit-covariance-pt/1", "eigendecompose-pt", "fit-lambda-ft/1")
    tasks += ("build-factors-ft", "precondition-queries-multi-stage", "score-corpus-multi-stage/1")
    for name in tasks:
        assert is_complete(join(gs_run["out"], name)), name
    assert sorted(o.uri.rsplit("/", 1)[-1] for o in storage.list_objects(gs_run["ranking"])) == [
        "_MSIF_COMPLETE.json",
        "metrics.json",
        "ranking.parquet",
        "report.html",
        "report.md",
    ]
    # The nodes read the gs:// inputs themselves (no local copy was handed to them).
    shard = json.loads((local_input_dir(gs_run["scores-0"]) / "scores.json").read_text())
    assert shard["corpus"] == gs_world["corpus"] and shard["model"] == gs_world["pt_model"]


# ----------------------------------------------------------------------------- kfp.local

_PIPELINE_CHILD = """
import json, sys
from pathlib import Path
from msif.workflow.local_run import run_pipeline_locally
params, root = json.loads(sys.argv[1]), Path(sys.argv[2])
print(json.dumps(run_pipeline_locally(params, root)))
"""


@pytest.mark.slow
def test_kfp_local_with_gs_inputs_gives_the_inprocess_run(gs_world, world, tmp_path):
    """kfp.local runs every component (ParallelFor, Collected, optional inputs) with gs://
    inputs and produces exactly the ranking, metrics and UI artifacts of the same nodes called
    in-process on local files."""
    from msif.evaluation.metrics import kfp_metrics
    from msif.main_job import run_inprocess

    num_shards = 1 if TRIM else 2  # trimmed: fewer tasks, same code paths
    settings = dag_settings(num_shards)
    reference = run_inprocess(
        {k: world[k] for k in ("pt_model", "ft_model", "corpus", "finetune", "queries")},
        tmp_path / "inprocess",
        settings,
    )
    # Local and gs:// inputs mix freely; the pipeline's nodes use --device auto.
    params = settings.parameters({**gs_world, "finetune": world["finetune"]})
    params["device"] = "auto"
    # A child process bounds the whole run in time; kfp.local runs each task in its own.
    child = subprocess.run(
        [sys.executable, "-c", _PIPELINE_CHILD, json.dumps(params), str(tmp_path / "kfp")],
        capture_output=True,
        text=True,
        timeout=540,
        env=child_env(CUDA_VISIBLE_DEVICES=""),  # pipeline nodes use --device auto
    )
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    metrics = json.loads(Path(out["metrics_json"]).read_text())
    assert set(metrics["methods"]) == {"multi-stage", "single-stage", "gradient-dot", "bm25"}
    want = reference["metrics"]["methods"]
    assert {m: pytest.approx(v) for m, v in want.items()} == metrics["methods"]
    assert out["kfp_metrics"] == pytest.approx(kfp_metrics(metrics))
    ranking = Path(out["ranking"])
    assert Path(out["report_md"]).read_text() == (ranking / "report.md").read_text()
    assert Path(out["report_html"]).read_bytes() == (ranking / "report.html").read_bytes()
    got = pq.read_table(out["ranking_parquet"]).to_pylist()
    want = pq.read_table(Path(reference["ranking"]) / "ranking.parquet").to_pylist()
    assert [[r[k] for k in [*KEY, "relevant"]] for r in got] == [
        [r[k] for k in [*KEY, "relevant"]] for r in want
    ]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5)


# ----------------------------------------------------------------------------- streaming

_MEASURE_CHILD = """
import json, sys
import torch
from msif.cli import main
from msif.testing.memcheck import reset_peak, status_kib
torch.set_num_threads(1)
model, pre, warm, corpus, out, *common = sys.argv[1:]
def score(data, dest):
    argv = ["score-corpus", "--model", model, "--corpus", data, "--preconditioned", pre]
    assert main([*argv, "--top-k", "5", "--out", dest, *common]) == 0
score(warm, out + "-warm")  # every lazy import and one-off allocation happens here
assert reset_peak()
before = status_kib("VmRSS")
score(corpus, out)
print(json.dumps({"peak_growth_kib": status_kib("VmHWM") - before}))
"""

FILLER_BYTES = 16 << 10  # per document; the tail past max-length is read, then truncated


def filler_corpus(path: Path, num_docs: int, seed: int) -> int:
    """A corpus of ~16 KiB documents (a few words, then one long untokenisable word); its
    total text size in bytes."""
    rng = random.Random(seed)
    texts = [
        " ".join(rng.choice(WORDS) for _ in range(12))
        + " "
        + rng.randbytes(FILLER_BYTES // 2).hex()
        for _ in range(num_docs)
    ]
    ids = [f"big-{i:05d}" for i in range(num_docs)]
    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=64)
    return sum(len(t) for t in texts)


@pytest.mark.skipif(not reset_peak(), reason="needs Linux /proc/self/clear_refs")
def test_scoring_a_gs_corpus_streams_in_flat_memory(gs_world, tmp_path):
    """Peak RSS growth of `msif score` over a gs:// corpus 8× larger stays nearly the same."""
    prefix = fresh_prefix("stream")
    pre = join(prefix, "pre")
    cli(
        "precondition-queries",
        *("--model", gs_world["ft_model"], "--queries", gs_world["queries"]),
        *("--method", "gradient-dot", "--out", pre),
        *COMMON,
    )
    sizes = {"warm": 8, "1x": 300, "8x": 2400}  # 2400 documents ≫ batch (16) and row group (64)
    text_bytes = {}
    for name, n in sizes.items():
        local = tmp_path / f"{name}.parquet"
        text_bytes[name] = filler_corpus(local, n, seed=n)
        storage.upload_file(local, join(prefix, f"{name}.parquet"))
    common = ["--max-length", "32", "--batch-size", "16", "--no-progress", "--device", "cpu"]
    children = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                _MEASURE_CHILD,
                *(gs_world["pt_model"], pre, join(prefix, "warm.parquet")),
                *(join(prefix, f"{name}.parquet"), join(prefix, f"scores-{name}"), *common),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for name in ("1x", "8x")  # in parallel: two cores, one torch thread each
    }
    growth = {}
    try:
        for name, child in children.items():
            stdout, stderr = child.communicate(timeout=300)
            assert child.returncode == 0, stderr[-3000:]
            growth[name] = json.loads(stdout.strip().splitlines()[-1])["peak_growth_kib"] / 1024
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
    extra_text = (text_bytes["8x"] - text_bytes["1x"]) / 2**20
    print(  # shown with pytest -s, for the record
        f"\nmsif score over gs:// (batch 16, row group 64, ~16 KiB documents): peak RSS growth "
        f"{growth['1x']:.1f} MiB for {sizes['1x']} documents ({text_bytes['1x'] / 2**20:.1f} "
        f"MiB of text), {growth['8x']:.1f} MiB for {sizes['8x']} documents "
        f"({text_bytes['8x'] / 2**20:.1f} MiB of text)"
    )
    for name in ("1x", "8x"):
        info = local_input_dir(join(prefix, f"scores-{name}")) / "scores.json"
        assert json.loads(info.read_text())["num_docs"] == sizes[name]  # every row streamed
    # Holding the corpus would add at least its text (as Arrow, then again as Python str).
    assert growth["8x"] - growth["1x"] < 0.25 * extra_text
