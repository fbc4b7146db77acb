"""The projected tier of the corpus index: a fixed number of values per document, any model.

Each document's gradient of a module, in the pre-train Kronecker eigenbasis and whitened
(X = D_G^-p Q_Gᵀ DW_z Q_A D_A^-p, D_G d_Aᵀ a rank-1 fit of Λ + λ as in the factored tier),
keeps its top-r singular triplets, and of each triplet only the k_out entries of u and the
k_in entries of v largest in magnitude, as (value, int32 index) pairs. The budget is split
over modules by their expected share, Σ Λ / (Λ + λ)^2p. A query is rotated into the same
basis and read on each triplet's k_out × k_in grid, so a score is a sparse bilinear form.

Why sparse factors: k_out + k_in stored pairs stand for k_out·k_in coordinates of a
nearly low-rank gradient, so at 4096 values per document they carry far more of it than the
same number of single coordinates (multi-stage Spearman 0.77–0.85 against 0.58 for the top
coordinates and 0.21 for a whitened Gaussian sketch on the fact world; benchmarks/RESULTS.md).
Multi-stage queries reach the corpus through (F_pt + λI)⁻¹, which makes them too
ill-conditioned for a random sketch at these sizes. It is deterministic (no seed) and biased
toward zero, which a ranking does not mind; the exact rerank removes it. With r at the
gradient's rank and every entry kept it is exact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from msif.core.artifact import Artifact, module_specs, per_module
from msif.core.fingerprint import model_fingerprint
from msif.core.hooks import hooked_batches
from msif.core.modules import ModuleSpec
from msif.errors import MismatchError, MsifError
from msif.index.factored import (
    Metric,
    batch_doc_ids,
    collect_into,
    eigenbasis_factors,
    on_model_device,
    pt_metric,
)

TIER = "projected"


def module_budgets(
    lambdas: Mapping[str, torch.Tensor],
    damping: Mapping[str, float],
    total: int,
    power: float,
    capacity: Mapping[str, int],
    least: int = 1,
) -> dict[str, int]:
    """Pairs per module (at least `least`, at most its capacity), summing to total or to the
    whole capacity, split by each module's expected share Σ Λ / (Λ + λ)^2p."""
    if total < least * len(lambdas):
        raise MsifError(
            f"the projected tier needs at least {2 * least} values per module "
            f"({2 * least * len(lambdas)} for these {len(lambdas)} modules)"
        )
    share = {
        n: float((lam.double() / (lam.double() + damping[n]) ** (2 * power)).sum())
        for n, lam in lambdas.items()
    }
    whole = sum(share.values()) or 1.0
    budget = {n: max(least, min(capacity[n], int(total * s / whole))) for n, s in share.items()}
    for n in sorted(share, key=share.get, reverse=True):  # the rounding's remainder
        spare = total - sum(budget.values())
        if spare <= 0:
            break
        budget[n] += min(spare, capacity[n] - budget[n])
    return budget


@dataclass(frozen=True)
class Layout:
    """How one module's pairs are spent: rank triplets of k_out entries of u and k_in of v."""

    rank: int
    k_out: int
    k_in: int

    @property
    def pairs(self) -> int:
        """(value, index) pairs per document."""
        return self.rank * (self.k_out + self.k_in)


def module_layout(spec: ModuleSpec, pairs: int, rank: int) -> Layout:
    """Split pairs over min(rank, pairs/2) triplets; u and v in proportion to √out : √in',
    the split that keeps the most of a triplet whose entries spread evenly over both."""
    o, i = spec.out_features, spec.in_dim
    r = max(1, min(rank, o, i, pairs // 2))
    per = pairs // r
    k_out = min(o, max(1, round(per * math.sqrt(o) / (math.sqrt(o) + math.sqrt(i)))))
    k_in = min(i, max(1, per - k_out))
    k_out = min(o, max(k_out, per - k_in))  # what v could not take, u gets
    return Layout(r, k_out, k_in)


def layouts(factors, values: int, rank: int, power: float, damping) -> dict[str, Layout]:
    """Per module of the pre-train factors its layout for values numbers per document."""
    specs = factors.specs
    capacity = {
        n: min(rank, s.out_features, s.in_dim) * (s.out_features + s.in_dim)
        for n, s in specs.items()
    }
    budgets = module_budgets(factors.lambdas, damping, max(1, values // 2), power, capacity, 2)
    return {n: module_layout(specs[n], budgets[n], rank) for n in specs}


def document_sparse_factors(
    a: torch.Tensor, g: torch.Tensor, metric: Metric, layout: Layout
) -> tuple[torch.Tensor, ...]:
    """Per sequence its whitened eigenbasis triplets, each cut to its largest entries.

    a (B, T, in'), g (B, T, out); returns u values and int32 indices (B, r, k_out) and v
    values and indices (B, r, k_in) in (unwhitened) eigenbasis coordinates, s folded into u:
    Σ_k u_k v_kᵀ on those grids approximates Q_Gᵀ DW Q_A.
    """
    u, s, v, sg, sa = eigenbasis_factors(a, g, layout.rank, metric)
    iu = u.abs().topk(layout.k_out, dim=-1).indices
    iv = v.abs().topk(layout.k_in, dim=-1).indices
    u_vals = (u * sg * s[..., None]).gather(-1, iu)
    v_vals = (v * sa).gather(-1, iv)
    return u_vals, iu.to(torch.int32), v_vals, iv.to(torch.int32)


@dataclass
class ProjectedIndex(Artifact):
    """One corpus shard's documents as per-module sparse factors in the pt eigenbasis:
    u values and indices (N, r, k_out), v values and indices (N, r, k_in)."""

    stem: ClassVar[str] = "projected_index"

    doc_ids: list[str]
    power: float
    rank: int
    eigenbasis: str  # msif.ekfac.lambdas.eigenbasis_id of the pre-train factors
    specs: dict[str, ModuleSpec] = module_specs()
    factors: dict[str, tuple[torch.Tensor, ...]] = per_module("u", "u_index", "v", "v_index")
    damping: dict[str, float] = field(default_factory=dict)
    tier: str = TIER
    model_fingerprint: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_docs(self) -> int:
        """Number of documents in this shard."""
        return len(self.doc_ids)

    def values_per_document(self) -> int:
        """Stored numbers per document: a value and an index per kept entry."""
        return 2 * sum(
            u.shape[1] * (u.shape[2] + v.shape[2]) for u, _, v, _ in self.factors.values()
        )


def build_projected_index(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    factors,
    values: int,
    power: float,
    damping: Mapping[str, float],
    *,
    rank: int = 4,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ProjectedIndex:
    """Keep about `values` numbers per document (a value and an index per entry), at model:
    up to rank triplets per module, truncated in the (Λ + λ)^-p whitened norm."""
    from msif.ekfac.lambdas import eigenbasis_id

    specs = factors.specs
    plan = layouts(factors, values, rank, power, damping)
    metrics = {n: pt_metric(factors, n, damping[n], power) for n in specs}
    metrics = on_model_device(metrics, model)
    doc_ids: list[str] = []
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {n: [] for n in specs}
    # lag 0: the SVDs synchronise per batch anyway, and a/g are checked before they run.
    for hb in hooked_batches(model, batches, specs, progress=progress, desc="index", lag=0):
        doc_ids += batch_doc_ids(hb.batch, len(doc_ids))
        for spec, a, g in hb.modules():
            uv = document_sparse_factors(a, g, metrics[spec.name], plan[spec.name])
            stored = (x.to(dtype) if x.is_floating_point() else x for x in uv)
            hb.defer(collect_into(parts[spec.name]), *stored)
    stored = {}
    for name, chunks in parts.items():
        lay = plan[name]
        if chunks:
            stored[name] = tuple(torch.cat([c[j] for c in chunks]) for j in range(4))
        else:
            shapes = [(0, lay.rank, lay.k_out)] * 2 + [(0, lay.rank, lay.k_in)] * 2
            kinds = [dtype, torch.int32, dtype, torch.int32]
            stored[name] = tuple(
                torch.zeros(s, dtype=k) for s, k in zip(shapes, kinds, strict=True)
            )
    return ProjectedIndex(
        doc_ids=doc_ids,
        power=power,
        rank=rank,
        eigenbasis=eigenbasis_id(factors),
        specs=dict(specs),
        factors=stored,
        damping=dict(damping),
        model_fingerprint=model_fingerprint(model, specs),
    )


def check_factors(index: ProjectedIndex, factors, where: str, basis: str | None = None) -> None:
    """Refuse pre-train factors other than those the index was built in; basis: their
    eigenbasis_id when already computed (it hashes every eigenvector)."""
    from msif.ekfac.lambdas import eigenbasis_id

    if (basis or eigenbasis_id(factors)) != index.eigenbasis:
        raise MismatchError(f"{where} was built in another pre-train eigenbasis than these factors")


def rotated_queries(
    queries, factors, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Per module the queries in the pre-train eigenbasis, one row per coordinate: (out·in', Q)
    (row-major, so that a document's cells are read as whole rows); dtype: that of the
    rotation, float32 for a float32 index (half the cost of the fixed part of a lookup)."""
    out = {}
    for name in queries.specs:
        w = factors.to_eigenbasis(name, queries.weight(name).to(dtype))
        out[name] = w.reshape(w.shape[0], -1).T.contiguous()
    return out


def work_dtype(index: ProjectedIndex) -> torch.dtype:
    """The dtype a lookup of this index computes in: float64 only for a float64 index."""
    first = next(iter(index.factors.values()))[0]
    return torch.float64 if first.dtype == torch.float64 else torch.float32


def projected_module_scores(
    rotated: torch.Tensor, index: ProjectedIndex, name: str, chunk_elements: int
) -> torch.Tensor:
    """Scores (Q, N) of one module: each document's triplets Σ_k u_kᵀ W̃_q v_k, i.e. a sparse
    row of u_k ⊗ v_k on each triplet's k_out × k_in grid times the rotated queries (out·in', Q),
    one CSR matmul per chunk of documents (7× a gather of the same cells), in float32 unless
    the index is float64."""
    u, iu, v, iv = index.factors[name]
    width = index.specs[name].in_dim
    work = work_dtype(index)
    w = rotated.to(work)
    q = w.shape[1]
    n, r, ko = u.shape
    ki = v.shape[2]
    step = max(1, chunk_elements // max(1, r * (ko * ki + q)))
    out = []
    for s in range(0, n, step):
        # One CSR row per (document, triplet): with both index lists ascending the row's
        # columns i_u·in' + i_v come out sorted and distinct, as CSR wants, without a sort
        # of the k_out·k_in cells.
        su, pu = iu[s : s + step].long().sort(dim=-1)
        sv, pv = iv[s : s + step].long().sort(dim=-1)
        uu = u[s : s + step].to(work).gather(-1, pu)
        vv = v[s : s + step].to(work).gather(-1, pv)
        cols = (su[..., :, None] * width + sv[..., None, :]).reshape(-1)
        vals = (uu[..., :, None] * vv[..., None, :]).reshape(-1)
        m = su.shape[0] * r
        rows = torch.arange(0, m * ko * ki + 1, ko * ki, dtype=torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
            sparse = torch.sparse_csr_tensor(
                rows, cols, vals, (m, w.shape[0]), check_invariants=False
            )
            per_triplet = sparse @ w  # (m, Q)
        out.append(per_triplet.reshape(-1, r, q).sum(1).T.double())
    return torch.cat(out, dim=1) if out else torch.zeros(q, 0, dtype=torch.float64)
