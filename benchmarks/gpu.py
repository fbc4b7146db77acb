"""The prepared GPU check (issue 16): msif's passes on a ~400 M-parameter GPT-NeoX on one GPU.

bash benchmarks/gpu.sh                      # on a GPU machine: < 8 min on one H100/H200
python -m benchmarks.gpu --cpu-smoke        # the same code path on a tiny model, CPU, seconds

For bfloat16 and float32 (the second one only while the time budget lasts) it builds the
model from a config (Pythia-410M's shape, random weights, random token ids: nothing is
downloaded) and times, on the same batches, a plain training step (forward, backward, AdamW
step) and msif's passes: covariance, eigendecomposition (float64 eigh on the GPU), Λ,
preconditioning (single-stage, 16 queries: the passes' per-batch work is that of every
method) and scoring (16 and 1 queries, streamed to the host into a top-k as score-corpus
does). It reports tokens/s per pass, the ratio to the training step, the peak GPU memory of
each pass, the time of one 14336² float64 eigh, and how a 2-layer slice of the model (its
attention modules, 8 documents × 4 queries, multi-stage) scores on the GPU against the CPU,
plain and refined (2 CG steps per stage after a 4-step Lanczos correction), and how many
synchronising CUDA calls each pass makes per batch (set_sync_debug_mode).

Output: a table on stdout and gpu-results.json in --out (default $OUT when set, else
./gpu-results), rewritten after every section so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import msif
from benchmarks.common import token_examples
from benchmarks.stats import spearman
from msif.attribution.topk import TopK
from msif.core.device import to_device
from msif.core.modules import ModuleSelection
from msif.data.examples import batches

# Issue 16's targets: tokens/s as a fraction of the training step's, and seconds.
TARGETS = {
    "scoring, 16 queries": ("ratio", 1.0),
    "scoring, 1 query": ("ratio", 1.0),
    "covariance": ("ratio", 0.5),
    "lambda": ("ratio", 0.5),
    "eigh": ("seconds", 60.0),
}
PYTHIA_410M = {
    "vocab_size": 50304,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
}
TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
ATTENTION = ModuleSelection(include=(r"\.attention\.",))
REFINE_STEPS, REFINE_LANCZOS = 2, 4  # the slice's refinement check: every code path, briefly
log = logging.getLogger("msif.benchmarks.gpu")


@dataclass(frozen=True)
class Setup:
    """What one run measures."""

    config: dict
    device: str
    batch: int = 8
    seq: int = 512
    batches: int = 6  # timed batches per pass (one more, untimed, warms each pass up)
    queries: int = 16
    query_len: int = 64
    prompt_len: int = 48
    eigh_size: int = 14336
    slice_layers: int = 2
    slice_docs: int = 8
    slice_queries: int = 4
    slice_seq: int = 64
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    budget_s: float = 420.0

    @property
    def tokens(self) -> int:
        """Tokens of the timed batches of one pass."""
        return self.batch * self.seq * self.batches


GPU = Setup(PYTHIA_410M, "cuda")
SMOKE = Setup(
    TINY,
    "cpu",
    batch=2,
    seq=16,
    batches=2,
    queries=4,
    query_len=12,
    prompt_len=8,
    eigh_size=64,
    slice_docs=8,
    slice_queries=4,
    slice_seq=16,
)


# ------------------------------------------------------------------------------- building


def build_model(config: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """A GPT-NeoX from config with seeded random weights, built on device, eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**config))
    return model.to(dtype).eval()


def perturbed(model, scale: float = 0.02, seed: int = 1):
    """A copy with every weight nudged (seeded on the CPU): a stand-in for θ_ft."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_(scale * p.float().std().nan_to_num() * noise.to(p.device, p.dtype))
    return other


def document_batches(n: int, length: int, vocab: int, batch: int, seed: int) -> list[dict]:
    """n random documents (every token scored), collated on the host."""
    return list(batches(token_examples(n, length, vocab, seed), batch))


def query_batches(setup: Setup, n: int, vocab: int) -> tuple[list[dict], list[str]]:
    """n random queries of query_len tokens whose first prompt_len are unscored."""
    qs = token_examples(n, setup.query_len, vocab, 1000, prompt=setup.prompt_len)
    return list(batches(qs, 16)), [e.id for e in qs]


# -------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device (a wall-clock time must include its queued work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, fn: Callable[[], Any], device: torch.device, tokens: int | None):
    """(fn(), record): wall seconds, tokens/s and the pass's peak GPU memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    record = {
        "pass": name,
        "seconds": round(seconds, 4),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if tokens else None,
        "peak_memory_gib": round(peak, 3) if peak is not None else None,
    }
    return out, record


def trainer(model) -> Callable[[list[dict], torch.device], None]:
    """steps(data, device): forward, backward and an AdamW step per batch (Hugging Face's
    mean loss), one optimizer across calls so the timed steps find its state allocated."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def steps(data: list[dict], device: torch.device) -> None:
        for b in data:
            moved = to_device(b, device)
            out = model(input_ids=moved["input_ids"], labels=moved["labels"], use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return steps


def stream_scores(model, data: list[dict], queries) -> TopK:
    """Score data as score-corpus does: host scores into a running top-100 per query."""
    topk = TopK(100, queries.num_queries)
    for bs in msif.iter_scores(model, data, queries, to_host=True):
        topk.update(bs.scores.double().numpy(), bs.ids)
    return topk


def first_queries(queries, n: int):
    """The first n preconditioned queries."""
    return dataclasses.replace(
        queries,
        query_ids=list(queries.query_ids[:n]),
        dense={k: v[:n] for k, v in queries.dense.items()},
    )


# -------------------------------------------------------------------------------- passes


def dtype_passes(setup: Setup, dtype_name: str, device: torch.device) -> list[dict]:
    """Every pass of one dtype on the full model, each warmed up on one batch first."""
    dtype = getattr(torch, dtype_name)
    model = build_model(setup.config, dtype, setup.device)
    vocab = setup.config["vocab_size"]
    data = document_batches(setup.batch * setup.batches, setup.seq, vocab, setup.batch, 0)
    warm = data[:1]
    tokens = setup.tokens
    rows = []

    def timed(name, fn, n=tokens, warmup=None):
        if warmup is not None:
            warmup()
        out, rec = measure(name, fn, device, n)
        rows.append({**rec, "dtype": dtype_name})
        log.info("%s %s: %.2fs", dtype_name, name, rec["seconds"])
        return out

    steps = trainer(copy.deepcopy(model))
    timed("training step", lambda: steps(data, device), warmup=lambda: steps(warm, device))
    steps = None  # the copy and its optimizer, freed before msif's passes
    cov = timed(
        "covariance",
        lambda: msif.fit_covariance(model, data, stage="ft"),
        warmup=lambda: msif.fit_covariance(model, warm, stage="ft"),
    )
    basis = timed("eigendecomposition", lambda: msif.eigendecompose(cov, device=device), None)
    rows[-1]["eigh_device"] = basis.info["eigh_device"]
    rows[-1]["eigh_cpu_fallbacks"] = basis.info["eigh_cpu_fallbacks"]
    lam = timed(
        "lambda",
        lambda: msif.fit_lambda(model, data, basis),
        warmup=lambda: msif.fit_lambda(model, warm, basis),
    )
    factors = msif.Factors.build(basis, lam)
    cov = lam = None
    qb, ids = query_batches(setup, setup.queries, vocab)
    pre = timed(
        f"preconditioning, {setup.queries} queries",
        lambda: msif.precondition_queries(
            model, qb, ids, method="single-stage", ft_factors=factors
        ),
        n=setup.queries * (setup.query_len - setup.prompt_len),
    )
    factors = None
    for n in (setup.queries, 1):
        queries = first_queries(pre, n)
        timed(
            f"scoring, {n} quer{'y' if n == 1 else 'ies'}",
            lambda q=queries: stream_scores(model, data, q),
            warmup=lambda q=queries: stream_scores(model, warm, q),
        )
    if device.type == "cuda" and dtype == torch.bfloat16:
        rows += tf32_rows(model, data, pre, device, dtype_name)
    model = pre = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    train = next(r for r in rows if r["pass"] == "training step")["tokens_per_s"]
    for r in rows:
        if r["tokens_per_s"] and r["tokens"] == tokens:
            r["ratio_to_training"] = round(r["tokens_per_s"] / train, 3)
    return rows


def tf32_rows(model, data, pre, device, dtype_name: str) -> list[dict]:
    """Covariance and scoring again with TF32 float32 matmuls (exact for bf16 inputs of a
    and g, float32 accumulation): what that setting would buy; not msif's default."""
    rows = []
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for name, fn in (
            ("covariance (TF32 matmuls)", lambda: msif.fit_covariance(model, data, stage="ft")),
            ("scoring, 16 queries (TF32 matmuls)", lambda: stream_scores(model, data, pre)),
        ):
            _, rec = measure(name, fn, device, sum(b["input_ids"].numel() for b in data))
            rows.append({**rec, "dtype": dtype_name})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return rows


def big_eigh(n: int, device: torch.device) -> dict:
    """Seconds of one n×n float64 eigh on device, and its reconstruction error."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, n, dtype=torch.float64, device=device, generator=gen)
    m = x @ x.mT / n
    m.diagonal().add_(1e-3)
    del x
    torch.linalg.eigh(m[:256, :256])  # the solver's one-off start-up
    (vals, vecs), rec = measure(f"eigh {n}² float64", lambda: torch.linalg.eigh(m), device, None)
    err = float(torch.linalg.matrix_norm((vecs * vals) @ vecs.mT - m) / torch.linalg.matrix_norm(m))
    return {**rec, "n": n, "device": str(device), "reconstruction_error": err}


def slice_scores(pt, ft, docs, qb, ids, refine: bool = False) -> torch.Tensor:
    """Multi-stage scores (queries × documents) of the attention modules, on the CPU.

    refine: queries refined by REFINE_STEPS CG steps per stage with a REFINE_LANCZOS-step
    Lanczos correction, on each stage's own slice data (msif.attribution.refine)."""
    from msif.attribution.refine import Refinement, StageSample

    f_pt = msif.fit_factors(pt, lambda: docs, stage="pt", modules=ATTENTION)
    f_ft = msif.fit_factors(ft, lambda: qb, stage="ft", modules=ATTENTION)
    refinement = None
    if refine:
        samples = {
            "pt": StageSample(pt, [e for b in docs for e in _examples(b)]),
            "ft": StageSample(ft, [e for b in qb for e in _examples(b)]),
        }
        refinement = Refinement(REFINE_STEPS, samples, lanczos=REFINE_LANCZOS)
    pre = msif.precondition_queries(
        ft, qb, ids, ft_factors=f_ft, pt_factors=f_pt, refine=refinement
    )
    return msif.score(pt, docs, pre).values.double().cpu()


def agreement(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Spearman over every (query, document) pair and max |got − want| / max |want|."""
    rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
    return {"spearman": round(spearman(got, want), 6), "max_relative_error": rel}


def slice_agreement(setup: Setup, device: torch.device) -> dict:
    """A 2-layer slice scored on device against the same slice on the CPU (float32), and
    the slice in bfloat16 on device against it."""
    config = {**setup.config, "num_hidden_layers": setup.slice_layers}
    pt = build_model(config, torch.float32, "cpu", seed=1)
    ft = perturbed(pt)
    vocab = config["vocab_size"]
    docs = document_batches(setup.slice_docs, setup.slice_seq, vocab, setup.slice_docs, 7)
    qs = token_examples(setup.slice_queries, setup.query_len, vocab, 8, prompt=setup.prompt_len)
    qb, ids = list(batches(qs, setup.slice_queries)), [e.id for e in qs]
    start = time.perf_counter()
    cpu = slice_scores(pt, ft, docs, qb, ids)
    cpu_s = time.perf_counter() - start
    out = {"documents": setup.slice_docs, "queries": setup.slice_queries, "cpu_seconds": cpu_s}
    for dtype in (torch.float32, torch.bfloat16):
        on = [copy.deepcopy(m).to(device, dtype) for m in (pt, ft)]
        got = slice_scores(*on, docs, qb, ids)
        out[f"{device.type} {str(dtype).removeprefix('torch.')} vs cpu float32"] = agreement(
            got, cpu
        )
    # Refinement (forward-mode products, Lanczos, CG) on the device against the CPU's.
    refined = slice_scores(pt, ft, docs, qb, ids, refine=True)
    on = [copy.deepcopy(m).to(device) for m in (pt, ft)]
    got = slice_scores(*on, docs, qb, ids, refine=True)
    out[f"{device.type} float32 refined vs cpu float32 refined"] = agreement(got, refined)
    return out


def sync_check(setup: Setup, device: torch.device) -> dict:
    """Synchronising CUDA calls per extra batch of each pass (torch.cuda.set_sync_debug_mode
    warns at each one), with where they came from: the GPU side of tests/core/test_syncs.py.
    Runs the 2-layer slice on 2 and on 5 batches; the difference is what a pass does per
    batch. Off CUDA the passes run the same way with nothing to count (counted: false)."""
    from msif.attribution.explain import predicted_token_scores
    from msif.index.factored import build_index

    config = {**setup.config, "num_hidden_layers": setup.slice_layers}
    model = build_model(config, torch.float32, setup.device, seed=2)
    vocab = config["vocab_size"]
    data = document_batches(20, setup.slice_seq, vocab, 4, 9)
    small, large = data[:2], data
    cov = msif.fit_covariance(model, large, stage="ft")
    basis = msif.eigendecompose(cov, device=device)
    factors = msif.Factors.build(basis, msif.fit_lambda(model, large, basis))
    qb, ids = query_batches(setup, 4, vocab)
    pre = msif.precondition_queries(model, qb, ids, method="single-stage", ft_factors=factors)
    docs = [e for b in large for e in _examples(b)]
    passes = {
        "covariance": lambda d: msif.fit_covariance(model, d),
        "lambda": lambda d: msif.fit_lambda(model, d, basis),
        "query gradients": lambda d: msif.query_gradients(model, d, pre.specs, basis=factors),
        "scoring (streamed to the host)": lambda d: stream_scores(model, d, pre),
        "index (factored, rank 4)": lambda d: build_index(model, d, pre.specs, 4),
        "explain": lambda d: predicted_token_scores(
            model, [(0, e) for e in docs[: 4 * len(d)]], pre, batch_size=4
        ),
    }
    count = _syncs if device.type == "cuda" else _ran
    out = {}
    for name, fn in passes.items():
        fn(small)  # warm-up: one-off synchronisations (cuBLAS handles, the allocator)
        counts = [count(fn, d) for d in (small, large)]
        extra = counts[1] - counts[0]
        out[name] = {
            "counted": device.type == "cuda",
            "syncs_2_batches": sum(counts[0].values()),
            "syncs_5_batches": sum(counts[1].values()),
            "per_extra_batch": round(sum(extra.values()) / 3, 2),
            "where": {k: v for k, v in extra.most_common(8)},
        }
    return out


def _examples(batch: dict) -> list:
    from msif.data.examples import Example

    return [
        Example(i, row.tolist(), lab.tolist())
        for i, row, lab in zip(batch["ids"], batch["input_ids"], batch["labels"], strict=True)
    ]


def _ran(fn: Callable, data) -> Counter:
    fn(data)
    return Counter()


def _syncs(fn: Callable, data) -> Counter:
    """Counter of where fn(data) synchronised, by file:line of the warning."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in hits)


# ------------------------------------------------------------------------------ reporting


def environment(device: torch.device) -> dict:
    """Where the numbers were taken."""
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def verdicts(result: dict) -> list[dict]:
    """Each target against what was measured (bfloat16 rows first)."""
    out = []
    for name, (kind, bound) in TARGETS.items():
        if kind == "seconds":
            if name not in result:
                continue
            got = result[name]["seconds"]
            label = f"eigh {result[name]['n']}² float64 < {bound:g} s"
            out.append({"target": label, "measured": got, "met": got < bound})
            continue
        for row in result.get("passes", []):
            if row["pass"] == name and "ratio_to_training" in row:
                got = row["ratio_to_training"]
                out.append(
                    {
                        "target": f"{name} ({row['dtype']}) ≥ {bound:g}× training step",
                        "measured": got,
                        "met": got >= bound,
                    }
                )
    return out


def table(result: dict) -> str:
    """The passes, the eigh, the slice agreement and the targets as Markdown."""
    lines = [
        "| dtype | pass | s | tokens/s | ÷ training step | peak GiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result.get("passes", []):
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"
        ratio = f"{r['ratio_to_training']:.2f}" if "ratio_to_training" in r else "–"
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "–"
        lines.append(
            f"| {r['dtype']} | {r['pass']} | {r['seconds']:.3f} | {tps} | {ratio} | {peak} |"
        )
    if "eigh" in result:
        e = result["eigh"]
        lines.append(
            f"\neigh {e['n']}² float64 on {e['device']}: {e['seconds']:.2f} s "
            f"(reconstruction error {e['reconstruction_error']:.1e})"
        )
    for key, value in result.get("slice", {}).items():
        if isinstance(value, dict):
            lines.append(
                f"slice, {key}: Spearman {value['spearman']:.4f}, "
                f"max relative error {value['max_relative_error']:.2e}"
            )
    for name, s in result.get("syncs", {}).items():
        if s["counted"]:
            lines.append(f"syncs per extra batch, {name}: {s['per_extra_batch']} {s['where']}")
    for v in result.get("targets", []):
        lines.append(f"{'PASS' if v['met'] else 'FAIL'}: {v['target']} (measured {v['measured']})")
    for note in result.get("skipped", []):
        lines.append(f"skipped: {note}")
    for name, tail in result.get("errors", {}).items():
        lines.append(f"ERROR in {name}: {tail[-1]}")
    return "\n".join(lines)


def save(result: dict, out: Path) -> None:
    """gpu-results.json in out (rewritten after every section)."""
    out.mkdir(parents=True, exist_ok=True)
    result["targets"] = verdicts(result)
    (out / "gpu-results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def section(result: dict, out: Path, name: str, fn: Callable[[], Any]) -> Any:
    """fn(), saved after; an error is recorded (with its traceback's end) and the run goes
    on, so one broken section does not cost the device time of the others."""
    import traceback

    try:
        value = fn()
    except Exception as exc:  # every failure is reported, none is fatal here
        tail = traceback.format_exc().strip().splitlines()[-12:]
        result.setdefault("errors", {})[name] = tail
        log.error("%s failed: %s", name, exc)
        value = None
    save(result, out)
    return value


def run(setup: Setup, out: Path) -> dict:
    """Every section in order of importance, stopping optional ones at the time budget."""
    device = torch.device(setup.device)
    start = time.perf_counter()
    result: dict = {"setup": dataclasses.asdict(setup), "passes": [], "skipped": []}
    result["environment"] = environment(device)
    save(result, out)
    first = setup.dtypes[0]
    rows = section(result, out, f"{first} passes", lambda: dtype_passes(setup, first, device))
    result["passes"] += rows or []
    per_dtype = time.perf_counter() - start
    save(result, out)
    for key, fn in (
        ("eigh", lambda: big_eigh(setup.eigh_size, device)),
        ("slice", lambda: slice_agreement(setup, device)),
        ("syncs", lambda: sync_check(setup, device)),
    ):
        value = section(result, out, key, fn)
        if value is not None:
            result[key] = value
    for name in setup.dtypes[1:]:
        left = setup.budget_s - (time.perf_counter() - start)
        if left < 1.3 * per_dtype:
            result["skipped"].append(
                f"{name} passes: {left:.0f} s of the budget left, the {first} ones took "
                f"{per_dtype:.0f} s"
            )
            continue
        result["passes"] += (
            section(result, out, f"{name} passes", lambda n=name: dtype_passes(setup, n, device))
            or []
        )
    result["wall_s"] = round(time.perf_counter() - start, 1)
    save(result, out)
    return result


def default_out() -> Path:
    """$OUT when set (the device tool's folder that comes back), else ./gpu-results."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu-results")


def main(argv: list[str] | None = None) -> dict:
    """Run the check and print its table; return the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, seconds")
    p.add_argument("--out", type=Path, default=None, help="folder for gpu-results.json")
    p.add_argument("--budget-s", type=float, default=None, help="skip later dtypes past this")
    p.add_argument("--layers", type=int, default=None, help="model layers (default: 24)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per pass")
    args = p.parse_args(argv)
    setup = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or give --cpu-smoke")
    if args.layers:
        setup = dataclasses.replace(
            setup, config={**setup.config, "num_hidden_layers": args.layers}
        )
    if args.batches:
        setup = dataclasses.replace(setup, batches=args.batches)
    if args.budget_s:
        setup = dataclasses.replace(setup, budget_s=args.budget_s)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("msif").setLevel(logging.WARNING)  # eigh fallbacks, not per-pass lines
    log.setLevel(logging.INFO)
    out = args.out or default_out()
    result = run(setup, out)
    print(table(result))
    print(f"results: {out / 'gpu-results.json'}")
    return result


if __name__ == "__main__":
    raise SystemExit(1 if main().get("errors") else 0)
