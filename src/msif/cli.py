"""The `msif` command line: one subcommand per pipeline node, plus the main job (`msif run`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from msif.errors import MsifError
from msif.version import __version__

DESCRIPTION = """\
msif traces what a fine-tuned language model says back to the pre-training documents that
made it say so (multi-stage influence functions with EK-FAC curvature).

Run `msif` (or `msif run`) with no arguments to build a small synthetic fact world, train a
tiny model on it, and run the whole pipeline locally. The other subcommands are the pipeline's
nodes, in data-flow order: fit-covariance → eigendecompose → fit-lambda → build-factors
(once per stage: pt = pre-training, ft = fine-tuning), query-gradients, score, rank.
Every path may be a local path or a gs:// URI."""


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and batching")
    g.add_argument("--max-length", type=int, default=512, help="tokens per sequence (512)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per batch (8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled Fisher labels (0)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float64 (float32)")
    g.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="REGEX",
        help="track only block modules whose name matches (repeatable)",
    )
    g.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="do not track modules whose name matches (repeatable)",
    )
    g.add_argument(
        "--split-heads",
        action="store_true",
        help="split fused QKV projections into head-size blocks of G",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", type=int, default=0, help="index of this shard (0)")
    p.add_argument("--num-shards", type=int, default=1, help="number of shards (1)")


def _opts(args):
    from msif.nodes import RunOptions

    return RunOptions(
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        split_heads=args.split_heads,
        progress=not args.no_progress,
    )


def _add_fit(sub) -> None:
    p = sub.add_parser(
        "fit-covariance",
        help="covariance partial sums of one data shard",
        description="Fit A = E[a aᵀ] and G = E[g gᵀ] sums (labels sampled from "
        "the model) on one shard of a corpus or fine-tuning table.",
    )
    p.add_argument("--model", required=True, help="model dir or gs:// prefix")
    p.add_argument(
        "--data", required=True, help="corpus (id,text) or fine-tune (prompt,completion) Parquet"
    )
    p.add_argument("--stage", required=True, choices=["pt", "ft"])
    p.add_argument("--out", required=True, help="output directory or gs:// prefix")
    _shard_options(p)
    _model_options(p)
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.fit_covariance_node(
            a.model, a.data, a.stage, a.shard, a.num_shards, a.out, _opts(a)
        )
    )

    p = sub.add_parser(
        "eigendecompose",
        help="reduce covariance shards and eigendecompose",
        description="Add covariance partial sums of all shards and compute the "
        "EK-FAC eigenbasis in float64.",
    )
    p.add_argument("--partials", nargs="+", required=True, help="covariance partial dirs")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", help="storage dtype of the eigenvectors")
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.eigendecompose_node(a.partials, a.out, a.dtype)
    )

    p = sub.add_parser(
        "fit-lambda",
        help="eigenvalue-correction (Λ) sums of one data shard",
        description="Fit Λ = E[(Q_Gᵀ DW Q_A)²] sums in a given eigenbasis.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--stage", required=True, choices=["pt", "ft"])
    p.add_argument("--eigenbasis", required=True)
    p.add_argument("--out", required=True)
    _shard_options(p)
    _model_options(p)
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.fit_lambda_node(
            a.model, a.data, a.stage, a.eigenbasis, a.shard, a.num_shards, a.out, _opts(a)
        )
    )

    p = sub.add_parser("build-factors", help="reduce Λ shards into a stage's factors")
    p.add_argument("--eigenbasis", required=True)
    p.add_argument("--partials", nargs="+", required=True, help="Λ partial dirs")
    p.add_argument("--out", required=True)
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.build_factors_node(
            a.eigenbasis, a.partials, a.out
        )
    )


def _add_queries(sub) -> None:
    p = sub.add_parser(
        "query-gradients",
        help="precondition query gradients (fine-tuned model)",
        description="Gradients of the queries' completion loss at θ_ft, "
        "preconditioned by (F_pt+λI)⁻¹(F_ft+αI)⁻¹ (multi-stage), (F_ft+λI)⁻¹ "
        "(single-stage) or nothing (gradient-dot).",
    )
    p.add_argument("--model", required=True, help="the fine-tuned model")
    p.add_argument("--queries", required=True, help="Parquet with id, prompt, completion")
    p.add_argument(
        "--method", default="multi-stage", choices=["multi-stage", "single-stage", "gradient-dot"]
    )
    p.add_argument("--ft-factors", help="fine-tune factors dir")
    p.add_argument("--pt-factors", help="pre-train factors dir")
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="proximity coefficient α = fine-tune damping (default: relative)",
    )
    p.add_argument(
        "--damping-factor", type=float, default=0.1, help="λ = factor × mean(Λ) per module (0.1)"
    )
    p.add_argument("--damping", type=float, default=None, help="absolute λ instead")
    p.add_argument("--rank", type=int, default=0, help="low-rank query compression (0 = off)")
    p.add_argument("--out", required=True)
    _model_options(p)
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.query_gradients_node(
            a.model,
            a.queries,
            a.method,
            a.out,
            _opts(a),
            ft_factors_uri=a.ft_factors,
            pt_factors_uri=a.pt_factors,
            alpha=a.alpha,
            damping_factor=a.damping_factor,
            damping=a.damping,
            rank=a.rank,
        )
    )


def _add_scoring(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score one corpus shard against preconditioned queries",
        description="One forward and backward pass per batch; keeps the top-k "
        "documents per query with per-token scores for the best ones.",
    )
    p.add_argument(
        "--model", required=True, help="pre-trained model (fine-tuned model for single-stage)"
    )
    p.add_argument("--corpus", required=True)
    p.add_argument("--preconditioned", required=True, help="query-gradients output dir")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument(
        "--explain-k",
        type=int,
        default=10,
        help="documents per query that get per-token scores (10)",
    )
    p.add_argument("--full", action="store_true", help="also write every score")
    p.add_argument("--path", default="auto", choices=["auto", "materialise", "per-token"])
    p.add_argument("--out", required=True)
    _shard_options(p)
    _model_options(p)
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.score_node(
            a.model,
            a.corpus,
            a.preconditioned,
            a.shard,
            a.num_shards,
            a.top_k,
            a.out,
            _opts(a),
            full=a.full,
            explain_k=a.explain_k,
            path=a.path,
        )
    )

    p = sub.add_parser("bm25", help="BM25 baseline scores (text only)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--out", required=True)
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.bm25_node(a.corpus, a.queries, a.top_k, a.out)
    )

    p = sub.add_parser(
        "rank",
        help="merge shard scores, evaluate, write the report",
        description="Merge the shards' top-k per method, compute MRR and "
        "recall@10 against relevant_ids, write ranking.parquet, metrics.json and "
        "a Markdown/HTML report.",
    )
    p.add_argument("--scores", nargs="+", required=True, help="shard score dirs (any methods)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--report-k", type=int, default=5, help="documents per query in the report")
    p.add_argument("--factors", nargs="*", default=[], help="factor dirs (Λ spectrum plots)")
    p.add_argument("--out", required=True)
    p.set_defaults(
        run=lambda a: __import__("msif.nodes").nodes.rank_node(
            a.scores,
            a.corpus,
            a.queries,
            a.top_k,
            a.out,
            factor_uris=a.factors,
            report_k=a.report_k,
        )
    )


def _add_world_and_run(sub) -> None:
    p = sub.add_parser("world", help="build (or reuse) the synthetic fact world")
    p.add_argument("--preset", default="default", choices=["default", "small"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", default=None, help="cache dir ($MSIF_CACHE or ~/.cache/msif)")
    p.set_defaults(run=lambda a: __import__("msif.main_job").main_job.world_command(a))

    p = sub.add_parser("run", help="the main job: fact world + whole pipeline, locally")
    p.add_argument("--preset", default="default", choices=["default", "small"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default="msif-out", help="where the run's artifacts go (msif-out)")
    p.add_argument(
        "--runner",
        default="kfp",
        choices=["kfp", "inprocess"],
        help="kfp: the KFP pipeline through kfp.local; inprocess: the same nodes called directly",
    )
    p.add_argument("--num-shards", type=int, default=2)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--damping-factor", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=0)
    p.set_defaults(run=lambda a: __import__("msif.main_job").main_job.run_command(a))


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="msif", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"msif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_fit(sub)
    _add_queries(sub)
    _add_scoring(sub)
    _add_world_and_run(sub)
    try:
        from msif.workflow.cli import add_pipeline_parser
    except ImportError:  # pragma: no cover - pipeline extras missing
        add_pipeline_parser = None
    if add_pipeline_parser is not None:
        add_pipeline_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; errors become one line on stderr and a non-zero exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv) or ["run"])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.run(args)
    except MsifError as e:
        print(f"msif: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("msif: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
