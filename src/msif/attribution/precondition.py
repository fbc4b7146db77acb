"""Query gradients at θ_ft, preconditioned by the stages' damped EK-FAC inverses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from msif.core.fingerprint import check_fingerprint, model_fingerprint
from msif.core.hooks import activations_and_gradients, capture, frozen
from msif.core.modules import ModuleSelection, ModuleSpec, find_modules
from msif.core.passes import gradient_pass, work_dtype
from msif.core.progress import progress_bar
from msif.ekfac.factors import Damping, Factors, change_of_basis
from msif.ekfac.lambdas import rotate_output
from msif.errors import MismatchError, MsifError

STEM = "queries"
METHODS = ("multi-stage", "single-stage", "gradient-dot")


@dataclass
class PreconditionedQueries:
    """Per module dense W_q (Q, out, in') or low-rank U (Q,out,r), S (Q,r), V (Q,in',r)."""

    query_ids: list[str]
    method: str
    specs: dict[str, ModuleSpec]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
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

    def save(self, directory: str | Path) -> None:
        """Write queries.safetensors + queries.json."""
        from msif.core.tensorfile import save_tensors

        tensors = {f"{k}.W": v for k, v in self.dense.items()}
        for k, (u, s, v) in self.lowrank.items():
            tensors.update({f"{k}.U": u, f"{k}.S": s, f"{k}.V": v})
        meta = {
            "query_ids": self.query_ids,
            "method": self.method,
            "rank": self.rank,
            "modules": [s.to_dict() for s in self.specs.values()],
            "damping": self.damping,
            "score_fingerprint": self.score_fingerprint,
            "left_out": self.left_out,
            "info": self.info,
        }
        save_tensors(directory, STEM, tensors, meta)

    @classmethod
    def load(cls, directory: str | Path) -> PreconditionedQueries:
        """Read preconditioned queries written by save."""
        from msif.core.tensorfile import load_tensors
        from msif.ekfac.covariance import specs_from_meta

        t, meta = load_tensors(directory, STEM)
        specs = specs_from_meta(meta)
        pq = cls(
            meta["query_ids"],
            meta["method"],
            specs,
            rank=meta["rank"],
            damping=meta["damping"],
            score_fingerprint=meta["score_fingerprint"],
            left_out=meta["left_out"],
            info=meta.get("info", {}),
        )
        for k in specs:
            if f"{k}.W" in t:
                pq.dense[k] = t[f"{k}.W"]
            elif f"{k}.U" in t:
                pq.lowrank[k] = (t[f"{k}.U"], t[f"{k}.S"], t[f"{k}.V"])
            else:
                raise MsifError(f"preconditioned queries in {directory} miss module {k!r}")
        return pq

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
    with frozen(model), capture(model, specs) as cap:
        for batch in progress_bar(batches, progress, "query gradients"):
            gradient_pass(model, batch, cap)
            for name, spec in specs.items():
                a, g = activations_and_gradients(cap, name)
                work = work_dtype(a.dtype)
                parts[name].append(summed_gradients(spec, a.to(work), g.to(work), basis))
        cap.clear()
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


def low_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD per query: U (Q,out,r), S (Q,r), V (Q,in',r)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, s.shape[-1])
    return u[..., :r].contiguous(), s[..., :r].contiguous(), vh[..., :r, :].mT.contiguous()


def precondition_queries(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    query_ids: Sequence[str],
    *,
    method: str = "multi-stage",
    ft_factors: Factors | None = None,
    pt_factors: Factors | None = None,
    alpha: float | None = None,
    damping: Damping | None = None,
    rank: int | None = None,
    modules: ModuleSelection | None = None,
    progress: bool = False,
) -> PreconditionedQueries:
    """Gradients of the queries at θ_ft (model), preconditioned for the chosen method.

    multi-stage: (F_pt + λ_pt I)⁻¹ (F_ft + α I)⁻¹ ∇ℓ(q); single-stage: (F_ft + λ I)⁻¹ ∇ℓ(q);
    gradient-dot: ∇ℓ(q). α=None gives the fine-tune stage relative damping like λ_pt.
    """
    if method not in METHODS:
        raise MsifError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    damping = damping or Damping()
    need = {
        "multi-stage": (ft_factors, pt_factors),
        "single-stage": (ft_factors,),
        "gradient-dot": (),
    }[method]
    if any(f is None for f in need):
        raise MsifError(
            f"method {method} needs "
            + " and ".join(("fine-tune", "pre-train")[: len(need)])
            + " factors"
        )
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
    specs, left_out = _common_specs(specs, *need)
    # Preconditioned queries start in the fine-tune eigenbasis, where (F_ft + αI)⁻¹ is diagonal.
    basis = ft_factors if method != "gradient-dot" else None
    grads = query_gradients(model, batches, specs, basis=basis, progress=progress)
    ids = list(query_ids)
    if len(ids) != next(iter(grads.values())).shape[0]:
        raise MsifError(f"{len(ids)} query ids for {next(iter(grads.values())).shape[0]} queries")
    out = PreconditionedQueries(ids, method, specs, rank=rank, left_out=left_out)
    out.damping = {"ft": {}, "pt": {}}
    for name in specs:
        w = grads[name]
        if method in ("multi-stage", "single-stage"):
            rule = Damping(damping.factor, alpha) if alpha is not None else damping
            lam = ft_factors.damping_for(name, rule)
            out.damping["ft"][name] = lam
            w = ft_factors.divide(name, w, lam)
        if method == "multi-stage":
            lam = pt_factors.damping_for(name, damping)
            out.damping["pt"][name] = lam
            w = change_of_basis(ft_factors, pt_factors, name, w)
            w = pt_factors.from_eigenbasis(name, pt_factors.divide(name, w, lam))
        elif method == "single-stage":
            w = ft_factors.from_eigenbasis(name, w)
        if rank:
            out.lowrank[name] = low_rank(w, rank)
        else:
            out.dense[name] = w
    out.score_fingerprint = _score_fingerprint(method, fp, ft_factors, pt_factors)
    out.info = {
        "alpha": alpha,
        "damping_factor": damping.factor,
        "damping_absolute": damping.absolute,
    }
    return out


def _score_fingerprint(method, query_fp, ft_factors, pt_factors) -> dict | None:
    # Which model the corpus gradients must come from, and over which modules to check it.
    if method == "single-stage":
        return {**query_fp, "modules": [s.to_dict() for s in ft_factors.specs.values()]}
    if method == "multi-stage":
        return {
            **pt_factors.fingerprint,
            "modules": [s.to_dict() for s in pt_factors.specs.values()],
        }
    return None
