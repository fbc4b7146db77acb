"""`msif index`, `msif lookup` and `score-corpus --candidates` on the mini world: a full-rank
index reproduces the scan's scores and its exact rerank the scan's top-k; bad inputs refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from msif.cli import main
from tests.support.cli_helpers import COMMON, run_nodes
from tests.support.mini_world import build

pytestmark = pytest.mark.e2e
TOP_K = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    w = build(root)
    r = run_nodes(w, root / "run", num_shards=2, full=True)
    return {**w, **r, "root": root}


def msif(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, f"msif {' '.join(map(str, argv))} failed"


def index_shards(world, name: str, rank: int, num_shards: int = 2, *extra) -> list[Path]:
    outs = []
    for shard in range(num_shards):
        out = world["root"] / name / str(shard)
        msif(
            "index", "--model", world["pt_model"], "--corpus", world["corpus"],
            "--pt-factors", world["pt_factors"], "--shard", shard, "--num-shards", num_shards,
            "--index-rank", rank, "--out", out, *COMMON, *extra,
        )  # fmt: skip
        outs.append(out)
    return outs


def scan_scores(world) -> dict[tuple[str, str], float]:
    """Every document's exact multi-stage score (score-corpus --full of the DAG run)."""
    rows = []
    for shard in world["shards"]:
        rows += pq.read_table(Path(shard) / "full_scores.parquet").to_pylist()
    return {(r["query_id"], r["doc_id"]): r["score"] for r in rows}


def test_full_rank_lookup_and_rerank_give_the_scan(world, tmp_path):
    shards = index_shards(world, "index-full", 32)
    info = json.loads((shards[0] / "index.json").read_text())
    assert info["rank"] == 32 and info["info"]["node"] == "index"
    msif("lookup", "--index", *shards, "--preconditioned", world["pre"], "--top-c", 4,
         "--out", tmp_path / "cand")  # fmt: skip
    cand = pq.read_table(tmp_path / "cand" / "candidates.parquet").to_pylist()
    exact = scan_scores(world)
    queries = sorted({q for q, _ in exact})
    assert len(cand) == 4 * len(queries)
    for r in cand:
        want = exact[(r["query_id"], r["doc_id"])]
        assert r["index_score"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    for q in queries:
        best = sorted((d for qq, d in exact if qq == q), key=lambda d: -exact[(q, d)])[:4]
        got = [
            r["doc_id"] for r in sorted(cand, key=lambda r: r["index_rank"]) if r["query_id"] == q
        ]
        assert got == best
    # The exact rerank scores only the candidates' union, and gets their scan scores.
    for shard in range(2):
        msif(
            "score-corpus", "--model", world["pt_model"], "--corpus", world["corpus"],
            "--preconditioned", world["pre"], "--candidates", tmp_path / "cand",
            "--shard", shard, "--num-shards", 2, "--top-k", TOP_K,
            "--out", tmp_path / "rerank" / str(shard), *COMMON,
        )  # fmt: skip
    union = {r["doc_id"] for r in cand}
    scored = []
    for shard in range(2):
        info = json.loads((tmp_path / "rerank" / str(shard) / "scores.json").read_text())
        assert info["num_candidates"] == len(union)
        scored += pq.read_table(tmp_path / "rerank" / str(shard) / "scores.parquet").to_pylist()
    assert {r["doc_id"] for r in scored} == union
    # Not bitwise: the rerank batches other documents together than the scan, so float32 sums
    # run in another order (1e-5 relative was exceeded on an AMD EPYC host).
    for r in scored:
        assert r["score"] == pytest.approx(exact[(r["query_id"], r["doc_id"])], rel=1e-4)


def test_bm25_candidates_rerank(world, tmp_path):
    msif(
        "score-corpus", "--model", world["pt_model"], "--corpus", world["corpus"],
        "--preconditioned", world["pre"], "--candidates", world["bm25"],
        "--out", tmp_path / "rerank", *COMMON,
    )  # fmt: skip
    bm25 = {r["doc_id"] for r in pq.read_table(Path(world["bm25"]) / "scores.parquet").to_pylist()}
    scored = pq.read_table(tmp_path / "rerank" / "scores.parquet").to_pylist()
    assert {r["doc_id"] for r in scored} <= bm25


def test_lookup_takes_bm25_candidates_alone_or_with_the_index(world, tmp_path, capsys):
    shards = index_shards(world, "index-r2b", 2)
    top_c = 3
    bm25 = pq.read_table(Path(world["bm25"]) / "scores.parquet").to_pylist()
    bm25_top = {(r["query_id"], r["doc_id"]): r["rank"] for r in bm25 if r["rank"] <= top_c}
    base = ["lookup", "--preconditioned", world["pre"], "--top-c", top_c]

    def candidates(name, *extra):
        msif(*base, *extra, "--out", tmp_path / name)
        return pq.read_table(tmp_path / name / "candidates.parquet").to_pylist()

    alone = candidates("bm25", "--candidates-from", "bm25", "--bm25", world["bm25"])
    assert {(r["query_id"], r["doc_id"]): r["bm25_rank"] for r in alone} == bm25_top
    assert all(r["index_score"] is None and r["index_rank"] is None for r in alone)
    index = candidates("index", "--index", *shards)
    assert all(r["bm25_rank"] is None for r in index)
    both = candidates("both", "--index", *shards, "--candidates-from", "both",
                      "--bm25", world["bm25"])  # fmt: skip
    pairs = {(r["query_id"], r["doc_id"]) for r in both}
    assert pairs == {(r["query_id"], r["doc_id"]) for r in index} | set(bm25_top)
    assert len(pairs) == len(both)  # a document both sources propose is listed once
    for r in both:
        key = (r["query_id"], r["doc_id"])
        assert r["bm25_rank"] == bm25_top.get(key)
        assert (r["index_rank"] is None) == (
            key not in {(i["query_id"], i["doc_id"]) for i in index}
        )
    info = json.loads((tmp_path / "both" / "candidates.json").read_text())
    assert info["candidates_from"] == "both" and info["num_candidates"] == len(
        {d for _, d in pairs}
    )
    # What each source needs, refused before any work, in one line.
    for argv, says in (
        (["--candidates-from", "bm25"], "--candidates-from bm25 needs --bm25"),
        (["--candidates-from", "both", "--bm25", world["bm25"]], "both needs --index"),
        (["--candidates-from", "bm25", "--bm25", world["pre"]], "holds no scores.parquet"),
    ):
        assert main([str(a) for a in [*base, *argv, "--out", tmp_path / "no"]]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / "no").exists()


def test_lookup_refuses_mixed_or_missing_shards(world, tmp_path, capsys):
    full = index_shards(world, "index-r1", 1)
    argv = ["lookup", "--preconditioned", world["pre"], "--out", tmp_path / "c"]
    assert main([str(a) for a in [*argv, "--index", full[0]]]) == 1
    assert "index shard 1 of 2 is missing" in capsys.readouterr().err
    other = index_shards(world, "index-r2", 2)
    assert main([str(a) for a in [*argv, "--index", full[0], other[1]]]) == 1
    assert "different compression settings" in capsys.readouterr().err
    # A corrupt factor file: refused by its checksum, not read as numbers.
    bad = tmp_path / "bad"
    shutil.copytree(full[1], bad)
    data = bytearray((bad / "index.safetensors").read_bytes())
    data[-8:] = b"\x00" * 8
    (bad / "index.safetensors").write_bytes(bytes(data))
    assert main([str(a) for a in [*argv, "--index", full[0], bad]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msif: error:")


def test_projected_tier_with_every_triplet_and_entry_gives_the_scan(world, tmp_path, capsys):
    everything = ["--index-tier", "projected", "--index-values", 10**8]
    shards = index_shards(world, "index-projected", 64, 2, *everything)  # rank 64: all of it
    argv = ["lookup", "--index", *shards, "--preconditioned", world["pre"], "--top-c", 12]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "no"]]) == 1
    assert "needs --pt-factors" in capsys.readouterr().err
    msif(*argv, "--pt-factors", world["pt_factors"], "--out", tmp_path / "cand")
    exact = scan_scores(world)
    cand = pq.read_table(tmp_path / "cand" / "candidates.parquet").to_pylist()
    assert len(cand) == 12 * len({q for q, _ in exact})
    scale = max(abs(v) for v in exact.values())
    for r in cand:
        want = exact[(r["query_id"], r["doc_id"])]
        assert r["index_score"] == pytest.approx(want, rel=1e-4, abs=1e-5 * scale)
