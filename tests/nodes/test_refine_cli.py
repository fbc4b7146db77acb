"""`precondition-queries --refine-steps` on the mini world: the node's refined queries are the
library's on the same seeded samples; K = 0 is the plain node; bad input and mixing refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import msif
from msif.attribution.precondition import PreconditionedQueries
from msif.attribution.refine import Refinement, StageSample, refinement_id, sample_rows
from msif.cli import main
from msif.data.examples import batches, tokenize_documents, tokenize_prompt_completion
from msif.data.models import load_model
from tests.support.cli_helpers import ALPHA, COMMON, run_nodes
from tests.support.mini_world import build

pytestmark = pytest.mark.e2e
STEPS, SAMPLES, SEED = 3, 6, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    w = build(root)
    return {**w, **run_nodes(w, root / "run", num_shards=2), "root": root}


def run(*argv) -> int:
    return main([str(a) for a in argv])


def precondition(world, out, *extra, method="multi-stage") -> int:
    return run(
        "precondition-queries", "--model", world["ft_model"], "--queries", world["queries"],
        "--method", method, "--ft-factors", world["ft_factors"], "--pt-factors",
        world["pt_factors"], "--alpha", ALPHA, "--out", out, *COMMON, *extra,
    )  # fmt: skip


def stage_data(world) -> list:
    return [
        "--pt-model", world["pt_model"], "--corpus", world["corpus"],
        "--finetune-data", world["finetune"],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def refined(world):
    out = world["root"] / "refined"
    argv = ["--refine-steps", STEPS, "--refine-samples", SAMPLES, "--seed", SEED]
    assert precondition(world, out, *argv, *stage_data(world)) == 0
    return out


def tokenized(world):
    pt, tok = load_model(world["pt_model"], device="cpu")
    ft, _ = load_model(world["ft_model"], device="cpu")
    corpus, pairs = pq.read_table(world["corpus"]), pq.read_table(world["finetune"])
    queries = pq.read_table(world["queries"])
    docs = tokenize_documents(
        tok, corpus.column("id").to_pylist(), corpus.column("text").to_pylist(), 32
    )
    ft_rows = tokenize_prompt_completion(
        tok, [f"row-{i}" for i in range(pairs.num_rows)], pairs.column("prompt").to_pylist(),
        pairs.column("completion").to_pylist(), 32,
    )  # fmt: skip
    qs = tokenize_prompt_completion(
        tok, queries.column("id").to_pylist(), queries.column("prompt").to_pylist(),
        queries.column("completion").to_pylist(), 32,
    )  # fmt: skip
    return pt, ft, docs, ft_rows, qs


def test_refined_node_equals_the_library_on_the_same_samples(world, refined):
    got = PreconditionedQueries.load(refined)
    record = got.info["refine"]
    assert record["steps"] == STEPS and set(record["stages"]) == {"ft", "pt"}
    pt, ft, docs, ft_rows, qs = tokenized(world)
    rows = {"pt": sample_rows(len(docs), SAMPLES, SEED), "ft": sample_rows(8, SAMPLES, SEED)}
    for stage, r in record["stages"].items():
        assert r["rows"] == rows[stage] and r["seed"] == SEED and r["sequences"] == SAMPLES
        assert len(r["residuals"]) == STEPS + 1 and r["residuals"][-1] < r["residuals"][0]
    assert record["stages"]["pt"]["model"] == world["pt_model"]
    assert record["stages"]["pt"]["data"] == world["corpus"]
    samples = {
        "pt": StageSample(pt, [docs[i] for i in rows["pt"]]),
        "ft": StageSample(ft, [ft_rows[i] for i in rows["ft"]]),
    }
    want = msif.precondition_queries(
        ft,
        batches(qs, 4, 0),
        [q.id for q in qs],
        ft_factors=msif.Factors.load(world["ft_factors"]),
        pt_factors=msif.Factors.load(world["pt_factors"]),
        alpha=ALPHA,
        refine=Refinement(STEPS, samples, rows=4),
    )
    for k, w in want.dense.items():
        torch.testing.assert_close(got.dense[k], w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
    plain = PreconditionedQueries.load(world["pre"])
    assert any(not torch.allclose(got.dense[k], plain.dense[k]) for k in plain.dense)


def test_zero_steps_with_the_stage_data_is_the_plain_node(world, tmp_path):
    assert precondition(world, tmp_path / "k0", "--refine-steps", 0, *stage_data(world)) == 0
    got, plain = (
        PreconditionedQueries.load(tmp_path / "k0"),
        PreconditionedQueries.load(world["pre"]),
    )
    assert all(torch.equal(got.dense[k], plain.dense[k]) for k in plain.dense)
    assert "refine" not in got.info


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msif: error: "), err
    return err[0]


def test_refinement_without_its_stage_data_is_refused(world, tmp_path, capsys):
    given = stage_data(world)
    without_corpus = given[:2] + given[4:]
    assert precondition(world, tmp_path / "a", "--refine-steps", 2, *without_corpus) == 1
    assert "--refine-steps 2 with --method multi-stage needs --corpus" in one_line_error(capsys)
    single = ["--method", "single-stage", "--refine-steps", 2]
    assert precondition(world, tmp_path / "b", *single, *given[:4]) == 1
    assert "needs --finetune-data (the fine-tuning data)" in one_line_error(capsys)
    assert precondition(world, tmp_path / "c", "--refine-steps", -1) == 2
    assert "--refine-steps must be at least 0" in capsys.readouterr().err
    # θ_ft given as θ_pt: the pre-train stage's exact products would be of the wrong model.
    swapped = ["--refine-steps", 1, *given[2:], "--pt-model", world["ft_model"]]
    assert precondition(world, tmp_path / "d", *swapped) == 1
    assert "pt stage's refinement model" in one_line_error(capsys)
    assert not any((tmp_path / x).exists() for x in "abcd")


def score(world, pre, shard, out, *extra) -> int:
    return run(
        "score-corpus", "--model", world["pt_model"], "--corpus", world["corpus"],
        "--preconditioned", pre, "--shard", shard, "--num-shards", 2, "--out", out,
        *COMMON, *extra,
    )  # fmt: skip


def test_scores_of_differently_refined_queries_are_not_merged(world, refined, tmp_path, capsys):
    assert score(world, refined, 0, tmp_path / "s0") == 0
    info = json.loads((tmp_path / "s0" / "scores.json").read_text())
    assert info["refinement"] == refinement_id(PreconditionedQueries.load(refined).info)
    assert info["refinement"].startswith(f"K{STEPS}-")
    plain_shard_1 = Path(world["shards"][1])
    assert json.loads((plain_shard_1 / "scores.json").read_text())["refinement"] is None
    code = run(
        "rank", "--scores", tmp_path / "s0", plain_shard_1, "--corpus", world["corpus"],
        "--queries", world["queries"], "--out", tmp_path / "rank",
    )  # fmt: skip
    assert code == 1
    assert "shard 1 was scored with queries refined otherwise (EK-FAC alone)" in one_line_error(
        capsys
    )


def test_candidates_of_other_refinement_are_not_reranked(world, refined, tmp_path, capsys):
    index = []
    for shard in range(2):
        index.append(tmp_path / "index" / str(shard))
        assert run(
            "index", "--model", world["pt_model"], "--corpus", world["corpus"],
            "--pt-factors", world["pt_factors"], "--shard", shard, "--num-shards", 2,
            "--out", index[-1], *COMMON,
        ) == 0  # fmt: skip
    lookup = ["lookup", "--index", *index, "--top-c", 4]
    assert run(*lookup, "--preconditioned", world["pre"], "--out", tmp_path / "cand") == 0
    assert run(*lookup, "--preconditioned", refined, "--out", tmp_path / "cand-k") == 0
    cand = json.loads((tmp_path / "cand-k" / "candidates.json").read_text())
    assert cand["refinement"] == refinement_id(PreconditionedQueries.load(refined).info)
    assert score(world, refined, 0, tmp_path / "ok", "--candidates", tmp_path / "cand-k") == 0
    assert score(world, refined, 0, tmp_path / "no", "--candidates", tmp_path / "cand") == 1
    assert "looked up with queries refined otherwise (EK-FAC alone)" in one_line_error(capsys)
