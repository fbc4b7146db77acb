"""kfp.local runs of the `index` pipeline, then of the `attribute` pipeline on its outputs: at
full index rank and with every document a candidate, the attribute run's multi-stage and
gradient-dot rankings are the full pipeline's (same documents, same ranks, same scores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msif.workflow.dag import ATTRIBUTE, INDEX
from msif.workflow.local_run import pipeline_parameters
from tests.storage.test_gcs_end_to_end import assert_same_ranking, child_env, ranking_rows
from tests.support.cli_helpers import dag_settings
from tests.support.mini_world import build

pytestmark = pytest.mark.e2e
TRIM = os.environ.get("MSIF_TRIM") == "1"
INDEXED = ["multi-stage", "gradient-dot"]
# At or above the mini world's 32 tokens per document, the factored index is exact.
FULL_RANK = 32
NUM_DOCS = 12

_CHILD = """
import json, sys
from pathlib import Path
from msif.workflow.local_run import run_pipeline_locally
params, root, name = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
print(json.dumps(run_pipeline_locally(params, root, pipeline_name=name)))
"""


def run_locally(params: dict, root: Path, name: str) -> dict:
    """One kfp.local run of pipeline name in a child process, bounded in time."""
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(params), str(root), name],
        capture_output=True,
        text=True,
        timeout=540,
        env=child_env(CUDA_VISIBLE_DEVICES=""),
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_index_then_attribute_gives_the_full_pipeline_s_rankings(tmp_path):
    from msif.index.factored import CorpusIndex
    from msif.main_job import run_inprocess

    world = build(tmp_path / "world", num_docs=NUM_DOCS)
    settings = dag_settings(1 if TRIM else 2)  # trimmed: fewer tasks, same code paths
    reference = run_inprocess(world, tmp_path / "full", settings)
    params = settings.parameters(world)

    index_params = {k: v for k, v in params.items() if k in pipeline_parameters(INDEX)}
    indexed = run_locally({**index_params, "index_rank": FULL_RANK}, tmp_path / "kfp", INDEX)
    (pt_factors,) = indexed["outputs"]["build-factors-pt"]
    shards = indexed["outputs"]["index"]
    assert len(shards) == settings.num_shards
    assert {CorpusIndex.load(Path(s)).rank for s in shards} == {FULL_RANK}

    attribute_params = {k: v for k, v in params.items() if k in pipeline_parameters(ATTRIBUTE)}
    # Shards listed in reverse: lookup takes them in any order.
    attribute_params.update(pt_factors_uri=pt_factors, index_uris=shards[::-1], top_c=NUM_DOCS)
    attributed = run_locally(attribute_params, tmp_path / "kfp", ATTRIBUTE)

    got = ranking_rows(attributed["ranking"])
    assert {r["method"] for r in got} == {*INDEXED, "bm25"}  # single-stage is not indexed
    for method in INDEXED:
        want = ranking_rows(reference["ranking"], [method])
        assert len(want) == 3 * NUM_DOCS
        assert_same_ranking(ranking_rows(attributed["ranking"], [method]), want)
    # Every lookup kept every document: the rerank scored the whole corpus.
    for method in INDEXED:
        (lookup,) = attributed["outputs"][f"lookup-{method}"]
        assert json.loads((Path(lookup) / "candidates.json").read_text())["num_candidates"] == (
            NUM_DOCS
        )


def test_projected_index_in_process_gives_the_full_pipeline_s_rankings(tmp_path):
    """The same two pipelines walked in-process with the projected tier keeping every
    triplet and entry: exact, so the rankings are the full pipeline's; this checks that lookup gets
    the pre-train factors the projected index was built in."""
    from msif.config import IndexOptions
    from msif.ekfac.factors import Factors
    from msif.main_job import run_inprocess
    from msif.workflow.dag import option_parameters
    from msif.workflow.inprocess import primary_output, run_dag

    world = build(tmp_path / "world", num_docs=NUM_DOCS)
    settings = dag_settings(2)
    reference = run_inprocess(world, tmp_path / "full", settings)
    params = settings.parameters(world)
    index_params = {k: v for k, v in params.items() if k in pipeline_parameters(INDEX)}
    indexing = option_parameters(
        IndexOptions(index_tier="projected", index_values=10**8, index_rank=64)
    )
    runs = run_dag(
        {**index_params, **indexing},
        str(tmp_path / "index"),
        pipeline_name=INDEX,
    )
    pt_factors = primary_output(runs, "build-factors-pt")
    specs = Factors.load(pt_factors).specs.values()
    everything = 2 * sum(
        min(64, s.out_features, s.in_dim) * (s.out_features + s.in_dim) for s in specs
    )
    shards = [next(iter(o.values())).path for o in runs["index"].outputs]
    info = json.loads((Path(shards[0]) / "projected_index.json").read_text())
    assert info["info"]["values_per_document"] == everything
    attribute_params = {k: v for k, v in params.items() if k in pipeline_parameters(ATTRIBUTE)}
    attribute_params.update(pt_factors_uri=pt_factors, index_uris=shards, top_c=NUM_DOCS)
    attribute_params["candidates_from"] = "both"  # the bm25 task's output reaches each lookup
    runs = run_dag(attribute_params, str(tmp_path / "attribute"), pipeline_name=ATTRIBUTE)
    ranking = primary_output(runs, "rank")
    for method in INDEXED:
        info = json.loads(
            (Path(primary_output(runs, f"lookup-{method}")) / "candidates.json").read_text()
        )
        assert info["candidates_from"] == "both" and info["bm25"]
        assert_same_ranking(
            ranking_rows(ranking, [method]), ranking_rows(reference["ranking"], [method])
        )


def test_main_job_via_index_gives_the_full_main_job_s_results(tmp_path, capsys):
    """`msif run --via-index` (index then attribute) on the small world, with every document
    a candidate and a full-rank index: multi-stage and gradient-dot as in the plain main job."""
    from msif.cli import main

    argv = ["run", "--preset", "small", "--runner", "inprocess", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    via = ["--via-index", "--index-rank", "64", "--top-c", "1000"]
    assert main([*argv, *via, "--out", str(tmp_path / "via")]) == 0
    assert "done index" in capsys.readouterr().out
    full = json.loads((tmp_path / "full" / "summary.json").read_text())["metrics"]["methods"]
    got = json.loads((tmp_path / "via" / "summary.json").read_text())["metrics"]["methods"]
    assert set(got) == {*INDEXED, "bm25"}
    for method in got:
        assert got[method] == {k: pytest.approx(v) for k, v in full[method].items()}
