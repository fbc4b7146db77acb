"""How close msif's EK-FAC influence scores are to scores with the exact damped Fisher.

python -m benchmarks.exactness [--quick] [--hidden 24 --docs 128 ...]

A tiny float64 GPT-NeoX is briefly pre-trained on random token documents (θ_pt, so its
predictive distribution is not uniform) and a perturbed copy stands in for θ_ft. The exact
reference builds, per tracked module, the dense Fisher F = mean over sequences of
vec(DW_n) vec(DW_n)ᵀ from one autograd backward per sequence with the *same* sampled labels
msif uses (msif.loss.sample_labels seeds each sequence by its content), i.e. the true Fisher
restricted to the module's block, and solves with it:

  exact multi-stage S = Σ_modules ⟨(F_pt + λ_pt I)⁻¹ (F_ft + α I)⁻¹ ∇ℓ(q, θ_ft), ∇ℓ(z, θ_pt)⟩

with the λ_pt and α msif used (PreconditionedQueries.damping). Rows: both stages, each stage's
inverse alone, the single-stage method, and gradient dot (no curvature) as the floor.
"""

from __future__ import annotations

import argparse
import copy

import torch

import msif
from benchmarks.common import machine, neox
from benchmarks.stats import pearson, spearman
from msif.data import Example, batches, collate
from msif.loss import sample_labels, sequence_losses
from msif.modules import ModuleSpec, resolve, weight_gradient
from msif.precondition import PreconditionedQueries

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


def per_sequence_gradients(model, data: list[Example], specs: dict[str, ModuleSpec], *,
                           sample: bool) -> dict[str, torch.Tensor]:
    """{module: (N, out·in')} from one autograd backward per sequence (true or sampled labels)."""
    modules = resolve(model, specs.values())
    out: dict[str, list[torch.Tensor]] = {k: [] for k in specs}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for e in data:
            b = collate([e], 0)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           use_cache=False).logits
            labels = b["labels"]
            if sample:
                labels = sample_labels(logits.detach(), b["input_ids"], labels,
                                       b["attention_mask"], SEED)
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
    """Models, data, msif factors and the per-sequence gradients the exact reference needs."""

    def __init__(self, args):
        torch.manual_seed(0)
        self.pt = neox(args.hidden, args.layers, heads=args.heads, vocab=args.vocab).double()
        self.corpus = examples(args.docs, args.seq, args.vocab, 1)
        self.ft_data = examples(args.ft, args.seq, args.vocab, 2, prompt=args.seq // 2)
        self.queries = examples(args.queries, args.seq, args.vocab, 3, prompt=args.seq // 2)
        pretrain(self.pt, self.corpus, args.pretrain_steps, 16, 3e-3)
        self.ft = perturbed(self.pt, args.perturb, seed=4)
        for m in (self.pt, self.ft):
            for p in m.parameters():
                p.requires_grad_(False)
        self.batch = args.batch
        self.f_pt = fit(self.pt, self.corpus, "pt", args.batch)
        self.f_ft = fit(self.ft, self.ft_data, "ft", args.batch)
        specs = self.f_pt.specs
        self.specs = specs
        grads = per_sequence_gradients
        self.fisher_pt = self._fishers(grads(self.pt, self.corpus, specs, sample=True))
        self.fisher_ft = self._fishers(grads(self.ft, self.ft_data, specs, sample=True))
        self.q = grads(self.ft, self.queries, specs, sample=False)
        self.z_pt = grads(self.pt, self.corpus, specs, sample=False)
        self.z_ft = grads(self.ft, self.corpus, specs, sample=False)

    @staticmethod
    def _fishers(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.T @ v / v.shape[0] for k, v in g.items()}

    def queries_batches(self):
        """The queries as msif batches."""
        return batches(self.queries, len(self.queries))

    def msif_scores(self, model, pq: PreconditionedQueries) -> torch.Tensor:
        """msif's (Q, N) scores of the corpus at model."""
        return msif.score(model, batches(self.corpus, self.batch), pq).values

    def exact_scores(self, z: dict[str, torch.Tensor], solves) -> torch.Tensor:
        """Σ_modules ⟨(solves applied in order) ∇q, ∇z⟩ with dense damped Fishers."""
        total = 0
        for name in self.specs:
            w = self.q[name]
            for fishers, lams in solves:
                w = damped_solve(fishers[name], lams[name], w)
            total = total + w @ z[name].T
        return total


def rows_for(world: World, factor: float) -> list[dict]:
    """EK-FAC against exact for every method at one damping factor."""
    ids = [q.id for q in world.queries]
    damping = msif.Damping(factor)
    multi = msif.precondition_queries(world.ft, world.queries_batches(), ids, ft_factors=world.f_ft,
                                      pt_factors=world.f_pt, damping=damping)
    lam_pt, lam_ft = multi.damping["pt"], multi.damping["ft"]
    single = msif.precondition_queries(world.ft, world.queries_batches(), ids,
                                       method="single-stage", ft_factors=world.f_ft,
                                       damping=damping)
    raw = msif.precondition_queries(world.ft, world.queries_batches(), ids, method="gradient-dot",
                                    modules=msif.ModuleSelection())
    pt, ft = (world.fisher_pt, lam_pt), (world.fisher_ft, lam_ft)
    exact_multi = world.exact_scores(world.z_pt, [ft, pt])
    cases = [
        ("multi-stage (both inverses)", world.msif_scores(world.pt, multi), exact_multi),
        ("pre-train inverse only",
         world.msif_scores(world.pt, with_inverses(raw, "pt-only", [(world.f_pt, lam_pt)])),
         world.exact_scores(world.z_pt, [pt])),
        ("fine-tune inverse only",
         world.msif_scores(world.pt, with_inverses(raw, "ft-only", [(world.f_ft, lam_ft)])),
         world.exact_scores(world.z_pt, [ft])),
        ("single-stage method (corpus at θ_ft)", world.msif_scores(world.ft, single),
         world.exact_scores(world.z_ft, [(world.fisher_ft, single.damping["ft"])])),
        ("gradient dot vs exact multi-stage (floor)", world.msif_scores(world.pt, raw),
         exact_multi),
    ]
    return [{"damping_factor": factor, "method": name, "pearson": pearson(got, ref),
             "spearman": spearman(got, ref)} for name, got, ref in cases]


def parse(argv) -> argparse.Namespace:
    """Command-line options; --quick shrinks everything to a seconds-long smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    p.add_argument("--hidden", type=int, default=24)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=48)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--docs", type=int, default=128, help="pre-training documents (scored)")
    p.add_argument("--ft", type=int, default=96, help="fine-tuning examples")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--perturb", type=float, default=0.02)
    p.add_argument("--damping", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab, args.seq = 8, 1, 2, 16, 8
        args.docs, args.ft, args.queries, args.pretrain_steps = 24, 16, 3, 20
        args.damping = [0.1]
    return args


def main(argv=None) -> list[dict]:
    """Print a Markdown table of EK-FAC vs exact correlations; return its rows."""
    args = parse(argv)
    world = World(args)
    rows = [r for f in args.damping for r in rows_for(world, f)]
    sizes = {k: s.shape for k, s in world.specs.items()}
    print(f"machine: {machine()}")
    print(f"model: float64 GPT-NeoX hidden {args.hidden}, {args.layers} layers, {args.heads} "
          f"heads, vocab {args.vocab}; pre-trained {args.pretrain_steps} steps on {args.docs} "
          f"documents x {args.seq} tokens; θ_ft = θ_pt + {args.perturb}·N(0, 1); {args.ft} "
          f"fine-tune examples, {args.queries} queries (half the tokens prompt); "
          f"{len(sizes)} modules, largest block {max(o * i for o, i in sizes.values())} weights\n")
    print("| damping factor | scores | Pearson | Spearman |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['damping_factor']:g} | {r['method']} | {r['pearson']:.4f} | "
              f"{r['spearman']:.4f} |")
    return rows


if __name__ == "__main__":
    main()
