"""Query gradients at θ_ft, preconditioned by the stages' damped EK-FAC inverses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from msif.attribution.refine import Refinement, refine_queries
from msif.core.artifact import Artifact, module_specs, per_module
from msif.core.device import model_device, work_dtype
from msif.core.fingerprint import check_fingerprint, model_fingerprint, same_model
from msif.core.hooks import hooked_batches
from msif.core.linalg import low_rank, rotate_output
from msif.core.modules import ModuleSelection, ModuleSpec, find_modules
from msif.ekfac.factors import DEFAULT_ALPHA, Damping, Factors, change_of_basis
from msif.errors import MismatchError, MsifError


@dataclass(frozen=True)
class Method:
    """What an influence method computes from the same machinery."""

    stages: tuple[str, ...]  # factor stages whose damped inverses it applies, fine-tune first
    corpus_model: str  # the stage ("pt" or "ft") whose model gives the corpus gradients
    help: str  # one line for --help texts and reports


# The single home of the methods (DESIGN §1); the names, checks and help texts derive from it.
METHOD_INFO: Mapping[str, Method] = MappingProxyType(
    {
        "multi-stage": Method(
            stages=("ft", "pt"),
            corpus_model="pt",
            help="⟨(F_pt + λI)⁻¹ (F_ft + αI)⁻¹ ∇ℓ(q, θ_ft), ∇ℓ(z, θ_pt)⟩, both stages' curvature",
        ),
        "single-stage": Method(
            stages=("ft",),
            corpus_model="ft",
            help="⟨(F_ft + λI)⁻¹ ∇ℓ(q, θ_ft), ∇ℓ(z, θ_ft)⟩, fine-tune curvature only",
        ),
        "gradient-dot": Method(
            stages=(),
            corpus_model="pt",
            help="⟨∇ℓ(q, θ_ft), ∇ℓ(z, θ_pt)⟩, plain gradient dot product without curvature",
        ),
    }
)
METHODS = tuple(METHOD_INFO)
STAGE_NAMES = {"ft": "fine-tune", "pt": "pre-train"}


@dataclass
class PreconditionedQueries(Artifact):
    """Per module dense W_q (Q, out, in') or low-rank U (Q,out,r), S (Q,r), V (Q,in',r)."""

    stem: ClassVar[str] = "queries"

    query_ids: list[str]
    method: str
    specs: dict[str, ModuleSpec] = module_specs()
    dense: dict[str, torch.Tensor] = per_module("W", optional=True)
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = per_module(
        "U", "S", "V", optional=True
    )
    rank: int | None = None
    damping: dict[str, dict[str, float]] = field(default_factory=dict)
    score_fingerprint: dict | None = None  # the model whose corpus gradients these pair with
    left_out: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        """Number of stacked queries."""
        return len(self.query_ids)

    def weight(self, name: str) -> torch.Tensor:
        """The dense (Q, out, in') matrix of a module, rebuilding it from U S Vᵀ if low-rank."""
        if name in self.dense:
            return self.dense[name]
        u, s, v = self.lowrank[name]
        return torch.einsum("qor,qr,qir->qoi", u, s, v)


def query_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    specs: dict[str, ModuleSpec],
    *,
    basis: Factors | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-query gradients of the completion loss, (Q, out, in') per module, true labels.

    With a basis they come in that stage's Kronecker eigenbasis, Q_Gᵀ ∇ℓ Q_A.
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in specs}
    if basis is not None:  # moved once, not per batch
        basis = basis.moved(model_device(model), work_dtype(next(model.parameters()).dtype))
    for hb in hooked_batches(model, batches, specs, progress=progress, desc="query gradients"):
        for spec, a, g in hb.modules():
            parts[spec.name].append(summed_gradients(spec, a, g, basis))
    if not parts or not next(iter(parts.values())):
        raise MsifError("no queries were given")
    return {k: torch.cat(v) for k, v in parts.items()}


def rotate_tokens_first(spec: ModuleSpec, tokens: int) -> bool:
    """Whether rotating every token's a and g costs less than rotating the summed gradient.

    A query's gradient Σ_t g_t a_tᵀ has rank ≤ tokens, so for short queries on wide modules
    T·(out·bs + in'²) multiply-adds beat out·in'·(bs + in').
    """
    o, i, bs = spec.out_features, spec.in_dim, spec.block_size
    return tokens * (o * bs + i * i) < o * i * (bs + i)


def summed_gradients(
    spec: ModuleSpec, a: torch.Tensor, g: torch.Tensor, basis: Factors | None, route: str = "auto"
) -> torch.Tensor:
    """Σ_t g_t a_tᵀ per sequence (B, out, in'), in basis's eigenbasis when one is given.

    route: "auto" (the cheaper), "tokens" (rotate a and g, then sum) or "sum" (the reverse).
    """
    if basis is None:
        return torch.bmm(g.mT, a)
    if route == "auto":
        route = "tokens" if rotate_tokens_first(spec, a.shape[1]) else "sum"
    if route == "tokens":
        q_a, q_g = basis.eigenvectors(spec.name, a)
        return torch.bmm(rotate_output(g, q_g).mT, a @ q_a)
    return basis.to_eigenbasis(spec.name, torch.bmm(g.mT, a))


def _common_specs(specs: dict[str, ModuleSpec], *factor_sets: Factors | None):
    kept, left_out = dict(specs), {}
    for f in factor_sets:
        if f is None:
            continue
        for name in list(kept):
            other = f.specs.get(name)
            if other is None:
                left_out[name] = f"not in the {f.stage} factors"
            elif other != kept[name]:
                left_out[name] = f"shape or blocks differ from the {f.stage} factors"
            else:
                continue
            del kept[name]
    if not kept:
        raise MismatchError("no module is present with equal shape in the model and factors")
    return kept, left_out


def precondition_queries(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    query_ids: Sequence[str],
    *,
    method: str = "multi-stage",
    ft_factors: Factors | None = None,
    pt_factors: Factors | None = None,
    alpha: float | None = DEFAULT_ALPHA,
    damping: Damping | None = None,
    rank: int | None = None,
    modules: ModuleSelection | None = None,
    progress: bool = False,
    refine: Refinement | None = None,
) -> PreconditionedQueries:
    """Gradients of the queries at θ_ft (model), preconditioned for the chosen method.

    multi-stage: (F_pt + λ_pt I)⁻¹ (F_ft + α I)⁻¹ ∇ℓ(q); single-stage: (F_ft + λ I)⁻¹ ∇ℓ(q);
    gradient-dot: ∇ℓ(q). α=None gives the fine-tune stage relative damping like λ_pt (worse on
    every fact world measured: a confident fine-tune's Λ_ft is tiny).

    refine: K > 0 conjugate-gradient steps toward each stage's exact damped Gauss–Newton
    system (msif.attribution.refine), on that stage's sample; K = 0 or None is EK-FAC alone,
    and gradient-dot, which applies no curvature, ignores it.
    """
    if method not in METHOD_INFO:
        raise MsifError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    recipe = METHOD_INFO[method]
    damping = damping or Damping()
    need = [{"ft": ft_factors, "pt": pt_factors}[s] for s in recipe.stages]
    if any(f is None for f in need):
        names = " and ".join(STAGE_NAMES[s] for s in recipe.stages)
        raise MsifError(f"method {method} needs {names} factors")
    if ft_factors is not None and ft_factors.stage != "ft":
        raise MismatchError(f"ft_factors hold {ft_factors.stage!r} factors")
    if pt_factors is not None and pt_factors.stage != "pt":
        raise MismatchError(f"pt_factors hold {pt_factors.stage!r} factors")
    if ft_factors is not None:
        # The fine-tune factors must come from this very model (θ_ft), all modules present.
        specs = ft_factors.specs
        fp = model_fingerprint(model, specs)
        check_fingerprint(ft_factors.fingerprint, fp, "the fine-tune factors")
    else:
        specs = find_modules(model, modules)
        fp = model_fingerprint(model, specs)
    if pt_factors is not None:
        _check_not_fine_tuned(model, pt_factors)
    specs, left_out = _common_specs(specs, *need)
    refining = refine is not None and refine.active and bool(recipe.stages)
    # Preconditioned queries start in the fine-tune eigenbasis, where (F_ft + αI)⁻¹ is diagonal;
    # refinement works in weight coordinates, where its Gauss–Newton products are taken.
    basis = ft_factors if recipe.stages and not refining else None
    grads = query_gradients(model, batches, specs, basis=basis, progress=progress)
    ids = list(query_ids)
    if len(ids) != next(iter(grads.values())).shape[0]:
        raise MsifError(f"{len(ids)} query ids for {next(iter(grads.values())).shape[0]} queries")
    out = PreconditionedQueries(ids, method, specs, rank=rank, left_out=left_out)
    out.damping = lambdas = _stage_damping(recipe, specs, ft_factors, pt_factors, damping, alpha)
    if refining:
        both = {"ft": ft_factors, "pt": pt_factors}
        refined, record = refine_queries(grads, specs, recipe.stages, both, lambdas, refine)
    for name in specs:
        if refining:
            w = refined[name]
        else:
            w = _ekfac_preconditioned(recipe, name, grads[name], ft_factors, pt_factors, lambdas)
        _check_finite_queries(name, w, ids)
        if rank:
            out.lowrank[name] = low_rank(w, rank)
        else:
            out.dense[name] = w
    out.score_fingerprint = _score_fingerprint(recipe, fp, specs, ft_factors, pt_factors)
    out.info = {
        "alpha": alpha,
        "damping_factor": damping.factor,
        "damping_absolute": damping.absolute,
    }
    if refining:
        out.info["refine"] = record
    return out


def _ekfac_preconditioned(recipe: Method, name: str, w, ft_factors, pt_factors, lambdas):
    """The stages' EK-FAC inverses applied to one module's gradients (in the ft eigenbasis)."""
    if "ft" in recipe.stages:
        w = ft_factors.divide(name, w, lambdas["ft"][name])
    if "pt" in recipe.stages:
        w = change_of_basis(ft_factors, pt_factors, name, w)
        w = pt_factors.divide(name, w, lambdas["pt"][name])
        return pt_factors.from_eigenbasis(name, w)
    if "ft" in recipe.stages:
        return ft_factors.from_eigenbasis(name, w)
    return w


def _stage_damping(recipe: Method, specs, ft_factors, pt_factors, damping, alpha) -> dict:
    """λ per stage and module: α (or the relative rule) for ft, the damping rule for pt."""
    out: dict[str, dict[str, float]] = {"ft": {}, "pt": {}}
    rule = Damping(damping.factor, alpha) if alpha is not None else damping
    for name in specs:
        if "ft" in recipe.stages:
            out["ft"][name] = ft_factors.damping_for(name, rule)
        if "pt" in recipe.stages:
            out["pt"][name] = pt_factors.damping_for(name, damping)
    return out


def _check_finite_queries(name: str, w: torch.Tensor, ids: Sequence[str]) -> None:
    # The query gradients were checked per batch; this catches what the inverses make of them.
    ok = torch.isfinite(w.reshape(w.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        q = int((~ok).nonzero()[0, 0])
        raise MsifError(
            f"non-finite preconditioned gradient (NaN or inf) of query {ids[q]!r} in module "
            f"{name!r}: the factors are not finite or the damping is too small"
        )


def _check_not_fine_tuned(model: nn.Module, pt_factors: Factors) -> None:
    # θ_pt = θ_ft over every tracked module means these are not pre-training factors: most
    # likely fine-tune factors relabelled, which would silently score the wrong curvature.
    if same_model(model_fingerprint(model, pt_factors.specs), pt_factors.fingerprint):
        raise MismatchError(
            "the pre-train factors were computed with the fine-tuned model's own weights "
            "(θ_pt = θ_ft on every tracked module): pass the factors of the pre-trained model"
        )


def _score_fingerprint(recipe: Method, query_fp, specs, ft_factors, pt_factors) -> dict:
    # Which model the corpus gradients must come from, and over which modules to check it.
    if recipe.corpus_model == "ft":
        return {**query_fp, "modules": [s.to_dict() for s in ft_factors.specs.values()]}
    if pt_factors is not None:
        return {
            **pt_factors.fingerprint,
            "modules": [s.to_dict() for s in pt_factors.specs.values()],
        }
    # θ_pt unknown here (gradient-dot without pre-train factors): the corpus model must at
    # least have this architecture and must not be the fine-tuned model itself.
    return {
        "architecture": query_fp["architecture"],
        "not_weights": query_fp["weights"],
        "modules": [s.to_dict() for s in specs.values()],
    }
