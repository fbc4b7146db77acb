"""How close msif's EK-FAC influence scores are to scores with the exact damped Fisher.

python -m benchmarks.exactness [--quick] [--fisher 128 512 2048 8192] [--damping 1 0.1 0.01]

A tiny float64 GPT-NeoX is briefly pre-trained on random token documents (θ_pt, so its
predictive distribution is not uniform) and a perturbed copy stands in for θ_ft. The exact
reference builds, per tracked module, the dense Fisher F = mean over sequences of
vec(DW_n) vec(DW_n)ᵀ from one autograd backward per sequence with the *same* sampled labels
msif uses (msif.core.loss.sample_labels seeds each sequence by its content), i.e. the true Fisher
restricted to the module's block, and solves with it:

  exact multi-stage S = Σ_modules ⟨(F_pt + λ_pt I)⁻¹ (F_ft + α I)⁻¹ ∇ℓ(q, θ_ft), ∇ℓ(z, θ_pt)⟩

with the λ_pt and α msif used (PreconditionedQueries.damping). Both stages' EK-FAC factors and
exact Fishers are fitted on the first N sequences of their data, N swept by --fisher. Columns:
both stages, each stage's inverse alone, the single-stage method, and the gradient dot product
(no curvature) against the exact multi-stage scores as the floor.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch

import msif
from benchmarks.common import machine, neox
from benchmarks.stats import pearson, spearman
from msif.attribution.precondition import PreconditionedQueries
from msif.core.loss import sample_labels, sequence_losses
from msif.core.modules import ModuleSpec, resolve, weight_gradient
from msif.data.examples import Example, batches, collate

SEED = 0  # Fisher label seed for msif's fits and for the exact reference


def examples(n: int, length: int, vocab: int, seed: int, prompt: int = 0) -> list[Example]:
    """Random token sequences; the first `prompt` tokens unscored."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, vocab, (n, length), generator=g).tolist()
    return [Example(f"x{seed}-{i}", r, [-100] * prompt + r[prompt:]) for i, r in enumerate(rows)]


def pretrain(model, data: list[Example], steps: int, batch: int, lr: float) -> None:
    """A few Adam steps on the summed token loss, so θ_pt predicts something."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    collated = list(batches(data, batch))
    model.train()
    for step in range(steps):
        b = collated[step % len(collated)]
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        loss = sequence_losses(out.logits, b["labels"]).sum() / (b["labels"] != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def perturbed(model, scale: float, seed: int):
    """A copy with every weight nudged by scale × randn: the stand-in fine-tuned model."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


def per_sequence_gradients(
    model, data: list[Example], specs: dict[str, ModuleSpec], *, sample: bool
) -> dict[str, torch.Tensor]:
    """{module: (N, out·in')} from one autograd backward per sequence (true or sampled labels)."""
    modules = resolve(model, specs.values())
    out: dict[str, list[torch.Tensor]] = {k: [] for k in specs}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for e in data:
            b = collate([e], 0)
            model.zero_grad(set_to_none=True)
            logits = model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False
            ).logits
            labels = b["labels"]
            if sample:
                labels = sample_labels(
                    logits.detach(), b["input_ids"], labels, b["attention_mask"], SEED
                )
            sequence_losses(logits, labels).sum().backward()
            for name, module in modules.items():
                out[name].append(weight_gradient(module, specs[name]).detach().reshape(-1))
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    return {k: torch.stack(v) for k, v in out.items()}


def damped_solve(fisher: torch.Tensor, lam: float, v: torch.Tensor) -> torch.Tensor:
    """(F + λI)⁻¹ vᵀ for rows v (Q, d), by Cholesky of the dense damped Fisher."""
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
    chol = torch.linalg.cholesky(fisher + lam * eye)
    return torch.cholesky_solve(v.T, chol).T


def fit(model, data: list[Example], stage: str, batch: int) -> msif.Factors:
    """msif's EK-FAC factors of one stage in float64."""
    cov = msif.fit_covariance(model, batches(data, batch), stage=stage, seed=SEED)
    basis = msif.eigendecompose(cov, dtype=torch.float64)
    return msif.Factors.build(basis, msif.fit_lambda(model, batches(data, batch), basis))


def with_inverses(pq: PreconditionedQueries, method: str, steps) -> PreconditionedQueries:
    """A copy of gradient-dot queries with the given (factors, λ per module) inverses applied."""
    dense = {}
    for name, w in pq.dense.items():
        for factors, lams in steps:
            w = factors.inverse_apply(name, w, lams[name])
        dense[name] = w
    return PreconditionedQueries(list(pq.query_ids), method, pq.specs, dense=dense)


class World:
    """Models, data and the per-sequence gradients the exact reference needs."""

    def __init__(self, args):
        torch.manual_seed(0)
        self.pt = neox(args.hidden, args.layers, heads=args.heads, vocab=args.vocab).double()
        n = max(args.fisher)
        self.corpus = examples(n, args.seq, args.vocab, 1)
        self.ft_data = examples(n, args.seq, args.vocab, 2, prompt=args.seq // 2)
        self.queries = examples(args.queries, args.seq, args.vocab, 3, prompt=args.seq // 2)
        self.scored = self.corpus[: args.docs]
        pretrain(self.pt, self.corpus[: args.docs], args.pretrain_steps, 16, 3e-3)
        self.ft = perturbed(self.pt, args.perturb, seed=4)
        for m in (self.pt, self.ft):
            for p in m.parameters():
                p.requires_grad_(False)
        self.batch = args.batch
        self.specs = msif.find_modules(self.pt)
        grads = per_sequence_gradients
        self.fisher_grads_pt = grads(self.pt, self.corpus, self.specs, sample=True)
        self.fisher_grads_ft = grads(self.ft, self.ft_data, self.specs, sample=True)
        self.q = grads(self.ft, self.queries, self.specs, sample=False)
        self.z_pt = grads(self.pt, self.scored, self.specs, sample=False)
        self.z_ft = grads(self.ft, self.scored, self.specs, sample=False)

    def stage(self, n: int) -> Stage:
        """EK-FAC factors and exact Fishers of both stages fitted on the first n sequences."""

        def fishers(g):
            # Dense block Fishers from the first n per-sequence gradients.
            return {k: v[:n].T @ v[:n] / n for k, v in g.items()}

        return Stage(
            n,
            fit(self.pt, self.corpus[:n], "pt", self.batch),
            fit(self.ft, self.ft_data[:n], "ft", self.batch),
            fishers(self.fisher_grads_pt),
            fishers(self.fisher_grads_ft),
        )

    def queries_batches(self):
        """The queries as msif batches."""
        return batches(self.queries, len(self.queries))

    def msif_scores(self, model, pq: PreconditionedQueries) -> torch.Tensor:
        """msif's (Q, N) scores of the scored documents at model."""
        return msif.score(model, batches(self.scored, self.batch), pq).values

    def exact_scores(self, z: dict[str, torch.Tensor], solves) -> torch.Tensor:
        """Σ_modules ⟨(solves applied in order) ∇q, ∇z⟩ with dense damped Fishers."""
        total = 0
        for name in self.specs:
            w = self.q[name]
            for fishers, lams in solves:
                w = damped_solve(fishers[name], lams[name], w)
            total = total + w @ z[name].T
        return total


@dataclass
class Stage:
    """Both stages' EK-FAC factors and exact block Fishers from n sequences each."""

    n: int
    f_pt: msif.Factors
    f_ft: msif.Factors
    fisher_pt: dict[str, torch.Tensor]
    fisher_ft: dict[str, torch.Tensor]


METHODS = (
    "multi-stage (both inverses)",
    "pre-train inverse only",
    "fine-tune inverse only",
    "single-stage method (corpus at θ_ft)",
    "gradient dot vs exact multi-stage (floor)",
)


def rows_for(world: World, st: Stage, factor: float) -> dict:
    """EK-FAC against exact for every method at one damping factor: {method: (P, S)}."""
    ids = [q.id for q in world.queries]
    damping = msif.Damping(factor)
    multi = msif.precondition_queries(
        world.ft,
        world.queries_batches(),
        ids,
        ft_factors=st.f_ft,
        pt_factors=st.f_pt,
        damping=damping,
    )
    lam_pt, lam_ft = multi.damping["pt"], multi.damping["ft"]
    single = msif.precondition_queries(
        world.ft,
        world.queries_batches(),
        ids,
        method="single-stage",
        ft_factors=st.f_ft,
        damping=damping,
    )
    raw = msif.precondition_queries(world.ft, world.queries_batches(), ids, method="gradient-dot")
    pt, ft = (st.fisher_pt, lam_pt), (st.fisher_ft, lam_ft)
    exact_multi = world.exact_scores(world.z_pt, [ft, pt])
    cases = [
        (world.msif_scores(world.pt, multi), exact_multi),
        (
            world.msif_scores(world.pt, with_inverses(raw, "pt-only", [(st.f_pt, lam_pt)])),
            world.exact_scores(world.z_pt, [pt]),
        ),
        (
            world.msif_scores(world.pt, with_inverses(raw, "ft-only", [(st.f_ft, lam_ft)])),
            world.exact_scores(world.z_pt, [ft]),
        ),
        (
            world.msif_scores(world.ft, single),
            world.exact_scores(world.z_ft, [(st.fisher_ft, single.damping["ft"])]),
        ),
        (world.msif_scores(world.pt, raw), exact_multi),
    ]
    out = {"fisher_sequences": st.n, "damping_factor": factor}
    for name, (got, ref) in zip(METHODS, cases, strict=True):
        out[name] = (pearson(got, ref), spearman(got, ref))
    return out


def parse(argv) -> argparse.Namespace:
    """Command-line options; --quick shrinks everything to a seconds-long smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument(
        "--fisher",
        type=int,
        nargs="+",
        default=[128, 512, 2048, 8192],
        help="sequences each stage's Fisher is fitted on (a sweep)",
    )
    p.add_argument("--docs", type=int, default=128, help="scored pre-training documents")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--perturb", type=float, default=0.02)
    p.add_argument(
        "--damping",
        type=float,
        nargs="+",
        default=[1.0, 0.1, 0.01],
        help="damping factors tried at the largest Fisher size (0.1 at the others)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machines: 1)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab, args.seq = 8, 1, 2, 16, 8
        args.fisher, args.docs, args.queries, args.pretrain_steps = [64, 512], 24, 3, 50
        args.damping = [1.0, 0.1]
    return args


def grid(args) -> list[tuple[int, float]]:
    """(Fisher sequences, damping factor) pairs: 0.1 along the sweep, all factors at the top."""
    top = max(args.fisher)
    pairs = [(n, 0.1) for n in sorted(args.fisher) if n != top]
    return pairs + [(top, f) for f in args.damping]


def main(argv=None) -> list[dict]:
    """Print a Markdown table of EK-FAC vs exact correlations; return its rows."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    world = World(args)
    rows, stages = [], {}
    for n, factor in grid(args):
        if n not in stages:
            stages[n] = world.stage(n)
        rows.append(rows_for(world, stages[n], factor))
    sizes = [s.shape[0] * s.shape[1] for s in world.specs.values()]
    print(f"machine: {machine()}")
    print(
        f"model: float64 GPT-NeoX hidden {args.hidden}, {args.layers} layers, {args.heads} "
        f"heads, vocab {args.vocab}, {len(sizes)} tracked modules with {min(sizes)} to "
        f"{max(sizes)} weights each; pre-trained {args.pretrain_steps} steps on {args.docs} "
        f"documents of {args.seq} tokens; θ_ft = θ_pt + {args.perturb}·N(0, 1); fine-tune "
        f"examples and {args.queries} queries have half their tokens as prompt; "
        f"{args.docs} scored documents\n"
    )
    print("Pearson / Spearman of msif's EK-FAC scores against the exact block-Fisher scores\n")
    print("| Fisher sequences | damping factor | " + " | ".join(METHODS) + " |")
    print("|---:|---:|" + "---:|" * len(METHODS))
    for r in rows:
        cells = [f"{r[m][0]:.3f} / {r[m][1]:.3f}" for m in METHODS]
        print(f"| {r['fisher_sequences']} | {r['damping_factor']:g} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
