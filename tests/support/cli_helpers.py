"""Running the msif CLI's nodes in-process, in pipeline order, on local paths or gs:// URIs."""

from __future__ import annotations

from msif.cli import main
from msif.storage.gcs import join

COMMON = ["--max-length", "32", "--batch-size", "4", "--no-progress", "--device", "cpu"]
TOP_K = 20  # above the mini world's 12 documents: every document is ranked
ALPHA = 0.05


def cli(*argv) -> None:
    """Run one msif subcommand in-process; it must succeed."""
    args = [str(a) for a in argv]
    assert main(args) == 0, f"msif {' '.join(args)} failed"


def fit_stage(w: dict, out: str, stage: str, num_shards: int) -> str:
    """fit-covariance ×N → eigendecompose → fit-lambda ×N → build-factors; the factors URI."""
    model, data = (w["pt_model"], w["corpus"]) if stage == "pt" else (w["ft_model"], w["finetune"])
    fit = ["--model", model, "--data", data, "--stage", stage, "--num-shards", num_shards]
    covs = [join(out, f"{stage}-cov-{i}") for i in range(num_shards)]
    for i, cov in enumerate(covs):
        cli("fit-covariance", *fit, "--shard", i, "--out", cov, *COMMON)
    eigen = join(out, f"{stage}-eigen")
    cli("eigendecompose", "--partials", *covs, "--out", eigen)
    lams = [join(out, f"{stage}-lam-{i}") for i in range(num_shards)]
    for i, lam in enumerate(lams):
        cli("fit-lambda", *fit, "--eigenbasis", eigen, "--shard", i, "--out", lam, *COMMON)
    factors = join(out, f"{stage}-factors")
    cli("build-factors", "--eigenbasis", eigen, "--partials", *lams, "--out", factors)
    return factors


def run_nodes(w: dict, out: str, num_shards: int = 2, *, full: bool = False) -> dict:
    """Every node of the multi-stage pipeline with outputs under out; their URIs.

    full: score shards also keep every document's score (`score --full`).
    """
    out = str(out)
    fpt, fft = fit_stage(w, out, "pt", num_shards), fit_stage(w, out, "ft", num_shards)
    pre = join(out, "pre")
    cli(
        "query-gradients",
        *("--model", w["ft_model"], "--queries", w["queries"], "--method", "multi-stage"),
        *("--ft-factors", fft, "--pt-factors", fpt, "--alpha", ALPHA, "--out", pre),
        *COMMON,
    )
    shards = [join(out, f"scores-{i}") for i in range(num_shards)]
    for i, s in enumerate(shards):
        cli(
            "score",
            *("--model", w["pt_model"], "--corpus", w["corpus"], "--preconditioned", pre),
            *("--shard", i, "--num-shards", num_shards, "--top-k", TOP_K, "--out", s),
            *(["--full"] if full else []),
            *COMMON,
        )
    bm25 = join(out, "bm25")
    cli("bm25", "--corpus", w["corpus"], "--queries", w["queries"], "--top-k", TOP_K, "--out", bm25)
    ranking = join(out, "ranking")
    cli(
        "rank",
        *("--scores", *shards, bm25, "--corpus", w["corpus"], "--queries", w["queries"]),
        *("--top-k", TOP_K, "--factors", fpt, fft, "--out", ranking),
    )
    return {
        "out": out,
        "pt_factors": fpt,
        "ft_factors": fft,
        "pre": pre,
        "shards": shards,
        "scores-0": shards[0],
        "bm25": bm25,
        "ranking": ranking,
    }
