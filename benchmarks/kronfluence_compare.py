"""msif against kronfluence 1.0.1: time per stage and agreement of single-stage EK-FAC scores.

python -m benchmarks.kronfluence_compare [--quick] [--hidden 128 --layers 4 --seq 64 ...]

Both libraries see the same GPT-NeoX (built from a config), the same random token sequences
(pre-training style: every token scored), the same tracked modules (the block linears), EK-FAC
with the same damping rule, and single-stage scores (kronfluence has no multi-stage mode):
msif `precondition_queries(method="single-stage")` + `score` against kronfluence
`compute_pairwise_scores`, both with factors fitted on the training data at the same model.

Conventions, as read from kronfluence's source (site-packages/kronfluence):
- `ScoreArguments.damping_factor` is an *absolute* λ added to Λ (default 1e-8); `None` selects
  0.1 × mean(Λ) per module, which is msif's default `Damping(factor=0.1)`. Matched runs use None.
- kronfluence's A averages over every position its attention mask keeps (here: all tokens),
  msif's over *scored* positions only (those that predict a scored next token; the last
  position predicts nothing). The matched Task hands kronfluence that scored-position mask.
- Sampled Fisher labels are whatever the Task draws; the matched Task draws them with msif's
  per-sequence content-seeded sampler, so both libraries fit the Fisher of the same labels.
- Loss: sum over scored tokens (msif's sequence loss), labels shifted once, bias as an
  appended 1 on the input side in both.
The second table changes one convention at a time on the kronfluence side and shows what each
does to the agreement.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

import msif
from benchmarks.common import machine, neox, token_examples
from benchmarks.stats import pearson, relative_error, spearman, stopwatch
from msif.core.loss import IGNORE, sample_labels, scored_positions, sequence_losses
from msif.data.examples import Example, batches, collate

INSTALL_HINT = (
    "pip install -c constraints.txt --no-deps kronfluence==1.0.1 accelerate einops einconv "
    "opt-einsum scipy"
)
STAGES = ("covariance", "eigendecomposition", "Λ (eigenvalue correction)")


def require_kronfluence():
    """Import kronfluence's pieces, or exit with the install command."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as e:  # the benchmark is optional; msif never needs kronfluence
        raise SystemExit(
            f"benchmarks.kronfluence_compare needs kronfluence 1.0.1 ({e}). Install: {INSTALL_HINT}"
        ) from e
    return Analyzer, prepare_model, FactorArguments, ScoreArguments, Task


@dataclass(frozen=True)
class Convention:
    """How the kronfluence side is set up; the defaults match msif exactly."""

    name: str = "matched (msif's conventions)"
    labels: str = "shared"  # "shared": msif's sampler; "independent": the Task's own draws
    activation_mask: str = "scored"  # "scored" positions (msif) or "all" (kronfluence default)
    loss: str = "sum"  # "sum" over scored tokens, or "batch-mean" (sum / tokens in the batch)
    damping: float | None = None  # kronfluence damping_factor; None = 0.1 × mean(Λ)
    shift: int = 1  # how many times the labels are shifted


VARIANTS = (
    Convention(),
    Convention(
        "A over every position (kronfluence's attention-mask default)", activation_mask="all"
    ),
    Convention("independent Fisher label draws", labels="independent"),
    Convention("loss = mean over the batch's tokens", loss="batch-mean"),
    Convention("kronfluence's default damping_factor = 1e-8", damping=1e-8),
    Convention("labels shifted twice", shift=2),
)


class SequenceDataset(Dataset):
    """Examples as the dict items kronfluence's DataLoader collates."""

    def __init__(self, examples: list[Example]):
        self.batch = collate(examples, 0)

    def __len__(self) -> int:
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {k: self.batch[k][i] for k in ("input_ids", "attention_mask", "labels")}


def make_task(task_base: type, modules: list[str], conv: Convention, seed: int):
    """A kronfluence Task for causal-LM sequence losses under a convention."""

    class CausalLMTask(task_base):
        """Summed token losses of a causal LM, with the convention's quirks."""

        def __init__(self):
            super().__init__()
            self.generator = torch.Generator().manual_seed(seed)

        def _labels(self, batch):
            labels = batch["labels"]
            for _ in range(conv.shift - 1):  # the "shift in the collator too" mistake
                labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
            return labels

        def _loss(self, logits, labels):
            total = sequence_losses(logits, labels).sum()
            if conv.loss == "batch-mean":
                total = total / (labels[:, 1:] != IGNORE).sum().clamp(min=1)
            return total

        def _sample(self, logits, batch, labels):
            if conv.labels == "shared":
                return sample_labels(
                    logits.detach(), batch["input_ids"], labels, batch["attention_mask"], seed
                )
            out = torch.full_like(labels, IGNORE)
            mask = scored_positions(labels)
            probs = torch.softmax(logits.detach()[mask].double(), -1)
            out[:, 1:][mask[:, :-1]] = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
            return out

        def compute_train_loss(self, batch, model, sample=False):
            """Training loss; sampled labels (the Fisher's) when sample is set."""
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits
            labels = self._labels(batch)
            if sample:
                labels = self._sample(logits, batch, labels)
            return self._loss(logits, labels)

        def compute_measurement(self, batch, model):
            """The query's loss with its own labels, as msif's query gradients use."""
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            """msif's modules, by name."""
            return list(modules)

        def get_attention_mask(self, batch):
            """Positions kronfluence averages A over; the model still gets the real mask."""
            if conv.activation_mask == "all":
                return batch["attention_mask"]
            return scored_positions(self._labels(batch)).long()

    return CausalLMTask()


@dataclass
class Setup:
    """One comparison's model, data and sizes; scores are taken for each query count."""

    model: torch.nn.Module
    train: list[Example]
    queries: list[Example]
    batch: int
    dtype: torch.dtype
    query_counts: tuple[int, ...]
    seed: int = 0


def score_stage(q: int) -> str:
    """Name of the scoring stage with q queries."""
    return f"pairwise scores, {q} queries"


def run_msif(
    s: Setup, times: dict[str, float]
) -> tuple[dict[int, torch.Tensor], msif.CovarianceSums, msif.Factors]:
    """msif's stages, timed; returns {queries: scores (Q, N)}, covariance sums and factors."""
    model = s.model
    with stopwatch(times, STAGES[0]):
        cov = msif.fit_covariance(model, batches(s.train, s.batch), stage="ft", seed=s.seed)
    with stopwatch(times, STAGES[1]):
        basis = msif.eigendecompose(cov, dtype=s.dtype)
    with stopwatch(times, STAGES[2]):
        factors = msif.Factors.build(
            basis, msif.fit_lambda(model, batches(s.train, s.batch), basis)
        )
    scores = {}
    for q in s.query_counts:
        with stopwatch(times, score_stage(q)):
            pre = msif.precondition_queries(
                model,
                batches(s.queries[:q], q),
                [e.id for e in s.queries[:q]],
                method="single-stage",
                ft_factors=factors,
            )
            scores[q] = msif.score(model, batches(s.train, s.batch), pre).values
    return scores, cov, factors


def kronfluence_arguments(s: Setup, conv: Convention):
    """FactorArguments and ScoreArguments with every dtype set to the setup's."""
    _, _, factor_args_cls, score_args_cls, _ = require_kronfluence()
    dt = s.dtype
    fargs = factor_args_cls(
        strategy="ekfac",
        activation_covariance_dtype=dt,
        gradient_covariance_dtype=dt,
        per_sample_gradient_dtype=dt,
        lambda_dtype=dt,
        eigendecomposition_dtype=torch.float64,  # msif also decomposes in float64
    )
    sargs = score_args_cls(
        damping_factor=conv.damping,
        per_sample_gradient_dtype=dt,
        precondition_dtype=dt,
        score_dtype=dt,
        query_gradient_svd_dtype=dt,
    )
    return fargs, sargs


def run_kronfluence(
    s: Setup, modules: list[str], conv: Convention, times: dict[str, float], workdir: str, tag: str
) -> tuple[dict[int, torch.Tensor], dict, dict]:
    """kronfluence's stages, timed; returns {queries: scores (Q, N)}, covariance and Λ."""
    analyzer_cls, prepare_model, _, _, task_base = require_kronfluence()
    task = make_task(task_base, modules, conv, s.seed)
    model = prepare_model(copy.deepcopy(s.model), task)
    fargs, sargs = kronfluence_arguments(s, conv)
    train = SequenceDataset(s.train)
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kronfluence's CUDA GradScaler deprecation noise
        an = analyzer_cls(tag, model, task, cpu=True, disable_tqdm=True, output_dir=workdir)
        with stopwatch(times, STAGES[0]):
            an.fit_covariance_matrices(
                "f",
                train,
                per_device_batch_size=s.batch,
                factor_args=fargs,
                overwrite_output_dir=True,
            )
        with stopwatch(times, STAGES[1]):
            an.perform_eigendecomposition("f", factor_args=fargs, overwrite_output_dir=True)
        with stopwatch(times, STAGES[2]):
            an.fit_lambda_matrices(
                "f",
                train,
                per_device_batch_size=s.batch,
                factor_args=fargs,
                overwrite_output_dir=True,
            )
        for q in s.query_counts:
            with stopwatch(times, score_stage(q)):
                an.compute_pairwise_scores(
                    f"s{q}",
                    "f",
                    SequenceDataset(s.queries[:q]),
                    train,
                    per_device_query_batch_size=q,
                    per_device_train_batch_size=s.batch,
                    score_args=sargs,
                    overwrite_output_dir=True,
                )
            scores[q] = an.load_pairwise_scores(f"s{q}")["all_modules"]
        return scores, an.load_covariance_matrices("f"), an.load_lambda_matrices("f")


def factor_errors(
    cov: msif.CovarianceSums, factors: msif.Factors, k_cov: dict, k_lam: dict
) -> tuple[float, float]:
    """Largest relative difference over modules of the mean A and of Λ (kronfluence vs msif)."""
    err_a, err_l = 0.0, 0.0
    for name in factors.specs:
        count = k_cov["num_activation_covariance_processed"][name]
        a = k_cov["activation_covariance"][name] / count
        err_a = max(err_a, relative_error(a, cov.activation[name] / cov.num_tokens))
        lam = k_lam["lambda_matrix"][name] / k_lam["num_lambda_processed"][name]
        err_l = max(err_l, relative_error(lam, factors.lambdas[name]))
    return err_a, err_l


def make_setup(
    hidden: int,
    layers: int,
    vocab: int,
    seq: int,
    train: int,
    query_counts: tuple[int, ...],
    batch: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> Setup:
    """Model and data of one comparison."""
    model = neox(hidden, layers, heads=4, vocab=vocab, seed=seed).to(dtype)
    return Setup(
        model,
        token_examples(train, seq, vocab, seed=10 + seed),
        token_examples(max(query_counts), seq, vocab, seed=20 + seed),
        batch,
        dtype,
        tuple(query_counts),
    )


def timing_run(args) -> dict:
    """Side-by-side stage times in float32 with matched conventions, best of args.repeat."""
    s = make_setup(
        args.hidden,
        args.layers,
        args.vocab,
        args.seq,
        args.train,
        args.queries,
        args.batch,
        torch.float32,
    )
    t_msif: dict[str, float] = {}
    t_kron: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        if not args.quick:
            # One-off costs of a process's first hooks, kernels and einsum paths fall on neither.
            tiny = Setup(s.model, s.train[: s.batch], s.queries[:2], s.batch, s.dtype, (2,))
            _, _, factors = run_msif(tiny, {})
            run_kronfluence(tiny, list(factors.specs), Convention(), {}, workdir, "warmup")
        for _ in range(args.repeat):  # interleaved, so a busy moment hits both sides alike
            ours, _, factors = run_msif(s, t_msif)
            theirs, _, _ = run_kronfluence(
                s, list(factors.specs), Convention(), t_kron, workdir, "timing"
            )
    q = max(s.query_counts)
    return {
        "msif": t_msif,
        "kronfluence": t_kron,
        "spearman": spearman(ours[q], theirs[q]),
        "pearson": pearson(ours[q], theirs[q]),
        "modules": list(factors.specs),
    }


def convention_runs(args) -> list[dict]:
    """float64 agreement under each convention variant (kronfluence side changed)."""
    # An uneven last batch, so a per-batch mean loss is not a uniform rescaling.
    s = make_setup(
        args.corr_hidden,
        args.layers,
        args.vocab,
        args.corr_seq,
        args.corr_train,
        (args.corr_queries,),
        args.batch,
        torch.float64,
        seed=1,
    )
    ours, cov, factors = run_msif(s, {})
    q = args.corr_queries
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for i, conv in enumerate(args.variants):
            theirs, k_cov, k_lam = run_kronfluence(
                s, list(factors.specs), conv, {}, workdir, f"conv{i}"
            )
            err_a, err_l = factor_errors(cov, factors, k_cov, k_lam)
            rows.append(
                {
                    "convention": conv.name,
                    "spearman": spearman(ours[q], theirs[q]),
                    "pearson": pearson(ours[q], theirs[q]),
                    "score_rel_err": relative_error(theirs[q], ours[q]),
                    "A_rel_err": err_a,
                    "lambda_rel_err": err_l,
                }
            )
    return rows


def print_report(args, timing: dict, rows: list[dict]) -> None:
    """Markdown tables of times, ratios and agreement."""
    print(f"machine: {machine()}")
    print(
        f"timing model: GPT-NeoX hidden {args.hidden}, {args.layers} layers, vocab {args.vocab};"
        f" {args.train} training sequences x {args.seq} tokens, batch {args.batch}; float32; "
        f"best of {args.repeat} (interleaved); {len(timing['modules'])} modules\n"
    )
    print("| stage | msif s | kronfluence s | kronfluence / msif |\n|---|---:|---:|---:|")
    fit_m = sum(timing["msif"][st] for st in STAGES)
    fit_k = sum(timing["kronfluence"][st] for st in STAGES)
    for st in [*STAGES, *(score_stage(q) for q in args.queries)]:
        m, k = timing["msif"][st], timing["kronfluence"][st]
        print(f"| {st} | {m:.3f} | {k:.3f} | {k / m:.2f} |")
    print(
        f"| **fitting (covariance + eigendecomposition + Λ)** | {fit_m:.3f} | {fit_k:.3f} | "
        f"{fit_k / fit_m:.2f} |"
    )
    print(
        f"\nfloat32 agreement ({max(args.queries)} queries): Spearman "
        f"{timing['spearman']:.6f}, Pearson {timing['pearson']:.6f}\n"
    )
    print(
        f"float64 agreement: hidden {args.corr_hidden}, {args.layers} layers, "
        f"{args.corr_train} training sequences x {args.corr_seq} tokens (last batch short), "
        f"{args.corr_queries} queries; one convention changed at a time on the kronfluence "
        "side:\n"
    )
    print(
        "| kronfluence convention | Spearman | Pearson | ‖ΔS‖/‖S‖ | max ‖ΔA‖/‖A‖ | "
        "max ‖ΔΛ‖/‖Λ‖ |\n|---|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['convention']} | {r['spearman']:.6f} | {r['pearson']:.6f} | "
            f"{r['score_rel_err']:.1e} | {r['A_rel_err']:.1e} | {r['lambda_rel_err']:.1e} |"
        )


def parse(argv) -> argparse.Namespace:
    """Command-line options; --quick shrinks everything to a seconds-long smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--train", type=int, default=256, help="training sequences (timing run)")
    p.add_argument(
        "--queries",
        type=int,
        nargs="+",
        default=[8, 64],
        help="query counts scored in the timing run",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--corr-hidden", type=int, default=64, help="hidden size (float64 runs)")
    p.add_argument("--corr-seq", type=int, default=32, help="sequence length (float64 runs)")
    p.add_argument("--corr-train", type=int, default=60, help="training sequences (float64)")
    p.add_argument("--corr-queries", type=int, default=16, help="queries (float64 runs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machines: 1)")
    args = p.parse_args(argv)
    args.variants = VARIANTS
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq = 16, 1, 32, 8
        args.train, args.queries, args.batch, args.repeat = 8, [3], 4, 1
        args.corr_hidden, args.corr_seq, args.corr_train, args.corr_queries = 16, 8, 10, 3
        args.variants = VARIANTS[:2]
    return args


def main(argv=None) -> dict:
    """Run both comparisons, print Markdown, return the numbers."""
    args = parse(argv)
    require_kronfluence()
    torch.set_num_threads(args.threads)
    timing = timing_run(args)
    rows = convention_runs(args)
    print_report(args, timing, rows)
    return {"timing": timing, "conventions": rows}


if __name__ == "__main__":
    main()
