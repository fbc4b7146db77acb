"""How msif's cost grows with queries, corpus size, hidden size and sequence length.

python -m benchmarks.scaling [--quick] [--out DIR]

Four curves, each a Markdown table on stdout and a PNG in --out (default: this folder for a
full run, a temporary folder for --quick):
- scaling_queries.png: corpus-scoring time against the number of stacked queries, full-rank
  against rank-32 queries (plus the one-off preconditioning time).
- scaling_corpus.png: streaming `msif.iter_scores` over a growing corpus (batches generated on
  the fly, a running top-k kept): time must grow linearly and memory must stay flat. Each size
  runs in a fresh process that loads the saved model and preconditioned queries, as a scoring
  node does, and reports its peak RSS and the tracemalloc peak of a second, traced pass.
- scaling_hidden.png, scaling_seqlen.png: covariance, Λ and scoring time against the hidden
  size and the sequence length.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import torch

import msif
from benchmarks.common import best_time, machine, neox, token_batches, token_examples
from msif.data.examples import Example, batches, collate

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def fitted_factors(model, data: list[dict]) -> msif.Factors:
    """Single-stage ("ft") factors of model on data, as the scoring benchmarks use."""
    basis = msif.eigendecompose(msif.fit_covariance(model, data, stage="ft"))
    factors = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    return factors


def preconditioned(model, factors, n: int, seq: int, vocab: int, rank: int | None):
    """n random queries (half prompt) preconditioned single-stage, optionally rank-r."""
    qs = token_examples(n, seq, vocab, seed=7, prompt=seq // 2)
    return msif.precondition_queries(
        model,
        batches(qs, 32),
        [q.id for q in qs],
        method="single-stage",
        ft_factors=factors,
        rank=rank,
    )


def stored_mib(pre: msif.PreconditionedQueries) -> float:
    """Size of the preconditioned queries' tensors, MiB."""
    tensors = list(pre.dense.values()) + [x for usv in pre.lowrank.values() for x in usv]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def queries_curve(a) -> list[dict]:
    """Scoring time of a fixed corpus against the number of queries, full and rank-32."""
    model = neox(a.hidden, a.layers, vocab=a.vocab)
    corpus = token_batches(a.docs, a.seq, a.vocab, 0, a.batch)
    factors = fitted_factors(model, corpus)
    rows = []
    for q in a.query_counts:
        row = {"queries": q}
        for label, rank in (("full", None), ("rank-32", 32)):
            start = time.perf_counter()
            pre = preconditioned(model, factors, q, a.seq, a.vocab, rank)
            row[f"precondition {label}"] = time.perf_counter() - start
            row[f"stored MiB {label}"] = stored_mib(pre)
            row[f"score {label}"] = best_time(
                lambda pre=pre: msif.score(model, corpus, pre), a.repeat
            )
        rows.append(row)
    return rows


def stream(n: int, seq: int, vocab: int, batch: int, seed: int) -> Iterator[dict]:
    """n random documents generated batch by batch: nothing about the corpus is held."""
    for start in range(0, n, batch):
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        ids = torch.randint(1, vocab, (min(batch, n - start), seq), generator=g).tolist()
        yield collate([Example(f"d{start + i}", r, r) for i, r in enumerate(ids)], 0)


def stream_top_k(model, pre, docs: Iterator[dict], k: int = 10) -> torch.Tensor:
    """Consume iter_scores keeping only a running top-k per query, as a scoring shard does."""
    best = torch.full((pre.num_queries, 0), float("-inf"))
    for part in msif.iter_scores(model, docs, pre):
        both = torch.cat([best, part.scores.float()], dim=1)
        best = both.topk(min(k, both.shape[1]), dim=1).values
    return best


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(directory: str, n: int, seq: int, vocab: int, batch: int) -> dict:
    """In a fresh process: time, peak RSS and traced Python peak of scoring n streamed docs."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(directory).eval()
    pre = msif.PreconditionedQueries.load(directory)
    stream_top_k(model, pre, stream(batch, seq, vocab, batch, seed=99))  # warm-up batch
    base = rss_mib()
    start = time.perf_counter()
    stream_top_k(model, pre, stream(n, seq, vocab, batch, seed=1))
    seconds = time.perf_counter() - start
    peak = rss_mib()
    gc.collect()
    tracemalloc.start()
    stream_top_k(model, pre, stream(n, seq, vocab, batch, seed=1))
    gc.collect()
    retained, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "docs": n,
        "seconds": seconds,
        "rss_after_first_batch_mib": base,
        "peak_rss_mib": peak,
        "tracemalloc_peak_kib": traced / 1024,
        "tracemalloc_retained_kib": retained / 1024,
    }


def corpus_curve(a, workdir: str) -> list[dict]:
    """Streaming cost against corpus size, each size in a fresh process."""
    model = neox(a.hidden, a.layers, vocab=a.vocab)
    factors = fitted_factors(model, token_batches(a.docs, a.seq, a.vocab, 0, a.batch))
    pre = preconditioned(model, factors, a.corpus_queries, a.seq, a.vocab, None)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(workdir)
    pre.save(workdir)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    rows = []
    for n in a.corpus_sizes:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.scaling",
            "--threads",
            str(a.threads),
            "--probe",
            workdir,
            str(n),
            str(a.seq),
            str(a.vocab),
            str(a.batch),
        ]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"corpus probe for {n} documents failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def stage_times(
    model, data: list[dict], pre_queries: int, seq: int, vocab: int, repeat: int
) -> dict:
    """Seconds of covariance, Λ and scoring (pre_queries full-rank queries) on data."""
    cov = msif.fit_covariance(model, data, stage="ft")
    basis = msif.eigendecompose(cov)
    factors = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    pre = preconditioned(model, factors, pre_queries, seq, vocab, None)
    return {
        "covariance": best_time(lambda: msif.fit_covariance(model, data, stage="ft"), repeat),
        "eigendecomposition": best_time(lambda: msif.eigendecompose(cov), repeat),
        "Λ": best_time(lambda: msif.fit_lambda(model, data, basis), repeat),
        "score": best_time(lambda: msif.score(model, data, pre), repeat),
    }


def hidden_curve(a) -> list[dict]:
    """Stage times against hidden size at a fixed number of tokens."""
    rows = []
    for h in a.hidden_sizes:
        model = neox(h, a.layers, vocab=a.vocab)
        data = token_batches(a.docs, a.seq, a.vocab, 0, a.batch)
        rows.append({"hidden": h, **stage_times(model, data, 16, a.seq, a.vocab, a.repeat)})
    return rows


def seqlen_curve(a) -> list[dict]:
    """Stage times against sequence length at a fixed number of documents."""
    model = neox(a.hidden, a.layers, vocab=a.vocab)
    rows = []
    for t in a.seq_lengths:
        data = token_batches(a.docs, t, a.vocab, 0, a.batch)
        rows.append({"seq": t, **stage_times(model, data, 16, min(t, 64), a.vocab, a.repeat)})
    return rows


def table(rows: list[dict], fmt: dict[str, str] | None = None) -> str:
    """A Markdown table of uniform dict rows."""
    fmt = fmt or {}
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    for r in rows:
        cells = [format(r[k], fmt.get(k, ".3f" if isinstance(r[k], float) else "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    path: Path,
    x: list,
    series: dict[str, list],
    xlabel: str,
    ylabel: str,
    title: str,
    right: tuple[str, list] | None = None,
) -> None:
    """One small log-log line chart (optionally a second y axis), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=100)
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        ax2 = ax.twinx()
        line = ax2.plot(x, right[1], marker="s", color="grey", linestyle="--", label=right[0])
        ax2.set_ylabel(right[0])
        ax2.set_ylim(0, max(right[1]) * 1.5)
        handles, labels = handles + line, labels + [right[0]]
    ax.legend(handles, labels, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def linearity(rows: list[dict]) -> float:
    """Largest / smallest seconds per document over the sizes after the smallest."""
    per_doc = [r["seconds"] / r["docs"] for r in rows[1:]] or [rows[0]["seconds"]]
    return max(per_doc) / min(per_doc)


def report(a, out: Path, results: dict) -> None:
    """Print the tables and write the four PNGs into out."""
    q, c, h, s = (results[k] for k in ("queries", "corpus", "hidden", "seqlen"))
    print(f"machine: {machine()}")
    print(
        f"model: GPT-NeoX hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; "
        f"{a.docs} documents x {a.seq} tokens unless varied; batch {a.batch}\n"
    )
    print(f"### Queries (corpus {a.docs} x {a.seq} tokens; seconds)\n\n{table(q)}\n")
    kib = {"docs": "d", "tracemalloc_peak_kib": ".0f", "tracemalloc_retained_kib": ".0f"}
    print(
        f"### Corpus size (streamed, {a.corpus_queries} full-rank queries, fresh process per "
        f"size)\n\n{table(c, kib)}\n"
    )
    print(
        f"seconds per document, largest / smallest (sizes above the first): "
        f"{linearity(c):.2f}; peak RSS spread: "
        f"{max(r['peak_rss_mib'] for r in c) - min(r['peak_rss_mib'] for r in c):.1f} MiB\n"
    )
    print(f"### Hidden size ({a.docs} x {a.seq} tokens; seconds)\n\n{table(h)}\n")
    print(f"### Sequence length ({a.docs} documents, hidden {a.hidden}; seconds)\n\n{table(s)}\n")
    out.mkdir(parents=True, exist_ok=True)
    qs = [r["queries"] for r in q]
    plot(
        out / "scaling_queries.png",
        qs,
        {
            "score, full": [r["score full"] for r in q],
            "score, rank 32": [r["score rank-32"] for r in q],
            "precondition, full": [r["precondition full"] for r in q],
        },
        "queries",
        "seconds",
        f"corpus {a.docs}×{a.seq} tokens",
    )
    docs = [r["docs"] for r in c]
    plot(
        out / "scaling_corpus.png",
        docs,
        {"seconds": [r["seconds"] for r in c]},
        "documents",
        "seconds",
        "streaming iter_scores",
        ("peak RSS MiB", [r["peak_rss_mib"] for r in c]),
    )
    stages = ("covariance", "Λ", "score", "eigendecomposition")
    plot(
        out / "scaling_hidden.png",
        [r["hidden"] for r in h],
        {k: [r[k] for r in h] for k in stages},
        "hidden size",
        "seconds",
        f"{a.docs}×{a.seq} tokens",
    )
    plot(
        out / "scaling_seqlen.png",
        [r["seq"] for r in s],
        {k: [r[k] for r in s] for k in stages},
        "sequence length",
        "seconds",
        f"{a.docs} documents",
    )
    print(f"plots: {', '.join(sorted(str(p) for p in out.glob('scaling_*.png')))}")


def parse(argv) -> argparse.Namespace:
    """Command-line options; --quick shrinks everything to a seconds-long smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs")
    p.add_argument(
        "--probe", nargs=5, metavar=("DIR", "N", "SEQ", "VOCAB", "BATCH"), help=argparse.SUPPRESS
    )  # internal: one corpus size in a fresh process
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machines: 1)")
    a = p.parse_args(argv)
    a.query_counts = [1, 4, 16, 64, 256]
    a.corpus_sizes = [64, 128, 256, 512, 1024]
    a.corpus_queries = 16
    a.hidden_sizes = [32, 64, 128, 256]
    a.seq_lengths = [32, 64, 128, 256, 512]
    if a.quick:
        a.hidden, a.layers, a.vocab, a.seq, a.docs, a.batch, a.repeat = 16, 1, 64, 16, 8, 4, 1
        a.query_counts, a.corpus_sizes, a.corpus_queries = [1, 4], [8, 32], 2
        a.hidden_sizes, a.seq_lengths = [8, 16], [8, 16]
    return a


def main(argv=None) -> dict:
    """Run the four curves, print tables, write PNGs; return the rows."""
    a = parse(argv)
    torch.set_num_threads(a.threads)
    if a.probe:
        directory, n, seq, vocab, batch = a.probe
        print(json.dumps(probe(directory, int(n), int(seq), int(vocab), int(batch))))
        return {}
    # A quick run must not overwrite the recorded plots: it writes to a fresh folder.
    out = a.out or (Path(tempfile.mkdtemp(prefix="msif-scaling-")) if a.quick else HERE)
    with tempfile.TemporaryDirectory() as workdir:
        results = {
            "queries": queries_curve(a),
            "corpus": corpus_curve(a, str(Path(workdir) / "probe")),
            "hidden": hidden_curve(a),
            "seqlen": seqlen_curve(a),
        }
        report(a, out, results)
    results["out"] = str(out)
    return results


if __name__ == "__main__":
    main()
