"""The msif command line end to end on a mini world: results, shards and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import msif
from msif.attribution.explain import predicted_token_scores
from msif.cli import main
from msif.data.examples import batches, tokenize_documents, tokenize_prompt_completion
from msif.data.models import load_model
from tests.support.cli_helpers import COMMON, run_nodes
from tests.support.mini_world import build, save_model, tokenizer_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("mini"))


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def pipeline(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run_nodes(world, out, num_shards=3, full=True)
    return out, Path(r["pt_factors"]), Path(r["ft_factors"]), [Path(s) for s in r["shards"]]


def test_cli_scores_equal_library_scores(world, pipeline):
    out, fpt, fft, _ = pipeline
    pt, tok = load_model(world["pt_model"], device="cpu")
    ft, _ = load_model(world["ft_model"], device="cpu")
    corpus = pq.read_table(world["corpus"])
    queries = pq.read_table(world["queries"])
    ids = corpus.column("id").to_pylist()
    docs = tokenize_documents(tok, ids, corpus.column("text").to_pylist(), 32)
    qs = tokenize_prompt_completion(
        tok,
        queries.column("id").to_pylist(),
        queries.column("prompt").to_pylist(),
        queries.column("completion").to_pylist(),
        32,
    )
    pre = msif.precondition_queries(
        ft,
        batches(qs, 4, 0),
        [q.id for q in qs],
        ft_factors=msif.Factors.load(fft),
        pt_factors=msif.Factors.load(fpt),
        alpha=0.05,
    )
    expected = msif.score(pt, batches(docs, 4, 0), pre).values
    ranking = pq.read_table(out / "rank" / "ranking.parquet").to_pylist()
    multi = [r for r in ranking if r["method"] == "multi-stage"]
    assert len(multi) == 3 * len(ids)  # top-k 20 > 12 documents: every document ranked
    for r in multi:
        q = queries.column("id").to_pylist().index(r["query_id"])
        want = float(expected[q, ids.index(r["doc_id"])])
        assert r["score"] == pytest.approx(want, rel=1e-4, abs=1e-4 * float(expected.abs().max()))
    for q in ("q0", "q1", "q2"):
        scores = [r["score"] for r in multi if r["query_id"] == q]
        assert scores == sorted(scores, reverse=True)
        assert [r["rank"] for r in multi if r["query_id"] == q] == list(range(1, 13))
    explained = [r for r in multi if r["tokens"]]
    assert explained and all(len(r["tokens"]) == len(r["token_scores"]) for r in explained)
    # Per-token parts cancel: their float32 sum holds to ~1e-7 of the largest score (4e3 here).
    scale = float(expected.abs().max())
    for r in explained:
        assert sum(r["token_scores"]) == pytest.approx(r["score"], rel=1e-5, abs=1e-6 * scale)
    # Token i carries the part of the score from predicting it, computed for its own query.
    assert len(explained) == len(multi)  # 4 documents per shard, explain_k 10
    qids = queries.column("id").to_pylist()
    pairs = [(qids.index(r["query_id"]), docs[ids.index(r["doc_id"])]) for r in explained]
    want = predicted_token_scores(pt, pairs, pre)
    for r, w in zip(explained, want, strict=True):
        assert r["token_scores"][0] == 0.0
        assert r["token_scores"] == pytest.approx(w, rel=1e-4, abs=1e-5 * scale)
    for i in range(3):
        info = json.loads((out / "score-corpus-multi-stage" / str(i) / "scores.json").read_text())
        assert info["token_scores"] == "predicted-token"
    full = pa.concat_tables(
        [
            pq.read_table(out / "score-corpus-multi-stage" / str(i) / "full_scores.parquet")
            for i in range(3)
        ]
    )
    assert full.num_rows == 3 * len(ids)


def test_rank_writes_metrics_and_report(pipeline):
    out = pipeline[0] / "rank"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"multi-stage", "single-stage", "gradient-dot", "bm25"}
    assert metrics["methods"]["multi-stage"]["num_queries"] == 2  # q2 has no relevant ids
    ranking = pq.read_table(out / "ranking.parquet").to_pylist()
    for method in ("multi-stage", "bm25"):
        rows = [r for r in ranking if r["method"] == method]
        rr = []
        for q in ("q0", "q1"):
            hits = [r["rank"] for r in rows if r["query_id"] == q and r["relevant"]]
            rr.append(1 / min(hits) if hits else 0.0)
        assert metrics["methods"][method]["mrr"] == pytest.approx(sum(rr) / 2)
    html = (out / "report.html").read_text()
    assert "multi-stage" in html and "data:image/png;base64," in html


def test_deterministic_reruns(world, pipeline, tmp_path):
    out = pipeline[0]
    args = [
        "fit-covariance",
        "--model",
        world["pt_model"],
        "--data",
        world["corpus"],
        "--stage",
        "pt",
        "--shard",
        0,
        "--num-shards",
        3,
        *COMMON,
    ]
    assert run(*args, "--out", tmp_path / "again") == 0
    a = (tmp_path / "again" / "covariance.safetensors").read_bytes()
    assert a == (out / "fit-covariance-pt" / "0" / "covariance.safetensors").read_bytes()


def test_missing_shard_is_refused(world, pipeline, tmp_path, capsys):
    out, _, _, shards = pipeline
    assert (
        run(
            "eigendecompose", "--partials", out / "fit-covariance-pt" / "0", "--out", tmp_path / "e"
        )
        == 1
    )
    assert "shard 1 of 3 is missing" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert (
        run(
            "rank",
            "--scores",
            shards[0],
            shards[2],
            "--corpus",
            world["corpus"],
            "--queries",
            world["queries"],
            "--out",
            tmp_path / "r",
        )
        == 1
    )
    assert "shard 1 of 3 is missing" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_rank_refuses_scores_of_other_queries(world, pipeline, tmp_path, capsys):
    out, _, _, shards = pipeline
    other = tmp_path / "queries.parquet"
    table = pq.read_table(world["queries"])
    pq.write_table(table.slice(0, 2), other)
    assert (
        run(
            "rank",
            "--scores",
            *shards,
            "--corpus",
            world["corpus"],
            "--queries",
            other,
            "--out",
            tmp_path / "r",
        )
        == 1
    )
    assert "scored for other queries" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msif: error: "), err
    return err[0]


def test_bad_inputs_give_one_line_errors(world, pipeline, tmp_path, capsys):
    out, fpt, fft, _ = pipeline
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"name": ["a"], "body": ["b c"]}), bad)
    assert (
        run(
            "fit-covariance",
            "--model",
            world["pt_model"],
            "--data",
            bad,
            "--stage",
            "pt",
            "--out",
            tmp_path / "o",
            *COMMON,
        )
        == 1
    )
    assert "expected `text` (--text-column) or `input_ids`" in one_line_error(capsys)
    empty = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty
    )
    assert (
        run(
            "score-corpus",
            "--model",
            world["pt_model"],
            "--corpus",
            empty,
            "--preconditioned",
            out / "precondition-queries-multi-stage",
            "--out",
            tmp_path / "o",
            *COMMON,
        )
        == 1
    )
    assert "empty" in one_line_error(capsys)
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["w1 w2", "   "]}), blank)
    assert (
        run(
            "fit-covariance",
            "--model",
            world["pt_model"],
            "--data",
            blank,
            "--stage",
            "pt",
            "--out",
            tmp_path / "o",
            *COMMON,
        )
        == 1
    )
    assert "document 'b' is empty" in one_line_error(capsys)
    # Factors of another model: the fine-tune factors given as pre-train ones and vice versa.
    assert (
        run(
            "precondition-queries",
            "--model",
            world["ft_model"],
            "--queries",
            world["queries"],
            "--ft-factors",
            fpt,
            "--pt-factors",
            fft,
            "--out",
            tmp_path / "o",
            *COMMON,
        )
        == 1
    )
    assert "'pt' factors, expected 'ft'" in one_line_error(capsys)
    assert (
        run(
            "score-corpus",
            "--model",
            world["ft_model"],
            "--corpus",
            world["corpus"],
            "--preconditioned",
            out / "precondition-queries-multi-stage",
            "--out",
            tmp_path / "o",
            *COMMON,
        )
        == 1
    )
    assert "other model weights" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_tokenizer_model_mismatch(tmp_path, capsys):
    tok = tokenizer_for(["a b c d e f g h"])
    save_model(tmp_path / "m", tok, 0, vocab=4)
    pq.write_table(pa.table({"id": ["x"], "text": ["a b c"]}), tmp_path / "c.parquet")
    assert (
        run(
            "fit-covariance",
            "--model",
            tmp_path / "m",
            "--data",
            tmp_path / "c.parquet",
            "--stage",
            "pt",
            "--out",
            tmp_path / "o",
            *COMMON,
        )
        == 1
    )
    assert "tokenizer has" in one_line_error(capsys)


def test_cli_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["score-corpus", "--model", "m"])
    assert e.value.code == 2
    assert "required" in capsys.readouterr().err


def test_rerun_of_a_complete_shard_is_skipped(world, pipeline, caplog):
    out = pipeline[0]
    marker = out / "score-corpus-multi-stage" / "1" / "_MSIF_COMPLETE.json"
    before = marker.read_bytes()
    argv = [
        "score-corpus",
        "--model",
        world["pt_model"],
        "--corpus",
        world["corpus"],
        "--preconditioned",
        out / "precondition-queries-multi-stage",
        "--shard",
        1,
        "--num-shards",
        3,
        "--top-k",
        20,
        "--full",
        "--out",
        out / "score-corpus-multi-stage" / "1",
        *COMMON,
    ]
    with caplog.at_level("INFO", logger="msif"):
        assert run(*argv) == 0
    assert "skipped" in caplog.text
    assert marker.read_bytes() == before
    manifest = json.loads(before)
    assert manifest["metadata"]["wall_s"] > 0
